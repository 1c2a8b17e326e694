/*
 * bench_ops DESIGN WORKLOAD KEYS OPS WARMUP: a fixed number of operations of
 * one design on one workload, in one thread, for instruction counts under
 * valgrind --tool=callgrind --instr-atstart=no (tools/bench-callgrind).
 *
 * The keys and the sequence are bench_hit's thread 0's (BENCH_KEY_SEED). The
 * target is made and warmed (its prefill, then WARMUP operations) without
 * instrumentation; only the OPS operations after it are instrumented, so key
 * generation, prefill and warm-up cost nothing in the counts. In the insert
 * workload time is not the clock but BENCH_OPS_STEP_NS per operation from a
 * fixed start (bench_target_set_clock), so the same windows expire after the
 * same operations in every run; tally_hit alone keeps its own clock, and
 * tally_hit_at, which otherwise runs at one time, runs insert on that clock.
 *
 * Prints "ops N allowed A errors E" on stdout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <valgrind/callgrind.h>

#include "shim.h"

/* 2M operations per second: a 10 ms window holds 20K operations, under a
   third of a 64K-key table */
#define BENCH_OPS_STEP_NS 500u
#define BENCH_OPS_START_NS (UINT64_C(1) << 60)

static int design_of(const char *name, bench_design *d)
{
    for (int i = 0; i < BENCH_N_DESIGNS; i++) {
        if (strcmp(bench_design_name((bench_design)i), name) == 0) {
            *d = (bench_design)i;
            return 0;
        }
    }
    return -1;
}

static int kind_of(const char *name, bench_kind *kind)
{
    for (int i = 0; i < BENCH_N_KINDS; i++) {
        if (strcmp(bench_kind_name((bench_kind)i), name) == 0) {
            *kind = (bench_kind)i;
            return 0;
        }
    }
    return -1;
}

int main(int argc, char **argv)
{
    bench_design d;
    bench_kind kind;

    if (argc != 6 || design_of(argv[1], &d) || kind_of(argv[2], &kind)) {
        fprintf(stderr, "usage: bench_ops DESIGN WORKLOAD KEYS OPS WARMUP\n");
        return 2;
    }
    size_t n_keys = strtoull(argv[3], NULL, 0), ops = strtoull(argv[4], NULL, 0);
    size_t warmup = strtoull(argv[5], NULL, 0);
    bench_workload w = bench_workload_of(kind, n_keys);
    int virtual_clock = kind == BENCH_W_INSERT;

    if (bench_design_needs_redis(d)
        || !(bench_design_supports(d, &w)
             || ((d == BENCH_TALLY_AT || d == BENCH_TALLY_SHARED_AT) && virtual_clock))) {
        fprintf(stderr, "bench_ops: %s does not run %s\n", argv[1], argv[2]);
        return 2;
    }
    bench_keys *k = bench_keys_new(w.n_keys, BENCH_KEY_SEED);
    bench_seq *seq = k ? bench_seq_new(k, (size_t)1 << 20, BENCH_KEY_SEED + 1, w.dist,
                                       w.weighted)
                       : NULL;
    bench_target *t = seq ? bench_target_new(d, &w, k) : NULL;
    if (!t) {
        fprintf(stderr, "bench_ops: cannot set up %s on %s\n", argv[1], argv[2]);
        return 1;
    }
    if (virtual_clock)
        bench_target_set_clock(t, BENCH_OPS_START_NS, BENCH_OPS_STEP_NS);

    size_t pos = 0;
    bench_target_run(t, 0, k, seq, &pos, warmup);
    uint64_t errors = bench_target_errors(t);
    CALLGRIND_START_INSTRUMENTATION;
    uint64_t allowed = bench_target_run(t, 0, k, seq, &pos, ops);
    CALLGRIND_STOP_INSTRUMENTATION;
    printf("ops %zu allowed %llu errors %llu\n", ops, (unsigned long long)allowed,
           (unsigned long long)(bench_target_errors(t) - errors));

    bench_target_free(t);
    bench_seq_free(seq);
    bench_keys_free(k);
    return 0;
}
