/* C side of bench_flush: flush throughput against a raw pipelined INCRBY and
   redis-benchmark's pipelined INCR, of one key and of 100K keys. */
#ifndef TALLY_BENCH_FLUSH_WORK_H
#define TALLY_BENCH_FLUSH_WORK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Start a redis-server on a free loopback port; 0 when none could start. */
int  flush_bench_redis_start(void);
void flush_bench_redis_stop(void);

/* An engine with a flusher on that Redis, and n distinct keys. */
int  flush_bench_setup(size_t n_keys);
void flush_bench_teardown(void);
/* Make every key dirty (one hit each): not timed. */
void flush_bench_dirty(void);
/* tally_flush: every dirty key pushed and acknowledged. 0 on success. */
int  flush_bench_flush(void);
/* The same keys, one INCRBY each, in one pipeline from this binary. 0 on success. */
int  flush_bench_raw_incrby(void);
/* redis-benchmark -c 1 -P 500 -t incr -n @n against the same server, on
   one key (@keyspace 0) or on @keyspace random keys (-r): its requests per
   second, or 0 when it could not run. */
double flush_bench_redis_benchmark(size_t n, size_t keyspace);

#ifdef __cplusplus
}
#endif

#endif
