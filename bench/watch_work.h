/* C side of bench_watch: tally_hit with and without a rejection watch. */
#ifndef TALLY_BENCH_WATCH_WORK_H
#define TALLY_BENCH_WATCH_WORK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Two engines on the same 64K keys: one policy without a watch, one with. */
int  watch_bench_setup(size_t n_keys);
void watch_bench_teardown(void);
/* @n allowed hits starting at key @from on the engine with (1) or without (0) a watch. */
uint64_t watch_bench_hits(int watched, size_t from, size_t n);

#ifdef __cplusplus
}
#endif

#endif
