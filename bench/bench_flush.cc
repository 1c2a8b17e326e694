// Flush throughput in keys per second: tally_flush of 100K dirty keys
// against a raw pipelined INCRBY of the same keys from the same binary, and
// redis-benchmark's pipelined INCR against the same server in the same run.
#include <benchmark/benchmark.h>

#include "flush_work.h"

static const size_t KEYS = 100000;

static void flush_tally(benchmark::State &state)
{
    for (auto _ : state) {
        state.PauseTiming();
        flush_bench_dirty();
        state.ResumeTiming();
        if (flush_bench_flush() != 0)
            state.SkipWithError("tally_flush failed");
    }
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)KEYS);
}

static void flush_raw_incrby(benchmark::State &state)
{
    for (auto _ : state)
        if (flush_bench_raw_incrby() != 0)
            state.SkipWithError("pipelined INCRBY failed");
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)KEYS);
}

static void redis_benchmark_incr(benchmark::State &state)
{
    const size_t n = 1000000;
    for (auto _ : state) {
        double rps = flush_bench_redis_benchmark(n);
        if (rps <= 0) {
            state.SkipWithError("redis-benchmark did not run");
            break;
        }
        state.SetIterationTime((double)n / rps);
    }
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)n);
}

BENCHMARK(flush_tally)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(flush_raw_incrby)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(redis_benchmark_incr)->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(3);

int main(int argc, char **argv)
{
    benchmark::Initialize(&argc, argv);
    if (!flush_bench_redis_start()) {
        fprintf(stderr, "bench_flush: no redis-server could start; nothing measured\n");
        return 1;
    }
    if (flush_bench_setup(KEYS) != 0) {
        fprintf(stderr, "bench_flush: set-up failed\n");
        flush_bench_redis_stop();
        return 1;
    }
    benchmark::RunSpecifiedBenchmarks();
    flush_bench_teardown();
    flush_bench_redis_stop();
    return 0;
}
