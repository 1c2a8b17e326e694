// Throughput rows: tally against the baselines a user would otherwise write
// or pick, side by side in one binary and one run, on the same keys. Only
// registration and the timing loop live here; every workload is a C function
// of shim.h.
//
// Rows: <workload>/<design>/<keys>/real_time/threads:<T>, items_per_second =
// operations per second summed over the threads; memory/... rows report bytes
// per tracked key; latency/... rows come from bench_latency.cc. Counters:
// errors (this row's failed calls), exact (hot: the stored count grew by the
// allowed cost), windows, admitted_per_window, first_exceeded_per_window and
// windows_exact (hot_limit, tally: every window admitted max and told one call
// first_exceeded), holds_after (conc_pair_hot: the key's holders after the
// run, 0 when every acquire was given back).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>
#include <vector>

#include "fixture.h"
#include "shim.h"

void register_latency();

namespace {

void BM_hit(benchmark::State &state, bench_design d, bench_workload w)
{
    const int tid = state.thread_index();
    const size_t batch = bench_design_batch(d);
    const bool windowed = w.kind == BENCH_W_HOT_LIMIT;    // tally_hit_at only
    static fixture::Setup s;          // written by thread 0 before the start barrier
    static uint64_t count_before, cost_before, errors_before, opened_before, first_before;
    static int counted, filled;

    if (tid == 0) {
        s = fixture::prepare(d, w, state.threads());
        const bench_keys *k = s.keys;
        counted = s.target && (w.kind == BENCH_W_HOT || w.kind == BENCH_W_CONC_PAIR_HOT)
                  && bench_target_count(s.target, k->arena + k->ref[0].off, k->ref[0].len,
                                        &count_before) == 0;
        // at the limit the row starts on a full window: it owns the windows it opens
        filled = s.target && windowed
                 && bench_target_fill_window(s.target, 0, k->arena + k->ref[0].off,
                                             k->ref[0].len) == 0;
        cost_before = s.target ? bench_target_allowed_cost(s.target) : 0;
        errors_before = s.target ? bench_target_errors(s.target) : 0;
        if (s.target)
            bench_target_windows(s.target, &opened_before, &first_before);
    }
    // s is read only after the start barrier, inside the loop
    size_t pos = 0;
    uint64_t allowed = 0;
    for (auto _ : state) {
        if (!s.target) {
            state.SkipWithError("skipped: the redis-server went away (see stderr)");
            break;
        }
        allowed += bench_target_run(s.target, tid, s.keys, s.seq[tid], &pos, batch);
    }
    if (!s.target)
        return;

    const uint64_t items = uint64_t(state.iterations()) * batch;
    state.SetItemsProcessed(int64_t(items));
    // per-thread counters are summed over the threads; not_allowed = denied + errors
    state.counters["not_allowed"] = double(items - allowed);
    if (tid == 0) {
        // after the end barrier: every thread's hits are in
        const bench_keys *k = s.keys;
        state.counters["errors_total"] = double(bench_target_errors(s.target));
        state.counters["errors"] = double(bench_target_errors(s.target) - errors_before);
        state.counters["bytes_per_key"] = bench_target_bytes_per_key(s.target);
        if (w.kind == BENCH_W_HOT) {
            // the stored count grew by exactly the cost of the allowed hits
            uint64_t after;
            const bool exact = counted
                && bench_target_count(s.target, k->arena + k->ref[0].off, k->ref[0].len,
                                      &after) == 0
                && after - count_before == bench_target_allowed_cost(s.target) - cost_before;
            state.counters["exact"] = exact ? 1 : 0;
        }
        if (w.kind == BENCH_W_CONC_PAIR_HOT) {
            uint64_t after;
            state.counters["holds_after"] =
                counted && bench_target_count(s.target, k->arena + k->ref[0].off, k->ref[0].len,
                                              &after) == 0 ? double(after) : -1;
        }
        if (windowed) {
            // the last window is filled too, so every window the row opened is whole:
            // each admitted exactly max and told exactly one call first_exceeded
            filled = filled
                     && bench_target_fill_window(s.target, 0, k->arena + k->ref[0].off,
                                                 k->ref[0].len) == 0;
            uint64_t opened, first;
            bench_target_windows(s.target, &opened, &first);
            opened -= opened_before;
            first -= first_before;
            const uint64_t admitted = bench_target_allowed_cost(s.target) - cost_before;
            state.counters["windows"] = double(opened);
            state.counters["admitted_per_window"] = opened ? double(admitted) / double(opened) : 0;
            state.counters["first_exceeded_per_window"] =
                opened ? double(first) / double(opened) : 0;
            state.counters["windows_exact"] =
                filled && opened && admitted == opened * w.max && first == opened ? 1 : 0;
        }
    }
}

void BM_skip(benchmark::State &state, std::string why)
{
    state.SkipWithError(why.c_str());
    for (auto _ : state) {
    }
}

void BM_memory(benchmark::State &state, size_t capacity, int digest_only)
{
    const double b = bench_tally_bytes_per_key(capacity, digest_only);
    if (b < 0)
        state.SkipWithError("cannot open the engine");
    for (auto _ : state) {
    }
    state.counters["bytes_per_key"] = b;
}

constexpr size_t K1 = 1024, K64 = size_t(1) << 16, M1 = size_t(1) << 20;

void register_rows(bench_kind kind, std::vector<size_t> key_counts, size_t redis_keys,
                   const std::string &redis_why, int max_threads = 8)
{
    for (size_t nkeys : key_counts) {
        const bench_workload w = bench_workload_of(kind, nkeys);
        for (int di = 0; di < BENCH_N_DESIGNS; di++) {
            const bench_design d = bench_design(di);
            if (!bench_design_supports(d, &w))
                continue;
            const bool redis = bench_design_needs_redis(d);
            if (redis && nkeys != redis_keys)
                continue;
            const std::string name = std::string(bench_kind_name(kind)) + "/"
                + bench_design_name(d) + "/" + fixture::keys_label(w.n_keys);
            benchmark::internal::Benchmark *b =
                redis && !redis_why.empty()
                    ? benchmark::RegisterBenchmark(name.c_str(), BM_skip, "skipped: " + redis_why)
                    : benchmark::RegisterBenchmark(name.c_str(), BM_hit, d, w);
            for (int th = 1; th <= max_threads; th *= 2)
                b->Threads(th);
            b->UseRealTime();
        }
    }
}

void register_all()
{
    char why[256] = "";
    const std::string redis_why = bench_redis_check(why, sizeof(why)) == 0 ? "" : why;

    register_rows(BENCH_W_UNIFORM, { K1, K64, M1 }, K64, redis_why);
    register_rows(BENCH_W_ZIPF, { K64, M1 }, K64, redis_why);
    register_rows(BENCH_W_HOT, { 1 }, 1, redis_why);
    register_rows(BENCH_W_WEIGHTED, { K64 }, K64, redis_why);
    register_rows(BENCH_W_GCRA, { K64 }, K64, redis_why);
    register_rows(BENCH_W_PEEK, { K64 }, K64, redis_why);
    register_rows(BENCH_W_INSERT, { M1 }, M1, redis_why);
    register_rows(BENCH_W_HOT_LIMIT, { 1 }, 1, redis_why);
    register_rows(BENCH_W_LRU_CHURN, { M1 }, M1, redis_why, 2);
    register_rows(BENCH_W_CONC_PAIR, { K64 }, K64, redis_why, 2);
    register_rows(BENCH_W_CONC_PAIR_HOT, { 1 }, 1, redis_why, 2);
    register_latency();

    benchmark::RegisterBenchmark("memory/tally_digest_only/1000000", BM_memory, size_t(1000000), 1)
        ->Iterations(1);
    // digest_only=false: the table plus its per-slot key pointers (key copies not counted)
    benchmark::RegisterBenchmark("memory/tally_keep_keys/1000000", BM_memory, size_t(1000000), 0)
        ->Iterations(1);
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
    fixture::release_all();
    return 0;
}
