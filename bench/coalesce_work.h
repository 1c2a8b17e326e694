/*
 * The C side of bench_coalesce.cc: a coalescer and the loop of calls each
 * benchmark thread runs. The .cc file only registers and times.
 */
#ifndef TALLY_BENCH_COALESCE_WORK_H
#define TALLY_BENCH_COALESCE_WORK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BENCH_COALESCE_MAX_KEYS 64

typedef struct bench_coalesce bench_coalesce;

/*
 * A coalescer with default options (no cap, no attempt limit, no breaker)
 * whose operation spins for @work_ns (0: returns at once) and returns a
 * static value (nothing to free). NULL on failure (message on stderr).
 */
bench_coalesce *bench_coalesce_new(uint64_t work_ns);
void            bench_coalesce_free(bench_coalesce *b);

/*
 * @n calls of tally_coalesce_do on key number @key (0..BENCH_COALESCE_MAX_KEYS-1),
 * each waiting without a bound and releasing its result. Any thread may run
 * it concurrently with others. Returns the number of calls that failed.
 */
uint64_t bench_coalesce_run(bench_coalesce *b, int key, size_t n);

/* The coalescer's counters: calls and executions so far. */
void bench_coalesce_counts(bench_coalesce *b, uint64_t *calls, uint64_t *executions);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_BENCH_COALESCE_WORK_H */
