/*
 * The workload of each design behind one interface: create and warm the
 * shared state, then run batches of operations from a per-thread key
 * sequence. The loop around each design is the same: the next key reference
 * (and cost) comes from a precomputed sequence and the key bytes a few
 * operations ahead are prefetched, as they would be in cache in a server that
 * has just parsed the request. Every baseline reads the clock on each hit, as
 * tally_hit does; only tally_hit_at, the practical limit and the bare CAS do
 * not. The operation itself is one call per design (bench_op_<design>).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include "shim.h"
#include "tally.h"

/* Defined in src/engine.c, declared in no header. */
extern size_t tally__policy_bytes(tally_engine *e, uint32_t policy);

#define PREFETCH_AHEAD 8

/* What one thread counts; written by that thread only. */
typedef struct bench_thread {
    _Alignas(64) uint64_t cost;     /* of the allowed hits */
    uint64_t     opened;            /* BENCH_W_HOT_LIMIT: see bench_target_windows() */
    uint64_t     first_exceeded;
    uint64_t     linger;            /* BENCH_W_HOT_LIMIT: own hits left before the clock moves */
    tally_result res;               /* the last tally call's */
} bench_thread;

struct bench_target {
    bench_design      design;
    bench_workload    w;
    tally_engine     *engine;
    uint32_t          policy;
    uint64_t          now;          /* tally_hit_at: the time read once */
    void             *shared;       /* BENCH_TALLY_SHARED_AT: the engine's mapping */
    size_t            shared_len;
    uint64_t          start_ns;     /* bench_target_set_clock() */
    uint64_t          step_ns;      /* 0: the clock */
    bench_mutex_map  *mutex_map;
    bench_rwlock_map *rwlock_map;
    bench_rcu_map    *rcu_map;
    bench_ck_map     *ck_map;
    bench_flat       *flat;
    bench_cas        *cas;
    bench_redis      *redis;
    _Atomic uint64_t  errors;
    bench_thread      thr[BENCH_MAX_THREADS];
    _Alignas(64) _Atomic uint64_t window_clock;   /* BENCH_W_HOT_LIMIT's time */
};

/* ---- Names, workloads, support ------------------------------------------------ */

const char *bench_design_name(bench_design d)
{
    static const char *const names[BENCH_N_DESIGNS] = {
        [BENCH_TALLY] = "tally",           [BENCH_TALLY_AT] = "tally_hit_at",
        [BENCH_TALLY_SHARED_AT] = "tally_shared_at",
        [BENCH_MUTEX_MAP] = "mutex_map",   [BENCH_RWLOCK_MAP] = "rwlock_map",
        [BENCH_RCU_LFHT] = "rculfhash",    [BENCH_CK_HS] = "ck_hs",
        [BENCH_FLAT_LOCKFREE] = "flat_lockfree", [BENCH_CAS_ADD] = "cas_add",
        [BENCH_REDIS_INCR] = "redis_incr", [BENCH_REDIS_PIPELINED] = "redis_pipelined",
    };
    return (unsigned)d < BENCH_N_DESIGNS ? names[d] : "?";
}

const char *bench_kind_name(bench_kind kind)
{
    static const char *const names[BENCH_N_KINDS] = {
        [BENCH_W_UNIFORM] = "uniform", [BENCH_W_ZIPF] = "zipf",   [BENCH_W_HOT] = "hot",
        [BENCH_W_WEIGHTED] = "weighted", [BENCH_W_GCRA] = "gcra", [BENCH_W_PEEK] = "peek_mix",
        [BENCH_W_INSERT] = "insert", [BENCH_W_HOT_LIMIT] = "hot_limit",
        [BENCH_W_LRU_CHURN] = "lru_churn", [BENCH_W_CONC_PAIR] = "conc_pair",
        [BENCH_W_CONC_PAIR_HOT] = "conc_pair_hot",
    };
    return (unsigned)kind < BENCH_N_KINDS ? names[kind] : "?";
}

