/*
 * SipHash with a 128-bit output (Aumasson and Bernstein), written from the
 * paper. Keys are digested with SipHash-1-3, the variant CPython and Rust
 * use for hash-flooding resistance; SipHash-2-4 shares the code so that the
 * reference test vectors can check it.
 */
#include <errno.h>
#include <string.h>
#include <sys/random.h>

#include "core/hash.h"
#include "tally.h"

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

static inline uint64_t load_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* The last len % 8 bytes, little-endian, with word loads instead of a byte loop. */
static inline uint64_t load_tail(const uint8_t *in, size_t len)
{
    size_t left = len & 7;
    const uint8_t *p = in + (len - left);

    if (left == 0)
        return 0;
    if (len >= 8)                             /* one load ending at the last byte */
        return load_le64(in + len - 8) >> (8 * (8 - left));
    if (left >= 4)                            /* two overlapping 4-byte loads */
        return load_le32(p) | (load_le32(p + left - 4) << (8 * (left - 4)));
    return (uint64_t)p[0] | ((uint64_t)p[left >> 1] << (8 * (left >> 1)))
           | ((uint64_t)p[left - 1] << (8 * (left - 1)));
}

#define ROUNDS_1 SIPROUND
#define ROUNDS_2 SIPROUND; SIPROUND
#define ROUNDS_3 SIPROUND; SIPROUND; SIPROUND
#define ROUNDS_4 SIPROUND; SIPROUND; SIPROUND; SIPROUND

/* SipHash-c-d with a 128-bit output; C and D are ROUNDS_n macros. */
#define SIPHASH128(C, D)                                                      \
    const uint8_t *in = data;                                                 \
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);                    \
    uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575);                          \
    uint64_t v1 = k1 ^ UINT64_C(0x646f72616e646f6d) ^ 0xee;                   \
    uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261);                          \
    uint64_t v3 = k1 ^ UINT64_C(0x7465646279746573);                          \
    size_t full = len & ~(size_t)7;                                           \
    for (size_t i = 0; i < full; i += 8) {                                    \
        uint64_t m = load_le64(in + i);                                       \
        v3 ^= m;                                                              \
        C;                                                                    \
        v0 ^= m;                                                              \
    }                                                                         \
    uint64_t b = ((uint64_t)len << 56) | load_tail(in, len);                  \
    v3 ^= b;                                                                  \
    C;                                                                        \
    v0 ^= b;                                                                  \
    tally__digest d;                                                          \
    v2 ^= 0xee;                                                               \
    D;                                                                        \
    d.lo = v0 ^ v1 ^ v2 ^ v3;                                                 \
    v1 ^= 0xdd;                                                               \
    D;                                                                        \
    d.hi = v0 ^ v1 ^ v2 ^ v3;                                                 \
    return d

tally__digest tally__siphash128(const uint8_t key[16], const void *data, size_t len)
{
    SIPHASH128(ROUNDS_1, ROUNDS_3);
}

tally__digest tally__siphash24_128(const uint8_t key[16], const void *data, size_t len)
{
    SIPHASH128(ROUNDS_2, ROUNDS_4);
}

int tally__hash_key_fill(uint8_t key[16])
{
    size_t got = 0;
    if (!tally__all_zero(key, 16))
        return 0;
    while (got < 16) {
        ssize_t n = getrandom(key + got, 16 - got, 0);
        if (n < 0 && errno != EINTR)
            return TALLY_ENOMEM;
        got += n > 0 ? (size_t)n : 0;
    }
    return 0;
}
