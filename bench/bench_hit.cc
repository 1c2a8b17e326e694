// Steady-state hits on existing keys: tally against the baselines a user would
// otherwise write, side by side in one binary and one run. Only registration
// and the timing loop live here; every workload is a C function of shim.h.
//
// Rows: hit/<design>/<keys>/real_time/threads:<T>, items_per_second = hits/s
// summed over the threads; memory/... rows report bytes per tracked key.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <map>

#include "shim.h"

namespace {

constexpr size_t kBatch = 256;          // hits per benchmark iteration
constexpr size_t kSeqLen = size_t(1) << 20;
constexpr int kMaxThreads = 8;
constexpr uint64_t kKeySeed = 0x7a11c0ffee;

struct KeySet {
    bench_keys *keys = nullptr;
    bench_seq *seq[kMaxThreads] = {};
};

// Shared state. Written only by thread 0 before the loop starts: the
// benchmark library's start barrier orders it before the other threads read it.
std::map<size_t, KeySet> g_keysets;
bench_target *g_target = nullptr;
bench_design g_design = BENCH_N_DESIGNS;
size_t g_nkeys = 0;
KeySet *g_cur = nullptr;

[[noreturn]] void die(const char *what)
{
    std::fprintf(stderr, "bench_hit: %s\n", what);
    std::abort();
}

// Create (once per design and key count) the keys, the per-thread sequences
// and the warm shared state. A later run of the same benchmark reuses them.
void setup(bench_design d, size_t nkeys, int threads)
{
    if (threads > kMaxThreads)
        die("too many threads");
    KeySet &ks = g_keysets[nkeys];
    if (!ks.keys && !(ks.keys = bench_keys_new(nkeys, kKeySeed)))
        die("cannot make keys");
    for (int i = 0; i < threads; i++)
        if (!ks.seq[i] && !(ks.seq[i] = bench_seq_new(ks.keys, kSeqLen, kKeySeed + 1 + i)))
            die("cannot make key sequence");
    g_cur = &ks;
    if (g_target && g_design == d && g_nkeys == nkeys)
        return;
    bench_target_free(g_target);
    g_target = bench_target_new(d, ks.keys);
    if (!g_target)
        die("cannot create the target");
    g_design = d;
    g_nkeys = nkeys;
}

void BM_hit(benchmark::State &state, bench_design d, size_t nkeys)
{
    const int tid = state.thread_index();
    if (tid == 0)
        setup(d, nkeys, state.threads());

    size_t pos = 0;
    uint64_t allowed = 0;
    for (auto _ : state) {
        // globals read after the start barrier
        allowed += bench_target_run(g_target, g_cur->keys, g_cur->seq[tid], &pos, kBatch);
    }
    const uint64_t items = uint64_t(state.iterations()) * kBatch;
    state.SetItemsProcessed(int64_t(items));
    // per-thread counters are summed over the threads; not_allowed = denied + errors
    state.counters["not_allowed"] = double(items - allowed);
    if (tid == 0) {
        // after the end barrier: every thread's errors are in (counted since the
        // target was created, warm-up included: tally EFULL shows up here)
        state.counters["errors_total"] = double(bench_target_errors(g_target));
        state.counters["bytes_per_key"] = bench_target_bytes_per_key(g_target);
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

const char *keys_label(size_t n)
{
    return n == (size_t(1) << 16) ? "64K" : n == (size_t(1) << 20) ? "1M" : "n";
}

void register_all()
{
    static const size_t key_counts[] = { size_t(1) << 16, size_t(1) << 20 };
    static const bench_design designs[] = { BENCH_TALLY, BENCH_TALLY_AT, BENCH_MUTEX_MAP,
                                            BENCH_FLAT_LOCKFREE };
    char name[128];

    for (size_t nkeys : key_counts) {
        for (bench_design d : designs) {
            std::snprintf(name, sizeof(name), "hit/%s/%s", bench_design_name(d), keys_label(nkeys));
            benchmark::RegisterBenchmark(name, BM_hit, d, nkeys)
                ->Threads(1)
                ->Threads(2)
                ->UseRealTime();
        }
    }
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

    bench_target_free(g_target);
    for (auto &kv : g_keysets) {
        for (bench_seq *s : kv.second.seq)
            bench_seq_free(s);
        bench_keys_free(kv.second.keys);
    }
    return 0;
}