bench_workload bench_workload_of(bench_kind kind, size_t n_keys)
{
    bench_workload w = {
        .kind = kind, .dist = BENCH_UNIFORM, .n_keys = n_keys, .capacity = n_keys,
        .algo = BENCH_FIXED, .max = UINT64_C(1) << 39,
        .period_ns = UINT64_C(3600) * 1000000000u, .prefill = 1,
    };
    switch (kind) {
    case BENCH_W_ZIPF:
        w.dist = BENCH_ZIPF;
        break;
    case BENCH_W_HOT:
        w.dist = BENCH_HOT;
        w.n_keys = w.capacity = 1;
        break;
    case BENCH_W_WEIGHTED:
        w.weighted = 1;
        break;
    case BENCH_W_GCRA:
        /* burst 2^30 refilled in 2^30 ns: one unit per ns, never reached */
        w.algo = BENCH_GCRA;
        w.max = w.period_ns = UINT64_C(1) << 30;
        break;
    case BENCH_W_PEEK:
        w.peek_mix = 1;
        break;
    case BENCH_W_INSERT:
        w.capacity = n_keys / 16;
        w.period_ns = 10 * 1000000u;
        w.prefill = 0;
        break;
    case BENCH_W_HOT_LIMIT:
        w.dist = BENCH_HOT;
        w.n_keys = w.capacity = 1;
        w.max = BENCH_HOT_LIMIT_MAX;
        w.period_ns = BENCH_HOT_LIMIT_PERIOD_NS;
        break;
    case BENCH_W_LRU_CHURN:
        w.capacity = n_keys / 16;
        w.prefill = 0;
        w.evict_lru = 1;
        break;
    case BENCH_W_CONC_PAIR:
    case BENCH_W_CONC_PAIR_HOT:
        if (kind == BENCH_W_CONC_PAIR_HOT) {
            w.dist = BENCH_HOT;
            w.n_keys = w.capacity = 1;
        }
        /* the lease (period_ns) outlasts every run; BENCH_MAX_THREADS holders at the most */
        w.algo = BENCH_CONCURRENCY;
        w.max = UINT64_C(1) << 31;
        break;
    default:
        break;
    }
    return w;
}

int bench_design_supports(bench_design d, const bench_workload *w)
{
    if (w->kind == BENCH_W_HOT_LIMIT)  /* the window clock is a time tally_hit_at is given */
        return d == BENCH_TALLY_AT;
    if (w->evict_lru || w->algo == BENCH_CONCURRENCY)    /* see bench_op_mutex_map_lru, _pair */
        return d == BENCH_TALLY || d == BENCH_MUTEX_MAP;
    switch (d) {
    case BENCH_TALLY:
    case BENCH_MUTEX_MAP:
    case BENCH_RWLOCK_MAP:
    case BENCH_RCU_LFHT:
        return 1;
    case BENCH_TALLY_AT:       /* one time for the whole run: windows never expire */
    case BENCH_TALLY_SHARED_AT:
        return w->kind != BENCH_W_INSERT;
    case BENCH_CK_HS:          /* removes no keys: see ck_map.c */
        return w->kind != BENCH_W_INSERT;
    case BENCH_FLAT_LOCKFREE:  /* no limit, no inserts during the run */
        return w->kind != BENCH_W_INSERT && w->kind != BENCH_W_GCRA;
    case BENCH_CAS_ADD:        /* one counter for every key */
        return w->kind == BENCH_W_HOT;
    case BENCH_REDIS_INCR:
    case BENCH_REDIS_PIPELINED:/* INCRBY is a fixed-window count; no peek, no expiry */
        return w->algo == BENCH_FIXED && !w->peek_mix && w->kind != BENCH_W_INSERT;
    default:
        return 0;
    }
}

size_t bench_design_batch(bench_design d)
{
    return d == BENCH_REDIS_INCR ? 8 : d == BENCH_REDIS_PIPELINED ? BENCH_REDIS_PIPELINE : 256;
}

int bench_design_needs_redis(bench_design d)
{
    return d == BENCH_REDIS_INCR || d == BENCH_REDIS_PIPELINED;
}

/* ---- Targets ---------------------------------------------------------------------- */

/* The policy open_tally() adds, for @w. */
static tally_policy policy_of(const bench_workload *w)
{
    tally_policy p = {
        .name = "bench",
        .limits = { { .algo = w->algo == BENCH_GCRA ? TALLY_GCRA
                            : w->algo == BENCH_CONCURRENCY ? TALLY_CONCURRENCY
                            : TALLY_FIXED_WINDOW,
                      .max = w->max, .period_ns = w->period_ns } },
        .n_limits = 1,
        .flags = w->evict_lru ? TALLY_EVICT_LRU : 0,
    };
    return p;
}

