/*
 * The work of bench_coalesce.cc: tally_coalesce_do in a loop on one key or
 * on a key per thread, with an operation that returns at once (the cost of
 * the coalescing machinery alone) or spins (so that callers meet a running
 * execution and share it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "coalesce_work.h"
#include "tally.h"

struct bench_coalesce {
    tally_coalesce *c;
    uint64_t        work_ns;
    char            keys[BENCH_COALESCE_MAX_KEYS][24];
    size_t          key_len[BENCH_COALESCE_MAX_KEYS];
};

static int the_value;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int op_run(void *arg, void **value)
{
    const bench_coalesce *b = arg;
    if (b->work_ns) {
        uint64_t end = mono_ns() + b->work_ns;
        while (mono_ns() < end)
            ;
    }
    *value = &the_value;
    return 0;
}

bench_coalesce *bench_coalesce_new(uint64_t work_ns)
{
    bench_coalesce *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    int rc = tally_coalesce_open(NULL, &b->c);
    if (rc) {
        fprintf(stderr, "bench: tally_coalesce_open: %s\n", tally_strerror(rc));
        free(b);
        return NULL;
    }
    b->work_ns = work_ns;
    for (int i = 0; i < BENCH_COALESCE_MAX_KEYS; i++) {
        int n = snprintf(b->keys[i], sizeof(b->keys[i]), "session:%08x", (unsigned)i * 2654435761u);
        b->key_len[i] = (size_t)n;
    }
    return b;
}

void bench_coalesce_free(bench_coalesce *b)
{
    if (!b)
        return;
    tally_coalesce_close(b->c);
    free(b);
}

uint64_t bench_coalesce_run(bench_coalesce *b, int key, size_t n)
{
    const tally_coalesce_op op = { .run = op_run, .arg = b };
    uint64_t errors = 0;
    for (size_t i = 0; i < n; i++) {
        tally_coalesce_result *r;
        if (tally_coalesce_do(b->c, b->keys[key], b->key_len[key], &op, TALLY_COALESCE_FOREVER, &r))
            errors++;
        else
            tally_coalesce_release(r);
    }
    return errors;
}

void bench_coalesce_counts(bench_coalesce *b, uint64_t *calls, uint64_t *executions)
{
    tally_coalesce_stats s;
    tally_coalesce_read_stats(b->c, &s);
    *calls = s.calls;
    *executions = s.executions;
}
