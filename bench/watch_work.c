/*
 * bench_watch: what a rejection watch costs tally_hit on allowed hits. Both
 * engines are the same but for tally_watch_set; the keys are warm and every
 * hit is allowed, so the rows compare the hot path with and without a watch.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"
#include "watch_work.h"

static tally_engine *engines[2];
static uint32_t policies[2];
static char (*keys)[32];
static size_t *lens;
static size_t n_keys;

int watch_bench_setup(size_t n)
{
    n_keys = n;
    keys = calloc(n, sizeof(*keys));
    lens = calloc(n, sizeof(*lens));
    if (!keys || !lens)
        return -1;
    for (size_t i = 0; i < n; i++)
        lens[i] = (size_t)snprintf(keys[i], sizeof(keys[i]), "user-%08zx-token", i * 2654435761u);
    for (int w = 0; w < 2; w++) {
        tally_options o;
        tally_options_init(&o);
        o.capacity = n;
        if (tally_open(&o, &engines[w]))
            return -1;
        tally_policy p = { .name = "api", .n_limits = 1,
                           .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 60,
                                         .period_ns = UINT64_C(3600000000000) } } };
        if (tally_policy_add(engines[w], &p, &policies[w]))
            return -1;
        tally_watch rule = { .threshold = 1000, .window_ns = UINT64_C(600000000000) };
        if (w && tally_watch_set(engines[w], policies[w], &rule))
            return -1;
        watch_bench_hits(w, 0, n);
    }
    return 0;
}

void watch_bench_teardown(void)
{
    for (int w = 0; w < 2; w++)
        tally_close(engines[w]);
    free(keys);
    free(lens);
}

uint64_t watch_bench_hits(int watched, size_t from, size_t n)
{
    uint64_t allowed = 0;
    tally_result r;
    for (size_t i = 0; i < n; i++) {
        size_t k = (from + i * 7919) % n_keys;
        if (tally_hit(engines[watched], policies[watched], keys[k], lens[k], NULL, &r) == 0)
            allowed += r.allowed;
    }
    return allowed;
}
