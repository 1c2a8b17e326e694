// Latency rows: the time of each tally_hit alone, as percentiles, with the
// threads hitting uniform keys of a 64K-key table, and the mutex map under
// the same load for comparison. Rows:
// latency/<environment>/<design>/64K/real_time/threads:<T>, counters p50_ns,
// p99_ns, p999_ns (all threads' hits together). The environment says what
// runs beside the hitting threads (bench_lat_env in shim.h).
#include <benchmark/benchmark.h>

#include <string>

#include "fixture.h"
#include "shim.h"

namespace {

constexpr size_t kBatch = 256;
bench_hist g_hist[BENCH_MAX_THREADS];

void BM_latency(benchmark::State &state, bench_design d, bench_lat_env env)
{
    const int tid = state.thread_index();
    static fixture::Setup s;      // written by thread 0 before the start barrier
    static int env_ok;
    static char why[256];

    if (tid == 0) {
        const bench_workload w = bench_workload_of(BENCH_W_UNIFORM, size_t(1) << 16);
        s = fixture::prepare(d, w, state.threads());
        env_ok = bench_lat_env_start(s.target, env, why, sizeof(why)) == 0;
        for (int i = 0; i < state.threads(); i++)
            g_hist[i] = bench_hist{};
    }
    // the other threads may read env_ok only after the barrier: every thread
    // enters the loop, and a thread that finds the environment missing stops
    size_t pos = 0;
    for (auto _ : state) {
        if (!env_ok) {
            state.SkipWithError(why);
            break;
        }
        bench_target_run_timed(s.target, tid, s.keys, s.seq[tid], &pos, kBatch, &g_hist[tid]);
    }
    if (tid == 0 && env_ok) {
        bench_lat_env_stop(s.target, env);
        bench_hist all{};
        for (int i = 0; i < state.threads(); i++)
            bench_hist_merge(&all, &g_hist[i]);
        state.SetItemsProcessed(int64_t(all.n));
        state.counters["p50_ns"] = bench_hist_quantile_ns(&all, 0.50);
        state.counters["p99_ns"] = bench_hist_quantile_ns(&all, 0.99);
        state.counters["p999_ns"] = bench_hist_quantile_ns(&all, 0.999);
        state.counters["errors_total"] = double(bench_target_errors(s.target));
    }
}

} // namespace

void register_latency()
{
    static const bench_design designs[] = { BENCH_TALLY, BENCH_MUTEX_MAP };
    for (int e = 0; e < BENCH_N_LAT_ENVS; e++) {
        const bench_lat_env env = bench_lat_env(e);
        for (bench_design d : designs) {
            if (env != BENCH_LAT_ALONE && d != BENCH_TALLY)
                continue;                 // the flusher is tally's
            const std::string name = std::string("latency/") + bench_lat_env_name(env) + "/"
                + bench_design_name(d) + "/64K";
            benchmark::RegisterBenchmark(name.c_str(), BM_latency, d, env)
                ->Threads(2)
                ->Threads(8)
                ->UseRealTime();
        }
    }
}
