/*
 * Unit tests of the key hashes (src/core/siphash.c, src/core/aeshash.c) and
 * of the engine's choice between them (tally_options.hash).
 *
 * SipHash-2-4 with a 128-bit output is checked against the reference test
 * vectors (vectors_sip128 in vectors.h of the reference implementation,
 * github.com/veorq/SipHash): key 00 01 .. 0f, message 00 01 .. (len-1).
 * The digest's 16 bytes are lo little-endian, then hi little-endian.
 *
 * SipHash-1-3 (the key digest) has no published 128-bit vectors; it shares
 * all its code with 2-4 except the round counts, so it is checked through
 * properties: determinism, key dependence, avalanche, and no collisions on
 * structured inputs.
 *
 * The AES hash is recomputed here from its definition (the comment at the
 * top of aeshash.c) with a byte-wise AES-128 written from FIPS-197, which is
 * itself checked against the standard's examples first; known answers
 * computed once with it pin the definition. Then the same properties.
 */
#include "test.h"   /* Criterion, or tests/harness.h under TSan */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine-internal.h"
#include "tally/ops.h"

/* vectors_sip128[0..17]: lengths 0..17 cover the empty message, every tail
   length, one and two full 8-byte blocks, and blocks followed by a tail. */
static const uint8_t SIP128_VECTORS[18][16] = {
    { 0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55, 0x02, 0x93 },
    { 0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22, 0xfc, 0x45 },
    { 0x81, 0x77, 0x22, 0x8d, 0xa4, 0xa4, 0x5d, 0xc7, 0xfc, 0xa3, 0x8b, 0xde, 0xf6, 0x0a, 0xff, 0xe4 },
    { 0x9c, 0x70, 0xb6, 0x0c, 0x52, 0x67, 0xa9, 0x4e, 0x5f, 0x33, 0xb6, 0xb0, 0x29, 0x85, 0xed, 0x51 },
    { 0xf8, 0x81, 0x64, 0xc1, 0x2d, 0x9c, 0x8f, 0xaf, 0x7d, 0x0f, 0x6e, 0x7c, 0x7b, 0xcd, 0x55, 0x79 },
    { 0x13, 0x68, 0x87, 0x59, 0x80, 0x77, 0x6f, 0x88, 0x54, 0x52, 0x7a, 0x07, 0x69, 0x0e, 0x96, 0x27 },
    { 0x14, 0xee, 0xca, 0x33, 0x8b, 0x20, 0x86, 0x13, 0x48, 0x5e, 0xa0, 0x30, 0x8f, 0xd7, 0xa1, 0x5e },
    { 0xa1, 0xf1, 0xeb, 0xbe, 0xd8, 0xdb, 0xc1, 0x53, 0xc0, 0xb8, 0x4a, 0xa6, 0x1f, 0xf0, 0x82, 0x39 },
    { 0x3b, 0x62, 0xa9, 0xba, 0x62, 0x58, 0xf5, 0x61, 0x0f, 0x83, 0xe2, 0x64, 0xf3, 0x14, 0x97, 0xb4 },
    { 0x26, 0x44, 0x99, 0x06, 0x0a, 0xd9, 0xba, 0xab, 0xc4, 0x7f, 0x8b, 0x02, 0xbb, 0x6d, 0x71, 0xed },
    { 0x00, 0x11, 0x0d, 0xc3, 0x78, 0x14, 0x69, 0x56, 0xc9, 0x54, 0x47, 0xd3, 0xf3, 0xd0, 0xfb, 0xba },
    { 0x01, 0x51, 0xc5, 0x68, 0x38, 0x6b, 0x66, 0x77, 0xa2, 0xb4, 0xdc, 0x6f, 0x81, 0xe5, 0xdc, 0x18 },
    { 0xd6, 0x26, 0xb2, 0x66, 0x90, 0x5e, 0xf3, 0x58, 0x82, 0x63, 0x4d, 0xf6, 0x85, 0x32, 0xc1, 0x25 },
    { 0x98, 0x69, 0xe2, 0x47, 0xe9, 0xc0, 0x8b, 0x10, 0xd0, 0x29, 0x93, 0x4f, 0xc4, 0xb9, 0x52, 0xf7 },
    { 0x31, 0xfc, 0xef, 0xac, 0x66, 0xd7, 0xde, 0x9c, 0x7e, 0xc7, 0x48, 0x5f, 0xe4, 0x49, 0x49, 0x02 },
    { 0x54, 0x93, 0xe9, 0x99, 0x33, 0xb0, 0xa8, 0x11, 0x7e, 0x08, 0xec, 0x0f, 0x97, 0xcf, 0xc3, 0xd9 },
    { 0x6e, 0xe2, 0xa4, 0xca, 0x67, 0xb0, 0x54, 0xbb, 0xfd, 0x33, 0x15, 0xbf, 0x85, 0x23, 0x05, 0x77 },
    { 0x47, 0x3d, 0x06, 0xe8, 0x73, 0x8d, 0xb8, 0x98, 0x54, 0xc0, 0x66, 0xc4, 0x7a, 0xe4, 0x77, 0x40 },
};

