/*
 * Benchmark keys: N distinct strings of 16..40 bytes that look like user ids
 * and API tokens, all in one arena, and per-thread sequences of key references
 * (uniform, Zipf or one hot key; with costs when weighted) drawn beforehand so
 * that nothing is generated inside a timed loop.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "shim.h"

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* A bijection on 32-bit values: distinct i give distinct ids that look random. */
static uint32_t perm32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* No prefix is a prefix of another, so keys with different prefixes differ. */
static const char *const prefixes[] = { "user-", "uid:", "tok_", "api-key-", "sess-" };
#define N_PREFIXES (sizeof(prefixes) / sizeof(prefixes[0]))

static const char hex[] = "0123456789abcdef";

bench_keys *bench_keys_new(size_t n, uint64_t seed)
{
    if (n == 0 || n > UINT32_MAX / BENCH_KEY_MAX)
        return NULL;
    bench_keys *k = calloc(1, sizeof(*k));
    if (!k)
        return NULL;
    k->n = n;
    k->arena = malloc(n * BENCH_KEY_MAX);
    k->ref = malloc(n * sizeof(*k->ref));
    if (!k->arena || !k->ref) {
        bench_keys_free(k);
        return NULL;
    }

    uint64_t rng = seed;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = splitmix64(&rng);
        const char *pre = prefixes[r % N_PREFIXES];
        size_t len = BENCH_KEY_MIN + (size_t)((r >> 8) % (BENCH_KEY_MAX - BENCH_KEY_MIN + 1));
        char *p = k->arena + off;
        size_t plen = strlen(pre), j = 0;

        memcpy(p, pre, plen);
        j = plen;
        /* the distinct part: 8 hex digits of a bijection of i (prefix + 8 <= 16) */
        uint32_t id = perm32((uint32_t)i);
        for (int s = 28; s >= 0; s -= 4)
            p[j++] = hex[(id >> s) & 15];
        /* random hex padding up to the drawn length */
        uint64_t pad = splitmix64(&rng);
        for (int used = 0; j < len; j++, used++) {
            if (used == 16) {
                pad = splitmix64(&rng);
                used = 0;
            }
            p[j] = hex[pad & 15];
            pad >>= 4;
        }
        k->ref[i].off = (uint32_t)off;
        k->ref[i].len = (uint32_t)len;
        off += len;
    }
    return k;
}

void bench_keys_free(bench_keys *k)
{
    if (!k)
        return;
    free(k->arena);
    free(k->ref);
    free(k);
}

/* Zipf(s) over ranks 1..n by inversion of the cumulative distribution. */
static double *zipf_cdf(size_t n, double s)
{
    double *cdf = malloc(n * sizeof(*cdf));
    if (!cdf)
        return NULL;
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        cdf[i] = (sum += pow((double)(i + 1), -s));
    for (size_t i = 0; i < n; i++)
        cdf[i] /= sum;
    return cdf;
}

static size_t zipf_draw(const double *cdf, size_t n, double u)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

bench_seq *bench_seq_new(const bench_keys *k, size_t len_pow2, uint64_t seed, bench_dist dist,
                         int weighted)
{
    if (!k || len_pow2 == 0 || (len_pow2 & (len_pow2 - 1)))
        return NULL;
    bench_seq *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->mask = len_pow2 - 1;
    s->ref = malloc(len_pow2 * sizeof(*s->ref));
    if (weighted)
        s->cost = malloc(len_pow2 * sizeof(*s->cost));
    double *cdf = dist == BENCH_ZIPF ? zipf_cdf(k->n, BENCH_ZIPF_S) : NULL;
    if (!s->ref || (weighted && !s->cost) || (dist == BENCH_ZIPF && !cdf)) {
        free(cdf);
        bench_seq_free(s);
        return NULL;
    }
    uint64_t rng = seed;
    for (size_t i = 0; i < len_pow2; i++) {
        uint64_t r = splitmix64(&rng);
        size_t idx;
        switch (dist) {
        case BENCH_ZIPF:
            /* rank i is key i: keys are unrelated strings, so hot keys land
               anywhere in a table */
            idx = zipf_draw(cdf, k->n, (double)(r >> 11) * 0x1.0p-53);
            break;
        case BENCH_HOT:
            idx = 0;
            break;
        default:
            /* uniform over [0, n) by multiply-shift (bias < n / 2^64) */
            idx = (size_t)(((unsigned __int128)r * k->n) >> 64);
            break;
        }
        s->ref[i] = k->ref[idx];
        if (weighted)   /* tokens per request: 1..BENCH_COST_MAX, uniform */
            s->cost[i] = (uint8_t)(1 + splitmix64(&rng) % BENCH_COST_MAX);
    }
    free(cdf);
    return s;
}

void bench_seq_free(bench_seq *s)
{
    if (!s)
        return;
    free(s->ref);
    free(s->cost);
    free(s);
}