static int open_tally(size_t capacity, const bench_workload *w, bool digest_only,
                      tally_engine **e, uint32_t *policy)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = digest_only;
    /* one hash key for every run: the same keys land in the same slots, so
       probe lengths and instruction counts repeat */
    memcpy(o.hash_key, "tally-bench-key.", sizeof(o.hash_key));
    int rc = tally_open(&o, e);
    if (rc)
        return rc;
    tally_policy p = policy_of(w);
    rc = tally_policy_add(*e, &p, policy);
    if (rc) {
        tally_close(*e);
        *e = NULL;
    }
    return rc;
}

/* A shared engine of the same policy in an anonymous shared mapping, as a
   server that forks its workers makes one (policy id 0). */
static int open_shared(size_t capacity, const bench_workload *w, bench_target *t)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = true;
    memcpy(o.hash_key, "tally-bench-key.", sizeof(o.hash_key));
    tally_policy p = policy_of(w);
    int rc = tally_shared_size(&o, &p, 1, BENCH_MAX_THREADS + 8, &t->shared_len);
    if (rc)
        return rc;
    t->shared = mmap(NULL, t->shared_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (t->shared == MAP_FAILED) {
        t->shared = NULL;
        return TALLY_ENOMEM;
    }
    t->policy = 0;
    return tally_shared_create(t->shared, t->shared_len, &o, &p, 1, BENCH_MAX_THREADS + 8, &t->engine);
}

static int one_op(bench_target *t, int tid, const char *key, size_t len, uint64_t cost, int peek);

bench_target *bench_target_new(bench_design d, const bench_workload *w, const bench_keys *k)
{
    bench_target *t = calloc(1, sizeof(*t));
    bench_rule rule = bench_rule_of(w);
    int reclaim = w->evict_lru ? BENCH_MAP_LRU : w->kind == BENCH_W_INSERT;
    bool made = false;

    if (!t)
        return NULL;
    t->design = d;
    t->w = *w;
    switch (d) {
    case BENCH_TALLY:
    case BENCH_TALLY_AT: {
        int rc = open_tally(w->capacity, w, false, &t->engine, &t->policy);
        if (rc)
            fprintf(stderr, "bench: tally_open/policy_add: %s\n", tally_strerror(rc));
        made = rc == 0;
        break;
    }
    case BENCH_TALLY_SHARED_AT: {
        int rc = open_shared(w->capacity, w, t);
        if (rc)
            fprintf(stderr, "bench: tally_shared_create: %s\n", tally_strerror(rc));
        made = rc == 0;
        break;
    }
    case BENCH_MUTEX_MAP:
        made = (t->mutex_map = bench_mutex_map_new(w->capacity, rule, reclaim)) != NULL;
        break;
    case BENCH_RWLOCK_MAP:
        made = (t->rwlock_map = bench_rwlock_map_new(w->capacity, rule, reclaim)) != NULL;
        break;
    case BENCH_RCU_LFHT:
        made = (t->rcu_map = bench_rcu_map_new(w->capacity, rule, reclaim)) != NULL;
        break;
    case BENCH_CK_HS:
        made = (t->ck_map = bench_ck_map_new(w->capacity, rule)) != NULL;
        break;
    case BENCH_FLAT_LOCKFREE:
        made = (t->flat = bench_flat_new(w->capacity)) != NULL;
        break;
    case BENCH_CAS_ADD:
        made = (t->cas = bench_cas_new()) != NULL;
        break;
    case BENCH_REDIS_INCR:
    case BENCH_REDIS_PIPELINED:
        made = (t->redis = bench_redis_new(w->max)) != NULL;
        break;
    default:
        break;
    }
    if (!made) {
        fprintf(stderr, "bench: cannot create %s\n", bench_design_name(d));
        free(t);
        return NULL;
    }
    t->now = tally_now_ns();
    atomic_init(&t->window_clock, t->now);

    /* every key once, before the run; Redis creates a key on its first INCRBY */
    size_t failed = 0;
    if (w->prefill && !t->redis) {
        for (size_t i = 0; i < k->n; i++) {
            const char *key = k->arena + k->ref[i].off;
            int a = t->flat ? bench_flat_insert(t->flat, key, k->ref[i].len) + 1
                            : one_op(t, 0, key, k->ref[i].len, 1, 0);
            failed += a != 1;
        }
    }
    if (failed)
        fprintf(stderr, "bench: %s warm-up: %zu of %zu keys failed\n", bench_design_name(d),
                failed, k->n);
    atomic_store(&t->errors, failed);
    return t;
}

