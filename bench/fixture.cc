#include "fixture.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>

namespace fixture {
namespace {

std::map<size_t, bench_keys *> g_keys;
std::map<std::tuple<size_t, int, int, int>, bench_seq *> g_seqs;  // (n, dist, weighted, tid)
// Every target made stays until the end, so that rows may run in any order
// (--benchmark_enable_random_interleaving) without being rebuilt and warmed.
std::map<std::tuple<int, int, size_t>, bench_target *> g_targets;  // (design, kind, keys)
bench_target *g_target = nullptr;

[[noreturn]] void die(const char *what)
{
    std::fprintf(stderr, "bench: %s\n", what);
    std::abort();
}

} // namespace

Setup prepare(bench_design d, const bench_workload &w, int threads)
{
    if (threads > BENCH_MAX_THREADS)
        die("too many threads");
    bench_keys *&k = g_keys[w.n_keys];
    if (!k && !(k = bench_keys_new(w.n_keys, BENCH_KEY_SEED)))
        die("cannot make keys");
    Setup s{};
    s.keys = k;
    for (int i = 0; i < threads; i++) {
        bench_seq *&q = g_seqs[{ w.n_keys, int(w.dist), w.weighted, i }];
        if (!q && !(q = bench_seq_new(k, kSeqLen, BENCH_KEY_SEED + 1 + i, w.dist, w.weighted)))
            die("cannot make key sequence");
        s.seq[i] = q;
    }
    bench_target *&t = g_targets[{ int(d), int(w.kind), w.n_keys }];
    if (!t) {
        if (!(t = bench_target_new(d, &w, k)) && !bench_design_needs_redis(d))
            die("cannot create the target");
        // churn: until every slot has been used once a miss may stop early at a
        // never-used slot, so a young table is cheaper than the one every later
        // row meets; ten times the capacity in hits ages it before the first row.
        // The LRU churn needs a full table: twice the capacity fills it, then
        // evicts about as many keys as it holds (tally's evictions take tens of
        // microseconds each, so not ten times)
        if (t && (w.kind == BENCH_W_INSERT || w.kind == BENCH_W_LRU_CHURN)) {
            size_t pos = 0;
            bench_target_run(t, 0, k, s.seq[0], &pos,
                             (w.kind == BENCH_W_INSERT ? 10 : 2) * w.capacity);
        }
    }
    s.target = g_target = t;
    return s;
}

bench_target *current()
{
    return g_target;
}

const char *keys_label(size_t n)
{
    static std::map<size_t, std::string> other;
    if (n == 1024)
        return "1K";
    if (n == (size_t(1) << 16))
        return "64K";
    if (n == (size_t(1) << 20))
        return "1M";
    std::string &s = other[n];
    s = std::to_string(n);
    return s.c_str();
}

void release_all()
{
    for (auto &kv : g_targets)
        bench_target_free(kv.second);
    g_targets.clear();
    g_target = nullptr;
    for (auto &kv : g_seqs)
        bench_seq_free(kv.second);
    g_seqs.clear();
    for (auto &kv : g_keys)
        bench_keys_free(kv.second);
    g_keys.clear();
}

} // namespace fixture
