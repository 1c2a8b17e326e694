// Shared set-up of the benchmark rows: keys, per-thread key sequences and the
// target under test, each made once and kept to the end, so that every row of
// a design and workload (thread counts, repetitions) meets the same warm
// target whatever order the rows run in. Called by
// thread 0 only, before the start barrier of google-benchmark's timing loop:
// the barrier orders these writes before the other threads read them.
#pragma once

#include <cstddef>

#include "shim.h"

namespace fixture {

constexpr size_t kSeqLen = size_t(1) << 20;   // references per thread, read cyclically

struct Setup {
    const bench_keys *keys;
    const bench_seq *seq[BENCH_MAX_THREADS];
    bench_target *target;
};

// The keys, @threads sequences and the target of design @d for workload @w;
// aborts with a message when something cannot be made, except that a design
// that needs a redis-server (which may have gone away) gets target nullptr.
Setup prepare(bench_design d, const bench_workload &w, int threads);
// The target in use, for counters read after the loop.
bench_target *current();
// "1K", "64K", "1M", or the number.
const char *keys_label(size_t n);
// Free everything (end of main).
void release_all();

} // namespace fixture