static void digest_bytes(tally__digest d, uint8_t out[16])
{
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(d.lo >> (8 * i));
        out[8 + i] = (uint8_t)(d.hi >> (8 * i));
    }
}

static const uint8_t REF_KEY[16] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };

Test(siphash, sip24_128_reference_vectors)
{
    uint8_t msg[18];
    for (int i = 0; i < 18; i++)
        msg[i] = (uint8_t)i;
    for (size_t len = 0; len < 18; len++) {
        uint8_t got[16];
        digest_bytes(tally__siphash24_128(REF_KEY, msg, len), got);
        for (int b = 0; b < 16; b++)
            cr_assert_eq(got[b], SIP128_VECTORS[len][b],
                         "len %zu byte %d: got 0x%02x, want 0x%02x", len, b, got[b],
                         SIP128_VECTORS[len][b]);
    }
}

/* The message is read only within len: bytes after it do not matter, and an
   unaligned start gives the same digest. */
Test(siphash, reads_exactly_len_bytes)
{
    uint8_t buf[40];
    for (int i = 0; i < 40; i++)
        buf[i] = (uint8_t)i;
    uint8_t shifted[41];
    for (size_t len = 0; len < 18; len++) {
        memset(shifted, 0xa5, sizeof shifted);
        memcpy(shifted + 1, buf, len);             /* odd address, garbage after len */
        tally__digest a = tally__siphash24_128(REF_KEY, buf, len);
        tally__digest b = tally__siphash24_128(REF_KEY, shifted + 1, len);
        cr_assert(a.lo == b.lo && a.hi == b.hi, "len %zu", len);
        tally__digest c = tally__siphash128(REF_KEY, buf, len);
        tally__digest e = tally__siphash128(REF_KEY, shifted + 1, len);
        cr_assert(c.lo == e.lo && c.hi == e.hi, "1-3 len %zu", len);
    }
}

/* ---- SipHash-1-3 ----------------------------------------------------------- */

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static void fill(uint64_t *x, uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)splitmix(x);
}

/* Same key and input, same digest; and it is not simply the 2-4 variant. */
Test(siphash, sip13_deterministic)
{
    const char msg[] = "user:42/GET /api/v1/items";
    tally__digest a = tally__siphash128(REF_KEY, msg, sizeof msg - 1);
    tally__digest b = tally__siphash128(REF_KEY, msg, sizeof msg - 1);
    cr_assert(a.lo == b.lo && a.hi == b.hi);
    tally__digest c = tally__siphash24_128(REF_KEY, msg, sizeof msg - 1);
    cr_assert(a.lo != c.lo || a.hi != c.hi, "1-3 and 2-4 agree: the round counts are ignored");
    cr_assert_neq(a.lo, a.hi, "the two output halves are equal");
}