void bench_target_free(bench_target *t)
{
    if (!t)
        return;
    tally_close(t->engine);         /* a shared engine's: a detach */
    if (t->shared)
        munmap(t->shared, t->shared_len);
    bench_mutex_map_free(t->mutex_map);
    bench_rwlock_map_free(t->rwlock_map);
    bench_rcu_map_free(t->rcu_map);
    bench_ck_map_free(t->ck_map);
    bench_flat_free(t->flat);
    bench_cas_free(t->cas);
    bench_redis_free(t->redis);
    free(t);
}

uint64_t bench_target_errors(const bench_target *t)
{
    return atomic_load(&((bench_target *)t)->errors);
}

uint64_t bench_target_allowed_cost(const bench_target *t)
{
    uint64_t sum = 0;
    for (int i = 0; i < BENCH_MAX_THREADS; i++)
        sum += t->thr[i].cost;
    return sum;
}

void bench_target_set_clock(bench_target *t, uint64_t start_ns, uint64_t step_ns)
{
    t->start_ns = start_ns;
    t->step_ns = step_ns;
}

void bench_target_windows(const bench_target *t, uint64_t *opened, uint64_t *first_exceeded)
{
    *opened = *first_exceeded = 0;
    for (int i = 0; i < BENCH_MAX_THREADS; i++) {
        *opened += t->thr[i].opened;
        *first_exceeded += t->thr[i].first_exceeded;
    }
}

int bench_target_fill_window(bench_target *t, int tid, const void *key, size_t len)
{
    bench_thread *th = &t->thr[tid];
    tally_snapshot s;
    tally_result res;

    if (!t->engine || t->w.algo != BENCH_FIXED || tally_read(t->engine, t->policy, key, len, &s))
        return -1;
    /* the window's own start is inside it whatever the clock reads by now */
    do {
        if (tally_hit_at(t->engine, t->policy, key, len, NULL, s.c[0].window_start_ns, &res))
            return -1;
        th->cost += res.allowed;
        th->opened += res.allowed && res.remaining == t->w.max - 1;
        th->first_exceeded += res.first_exceeded & 1;
    } while (res.allowed);
    /* a move left pending by an earlier run would cut a window of the next one short */
    for (int i = 0; i < BENCH_MAX_THREADS; i++)
        t->thr[i].linger = 0;
    /* relaxed: the threads that read it next are started after this call returns */
    atomic_store_explicit(&t->window_clock, s.c[0].window_start_ns + t->w.period_ns,
                          memory_order_relaxed);
    return 0;
}

int bench_target_count(bench_target *t, const void *key, size_t len, uint64_t *count)
{
    if (t->engine) {
        tally_snapshot s;
        if (tally_read(t->engine, t->policy, key, len, &s) != 0)
            return -1;
        *count = s.c[0].used;
        return 0;
    }
    if (t->mutex_map)
        return bench_mutex_map_count(t->mutex_map, key, len, count);
    if (t->rwlock_map)
        return bench_rwlock_map_count(t->rwlock_map, key, len, count);
    if (t->rcu_map)
        return bench_rcu_map_count(t->rcu_map, key, len, count);
    if (t->ck_map)
        return bench_ck_map_count(t->ck_map, key, len, count);
    if (t->flat)
        return bench_flat_count(t->flat, key, len, count);
    if (t->cas) {
        *count = bench_cas_count(t->cas);
        return 0;
    }
    if (t->redis)
        return bench_redis_count(t->redis, key, len, count);
    return -1;
}

double bench_target_bytes_per_key(const bench_target *t)
{
    size_t bytes = t->engine ? tally__policy_bytes(t->engine, t->policy)
                 : t->mutex_map ? bench_mutex_map_bytes(t->mutex_map)
                 : t->rwlock_map ? bench_rwlock_map_bytes(t->rwlock_map)
                 : t->rcu_map ? bench_rcu_map_bytes(t->rcu_map)
                 : t->ck_map ? bench_ck_map_bytes(t->ck_map)
                 : t->flat ? bench_flat_bytes(t->flat) : 0;
    return (double)bytes / (double)t->w.capacity;
}

