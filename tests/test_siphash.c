/*
 * Unit tests of src/siphash.c.
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
 */
#include "test.h"   /* Criterion, or tests/harness.h under TSan */
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine-internal.h"

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
