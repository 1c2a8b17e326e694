/*
 * The AES hash: a keyed 128-bit hash built from AES rounds, for CPUs with
 * AES-NI. It names keys as SipHash-1-3 does (core/hash.h), in about a
 * quarter of the instructions for keys of 16 to 40 bytes, so that digests
 * of independent keys overlap in the pipeline. One digest alone is a chain
 * of fourteen dependent AES rounds, which on some CPUs takes longer than
 * SipHash-1-3's chain.
 *
 * Definition. K is the 16-byte secret, E_K AES-128 encryption (FIPS-197)
 * under it, and R(x, k) = MixColumns(ShiftRows(SubBytes(x))) ^ k one AES
 * round (the AESENC instruction). From K:
 *   k_0..k_10  the AES-128 key schedule of K (used by E_K alone);
 *   r_j = E_K(<1 + j>), c_j = E_K(<5 + j>) for j = 0..3, where <i> is the
 *   block whose first byte is i and whose other bytes are zero.
 * The message of len bytes is cut into n = ceil(len / 16) blocks M_0..M_{n-1},
 * the last one padded with zero bytes. Four lanes start at A_j = c_j; block
 * M_i goes to lane i mod 4:
 *   A <- R(R(R(R(A ^ M_i, r_0), r_1), r_2), r_3)
 * The lanes that took a block (the first min(n, 4)) are XORed together with
 * L, the block holding len as a little-endian 64-bit number in its first
 * eight bytes, and the digest is E_K of the result: lo is its first eight
 * bytes, hi its last eight, both little-endian.
 *
 * Why. Distinct messages get unrelated digests as long as they do not meet
 * in the value S that E_K encrypts: E_K is a pseudorandom permutation, so
 * digests of distinct S look independent and random, and a digest read from
 * Redis tells nothing of S, of the lanes or of the subkeys. Meeting in S is
 * what an attacker without K has to bring about blind, since no digest shows
 * S. The subkeys r_j and c_j are AES outputs, as good as independent
 * random keys while AES is a good cipher, and K cannot be computed back from
 * them. Every block goes through four rounds whose S-box layers each follow
 * a secret key addition (the lane state, then r_0..r_2): the construction of
 * Pelican and ALRED (Daemen and Rijmen), where two messages that differ in a
 * block collide only through a 4-round AES differential, whose expected
 * probability over independent round keys is below 2^-113 (Keliher and
 * Sui). The lanes start from distinct secret states, so blocks swapped
 * between lanes change the inputs of every round they go through; blocks in
 * one lane are chained, so their order matters. Messages whose padded blocks
 * are equal differ in len, so their S differ by L ^ L', and E_K is a
 * permutation: "a" and "a\0", or any two lengths of zeros, never collide.
 * Independent lanes run in parallel: up to 64 bytes cost four rounds of
 * latency and then E_K.
 *
 * Limits. SipHash was designed and has been analysed for years as a
 * pseudorandom function; this hash has no such standing, and nothing here
 * is a proof: the differential bound is for independent uniform round keys,
 * while here four fixed round keys serve every block, and the argument holds
 * only as long as reduced-round AES shows no better structure than known. Chained 4-round
 * designs have known attacks that need observed outputs of about 2^64 chosen
 * messages or more (internal collisions, then state recovery: Dunkelman,
 * Keller and Shamir, "ALRED blues"), far beyond what anyone sending keys to a
 * rate limiter sees. As with any 128-bit digest, chance collisions come after
 * about 2^63 distinct keys (an engine keeps 126 bits). SipHash stays the
 * choice for every CPU (TALLY_HASH_SIPHASH in tally.h).
 */
#include <string.h>

#include "core/hash.h"

#if TALLY__HAVE_AESHASH

#include <immintrin.h>

#define AES __attribute__((target("aes,sse4.1")))
/* The helpers are the hash's own lines: a call would spill the lanes. */
#define AES_INLINE AES __attribute__((always_inline)) static inline

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

AES_INLINE __m128i loadu(const uint8_t *p)
{
    return _mm_loadu_si128((const __m128i *)(const void *)p);
}

/* The 1..15 bytes of a message shorter than a block, zero-padded, read with
   word loads that stay within them (the SipHash tail's overlapping loads). */
