/*
 * The workload of each design behind one interface: create and warm the
 * shared state, then run batches of hits from a per-thread key sequence.
 * The loop around each design is the same: the next key reference comes from
 * a precomputed sequence and the key bytes a few hits ahead are prefetched,
 * as they would be in cache in a server that has just parsed the request.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "shim.h"
#include "tally.h"

/* Defined in src/engine.c, declared in no header. */
extern size_t tally__policy_bytes(tally_engine *e, uint32_t policy);

/* The limit every design checks: large enough that every hit is allowed. */
#define BENCH_MAX       (UINT64_C(1) << 40)
#define BENCH_PERIOD_NS (UINT64_C(3600) * 1000000000u)
#define PREFETCH_AHEAD  8

struct bench_target {
    bench_design     design;
    size_t           capacity;
    tally_engine    *engine;
    uint32_t         policy;
    uint64_t         now;          /* tally_hit_at: the precomputed time */
    bench_mutex_map *mutex_map;
    bench_flat      *flat;
    _Atomic uint64_t errors;
};

const char *bench_design_name(bench_design d)
{
    switch (d) {
    case BENCH_TALLY:         return "tally";
    case BENCH_TALLY_AT:      return "tally_hit_at";
    case BENCH_MUTEX_MAP:     return "mutex_map";
    case BENCH_FLAT_LOCKFREE: return "flat_lockfree";
    default:                  return "?";
    }
}

static int open_tally(size_t capacity, bool digest_only, tally_engine **e, uint32_t *policy)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = digest_only;
    int rc = tally_open(&o, e);
    if (rc)
        return rc;
    tally_policy p = {
        .name = "bench",
        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = BENCH_MAX, .period_ns = BENCH_PERIOD_NS } },
        .n_limits = 1,
    };
    rc = tally_policy_add(*e, &p, policy);
    if (rc) {
        tally_close(*e);
        *e = NULL;
    }
    return rc;
}

bench_target *bench_target_new(bench_design d, const bench_keys *k)
{
    bench_target *t = calloc(1, sizeof(*t));
    size_t failed = 0;
    int first_rc = 0;

    if (!t)
        return NULL;
    t->design = d;
    t->capacity = k->n;
    switch (d) {
    case BENCH_TALLY:
    case BENCH_TALLY_AT: {
        int rc = open_tally(k->n, false, &t->engine, &t->policy);
        if (rc) {
            fprintf(stderr, "bench: tally_open/policy_add: %s\n", tally_strerror(rc));
            free(t);
            return NULL;
        }
        uint64_t now = tally_now_ns();
        for (size_t i = 0; i < k->n; i++) {
            tally_result res;
            rc = tally_hit_at(t->engine, t->policy, k->arena + k->ref[i].off, k->ref[i].len,
                              NULL, now, &res);
            if (rc) {
                if (!failed++)
                    first_rc = rc;
            }
        }
        t->now = tally_now_ns();
        if (failed)
            fprintf(stderr, "bench: tally warm-up: %zu of %zu keys failed (first: %s)\n",
                    failed, k->n, tally_strerror(first_rc));
        break;
    }
    case BENCH_MUTEX_MAP: {
        t->mutex_map = bench_mutex_map_new(k->n, BENCH_MAX, BENCH_PERIOD_NS);
        if (!t->mutex_map)
            break;
        uint64_t now = bench_clock_ns();
        for (size_t i = 0; i < k->n; i++)
            if (bench_mutex_map_hit(t->mutex_map, k->arena + k->ref[i].off, k->ref[i].len, now) != 1)
                failed++;
        break;
    }
    case BENCH_FLAT_LOCKFREE:
        t->flat = bench_flat_new(k->n);
        if (!t->flat)
            break;
        for (size_t i = 0; i < k->n; i++)
            if (bench_flat_insert(t->flat, k->arena + k->ref[i].off, k->ref[i].len) != 0)
                failed++;
        break;
    default:
        break;
    }
    if (!t->engine && !t->mutex_map && !t->flat) {
        fprintf(stderr, "bench: cannot create %s\n", bench_design_name(d));
        free(t);
        return NULL;
    }
    if (failed && d != BENCH_TALLY && d != BENCH_TALLY_AT)
        fprintf(stderr, "bench: %s warm-up: %zu of %zu keys failed\n", bench_design_name(d),
                failed, k->n);
    atomic_store(&t->errors, failed);
    return t;
}

void bench_target_free(bench_target *t)
{
    if (!t)
        return;
    tally_close(t->engine);
    bench_mutex_map_free(t->mutex_map);
    bench_flat_free(t->flat);
    free(t);
}

uint64_t bench_target_errors(const bench_target *t)
{
    return atomic_load(&((bench_target *)t)->errors);
}

double bench_target_bytes_per_key(const bench_target *t)
{
    size_t bytes = t->engine ? tally__policy_bytes(t->engine, t->policy)
                 : t->mutex_map ? bench_mutex_map_bytes(t->mutex_map)
                 : bench_flat_bytes(t->flat);
    return (double)bytes / (double)t->capacity;
}

/* The loop every design shares; BODY uses key, len and counts into allowed/errors. */
#define RUN_LOOP(BODY)                                                               \
    for (size_t i = 0; i < n; i++, p++) {                                            \
        bench_ref r = seq->ref[p & seq->mask];                                       \
        bench_ref ahead = seq->ref[(p + PREFETCH_AHEAD) & seq->mask];                \
        __builtin_prefetch(k->arena + ahead.off);                                    \
        __builtin_prefetch(k->arena + ahead.off + ahead.len - 1);                    \
        const char *key = k->arena + r.off;                                          \
        size_t len = r.len;                                                          \
        BODY                                                                         \
    }

uint64_t bench_target_run(bench_target *t, const bench_keys *k, const bench_seq *seq,
                          size_t *pos, size_t n)
{
    uint64_t allowed = 0, errors = 0;
    size_t p = *pos;
    tally_result res;

    switch (t->design) {
    case BENCH_TALLY:
        RUN_LOOP({
            if (tally_hit(t->engine, t->policy, key, len, NULL, &res) == 0)
                allowed += res.allowed;
            else
                errors++;
        })
        break;
    case BENCH_TALLY_AT:
        RUN_LOOP({
            if (tally_hit_at(t->engine, t->policy, key, len, NULL, t->now, &res) == 0)
                allowed += res.allowed;
            else
                errors++;
        })
        break;
    case BENCH_MUTEX_MAP:
        RUN_LOOP({
            /* read the clock outside the lock, as tally_hit does */
            int a = bench_mutex_map_hit(t->mutex_map, key, len, bench_clock_ns());
            if (a >= 0)
                allowed += (uint64_t)a;
            else
                errors++;
        })
        break;
    case BENCH_FLAT_LOCKFREE:
        RUN_LOOP({
            if (bench_flat_add(t->flat, key, len))
                allowed++;
            else
                errors++;
        })
        break;
    default:
        errors += n;
        break;
    }
    *pos = p;
    if (errors)
        atomic_fetch_add_explicit(&t->errors, errors, memory_order_relaxed);
    return allowed;
}

double bench_tally_bytes_per_key(size_t capacity, int digest_only)
{
    tally_engine *e;
    uint32_t policy;

    if (open_tally(capacity, digest_only != 0, &e, &policy) != 0)
        return -1;
    double r = (double)tally__policy_bytes(e, policy) / (double)capacity;
    tally_close(e);
    return r;
}