double bench_tally_bytes_per_key(size_t capacity, int digest_only)
{
    bench_workload w = bench_workload_of(BENCH_W_UNIFORM, capacity);
    tally_engine *e;
    uint32_t policy;

    if (open_tally(capacity, &w, digest_only != 0, &e, &policy) != 0)
        return -1;
    double r = (double)tally__policy_bytes(e, policy) / (double)capacity;
    tally_close(e);
    return r;
}

/* ---- The operation and the loop ------------------------------------------------------ */

/*
 * One operation of each design: 1 allowed, 0 denied, -1 error. @cost 0 asks
 * for a peek (decide, consume nothing); @now is the time for the designs
 * given one (see time_of). Never inlined, cloned or specialised: each is one
 * symbol whose inclusive cost is one operation's (tools/bench-callgrind).
 */
#if defined(__clang__)
#define OP_ENTRY __attribute__((noinline, used))
#else
#define OP_ENTRY __attribute__((noipa, used))
#endif

typedef int op_fn(bench_target *t, int tid, const char *key, size_t len, uint64_t cost,
                  uint64_t now);

static OP_ENTRY int bench_op_tally(bench_target *t, int tid, const char *key, size_t len,
                                   uint64_t cost, uint64_t now)
{
    tally_result *res = &t->thr[tid].res;
    int rc;

    (void)now;
    if (cost == 0)
        rc = tally_peek_at(t->engine, t->policy, key, len, tally_now_ns(), res);
    else
        rc = tally_hit(t->engine, t->policy, key, len, cost == 1 ? NULL : &cost, res);
    return rc == 0 ? res->allowed : -1;
}

static OP_ENTRY int bench_op_tally_hit_at(bench_target *t, int tid, const char *key, size_t len,
                                          uint64_t cost, uint64_t now)
{
    tally_result *res = &t->thr[tid].res;
    int rc;

    if (cost == 0)
        rc = tally_peek_at(t->engine, t->policy, key, len, now, res);
    else
        rc = tally_hit_at(t->engine, t->policy, key, len, cost == 1 ? NULL : &cost, now, res);
    return rc == 0 ? res->allowed : -1;
}

static OP_ENTRY int bench_op_mutex_map(bench_target *t, int tid, const char *key, size_t len,
                                       uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_mutex_map_hit(t->mutex_map, key, len, cost, now, cost == 0);
}

/* The mutex map's LRU churn: hits stamp their slot's recency (bench_mutex_map_hit_lru). */
static OP_ENTRY int bench_op_mutex_map_lru(bench_target *t, int tid, const char *key,
                                           size_t len, uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_mutex_map_hit_lru(t->mutex_map, key, len, cost, now);
}

/* A concurrency pair: acquire by a hit, then give the hold back on the same key, as a
   caller does around the request it admits. */
static OP_ENTRY int bench_op_tally_pair(bench_target *t, int tid, const char *key, size_t len,
                                        uint64_t cost, uint64_t now)
{
    tally_result *res = &t->thr[tid].res;
    const uint64_t *costs = cost == 1 ? NULL : &cost;

    (void)now;
    if (tally_hit(t->engine, t->policy, key, len, costs, res) != 0)
        return -1;
    if (res->allowed && tally_release(t->engine, t->policy, key, len, costs) != 0)
        return -1;
    return res->allowed;
}

static OP_ENTRY int bench_op_mutex_map_pair(bench_target *t, int tid, const char *key,
                                            size_t len, uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_mutex_map_pair(t->mutex_map, key, len, cost, now);
}

static OP_ENTRY int bench_op_rwlock_map(bench_target *t, int tid, const char *key, size_t len,
                                        uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_rwlock_map_hit(t->rwlock_map, key, len, cost, now, cost == 0);
}

static OP_ENTRY int bench_op_rculfhash(bench_target *t, int tid, const char *key, size_t len,
                                       uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_rcu_map_hit(t->rcu_map, key, len, cost, now, cost == 0);
}

static OP_ENTRY int bench_op_ck_hs(bench_target *t, int tid, const char *key, size_t len,
                                   uint64_t cost, uint64_t now)
{
    (void)tid;
    return bench_ck_map_hit(t->ck_map, key, len, cost, now, cost == 0);
}

