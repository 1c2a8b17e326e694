// tally_hit on allowed hits with and without a rejection watch, 1 and 2 threads.
#include <benchmark/benchmark.h>

#include "watch_work.h"

static const size_t KEYS = 65536, BATCH = 256;

static void hit(benchmark::State &state, int watched)
{
    size_t from = (size_t)state.thread_index() * 7777;
    uint64_t allowed = 0;
    for (auto _ : state) {
        allowed += watch_bench_hits(watched, from, BATCH);
        from += BATCH;
    }
    if (allowed != state.iterations() * BATCH)
        state.SkipWithError("a hit was not allowed");
    state.SetItemsProcessed((int64_t)(state.iterations() * BATCH));
}

static void watch_off(benchmark::State &state) { hit(state, 0); }
static void watch_on(benchmark::State &state) { hit(state, 1); }

BENCHMARK(watch_off)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(watch_on)->Threads(1)->Threads(2)->UseRealTime();

int main(int argc, char **argv)
{
    benchmark::Initialize(&argc, argv);
    if (watch_bench_setup(KEYS) != 0) {
        fprintf(stderr, "bench_watch: set-up failed\n");
        return 1;
    }
    benchmark::RunSpecifiedBenchmarks();
    watch_bench_teardown();
    return 0;
}
