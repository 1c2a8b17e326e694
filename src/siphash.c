/*
 * SipHash with a 128-bit output (Aumasson and Bernstein), written from the
 * paper. Keys are digested with SipHash-1-3, the variant CPython and Rust
 * use for hash-flooding resistance; SipHash-2-4 shares the code so that the
 * reference test vectors can check it.
 */
#include <string.h>

#include "tally-internal.h"

static inline uint64_t rotl(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#define SIPROUND                                                              \
    do {                                                                      \
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);             \
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2;                                \
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0;                                \
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);             \
    } while (0)

static inline tally__digest siphash128(const uint8_t key[16], const void *data, size_t len,
                                       int c_rounds, int d_rounds)
{
    const uint8_t *in = data;
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
    uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575);
    uint64_t v1 = k1 ^ UINT64_C(0x646f72616e646f6d) ^ 0xee;
    uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261);
    uint64_t v3 = k1 ^ UINT64_C(0x7465646279746573);
    size_t full = len & ~(size_t)7;

    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = load_le64(in + i);
        v3 ^= m;
        for (int r = 0; r < c_rounds; r++)
            SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t i = 0; i < (len & 7); i++)
        b |= (uint64_t)in[full + i] << (8 * i);
    v3 ^= b;
    for (int r = 0; r < c_rounds; r++)
        SIPROUND;
    v0 ^= b;

    tally__digest d;
    v2 ^= 0xee;
    for (int r = 0; r < d_rounds; r++)
        SIPROUND;
    d.lo = v0 ^ v1 ^ v2 ^ v3;
    v1 ^= 0xdd;
    for (int r = 0; r < d_rounds; r++)
        SIPROUND;
    d.hi = v0 ^ v1 ^ v2 ^ v3;
    return d;
}

tally__digest tally__siphash128(const uint8_t key[16], const void *data, size_t len)
{
    return siphash128(key, data, len, 1, 3);
}

tally__digest tally__siphash24_128(const uint8_t key[16], const void *data, size_t len)
{
    return siphash128(key, data, len, 2, 4);
}