/* The key is a secret: different keys must give unrelated digests. */
Test(siphash, sip13_key_dependent)
{
    uint64_t x = 1;
    const char msg[] = "the same key bytes";
    tally__digest ref = tally__siphash128(REF_KEY, msg, sizeof msg - 1);
    /* every single-bit change of the key changes both halves */
    for (int bit = 0; bit < 128; bit++) {
        uint8_t k[16];
        memcpy(k, REF_KEY, 16);
        k[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        tally__digest d = tally__siphash128(k, msg, sizeof msg - 1);
        cr_assert(d.lo != ref.lo && d.hi != ref.hi, "key bit %d", bit);
    }
    /* random keys: no two of 1000 digests of the same message collide */
    enum { N = 1000 };
    static tally__digest ds[N];
    for (int i = 0; i < N; i++) {
        uint8_t k[16];
        fill(&x, k, 16);
        ds[i] = tally__siphash128(k, msg, sizeof msg - 1);
        for (int j = 0; j < i; j++)
            cr_assert(ds[i].lo != ds[j].lo || ds[i].hi != ds[j].hi, "keys %d and %d collide", i, j);
    }
}

/* Avalanche: flipping one input bit flips each output bit with probability ~1/2.
   Over 4096 samples the mean of 128 flipped bits has sd ~0.09 and each bit's
   flip rate sd ~0.008: the bounds below are > 10 sd wide, and still fail a
   hash that ignores some input or leaves output bits stuck. */
Test(siphash, sip13_avalanche)
{
    enum { SAMPLES = 4096 };
    static const size_t lens[] = { 1, 7, 8, 15, 16, 24, 33 };
    unsigned per_bit[128] = { 0 };
    uint64_t total = 0, x = 42;
    uint8_t key[16], msg[64];
    fill(&x, key, 16);

    for (int n = 0; n < SAMPLES; n++) {
        size_t len = lens[n % (sizeof lens / sizeof *lens)];
        fill(&x, msg, len);
        tally__digest a = tally__siphash128(key, msg, len);
        size_t bit = splitmix(&x) % (len * 8);
        msg[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        tally__digest b = tally__siphash128(key, msg, len);
        uint64_t dlo = a.lo ^ b.lo, dhi = a.hi ^ b.hi;
        cr_assert(dlo != 0 && dhi != 0, "one input bit left a half unchanged");
        total += (uint64_t)__builtin_popcountll(dlo) + (uint64_t)__builtin_popcountll(dhi);
        for (int i = 0; i < 64; i++) {
            per_bit[i] += (dlo >> i) & 1;
            per_bit[64 + i] += (dhi >> i) & 1;
        }
    }
    double mean = (double)total / SAMPLES;
    cr_assert(mean > 63.0 && mean < 65.0, "mean flipped bits %.3f, want ~64", mean);
    for (int i = 0; i < 128; i++) {
        double p = (double)per_bit[i] / SAMPLES;
        cr_assert(p > 0.42 && p < 0.58, "output bit %d flips with rate %.3f", i, p);
    }
}

/* The length is part of the hash: a message and the same bytes plus a zero differ. */
Test(siphash, sip13_length_matters)
{
    uint8_t z[16] = { 0 };
    for (size_t len = 0; len < 15; len++) {
        tally__digest a = tally__siphash128(REF_KEY, z, len);
        tally__digest b = tally__siphash128(REF_KEY, z, len + 1);
        cr_assert(a.lo != b.lo || a.hi != b.hi, "len %zu vs %zu", len, len + 1);
    }
}

static int cmp_digest(const void *a, const void *b)
{
    const tally__digest *x = a, *y = b;
    if (x->hi != y->hi)
        return x->hi < y->hi ? -1 : 1;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Structured inputs, the kind a weak mix collides on: two 8-byte blocks, each
   zero or a single set bit, so (A, B) vs (B, A) and (A, A) vs (0, 0) differ
   only by block order or by cancelling XORs. All 65 x 65 digests are distinct. */
Test(siphash, sip13_structured_inputs_do_not_collide)
{
    enum { B = 65, N = B * B };
    static tally__digest ds[N];
    for (int i = 0; i < B; i++)
        for (int j = 0; j < B; j++) {
            uint8_t msg[16] = { 0 };
            if (i)
                msg[(i - 1) / 8] |= (uint8_t)(1u << ((i - 1) % 8));
            if (j)
                msg[8 + (j - 1) / 8] |= (uint8_t)(1u << ((j - 1) % 8));
            ds[i * B + j] = tally__siphash128(REF_KEY, msg, 16);
        }
    qsort(ds, N, sizeof *ds, cmp_digest);
    for (int i = 1; i < N; i++)
        cr_assert(ds[i].lo != ds[i - 1].lo || ds[i].hi != ds[i - 1].hi, "two inputs collide");
}

/* ---- AES-128, byte by byte, from FIPS-197 ------------------------------------ */

/* The state is 16 bytes s[r + 4c] (row r, column c), in input order. */
typedef struct ref_aes {
    uint8_t rk[11][16];
} ref_aes;

static uint8_t gmul(uint8_t a, uint8_t b)
{
    uint8_t p = 0;
    for (; b; b >>= 1) {
        if (b & 1)
            p ^= a;
        a = (uint8_t)((a << 1) ^ ((a & 0x80) ? 0x1b : 0));
    }
    return p;
}

/* The S-box from its definition (FIPS-197 5.1.1): the inverse in GF(2^8),
   then the affine map. */
static uint8_t sbox(uint8_t x)
{
    uint8_t inv = x ? 1 : 0;
    for (int i = 0; x && i < 254; i++)
        inv = gmul(inv, x);
    uint8_t s = 0x63;
    for (int i = 0; i < 5; i++)
        s ^= (uint8_t)((inv << i) | (inv >> ((8 - i) & 7)));
    return s;
}

static uint8_t SBOX[256];

static void ref_init(void)
{
    for (int x = 0; x < 256; x++)
        SBOX[x] = sbox((uint8_t)x);
}

static void ref_expand(ref_aes *a, const uint8_t key[16])
{
    uint8_t w[44][4], rcon = 1;
    if (SBOX[0] != 0x63)
        ref_init();
    memcpy(w, key, 16);
    for (int i = 4; i < 44; i++) {
        uint8_t t[4] = { w[i - 1][0], w[i - 1][1], w[i - 1][2], w[i - 1][3] };
        if (i % 4 == 0) {
            uint8_t t0 = t[0];
            t[0] = SBOX[t[1]] ^ rcon;
            t[1] = SBOX[t[2]];
            t[2] = SBOX[t[3]];
            t[3] = SBOX[t0];
            rcon = gmul(rcon, 2);
        }
        for (int b = 0; b < 4; b++)
            w[i][b] = w[i - 4][b] ^ t[b];
    }
    memcpy(a->rk, w, sizeof(a->rk));
}

/* One round: SubBytes, ShiftRows, MixColumns (not in the last round), AddRoundKey. */
static void ref_round(uint8_t s[16], const uint8_t rk[16], bool last)
{
    uint8_t t[16];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++)
            t[r + 4 * c] = SBOX[s[r + 4 * ((c + r) % 4)]];
    for (int c = 0; c < 4 && !last; c++) {
        uint8_t *a = t + 4 * c, b[4];
        b[0] = gmul(a[0], 2) ^ gmul(a[1], 3) ^ a[2] ^ a[3];
        b[1] = a[0] ^ gmul(a[1], 2) ^ gmul(a[2], 3) ^ a[3];
        b[2] = a[0] ^ a[1] ^ gmul(a[2], 2) ^ gmul(a[3], 3);
        b[3] = gmul(a[0], 3) ^ a[1] ^ a[2] ^ gmul(a[3], 2);
        memcpy(a, b, 4);
    }
    for (int i = 0; i < 16; i++)
        s[i] = t[i] ^ rk[i];
}

static void ref_encrypt(const ref_aes *a, const uint8_t in[16], uint8_t out[16])
{
    for (int i = 0; i < 16; i++)
        out[i] = in[i] ^ a->rk[0][i];
    for (int r = 1; r <= 10; r++)
        ref_round(out, a->rk[r], r == 10);
}

static void hex16(const char *hex, uint8_t out[16])
{
    for (int i = 0; i < 16; i++)
        sscanf(hex + 2 * i, "%2hhx", &out[i]);
}

/* FIPS-197 Appendix A.1 (the key expansion), B and C.1 (two ciphers). */
Test(aeshash, reference_aes_matches_fips197)
{
    ref_aes a;
    uint8_t key[16], in[16], want[16], out[16];
    hex16("2b7e151628aed2a6abf7158809cf4f3c", key);
    ref_expand(&a, key);
    hex16("d014f9a8c9ee2589e13f0cc8b6630ca6", want);              /* w[40..43] */
    cr_assert(memcmp(a.rk[10], want, 16) == 0, "the last round key");
    hex16("3243f6a8885a308d313198a2e0370734", in);
    hex16("3925841d02dc09fbdc118597196a0b32", want);
    ref_encrypt(&a, in, out);
    cr_assert(memcmp(out, want, 16) == 0, "Appendix B");
    hex16("000102030405060708090a0b0c0d0e0f", key);
    hex16("00112233445566778899aabbccddeeff", in);
    hex16("69c4e0d86a7b0430d8cdb78070b4c55a", want);
    ref_expand(&a, key);
    ref_encrypt(&a, in, out);
    cr_assert(memcmp(out, want, 16) == 0, "Appendix C.1");
}

/* ---- The AES hash, by its definition ----------------------------------------- */

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static tally__digest ref_aeshash(const uint8_t key[16], const uint8_t *msg, size_t len)
{
    ref_aes a;
    uint8_t r[4][16], lane[4][16], blk[16] = { 0 }, s[16] = { 0 }, out[16];
    ref_expand(&a, key);
    for (int j = 0; j < 4; j++) {
        blk[0] = (uint8_t)(1 + j);
        ref_encrypt(&a, blk, r[j]);
        blk[0] = (uint8_t)(5 + j);
        ref_encrypt(&a, blk, lane[j]);
    }
    size_t n = (len + 15) / 16;
    for (size_t i = 0; i < n; i++) {
        uint8_t *x = lane[i % 4];
        for (size_t b = 0; b < 16; b++)
            x[b] ^= 16 * i + b < len ? msg[16 * i + b] : 0;
        for (int j = 0; j < 4; j++)
            ref_round(x, r[j], false);
    }
    for (int b = 0; b < 8; b++)
        s[b] = (uint8_t)((uint64_t)len >> (8 * b));
    for (size_t j = 0; j < n && j < 4; j++)
        for (int b = 0; b < 16; b++)
            s[b] ^= lane[j][b];
    ref_encrypt(&a, s, out);
    return (tally__digest){ le64(out), le64(out + 8) };
}

static bool same(tally__digest a, tally__digest b)
{
    return a.lo == b.lo && a.hi == b.hi;
}

#if TALLY__HAVE_AESHASH

/* Computed once with ref_aeshash: key 00 01 .. 0f, message 00 01 .. (len-1),
   {lo, hi}. The lengths cover no block, a short block (each word-load case),
   one to four blocks with and without a tail, and the loop over 64 bytes. */
static const struct { size_t len; uint64_t lo, hi; } AES_KAT[] = {
    {   0, UINT64_C(0x825b8f87373ba1c6), UINT64_C(0x79d8c8a162814f6f) },
    {   1, UINT64_C(0xe778b13305c10674), UINT64_C(0x8e85d3667eb6a98b) },
    {   2, UINT64_C(0x08631e2ad2230ed4), UINT64_C(0x33ac3bb3c9e2385a) },
    {   3, UINT64_C(0x6276355be09ea886), UINT64_C(0x8244fd0c905e3829) },
    {   4, UINT64_C(0xe64ea8b8a12aacb8), UINT64_C(0x5523f785126e7e53) },
    {   7, UINT64_C(0x54d5c21d66e3c0b6), UINT64_C(0x21a8748f0d4f02d8) },
    {   8, UINT64_C(0xe40ee6bae5beb5c0), UINT64_C(0x760e5ab65a0a2f65) },
    {   9, UINT64_C(0x83754eba3070e1cd), UINT64_C(0x71e6c5a6a4282822) },
    {  15, UINT64_C(0xd3660267c33f7a15), UINT64_C(0x58be5e931eefa26a) },
    {  16, UINT64_C(0x3a33c0dd7f1775fc), UINT64_C(0x2cea0d532235c4ca) },
    {  17, UINT64_C(0x2fd7f2c17ef33f7b), UINT64_C(0xff8eda4ca617211d) },
    {  24, UINT64_C(0xb16af3c59d181cba), UINT64_C(0x97de9c81c0d953ca) },
    {  31, UINT64_C(0x442a65e79347cac6), UINT64_C(0x07d5bee294107a5f) },
    {  32, UINT64_C(0xd2cd834509e3ec64), UINT64_C(0xdda715c47aaaaabf) },
    {  33, UINT64_C(0x57a008951d60554a), UINT64_C(0x8eb147a1ada1f286) },
    {  40, UINT64_C(0x756784fff2eb9611), UINT64_C(0xb3cf41a7d2424c53) },
    {  47, UINT64_C(0xce41eaad1904a7fe), UINT64_C(0x7bad4ef68f4f49a8) },
    {  48, UINT64_C(0x8d4300aa33f16aac), UINT64_C(0xe745b7f44ffd17a7) },
    {  49, UINT64_C(0x3416626d0873d812), UINT64_C(0x4f674f701c840514) },
    {  63, UINT64_C(0xfbd6e2858cda86d0), UINT64_C(0xcda4f7a6241d2cc9) },
    {  64, UINT64_C(0xa4680da206ee56f8), UINT64_C(0x144eba189b9b306a) },
    {  65, UINT64_C(0xc605f6c9c661a74c), UINT64_C(0x2e568d1d4d003059) },
    {  80, UINT64_C(0x6949de24be3d7f09), UINT64_C(0xd9d018d40912b66d) },
    { 127, UINT64_C(0x51d6150da1930d92), UINT64_C(0x940d2100593c50a1) },
    { 128, UINT64_C(0xaef0d45d2f823c4a), UINT64_C(0x4c243564e12e7343) },
    { 129, UINT64_C(0xef28b6b6fcd06237), UINT64_C(0x0af339ca3f7cb453) },
    { 200, UINT64_C(0xed871350fa8ad1ca), UINT64_C(0xa4f83e8c1c4e0d17) },
};

Test(aeshash, known_answers)
{
    uint8_t msg[200];
    for (int i = 0; i < 200; i++)
        msg[i] = (uint8_t)i;
    cr_assert(tally__aeshash_supported(), "this CPU has AES-NI: the AES hash must be chosen");
    for (size_t i = 0; i < sizeof AES_KAT / sizeof *AES_KAT; i++) {
        tally__digest want = { AES_KAT[i].lo, AES_KAT[i].hi };
        tally__digest ref = ref_aeshash(REF_KEY, msg, AES_KAT[i].len);
        tally__digest got = tally__aeshash128(REF_KEY, msg, AES_KAT[i].len);
        cr_assert(same(ref, want), "len %zu: the reference drifted from the known answer", AES_KAT[i].len);
        cr_assert(same(got, want), "len %zu: got %016" PRIx64 "%016" PRIx64 ", want %016" PRIx64
                  "%016" PRIx64, AES_KAT[i].len, got.hi, got.lo, want.hi, want.lo);
    }
}

/* Random keys, every length to 300, odd start addresses and garbage after
   the message: the AES-NI code computes the definition, reading only the
   message (ASan builds catch a read past it). */
Test(aeshash, matches_its_definition)
{
    uint64_t x = 7;
    enum { MAX = 300 };
    uint8_t *buf = malloc(MAX + 1);
    cr_assert_not_null(buf);
    for (size_t len = 0; len <= MAX; len++)
        for (int rep = 0; rep < 3; rep++) {
            uint8_t key[16];
            fill(&x, key, 16);
            size_t off = (size_t)rep & 1;
            uint8_t *msg = malloc(len + off);   /* exactly the message: no slack to read */
            cr_assert(msg || len + off == 0);
            fill(&x, buf, len);
            if (msg)
                memcpy(msg + off, buf, len);
            tally__digest want = ref_aeshash(key, buf, len);
            tally__digest got = tally__aeshash128(key, msg ? msg + off : buf, len);
            cr_assert(same(got, want), "len %zu rep %d", len, rep);
            tally__aeskey k;
            tally__aeshash_expand(&k, key);
            cr_assert(same(tally__aeshash128_x(&k, msg ? msg + off : buf, len), want),
                      "expanded key, len %zu", len);
            free(msg);
        }
    free(buf);
}

#endif /* TALLY__HAVE_AESHASH */

/* ---- Properties of both key digests ------------------------------------------ */

typedef tally__digest (*hash_fn)(const uint8_t key[16], const void *data, size_t len);

static const struct {
    const char *name;
    hash_fn fn;
} HASHES[] = {
    { "siphash", tally__siphash128 },
#if TALLY__HAVE_AESHASH
    { "aes", tally__aeshash128 },
#endif
};
#define N_HASHES (sizeof HASHES / sizeof *HASHES)

/* Lengths 0..64 of the same bytes give 65 distinct digests: with zeros the
   padded blocks of lengths 1..16 (and 17..32, ...) are equal, so only the
   length tells them apart ("a" and "a\0"). */
Test(digests, every_length_0_to_64_differs)
{
    uint8_t bufs[3][64];
    uint64_t x = 3;
    memset(bufs[0], 0, 64);
    memset(bufs[1], 0xff, 64);
    fill(&x, bufs[2], 64);
    for (size_t h = 0; h < N_HASHES; h++)
        for (int b = 0; b < 3; b++) {
            tally__digest d[65];
            for (size_t len = 0; len <= 64; len++) {
                d[len] = HASHES[h].fn(REF_KEY, bufs[b], len);
                for (size_t j = 0; j < len; j++)
                    cr_assert(!same(d[len], d[j]), "%s, buffer %d: lengths %zu and %zu collide",
                              HASHES[h].name, b, j, len);
            }
        }
    for (size_t h = 0; h < N_HASHES; h++)
        cr_assert(!same(HASHES[h].fn(REF_KEY, "a", 1), HASHES[h].fn(REF_KEY, "a\0", 2)),
                  "%s: \"a\" and \"a\\0\"", HASHES[h].name);
}

/* The key is a secret: a one-bit change of it changes both halves, and 1000
   random keys give 1000 digests of one message. */
Test(digests, keys_differ_outputs_differ)
{
    static const size_t lens[] = { 0, 5, 16, 24, 40, 100 };
    uint8_t msg[100];
    uint64_t x = 11;
    fill(&x, msg, sizeof msg);
    for (size_t h = 0; h < N_HASHES; h++)
        for (size_t l = 0; l < sizeof lens / sizeof *lens; l++) {
            tally__digest ref = HASHES[h].fn(REF_KEY, msg, lens[l]);
            for (int bit = 0; bit < 128; bit++) {
                uint8_t k[16];
                memcpy(k, REF_KEY, 16);
                k[bit / 8] ^= (uint8_t)(1u << (bit % 8));
                tally__digest d = HASHES[h].fn(k, msg, lens[l]);
                cr_assert(d.lo != ref.lo && d.hi != ref.hi, "%s len %zu: key bit %d", HASHES[h].name,
                          lens[l], bit);
            }
        }
    enum { N = 1000 };
    static tally__digest ds[N];
    for (size_t h = 0; h < N_HASHES; h++) {
        for (int i = 0; i < N; i++) {
            uint8_t k[16];
            fill(&x, k, 16);
            ds[i] = HASHES[h].fn(k, msg, 24);
        }
        qsort(ds, N, sizeof *ds, cmp_digest);
        for (int i = 1; i < N; i++)
            cr_assert(!same(ds[i], ds[i - 1]), "%s: two keys collide", HASHES[h].name);
    }
}

/* As sip13_avalanche, over lengths that reach every load and lane case of the
   AES hash: one flipped input bit flips each output bit with rate ~1/2. */
Test(digests, avalanche)
{
    enum { SAMPLES = 4096 };
    static const size_t lens[] = { 1, 3, 7, 8, 9, 15, 16, 17, 24, 32, 33, 40, 48, 63, 64, 65, 100 };
    uint8_t key[16], msg[100];
    uint64_t x = 42;
    fill(&x, key, 16);
    for (size_t h = 0; h < N_HASHES; h++) {
        unsigned per_bit[128] = { 0 };
        uint64_t total = 0;
        for (int n = 0; n < SAMPLES; n++) {
            size_t len = lens[n % (sizeof lens / sizeof *lens)];
            fill(&x, msg, len);
            tally__digest a = HASHES[h].fn(key, msg, len);
            size_t bit = splitmix(&x) % (len * 8);
            msg[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            tally__digest b = HASHES[h].fn(key, msg, len);
            uint64_t dlo = a.lo ^ b.lo, dhi = a.hi ^ b.hi;
            cr_assert(dlo != 0 && dhi != 0, "%s len %zu: a half unchanged", HASHES[h].name, len);
            total += (uint64_t)__builtin_popcountll(dlo) + (uint64_t)__builtin_popcountll(dhi);
            for (int i = 0; i < 64; i++) {
                per_bit[i] += (dlo >> i) & 1;
                per_bit[64 + i] += (dhi >> i) & 1;
            }
        }
        double mean = (double)total / SAMPLES;
        cr_assert(mean > 63.0 && mean < 65.0, "%s: mean flipped bits %.3f, want ~64", HASHES[h].name, mean);
        for (int i = 0; i < 128; i++) {
            double p = (double)per_bit[i] / SAMPLES;
            cr_assert(p > 0.42 && p < 0.58, "%s: output bit %d flips with rate %.3f", HASHES[h].name, i, p);
        }
    }
}

/* Two 16-byte blocks, each zero or one set bit, at block positions that meet
   in the AES hash in different ways: neighbouring lanes (0, 1), (1, 2), the
   same lane one round of four apart (0, 4), and lanes of the loop and of the
   tail (2, 6). Swapped blocks, equal blocks and cancelling pairs: all
   129 x 129 digests of each layout are distinct. */
Test(digests, structured_blocks_do_not_collide)
{
    enum { B = 129, N = B * B };
    static const int pos[][2] = { { 0, 1 }, { 1, 2 }, { 0, 4 }, { 2, 6 } };
    static tally__digest ds[N];
    for (size_t h = 0; h < N_HASHES; h++)
        for (size_t q = 0; q < sizeof pos / sizeof *pos; q++) {
            size_t len = 16 * (size_t)(pos[q][1] + 1);
            for (int i = 0; i < B; i++)
                for (int j = 0; j < B; j++) {
                    uint8_t msg[112] = { 0 };
                    if (i)
                        msg[16 * pos[q][0] + (i - 1) / 8] |= (uint8_t)(1u << ((i - 1) % 8));
                    if (j)
                        msg[16 * pos[q][1] + (j - 1) / 8] |= (uint8_t)(1u << ((j - 1) % 8));
                    ds[i * B + j] = HASHES[h].fn(REF_KEY, msg, len);
                }
            qsort(ds, N, sizeof *ds, cmp_digest);
            for (int i = 1; i < N; i++)
                cr_assert(!same(ds[i], ds[i - 1]), "%s, blocks %d and %d: two inputs collide",
                          HASHES[h].name, pos[q][0], pos[q][1]);
        }
}

/* ---- The engine's hash -------------------------------------------------------- */

static const uint8_t ENGINE_KEY[16] = "engine-hash-key!";

static int open_with(tally_hash h, tally_engine **e)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 4096;
    o.digest_only = true;                 /* the scan then reports each key's digest */
    memcpy(o.hash_key, ENGINE_KEY, 16);
    o.hash = h;
    return tally_open(&o, e);
}

struct scanned {
    int n;
    tally__digest d[2048];
    uint64_t used[2048];
};

static int collect(void *ctx, const tally_scan_entry *en)
{
    struct scanned *s = ctx;
    cr_assert_eq(en->key_len, sizeof(tally__digest));
    if (s->n < 2048) {
        memcpy(&s->d[s->n], en->key, sizeof(tally__digest));
        s->used[s->n++] = en->c[0].used;
    }
    return 0;
}

/* The digest that engine @e reports for @key, found by a scan of a policy
   holding that key alone. */
static tally__digest engine_digest(tally_engine *e, const char *key)
{
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 3600 * UINT64_C(1000000000) };
    tally_policy p = { .name = key, .n_limits = 1, .limits = { l } };
    uint32_t pol;
    tally_result r;
    static struct scanned s;
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    cr_assert_eq(tally_hit(e, pol, key, strlen(key), NULL, &r), 0);
    s.n = 0;
    cr_assert_eq(tally_scan(e, pol, NULL, collect, &s), 1);
    return s.d[0];
}

static tally__digest masked(tally__digest d)
{
    d.hi &= TALLY__DIGEST_HI_MASK;
    return d;
}

/* Each hash the engine is given names keys by that hash and counts them: a
   limit of 5 admits five hits of a key, 1000 keys are 1000 counters. */
Test(engine_hash, engine_names_and_counts_keys_with_each_hash)
{
    static const tally_hash kinds[] = { TALLY_HASH_SIPHASH, TALLY_HASH_AES };
    static struct scanned s;
    for (size_t h = 0; h < sizeof kinds / sizeof *kinds; h++) {
        tally_engine *e;
        cr_assert_eq(open_with(kinds[h], &e), 0, "hash %d", kinds[h]);
        tally__digest want = kinds[h] == TALLY_HASH_AES
                                 ? masked(tally__aeshash128(ENGINE_KEY, "who", 3))
                                 : masked(tally__siphash128(ENGINE_KEY, "who", 3));
        cr_assert(same(engine_digest(e, "who"), want), "hash %d: the key's digest", kinds[h]);

        tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = 3600 * UINT64_C(1000000000) };
        tally_policy p = { .name = "count", .n_limits = 1, .limits = { l } };
        uint32_t pol;
        tally_result r;
        cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
        int allowed = 0;
        for (int i = 0; i < 8; i++) {
            cr_assert_eq(tally_hit(e, pol, "one", 3, NULL, &r), 0);
            allowed += r.allowed;
        }
        cr_assert_eq(allowed, 5, "hash %d", kinds[h]);
        for (int k = 0; k < 1000; k++) {
            char key[16];
            int len = snprintf(key, sizeof key, "key-%d", k);
            for (int i = 0; i <= k % 3; i++) {
                cr_assert_eq(tally_hit(e, pol, key, (size_t)len, NULL, &r), 0);
                cr_assert(r.allowed, "hash %d: key-%d hit %d", kinds[h], k, i);
            }
        }
        s.n = 0;
        cr_assert_eq(tally_scan(e, pol, NULL, collect, &s), 1001, "hash %d", kinds[h]);
        uint64_t sum = 0;
        for (int i = 0; i < s.n; i++)
            sum += s.used[i];
        /* "one" holds 5, key-k holds k % 3 + 1 */
        cr_assert_eq(sum, 5 + 334 * 1 + 333 * 2 + 333 * 3, "hash %d", kinds[h]);
        tally_close(e);
    }
}