AES_INLINE __m128i load_short(const uint8_t *p, size_t n)
{
    uint64_t lo;
    if (n > 8) {
        uint64_t hi = load64(p + n - 8) >> (8 * (16 - n));
        return _mm_insert_epi64(_mm_cvtsi64_si128((long long)load64(p)), (long long)hi, 1);
    }
    if (n >= 4)
        lo = load32(p) | (load32(p + n - 4) << (8 * (n - 4)));
    else
        lo = (uint64_t)p[0] | ((uint64_t)p[n >> 1] << (8 * (n >> 1)))
             | ((uint64_t)p[n - 1] << (8 * (n - 1)));
    return _mm_cvtsi64_si128((long long)lo);
}

/* pshufb controls: 16 bytes from SHIFT + 16 - t move the last t bytes of a
   block to its start and zero the rest (bit 7 set: zero). */
static const int8_t SHIFT[32] = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    -128, -128, -128, -128, -128, -128, -128, -128,
    -128, -128, -128, -128, -128, -128, -128, -128,
};

/* The last t (1..16) bytes before @end, zero-padded: one load of the 16
   bytes before @end (the message has that many) and a shuffle. */
AES_INLINE __m128i load_tail(const uint8_t *end, size_t t)
{
    __m128i ctl = _mm_loadu_si128((const __m128i *)(const void *)(SHIFT + 16 - t));
    return _mm_shuffle_epi8(loadu(end - 16), ctl);
}

/* One block into a lane: the four keyed rounds. */
AES_INLINE __m128i absorb(__m128i a, __m128i m, const __m128i r[4])
{
    a = _mm_aesenc_si128(_mm_xor_si128(a, m), r[0]);
    a = _mm_aesenc_si128(a, r[1]);
    a = _mm_aesenc_si128(a, r[2]);
    return _mm_aesenc_si128(a, r[3]);
}

/* The blocks of the last 1..64 bytes at @p, block i into lane a[i]; the
   message has 16 bytes before p + n. Return the XOR of every lane (@all)
   or of the lanes these blocks reached. */
AES_INLINE __m128i last_group(const __m128i a[4], bool all, const uint8_t *p, size_t n,
                              const __m128i r[4])
{
    const uint8_t *end = p + n;
    __m128i x;
    if (n <= 16)
        return _mm_xor_si128(absorb(a[0], load_tail(end, n), r),
                             all ? _mm_xor_si128(_mm_xor_si128(a[1], a[2]), a[3]) : _mm_setzero_si128());
    x = absorb(a[0], loadu(p), r);
    if (n <= 32)
        return _mm_xor_si128(_mm_xor_si128(x, absorb(a[1], load_tail(end, n - 16), r)),
                             all ? _mm_xor_si128(a[2], a[3]) : _mm_setzero_si128());
    x = _mm_xor_si128(x, absorb(a[1], loadu(p + 16), r));
    if (n <= 48)
        return _mm_xor_si128(_mm_xor_si128(x, absorb(a[2], load_tail(end, n - 32), r)),
                             all ? a[3] : _mm_setzero_si128());
    x = _mm_xor_si128(x, absorb(a[2], loadu(p + 32), r));
    return _mm_xor_si128(x, absorb(a[3], load_tail(end, n - 48), r));
}

/* E_K after its first key addition, the rounds written out: a loop would
   cost a compare and a branch a round. */
AES_INLINE __m128i rounds(__m128i s, const __m128i k[11])
{
    s = _mm_aesenc_si128(s, k[1]);
    s = _mm_aesenc_si128(s, k[2]);
    s = _mm_aesenc_si128(s, k[3]);
    s = _mm_aesenc_si128(s, k[4]);
    s = _mm_aesenc_si128(s, k[5]);
    s = _mm_aesenc_si128(s, k[6]);
    s = _mm_aesenc_si128(s, k[7]);
    s = _mm_aesenc_si128(s, k[8]);
    s = _mm_aesenc_si128(s, k[9]);
    return _mm_aesenclast_si128(s, k[10]);
}

AES_INLINE __m128i encrypt(__m128i s, const __m128i k[11])
{
    return rounds(_mm_xor_si128(s, k[0]), k);
}

