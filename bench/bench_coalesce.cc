// The cost of a coalesced call: tally_coalesce_do with an operation that
// returns at once, from 1, 2 and 8 threads, all on one key or each thread on
// its own key; and with an operation of 2 us, where callers of one key share
// executions. Only registration and timing live here (coalesce_work.c works).
//
// Rows: coalesce/<keys>/<work>/real_time/threads:<T>. items_per_second = calls/s
// summed over the threads (the time one thread spends in a call is
// threads / items_per_second); exec_per_call = executions / calls.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>

#include "coalesce_work.h"

namespace {

constexpr size_t kBatch = 64;   // calls per benchmark iteration

enum Keys { kOneKey, kDistinctKeys };

// Written by thread 0 before the start barrier, read by all after it.
bench_coalesce *g_b[2] = {};
uint64_t g_calls0, g_exec0;

void BM_coalesce(benchmark::State &state, Keys keys, int work_idx, uint64_t work_ns)
{
    const int tid = state.thread_index();
    if (tid == 0) {
        if (!g_b[work_idx] && !(g_b[work_idx] = bench_coalesce_new(work_ns))) {
            std::fprintf(stderr, "bench_coalesce: cannot create the coalescer\n");
            std::abort();
        }
        bench_coalesce_counts(g_b[work_idx], &g_calls0, &g_exec0);
    }
    const int key = keys == kOneKey ? 0 : tid;
    uint64_t errors = 0;
    for (auto _ : state)
        errors += bench_coalesce_run(g_b[work_idx], key, kBatch);
    state.SetItemsProcessed(int64_t(state.iterations() * kBatch));
    state.counters["errors"] = double(errors);
    if (tid == 0) {
        // after the end barrier: every thread's calls are counted
        uint64_t calls, exec;
        bench_coalesce_counts(g_b[work_idx], &calls, &exec);
        state.counters["exec_per_call"] = calls > g_calls0
            ? double(exec - g_exec0) / double(calls - g_calls0) : 0.0;
    }
}

void register_all()
{
    struct Row { const char *name; Keys keys; int work_idx; uint64_t work_ns; };
    static const Row rows[] = {
        { "coalesce/one_key/instant", kOneKey, 0, 0 },
        { "coalesce/distinct_keys/instant", kDistinctKeys, 0, 0 },
        { "coalesce/one_key/work_2us", kOneKey, 1, 2000 },
        { "coalesce/distinct_keys/work_2us", kDistinctKeys, 1, 2000 },
    };
    for (const Row &r : rows)
        benchmark::RegisterBenchmark(r.name, BM_coalesce, r.keys, r.work_idx, r.work_ns)
            ->Threads(1)
            ->Threads(2)
            ->Threads(8)
            ->UseRealTime();
}

} // namespace

int main(int argc, char **argv)
{
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;
    register_all();
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    for (bench_coalesce *b : g_b)
        bench_coalesce_free(b);
    return 0;
}