/* AUTO takes the AES hash exactly where the CPU has AES-NI; on a CPU without
   it AUTO is SipHash and asking for AES is refused. */
Test(engine_hash, auto_follows_the_cpu)
{
    tally_engine *e;
    cr_assert_eq(open_with(TALLY_HASH_AUTO, &e), 0);
    tally__digest got = engine_digest(e, "auto");
    tally_close(e);
#if TALLY__HAVE_AESHASH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("aes") && __builtin_cpu_supports("sse4.1")) {
        cr_assert(same(got, masked(tally__aeshash128(ENGINE_KEY, "auto", 4))), "AUTO is AES here");
        return;
    }
#endif
    cr_assert(same(got, masked(tally__siphash128(ENGINE_KEY, "auto", 4))), "AUTO is SipHash here");
    e = NULL;
    cr_assert_eq(open_with(TALLY_HASH_AES, &e), TALLY_EINVAL);
    cr_assert_null(e);
}

Test(engine_hash, unknown_hash_is_refused)
{
    tally_engine *e = NULL;
    cr_assert_eq(open_with((tally_hash)3, &e), TALLY_EINVAL);
    cr_assert_eq(open_with((tally_hash)-1, &e), TALLY_EINVAL);
    cr_assert_null(e, "a refused open leaves *out untouched");
}