AES tally__digest tally__aeshash128_x(const tally__aeskey *key, const void *data, size_t len)
{
    const __m128i *k = (const __m128i *)(const void *)key->k;
    const __m128i *r = (const __m128i *)(const void *)key->r;
    const __m128i *c = (const __m128i *)(const void *)key->c;
    const uint8_t *p = data;
    /* L ^ k_0 first, off the path through the lanes */
    __m128i s = _mm_xor_si128(_mm_cvtsi64_si128((long long)len), k[0]);

    if (len > 64) {
        __m128i a[4] = { c[0], c[1], c[2], c[3] };
        size_t left = len;
        do {
            a[0] = absorb(a[0], loadu(p), r);
            a[1] = absorb(a[1], loadu(p + 16), r);
            a[2] = absorb(a[2], loadu(p + 32), r);
            a[3] = absorb(a[3], loadu(p + 48), r);
            p += 64;
            left -= 64;
        } while (left > 64);
        s = _mm_xor_si128(s, last_group(a, true, p, left, r));
    } else if (len >= 16) {
        s = _mm_xor_si128(s, last_group(c, false, p, len, r));
    } else if (len) {
        s = _mm_xor_si128(s, absorb(c[0], load_short(p, len), r));
    }
    s = rounds(s, k);
    tally__digest d = { (uint64_t)_mm_cvtsi128_si64(s), (uint64_t)_mm_extract_epi64(s, 1) };
    return d;
}

/* One step of the AES-128 key schedule; @rcon must be a constant. */
#define EXPAND(k, rcon)                                                       \
    do {                                                                      \
        __m128i t_ = _mm_shuffle_epi32(_mm_aeskeygenassist_si128(k, rcon), 0xff); \
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));                           \
        k = _mm_xor_si128(k, _mm_slli_si128(k, 8));                           \
        k = _mm_xor_si128(k, t_);                                             \
    } while (0)

AES void tally__aeshash_expand(tally__aeskey *out, const uint8_t key[16])
{
    __m128i *k = (__m128i *)(void *)out->k;
    __m128i w = loadu(key);
    k[0] = w;
    EXPAND(w, 0x01); k[1] = w;
    EXPAND(w, 0x02); k[2] = w;
    EXPAND(w, 0x04); k[3] = w;
    EXPAND(w, 0x08); k[4] = w;
    EXPAND(w, 0x10); k[5] = w;
    EXPAND(w, 0x20); k[6] = w;
    EXPAND(w, 0x40); k[7] = w;
    EXPAND(w, 0x80); k[8] = w;
    EXPAND(w, 0x1b); k[9] = w;
    EXPAND(w, 0x36); k[10] = w;
    for (int j = 0; j < 4; j++) {
        __m128i rj = encrypt(_mm_cvtsi32_si128(1 + j), k);
        __m128i cj = encrypt(_mm_cvtsi32_si128(5 + j), k);
        memcpy(out->r[j], &rj, 16);
        memcpy(out->c[j], &cj, 16);
    }
}

tally__digest tally__aeshash128(const uint8_t key[16], const void *data, size_t len)
{
    tally__aeskey k;
    tally__aeshash_expand(&k, key);
    return tally__aeshash128_x(&k, data, len);
}

bool tally__aeshash_supported(void)
{
    __builtin_cpu_init();   /* the CPU model may not be read yet when called from a constructor */
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse4.1");
}

#else

bool tally__aeshash_supported(void)
{
    return false;
}

#endif /* TALLY__HAVE_AESHASH */

int tally__hasher_init(tally__hasher *h, tally_hash kind, const uint8_t key[16])
{
    bool aes = tally__aeshash_supported();
    if (kind == TALLY_HASH_AUTO)
        kind = aes ? TALLY_HASH_AES : TALLY_HASH_SIPHASH;
    if (kind != TALLY_HASH_SIPHASH && (kind != TALLY_HASH_AES || !aes))
        return TALLY_EINVAL;
    memset(h, 0, sizeof(*h));
    h->kind = kind;
    memcpy(h->sip, key, 16);
#if TALLY__HAVE_AESHASH
    if (kind == TALLY_HASH_AES)
        tally__aeshash_expand(&h->aes, key);
#endif
    return 0;
}