static OP_ENTRY int bench_op_flat_lockfree(bench_target *t, int tid, const char *key, size_t len,
                                           uint64_t cost, uint64_t now)
{
    (void)tid;
    (void)now;
    return bench_flat_add(t->flat, key, len, cost, cost == 0);
}

static OP_ENTRY int bench_op_cas_add(bench_target *t, int tid, const char *key, size_t len,
                                     uint64_t cost, uint64_t now)
{
    (void)tid;
    (void)key;
    (void)len;
    (void)now;
    return bench_cas_add(t->cas, cost, cost == 0);
}

static OP_ENTRY int bench_op_redis_incr(bench_target *t, int tid, const char *key, size_t len,
                                        uint64_t cost, uint64_t now)
{
    (void)now;
    return cost == 0 ? -1 : bench_redis_incr(t->redis, tid, key, len, cost);
}

static op_fn *const op_of_design[BENCH_N_DESIGNS] = {
    [BENCH_TALLY] = bench_op_tally,           [BENCH_TALLY_AT] = bench_op_tally_hit_at,
    [BENCH_TALLY_SHARED_AT] = bench_op_tally_hit_at,
    [BENCH_MUTEX_MAP] = bench_op_mutex_map,   [BENCH_RWLOCK_MAP] = bench_op_rwlock_map,
    [BENCH_RCU_LFHT] = bench_op_rculfhash,    [BENCH_CK_HS] = bench_op_ck_hs,
    [BENCH_FLAT_LOCKFREE] = bench_op_flat_lockfree, [BENCH_CAS_ADD] = bench_op_cas_add,
    [BENCH_REDIS_INCR] = bench_op_redis_incr,
};

/* The operation of design @d on workload @w: the one of op_of_design but for the
   workloads whose operation differs (see bench_design_supports). */
static op_fn *op_for(bench_design d, const bench_workload *w)
{
    if (w->algo == BENCH_CONCURRENCY)
        return d == BENCH_TALLY ? bench_op_tally_pair
             : d == BENCH_MUTEX_MAP ? bench_op_mutex_map_pair : NULL;
    if (w->evict_lru)
        return d == BENCH_TALLY ? bench_op_tally
             : d == BENCH_MUTEX_MAP ? bench_op_mutex_map_lru : NULL;
    return (unsigned)d < BENCH_N_DESIGNS ? op_of_design[d] : NULL;
}

/* The time operation @p of design D is given: tally_hit reads its own clock, the
   practical limit and the bare CAS need none, Redis keeps its own. */
static inline __attribute__((always_inline)) uint64_t
time_of(const bench_design D, bench_target *t, int driven, uint64_t start, uint64_t step,
        size_t p)
{
    if (D == BENCH_TALLY || D == BENCH_FLAT_LOCKFREE || D == BENCH_CAS_ADD
        || D == BENCH_REDIS_INCR)
        return 0;
    if (D == BENCH_TALLY_AT && driven)
        /* relaxed: the value only names a window; tally orders the key's state */
        return atomic_load_explicit(&t->window_clock, memory_order_relaxed);
    if (step)
        return start + (uint64_t)p * step;
    return D == BENCH_TALLY_AT || D == BENCH_TALLY_SHARED_AT ? t->now : bench_clock_ns();
}

static int one_op(bench_target *t, int tid, const char *key, size_t len, uint64_t cost, int peek)
{
    op_fn *op = op_for(t->design, &t->w);
    uint64_t now = t->design == BENCH_TALLY_AT || t->design == BENCH_TALLY_SHARED_AT
                   ? t->now : bench_clock_ns();
    return op ? op(t, tid, key, len, peek ? 0 : cost, now) : -1;
}

/* Ticks of the time-stamp counter (the latency rows); ns where there is none. */
static inline uint64_t ticks(void)
{
#if defined(__x86_64__)
    _mm_lfence();               /* the operation before has finished */
    uint64_t v = __rdtsc();
    _mm_lfence();               /* ... and the one after has not started */
    return v;
#else
    return bench_clock_ns();
#endif
}

static inline unsigned hist_bucket(uint64_t v)
{
    if (v < 128)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);      /* 7..63 */
    unsigned m = (unsigned)(v >> (e - 6));                /* 64..127 */
    return 128 + (e - 7) * 64 + (m - 64);
}

