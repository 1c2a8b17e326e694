// Flush throughput in keys per second: tally_flush of 100K dirty keys
// against a raw pipelined INCRBY of the same keys from the same binary, and
// redis-benchmark's pipelined INCR against the same server in the same run,
// of one key and of 100K random keys. The ratios of the flush to both
// redis-benchmark rows are printed at the end.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>

#include "flush_work.h"

static const size_t KEYS = 100000;
static double flush_rate, incr_rate, incr_keys_rate;   // per second, of the last run of each row

static void flush_tally(benchmark::State &state)
{
    double seconds = 0;
    for (auto _ : state) {
        state.PauseTiming();
        flush_bench_dirty();
        state.ResumeTiming();
        auto t0 = std::chrono::steady_clock::now();
        if (flush_bench_flush() != 0)
            state.SkipWithError("tally_flush failed");
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)KEYS);
    flush_rate = seconds > 0 ? (double)state.iterations() * (double)KEYS / seconds : 0;
}

static void flush_raw_incrby(benchmark::State &state)
{
    for (auto _ : state)
        if (flush_bench_raw_incrby() != 0)
            state.SkipWithError("pipelined INCRBY failed");
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)KEYS);
}

static void redis_benchmark(benchmark::State &state, size_t keyspace, double *rate)
{
    const size_t n = 1000000;
    double seconds = 0;
    for (auto _ : state) {
        double rps = flush_bench_redis_benchmark(n, keyspace);
        if (rps <= 0) {
            state.SkipWithError("redis-benchmark did not run");
            break;
        }
        state.SetIterationTime((double)n / rps);
        seconds += (double)n / rps;
    }
    state.SetItemsProcessed((int64_t)state.iterations() * (int64_t)n);
    *rate = seconds > 0 ? (double)state.iterations() * (double)n / seconds : 0;
}

static void redis_benchmark_incr(benchmark::State &state)
{
    redis_benchmark(state, 0, &incr_rate);
}

static void redis_benchmark_incr_100k_keys(benchmark::State &state)
{
    redis_benchmark(state, KEYS, &incr_keys_rate);
}

BENCHMARK(flush_tally)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(flush_raw_incrby)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(redis_benchmark_incr)->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(3);
BENCHMARK(redis_benchmark_incr_100k_keys)->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(3);

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
    if (flush_rate > 0 && incr_rate > 0)
        printf("tally_flush / redis-benchmark INCR: %.2fx\n", flush_rate / incr_rate);
    if (flush_rate > 0 && incr_keys_rate > 0)
        printf("tally_flush / redis-benchmark INCR -r %zu: %.2fx\n", KEYS, flush_rate / incr_keys_rate);
    flush_bench_teardown();
    flush_bench_redis_stop();
    return 0;
}