/* The loop, instantiated per design (D constant) and with or without timing. */
static inline __attribute__((always_inline)) uint64_t
run_loop(const bench_design D, op_fn *const op, bench_target *t, int tid, const bench_keys *k,
         const bench_seq *seq, size_t *pos, size_t n, bench_hist *h)
{
    bench_thread *th = &t->thr[tid];
    uint64_t allowed = 0, allowed_cost = 0, errors = 0, opened = 0, first = 0;
    const int peek_mix = t->w.peek_mix;
    const int windows = D == BENCH_TALLY_AT && t->w.kind == BENCH_W_HOT_LIMIT;
    const uint64_t start = t->start_ns, step = t->step_ns, max = t->w.max;
    size_t p = *pos;

    for (size_t i = 0; i < n; i++, p++) {
        bench_ref r = seq->ref[p & seq->mask];
        bench_ref ahead = seq->ref[(p + PREFETCH_AHEAD) & seq->mask];
        __builtin_prefetch(k->arena + ahead.off);
        __builtin_prefetch(k->arena + ahead.off + ahead.len - 1);
        uint64_t cost = seq->cost ? seq->cost[p & seq->mask] : 1;
        int peek = peek_mix && (p & 3) != 0;
        int a;
        if (h) {
            /* a baseline's clock read is part of its call's time, as tally_hit's is */
            uint64_t t0 = ticks();
            a = op(t, tid, k->arena + r.off, r.len, peek ? 0 : cost,
                   time_of(D, t, windows, start, step, p));
            uint64_t t1 = ticks();
            h->b[hist_bucket(t1 - t0)]++;
            h->n++;
        } else {
            a = op(t, tid, k->arena + r.off, r.len, peek ? 0 : cost,
                   time_of(D, t, windows, start, step, p));
        }
        if (a > 0) {
            allowed++;
            allowed_cost += peek ? 0 : cost;
        } else if (a < 0) {
            errors++;
        }
        if (windows && a >= 0) {
            opened += a > 0 && th->res.remaining == max - cost;
            if (th->res.first_exceeded & 1) {
                first++;
                th->linger = BENCH_HOT_LIMIT_LINGER;
            } else if (th->linger && --th->linger == 0) {
                /* one window per first_exceeded: the next opens when the clock moves.
                   Relaxed: a hit that still reads the old time is taken into the new
                   window by tally (a key's time never runs backwards) */
                atomic_fetch_add_explicit(&t->window_clock, t->w.period_ns,
                                          memory_order_relaxed);
            }
        }
    }
    *pos = p;
    th->cost += allowed_cost;
    th->opened += opened;
    th->first_exceeded += first;
    if (errors)
        atomic_fetch_add_explicit(&t->errors, errors, memory_order_relaxed);
    return allowed;
}

static uint64_t run(bench_target *t, int tid, const bench_keys *k, const bench_seq *seq,
                    size_t *pos, size_t n, bench_hist *h)
{
#define RUN_OP(D, OP) return h ? run_loop(D, OP, t, tid, k, seq, pos, n, h) \
                               : run_loop(D, OP, t, tid, k, seq, pos, n, NULL)
    if (t->design == BENCH_MUTEX_MAP && t->w.evict_lru)
        RUN_OP(BENCH_MUTEX_MAP, bench_op_mutex_map_lru);
    if (t->design == BENCH_TALLY && t->w.algo == BENCH_CONCURRENCY)
        RUN_OP(BENCH_TALLY, bench_op_tally_pair);
    if (t->design == BENCH_MUTEX_MAP && t->w.algo == BENCH_CONCURRENCY)
        RUN_OP(BENCH_MUTEX_MAP, bench_op_mutex_map_pair);
    switch (t->design) {
#define RUN(D) case D: RUN_OP(D, op_of_design[D]);
    RUN(BENCH_TALLY) RUN(BENCH_TALLY_AT) RUN(BENCH_TALLY_SHARED_AT) RUN(BENCH_MUTEX_MAP) RUN(BENCH_RWLOCK_MAP)
    RUN(BENCH_RCU_LFHT) RUN(BENCH_CK_HS) RUN(BENCH_FLAT_LOCKFREE) RUN(BENCH_CAS_ADD)
    RUN(BENCH_REDIS_INCR)
#undef RUN
#undef RUN_OP
    case BENCH_REDIS_PIPELINED: {
        uint64_t errors = 0, cost = 0;
        uint64_t a = bench_redis_pipeline(t->redis, tid, k, seq, pos, n, &cost, &errors);
        t->thr[tid].cost += cost;
        if (errors)
            atomic_fetch_add_explicit(&t->errors, errors, memory_order_relaxed);
        return a;
    }
    default:
        atomic_fetch_add_explicit(&t->errors, n, memory_order_relaxed);
        return 0;
    }
}

uint64_t bench_target_run(bench_target *t, int tid, const bench_keys *k, const bench_seq *seq,
                          size_t *pos, size_t n)
{
    return run(t, tid, k, seq, pos, n, NULL);
}

uint64_t bench_target_run_timed(bench_target *t, int tid, const bench_keys *k,
                                const bench_seq *seq, size_t *pos, size_t n, bench_hist *h)
{
    return run(t, tid, k, seq, pos, n, h);
}

/* ---- Latency ------------------------------------------------------------------------- */

static double ticks_per_ns = 1.0;
static pthread_once_t calibrated = PTHREAD_ONCE_INIT;

static void calibrate(void)
{
#if defined(__x86_64__)
    struct timespec pause = { 0, 50 * 1000000 };
    uint64_t c0 = bench_clock_ns(), t0 = __rdtsc();
    nanosleep(&pause, NULL);
    uint64_t c1 = bench_clock_ns(), t1 = __rdtsc();
    ticks_per_ns = (double)(t1 - t0) / (double)(c1 - c0);
#endif
}

void bench_hist_merge(bench_hist *into, const bench_hist *from)
{
    into->n += from->n;
    for (size_t i = 0; i < BENCH_HIST_BUCKETS; i++)
        into->b[i] += from->b[i];
}

double bench_hist_quantile_ns(const bench_hist *h, double q)
{
    pthread_once(&calibrated, calibrate);
    if (h->n == 0)
        return NAN;
    uint64_t want = (uint64_t)ceil(q * (double)h->n), seen = 0;
    if (want == 0)
        want = 1;
    for (unsigned i = 0; i < BENCH_HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen < want)
            continue;
        if (i < 128)
            return (double)i / ticks_per_ns;
        unsigned e = 7 + (i - 128) / 64, m = 64 + (i - 128) % 64;
        double lo = ldexp((double)m, (int)e - 6), width = ldexp(1.0, (int)e - 6);
        return (lo + width / 2) / ticks_per_ns;        /* the middle of the bucket */
    }
    return NAN;
}

const char *bench_lat_env_name(bench_lat_env env)
{
    static const char *const names[BENCH_N_LAT_ENVS] = {
        [BENCH_LAT_ALONE] = "alone", [BENCH_LAT_FLUSHER] = "flusher",
        [BENCH_LAT_REDIS_STOPPED] = "redis_stopped",
    };
    return (unsigned)env < BENCH_N_LAT_ENVS ? names[env] : "?";
}

/* A loopback port where nothing listens: bound once to learn it, then closed. */
static int dead_port(void)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0
        && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

int bench_lat_env_start(bench_target *t, bench_lat_env env, char *why, size_t why_len)
{
    pthread_once(&calibrated, calibrate);
    if (env == BENCH_LAT_ALONE)
        return 0;
    if (!t->engine) {
        snprintf(why, why_len, "the flusher is tally's");
        return -1;
    }
    char host[256] = "127.0.0.1";
    int port;
    if (env == BENCH_LAT_FLUSHER) {
        if (bench_redis_check(why, why_len) != 0 || bench_redis_addr(host, sizeof(host), &port))
            return -1;
    } else if ((port = dead_port()) < 0) {
        snprintf(why, why_len, "no free loopback port");
        return -1;
    }
    tally_redis_options ro = { .host = host, .port = port, .key_prefix = "bench:",
                               .connect_timeout_ms = 100, .command_timeout_ms = 1000 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = BENCH_FLUSH_INTERVAL_MS;
    fo.redis = &ro;
    int rc = tally_flusher_start(t->engine, &fo);
    if (rc) {
        snprintf(why, why_len, "tally_flusher_start: %s", tally_strerror(rc));
        return -1;
    }
    return 0;
}

void bench_lat_env_stop(bench_target *t, bench_lat_env env)
{
    if (env != BENCH_LAT_ALONE && t->engine)
        tally_flusher_stop(t->engine);
}
