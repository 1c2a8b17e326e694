/*
 * Stress tests: real threads racing on real keys. Each test checks an exact
 * invariant that a lost increment, a double reset winner or a duplicated
 * first_exceeded would break. Virtual time (tally_hit_at) makes the windows
 * roll at chosen points while the threads race.
 */
#include "../test.h"
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "tally.h"
#include "../engine_open.h"
#include "core/rcu.h"
#include "engine/engine-internal.h"

#define THREADS 4

static uint32_t add_policy(tally_engine *e, const char *name, tally_limit l, unsigned flags)
{
    tally_policy p = { .name = name, .n_limits = 1, .flags = flags, .limits = { l } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

static void run_threads(void *(*fn)(void *), void *args, size_t arg_size, int n)
{
    pthread_t th[16];
    for (int i = 0; i < n; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, fn, (char *)args + i * arg_size), 0);
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
}

/* ---- No lost increment: hot and cold keys -------------------------------- */

#define HOT_HITS  200000
#define COLD_KEYS 512

struct count_arg {
    tally_engine *e;
    uint32_t      policy;
    int           t;
    uint64_t      cost_sum;
    int           errors;
};

static void *count_worker(void *p)
{
    struct count_arg *a = p;
    char key[32];
    for (int i = 0; i < HOT_HITS; i++) {
        tally_result r;
        uint64_t cost = 1 + (uint64_t)(i % 3);          /* weighted costs 1, 2, 3 */
        const char *k = "hot";
        if (i % 4 == 0) {                               /* every 4th hit goes to a cold key */
            snprintf(key, sizeof(key), "cold-%d", (i / 4 + a->t * 7) % COLD_KEYS);
            k = key;
        }
        if (tally_hit_at(a->e, a->policy, k, strlen(k), &cost, T0, &r) != 0 || !r.allowed)
            a->errors++;
        a->cost_sum += cost;
    }
    return NULL;
}

Test(stress, no_lost_increment_hot_and_cold_keys, .timeout = 600)
{
    tally_engine *e = open_engine(4096);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = TALLY_MAX_COUNT, .period_ns = 3600 * SEC };
    uint32_t pol = add_policy(e, "count", l, 0);
    struct count_arg args[THREADS];
    for (int t = 0; t < THREADS; t++)
        args[t] = (struct count_arg){ .e = e, .policy = pol, .t = t };

    run_threads(count_worker, args, sizeof(args[0]), THREADS);

    uint64_t expected = 0, got = 0;
    for (int t = 0; t < THREADS; t++) {
        cr_assert_eq(args[t].errors, 0);
        expected += args[t].cost_sum;
    }
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "hot", 3, &s), 0);
    got += s.c[0].used;
    for (int k = 0; k < COLD_KEYS; k++) {
        char key[32];
        snprintf(key, sizeof(key), "cold-%d", k);
        if (tally_read(e, pol, key, strlen(key), &s) == 0)
            got += s.c[0].used;
    }
    cr_assert_eq(got, expected, "counted %" PRIu64 ", hit %" PRIu64, got, expected);
    tally_close(e);
}

/* ---- Window roll-over races: phases of virtual time ---------------------- */

#define PHASES       1500
#define PHASE_HITS   50
#define PHASE_MAX    120   /* below THREADS * PHASE_HITS: every phase overflows */

struct phase_shared {
    tally_engine     *e;
    uint32_t          policy[3];
    pthread_barrier_t barrier;
    uint64_t          period[3];
    /* per phase and policy: allowed hits, first_exceeded bits seen */
    _Atomic uint32_t  allowed[3][PHASES];
    _Atomic uint32_t  firsts[3][PHASES];
    _Atomic uint32_t  errors;
};

struct phase_arg {
    struct phase_shared *s;
    int t;
};

static void *phase_worker(void *p)
{
    struct phase_arg *a = p;
    struct phase_shared *s = a->s;
    for (int ph = 0; ph < PHASES; ph++) {
        pthread_barrier_wait(&s->barrier);
        for (int i = 0; i < PHASE_HITS; i++) {
            for (int k = 0; k < 3; k++) {
                tally_result r;
                /* each phase is two periods later: every window of the last phase expired */
                uint64_t now = T0 + (uint64_t)ph * 2 * s->period[k] + (uint64_t)i;
                if (tally_hit_at(s->e, s->policy[k], "key", 3, NULL, now, &r) != 0) {
                    atomic_fetch_add(&s->errors, 1);
                    continue;
                }
                if (r.allowed)
                    atomic_fetch_add(&s->allowed[k][ph], 1);
                atomic_fetch_add(&s->firsts[k][ph], __builtin_popcount(r.first_exceeded));
            }
        }
    }
    return NULL;
}

Test(stress, window_rollover_exact_admission_and_one_first_exceeded, .timeout = 600)
{
    static struct phase_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(64);
    s.period[0] = SEC;
    s.period[1] = SEC;
    s.period[2] = SEC;
    tally_limit fixed = { .algo = TALLY_FIXED_WINDOW, .max = PHASE_MAX, .period_ns = SEC };
    tally_limit sliding = { .algo = TALLY_SLIDING_WINDOW, .max = PHASE_MAX, .period_ns = SEC };
    tally_limit gcra = { .algo = TALLY_GCRA, .max = PHASE_MAX, .period_ns = SEC };
    s.policy[0] = add_policy(s.e, "fixed", fixed, 0);
    s.policy[1] = add_policy(s.e, "sliding", sliding, 0);
    s.policy[2] = add_policy(s.e, "gcra", gcra, 0);
    pthread_barrier_init(&s.barrier, NULL, THREADS);

    struct phase_arg args[THREADS];
    for (int t = 0; t < THREADS; t++)
        args[t] = (struct phase_arg){ &s, t };
    run_threads(phase_worker, args, sizeof(args[0]), THREADS);

    cr_assert_eq(atomic_load(&s.errors), 0);
    for (int k = 0; k < 3; k++) {
        for (int ph = 0; ph < PHASES; ph++) {
            /* exactly max admitted per window: none lost in the roll, none over */
            cr_assert_eq(atomic_load(&s.allowed[k][ph]), PHASE_MAX,
                         "policy %d phase %d admitted %u", k, ph, atomic_load(&s.allowed[k][ph]));
            cr_assert_eq(atomic_load(&s.firsts[k][ph]), 1,
                         "policy %d phase %d first_exceeded %u times", k, ph,
                         atomic_load(&s.firsts[k][ph]));
        }
    }
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}

/* ---- Multi-limit: all or none under contention --------------------------- */

#define MULTI_HITS 20000

struct multi_arg {
    tally_engine *e;
    uint32_t      policy;
    uint64_t      allowed_req, allowed_tok;
};

static void *multi_worker(void *p)
{
    struct multi_arg *a = p;
    for (int i = 0; i < MULTI_HITS; i++) {
        uint64_t costs[2] = { 1, 1 + (uint64_t)(i % 5) };
        tally_result r;
        if (tally_hit_at(a->e, a->policy, "k", 1, costs, T0 + (uint64_t)i, &r) == 0 && r.allowed) {
            a->allowed_req += costs[0];
            a->allowed_tok += costs[1];
        }
    }
    return NULL;
}

Test(stress, multi_limit_consumes_all_or_none, .timeout = 600)
{
    tally_engine *e = open_engine(16);
    tally_policy p = {
        .name = "multi", .n_limits = 2,
        .limits = {
            { .algo = TALLY_FIXED_WINDOW, .max = 30000, .period_ns = 3600 * SEC },
            { .algo = TALLY_FIXED_WINDOW, .max = 50000, .period_ns = 3600 * SEC },
        },
    };
    uint32_t pol;
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    struct multi_arg args[THREADS];
    for (int t = 0; t < THREADS; t++)
        args[t] = (struct multi_arg){ .e = e, .policy = pol };
    run_threads(multi_worker, args, sizeof(args[0]), THREADS);

    uint64_t req = 0, tok = 0;
    for (int t = 0; t < THREADS; t++) {
        req += args[t].allowed_req;
        tok += args[t].allowed_tok;
    }
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    /* what the allowed hits consumed is exactly what the counters hold */
    cr_assert_eq(s.c[0].used, req);
    cr_assert_eq(s.c[1].used, tok);
    cr_assert_leq(tok, 50000);
    cr_assert_geq(tok, 50000 - 4, "the token limit must be nearly used up, got %" PRIu64, tok);
    tally_close(e);
}

/* ---- reset_if: exactly one winner ---------------------------------------- */

#define RESET_ROUNDS 2000

struct reset_shared {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t barrier;
    tally_snapshot    snap;
    _Atomic int       winners[RESET_ROUNDS];
    _Atomic int       conflicts[RESET_ROUNDS];
};

static void *reset_worker(void *p)
{
    struct reset_shared *s = *(struct reset_shared **)p;
    for (int round = 0; round < RESET_ROUNDS; round++) {
        pthread_barrier_wait(&s->barrier);           /* snapshot taken by the main thread */
        uint32_t mask = 0;
        int rc = tally_reset_if(s->e, s->policy, "r", 1, &s->snap, &mask);
        if (rc == 0 && mask == 3)
            atomic_fetch_add(&s->winners[round], 1);
        else if (rc == TALLY_ECONFLICT)
            atomic_fetch_add(&s->conflicts[round], 1);
        pthread_barrier_wait(&s->barrier);
    }
    return NULL;
}

Test(stress, reset_if_has_exactly_one_winner, .timeout = 600)
{
    static struct reset_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(16);
    tally_policy p = {
        .name = "two", .n_limits = 2,
        .limits = {
            { .algo = TALLY_FIXED_WINDOW, .max = 1000000, .period_ns = 3600 * SEC },
            { .algo = TALLY_GCRA, .max = 1000, .period_ns = SEC },
        },
    };
    cr_assert_eq(tally_policy_add(s.e, &p, &s.policy), 0);
    pthread_barrier_init(&s.barrier, NULL, THREADS + 1);
    struct reset_shared *ptrs[THREADS];
    pthread_t th[THREADS];
    for (int t = 0; t < THREADS; t++) {
        ptrs[t] = &s;
        pthread_create(&th[t], NULL, reset_worker, &ptrs[t]);
    }
    for (int round = 0; round < RESET_ROUNDS; round++) {
        tally_result r;
        uint64_t costs[2] = { 3, 2 };
        cr_assert_eq(tally_hit_at(s.e, s.policy, "r", 1, costs, T0 + (uint64_t)round * SEC, &r), 0);
        cr_assert_eq(tally_read(s.e, s.policy, "r", 1, &s.snap), 0);
        pthread_barrier_wait(&s.barrier);
        pthread_barrier_wait(&s.barrier);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    for (int round = 0; round < RESET_ROUNDS; round++) {
        cr_assert_eq(atomic_load(&s.winners[round]), 1, "round %d", round);
        cr_assert_eq(atomic_load(&s.conflicts[round]), THREADS - 1, "round %d", round);
    }
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}

/* ---- A full table under churn loses no live state ------------------------ */

#define LIVE_KEYS     32
#define CHURN_PER     48     /* new keys per thread per phase */
#define CHURN_PHASES  400
#define STEP          (SEC / 4)   /* a phase is a quarter of the window */

struct churn_shared {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t barrier;
    _Atomic uint32_t  live_errors, churn_full, churn_other;
};

struct churn_arg {
    struct churn_shared *s;
    int t;
};

static void *churn_worker(void *p)
{
    struct churn_arg *a = p;
    struct churn_shared *s = a->s;
    char key[48];
    for (int ph = 0; ph < CHURN_PHASES; ph++) {
        uint64_t now = T0 + (uint64_t)ph * STEP;
        pthread_barrier_wait(&s->barrier);
        for (int i = 0; i < CHURN_PER; i++) {
            tally_result r;
            int rc;
            /* interleave live keys (every thread hits each once a phase) with fresh keys */
            if (i < LIVE_KEYS) {
                snprintf(key, sizeof(key), "live-%d", i);
                rc = tally_hit_at(s->e, s->policy, key, strlen(key), NULL, now, &r);
                if (rc != 0 || !r.allowed)
                    atomic_fetch_add(&s->live_errors, 1);
            }
            snprintf(key, sizeof(key), "churn-%d-%d-%d", a->t, ph, i);
            rc = tally_hit_at(s->e, s->policy, key, strlen(key), NULL, now, &r);
            if (rc == TALLY_EFULL)
                atomic_fetch_add(&s->churn_full, 1);
            else if (rc != 0)
                atomic_fetch_add(&s->churn_other, 1);
        }
        pthread_barrier_wait(&s->barrier);
        if (a->t == 0) {
            /* a live key's window opened at a phase start and counts every hit since */
            for (int k = 0; k < LIVE_KEYS; k++) {
                tally_snapshot snap;
                snprintf(key, sizeof(key), "live-%d", k);
                if (tally_read(s->e, s->policy, key, strlen(key), &snap) != 0) {
                    atomic_fetch_add(&s->live_errors, 1);
                    continue;
                }
                uint64_t start = snap.c[0].window_start_ns;
                uint64_t phases = (now - start) / STEP + 1;
                if ((start - T0) % STEP != 0 || snap.c[0].used != phases * THREADS)
                    atomic_fetch_add(&s->live_errors, 1);
            }
        }
    }
    return NULL;
}

Test(stress, full_table_under_churn_loses_no_live_state, .timeout = 600)
{
    static struct churn_shared s;
    memset(&s, 0, sizeof(s));
    /* live keys + 4 phases of churn fit; older churn must be reclaimed to go on */
    s.e = open_engine(LIVE_KEYS + 6 * THREADS * CHURN_PER);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000000, .period_ns = SEC };
    s.policy = add_policy(s.e, "churn", l, 0);
    pthread_barrier_init(&s.barrier, NULL, THREADS);
    struct churn_arg args[THREADS];
    for (int t = 0; t < THREADS; t++)
        args[t] = (struct churn_arg){ &s, t };
    run_threads(churn_worker, args, sizeof(args[0]), THREADS);

    cr_assert_eq(atomic_load(&s.live_errors), 0);
    cr_assert_eq(atomic_load(&s.churn_other), 0);
    cr_assert_eq(atomic_load(&s.churn_full), 0,
                 "expired slots were there to reclaim, yet %u new keys got TALLY_EFULL",
                 atomic_load(&s.churn_full));
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}

/* ---- New keys racing: one slot per key ----------------------------------- */

#define RACE_KEYS 20000

struct race_arg {
    tally_engine *e;
    uint32_t      policy;
    int           errors;
};

static void *race_worker(void *p)
{
    struct race_arg *a = p;
    char key[32];
    for (int k = 0; k < RACE_KEYS; k++) {
        tally_result r;
        snprintf(key, sizeof(key), "new-%d", k);
        if (tally_hit_at(a->e, a->policy, key, strlen(key), NULL, T0, &r) != 0)
            a->errors++;
    }
    return NULL;
}

Test(stress, concurrent_inserts_of_one_key_share_one_slot, .timeout = 600)
{
    tally_engine *e = open_engine(RACE_KEYS);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = 3600 * SEC };
    uint32_t pol = add_policy(e, "race", l, 0);
    struct race_arg args[THREADS];
    for (int t = 0; t < THREADS; t++)
        args[t] = (struct race_arg){ .e = e, .policy = pol };
    run_threads(race_worker, args, sizeof(args[0]), THREADS);
    for (int t = 0; t < THREADS; t++)
        cr_assert_eq(args[t].errors, 0);
    /* every thread hit every key once, all at the same moment it was new:
       a duplicate slot would split the count */
    for (int k = 0; k < RACE_KEYS; k++) {
        char key[32];
        tally_snapshot s;
        snprintf(key, sizeof(key), "new-%d", k);
        cr_assert_eq(tally_read(e, pol, key, strlen(key), &s), 0);
        cr_assert_eq(s.c[0].used, THREADS, "key %d counted %" PRIu64, k, s.c[0].used);
    }
    tally_close(e);
}

/* ---- The capacity edge: the last free reservation raced ------------------ */

#define EDGE_KEYS    8
#define EDGE_THREADS 8          /* more than the cores: holders get preempted */
#define EDGE_ROUNDS  400

struct edge_arg {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t *barrier;
    int               errors;
};

static void *edge_worker(void *p)
{
    struct edge_arg *a = p;
    char key[32];
    pthread_barrier_wait(a->barrier);
    for (int k = 0; k < EDGE_KEYS; k++) {
        tally_result r;
        snprintf(key, sizeof(key), "edge-%d", k);
        if (tally_hit_at(a->e, a->policy, key, strlen(key), NULL, T0, &r) != 0)
            a->errors++;
    }
    return NULL;
}

/* A table sized for exactly the keys inserted: each key's twins race for its
   reservation, the last key for the last one. No key may be refused while a
   reservation is only held by a promotion in flight, and none counted twice. */
Test(stress, capacity_edge_refuses_no_key_that_fits, .timeout = 600)
{
    for (int round = 0; round < EDGE_ROUNDS; round++) {
        tally_engine *e = open_engine(EDGE_KEYS);
        tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = 3600 * SEC };
        uint32_t pol = add_policy(e, "edge", l, 0);
        pthread_barrier_t barrier;
        pthread_barrier_init(&barrier, NULL, EDGE_THREADS);
        struct edge_arg args[EDGE_THREADS];
        for (int t = 0; t < EDGE_THREADS; t++)
            args[t] = (struct edge_arg){ .e = e, .policy = pol, .barrier = &barrier };
        run_threads(edge_worker, args, sizeof(args[0]), EDGE_THREADS);
        for (int t = 0; t < EDGE_THREADS; t++)
            cr_assert_eq(args[t].errors, 0, "round %d: %d keys refused", round, args[t].errors);
        for (int k = 0; k < EDGE_KEYS; k++) {
            char key[32];
            tally_snapshot s;
            snprintf(key, sizeof(key), "edge-%d", k);
            cr_assert_eq(tally_read(e, pol, key, strlen(key), &s), 0);
            cr_assert_eq(s.c[0].used, EDGE_THREADS, "round %d key %d counted %" PRIu64,
                         round, k, s.c[0].used);
        }
        /* the table is full now: one more key is refused */
        tally_result r;
        cr_assert_eq(tally_hit_at(e, pol, "one-more", 8, NULL, T0, &r), TALLY_EFULL);
        pthread_barrier_destroy(&barrier);
        tally_close(e);
    }
}

/* ---- A start racing a stop ---------------------------------------------- */

#define RESTART_ROUNDS 300

struct restart_arg {
    tally_engine *e;
    tally_flusher_options *o;
    pthread_barrier_t *barrier;
    int rc;
};

static void *stopper(void *p)
{
    struct restart_arg *a = p;
    pthread_barrier_wait(a->barrier);
    a->rc = tally_flusher_stop(a->e);
    return NULL;
}

static void *starter(void *p)
{
    struct restart_arg *a = p;
    pthread_barrier_wait(a->barrier);
    /* TALLY_ESTATE while the old flusher runs or is being stopped */
    while ((a->rc = tally_flusher_start(a->e, a->o)) == TALLY_ESTATE)
        sched_yield();
    return NULL;
}

static void count_deltas(void *ctx, const tally_delta *d, size_t n)
{
    for (size_t i = 0; i < n; i++)
        atomic_fetch_add((_Atomic uint64_t *)ctx, d[i].delta);
}

/* Whatever order stops and a start take, a flusher that runs afterwards
   sees every hit: the hot path records deltas while any flusher runs. */
Test(stress, a_flusher_started_while_another_stops_sees_every_hit, .timeout = 600)
{
    tally_engine *e = open_engine(64);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1u << 30, .period_ns = 3600 * SEC };
    uint32_t pol = add_policy(e, "restart", l, 0);
    _Atomic uint64_t flushed = 0;
    tally_flusher_options o;
    tally_flusher_options_init(&o);
    o.interval_ms = 1000;
    o.on_deltas = count_deltas;
    o.ctx = &flushed;
    cr_assert_eq(tally_flusher_start(e, &o), 0);
    uint64_t hits = 0;
    for (int round = 0; round < RESTART_ROUNDS; round++) {
        pthread_barrier_t barrier;
        /* two stops (stop is idempotent) and a start */
        pthread_barrier_init(&barrier, NULL, 3);
        struct restart_arg a = { e, &o, &barrier, 0 }, a2 = a, b = a;
        pthread_t t1, t2, t3;
        pthread_create(&t1, NULL, stopper, &a);
        pthread_create(&t3, NULL, stopper, &a2);
        pthread_create(&t2, NULL, starter, &b);
        pthread_join(t1, NULL);
        pthread_join(t3, NULL);
        pthread_join(t2, NULL);
        pthread_barrier_destroy(&barrier);
        cr_assert_eq(b.rc, 0, "round %d: start returned %d", round, b.rc);
        /* a stop that came after the start left no flusher: start one */
        int rc = tally_flusher_start(e, &o);
        cr_assert(rc == 0 || rc == TALLY_ESTATE, "round %d: start returned %d", round, rc);
        tally_result r;
        cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, T0, &r), 0);
        hits++;
        cr_assert_eq(tally_flush(e, 10000), 0);
        cr_assert_eq(atomic_load(&flushed), hits, "round %d: %" PRIu64 " of %" PRIu64 " hits flushed",
                     round, atomic_load(&flushed), hits);
    }
    cr_assert_eq(tally_flusher_stop(e), 0);
    tally_close(e);
}

/* ---- The table's control bytes: keys that share a group and a tag -------- */

/* The control byte of slot @i (engine/table.c, guarantee 8). */
static unsigned ctrl_byte_of(tally__table *t, size_t i)
{
    return (unsigned)(atomic_load(&t->ctrl[i / 8]) >> (8 * (i % 8))) & 0xff;
}

static size_t home_group_of(const tally__table *t, tally__digest d)
{
    return (size_t)(((unsigned __int128)d.lo * (t->n_slots / TALLY__GROUP)) >> 64);
}

static int cmp_digest(const void *a, const void *b)
{
    const tally__digest *x = a, *y = b;
    if (x->lo != y->lo)
        return x->lo < y->lo ? -1 : 1;
    return x->hi < y->hi ? -1 : x->hi > y->hi;
}

/*
 * With no call running: each control byte agrees with its slot's digest
 * (tag for PENDING and LIVE, EMPTY, FREE, DEAD), each overflow count equals
 * the claims that pass its group, and no digest is LIVE in two slots.
 * Returns the number of disagreements; *live gets the LIVE slots.
 */
static int table_at_rest_errors(tally__table *t, size_t *live)
{
    size_t n_groups = t->n_slots / TALLY__GROUP;
    uint32_t *ovf = calloc(n_groups, sizeof(*ovf));
    tally__digest *seen = malloc(t->n_slots * sizeof(*seen));
    int errors = 0;
    *live = 0;
    cr_assert(ovf && seen);
    for (size_t i = 0; i < t->n_slots; i++) {
        tally__slot *s = (tally__slot *)(t->mem + i * t->stride);
        uint64_t lo = s->d_lo, hi = s->d_hi;
        unsigned status = (unsigned)(hi >> TALLY__STATUS_SHIFT), want;
        tally__digest d = { .lo = lo, .hi = hi & TALLY__DIGEST_HI_MASK };
        if (status == TALLY__EMPTY)
            want = lo == TALLY__LO_EMPTY ? 0x80 : lo == TALLY__LO_FREE ? 0x81 : 0x100;  /* no ZOMBIE at rest */
        else if (status == TALLY__DEAD)
            want = 0x82;
        else
            want = (unsigned)(hi & 0x7f);
        if (ctrl_byte_of(t, i) != want && errors++ < 5)
            fprintf(stderr, "slot %zu: status %u lo %#" PRIx64 ", control byte %#x, want %#x\n",
                    i, status, lo, ctrl_byte_of(t, i), want);
        if (status == TALLY__LIVE)
            seen[(*live)++] = d;
        if (status != TALLY__EMPTY)
            for (size_t g = home_group_of(t, d); g != i / TALLY__GROUP; g = (g + 1) % n_groups)
                ovf[g]++;
    }
    for (size_t g = 0; g < n_groups; g++)
        if (atomic_load(&t->ovf[g]) != ovf[g] && errors++ < 10)
            fprintf(stderr, "group %zu: overflow count %u, claims past it %u\n",
                    g, atomic_load(&t->ovf[g]), ovf[g]);
    qsort(seen, *live, sizeof(*seen), cmp_digest);
    for (size_t j = 1; j < *live; j++)
        if (seen[j].lo == seen[j - 1].lo && seen[j].hi == seen[j - 1].hi && errors++ < 15)
            fprintf(stderr, "a digest is LIVE in two slots\n");
    free(ovf);
    free(seen);
    return errors;
}

#define CT_SAME_TAG   48        /* keys of one home group and one tag */
#define CT_SAME_GROUP 240       /* keys of that home group, any tag */
#define CT_ROUND_TAG  12        /* of each, per round */
#define CT_ROUND_GRP  24
#define CT_ROUNDS     40
#define CT_KEYS       (CT_ROUND_TAG + CT_ROUND_GRP)

struct ct_shared {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t barrier;
    char              tag_keys[CT_SAME_TAG][24];
    char              grp_keys[CT_SAME_GROUP][24];
    _Atomic uint32_t  errors;
};

static const char *ct_key(struct ct_shared *s, int round, int j)
{
    return j < CT_ROUND_TAG ? s->tag_keys[(round * 7 + j) % CT_SAME_TAG]
                            : s->grp_keys[(round * 17 + j - CT_ROUND_TAG) % CT_SAME_GROUP];
}

static void *ct_worker(void *p)
{
    struct ct_shared *s = p;
    for (int r = 0; r < CT_ROUNDS; r++) {
        pthread_barrier_wait(&s->barrier);
        for (int j = 0; j < CT_KEYS; j++) {
            const char *k = ct_key(s, r, j);
            tally_result res;
            if (tally_hit_at(s->e, s->policy, k, strlen(k), NULL, T0 + (uint64_t)r * SEC, &res) != 0
                || !res.allowed)
                atomic_fetch_add(&s->errors, 1);
        }
        pthread_barrier_wait(&s->barrier);
        pthread_barrier_wait(&s->barrier);      /* the main thread checks the table */
    }
    return NULL;
}

/*
 * Every thread inserts the same keys at once: keys with one home group and
 * one 7-bit tag (the control bytes match, the digests decide) and keys of
 * that group with other tags, more than a group holds, and each round new
 * ones while the last rounds' keys expire, so that the window fills, slots
 * are reclaimed and FREE slots reused. After each round, with no call
 * running: each key has one slot that counted every thread's hit, the
 * control bytes agree with the digests, and the overflow counts with the
 * claims.
 */
Test(stress, keys_sharing_a_group_and_a_tag_keep_one_slot_each, .timeout = 600)
{
    static struct ct_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(512);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = SEC };
    s.policy = add_policy(s.e, "ctrl", l, 0);
    tally__table *t = &tally__policy_get(s.e, s.policy)->table;

    /* keys whose digests put them in group 0 with the tag of the first found */
    int n_tag = 0, n_grp = 0, tag = -1;
    char key[24];
    for (uint64_t c = 0; n_tag < CT_SAME_TAG || n_grp < CT_SAME_GROUP; c++) {
        cr_assert_lt(c, UINT64_C(50000000), "no keys of one group and tag found");
        snprintf(key, sizeof(key), "ct-%" PRIu64, c);
        tally__digest d = tally__key_digest(s.e, key, strlen(key));
        if (home_group_of(t, d) != 0)
            continue;
        if (tag < 0)
            tag = (int)(d.hi & 0x7f);
        if ((int)(d.hi & 0x7f) == tag && n_tag < CT_SAME_TAG)
            memcpy(s.tag_keys[n_tag++], key, sizeof(key));
        else if ((int)(d.hi & 0x7f) != tag && n_grp < CT_SAME_GROUP)
            memcpy(s.grp_keys[n_grp++], key, sizeof(key));
    }

    pthread_barrier_init(&s.barrier, NULL, THREADS + 1);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, ct_worker, &s), 0);
    size_t past_home = 0, reclaimed_before = atomic_load(&t->reclaimed);
    for (int r = 0; r < CT_ROUNDS; r++) {
        pthread_barrier_wait(&s.barrier);
        pthread_barrier_wait(&s.barrier);
        /* a refused hit (TALLY_EFULL) would show as a lost count below */
        cr_assert_eq(atomic_load(&s.errors), 0, "round %d: a hit failed or was denied", r);
        for (int j = 0; j < CT_KEYS; j++) {
            const char *k = ct_key(&s, r, j);
            tally_snapshot snap;
            cr_assert_eq(tally_read(s.e, s.policy, k, strlen(k), &snap), 0, "round %d: %s", r, k);
            cr_assert_eq(snap.c[0].used, THREADS, "round %d: %s counted %" PRIu64, r, k, snap.c[0].used);
            tally__slot *sl = tally__table_find(t, tally__key_digest(s.e, k, strlen(k)));
            cr_assert_not_null(sl);
            size_t i = tally__slot_index(t, sl);
            if (j < CT_ROUND_TAG)
                cr_assert_eq(ctrl_byte_of(t, i), (unsigned)tag);
            past_home += i >= TALLY__GROUP;
        }
        size_t live;
        cr_assert_eq(table_at_rest_errors(t, &live), 0, "round %d", r);
        cr_assert_geq(live, (size_t)CT_KEYS);
        pthread_barrier_wait(&s.barrier);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(atomic_load(&s.errors), 0);
    /* what the test is for took place: keys placed past their home group,
       and reclaimed slots reused */
    cr_assert_gt(past_home, 0);
    cr_assert_gt(atomic_load(&t->reclaimed), reclaimed_before);
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}

struct settle_shared {
    tally_engine   *e;
    uint32_t        policy;
    const char     *key;
    _Atomic int     freed;         /* set just before the held slots are freed */
    int             rc, freed_at_return;
};

static void *settle_worker_at(struct settle_shared *s, uint64_t now)
{
    tally_result r;
    s->rc = tally_hit_at(s->e, s->policy, s->key, strlen(s->key), NULL, now, &r);
    s->freed_at_return = atomic_load(&s->freed);
    return NULL;
}

static void *settle_worker(void *p)
{
    return settle_worker_at(p, T0 + 2 * SEC);
}

static void *settle_worker_late(void *p)
{
    return settle_worker_at(p, T0 + 200 * SEC);
}

/*
 * A reclaim took every slot of a key's window (they wait for its grace
 * period as ZOMBIE) and its thread is held up before it frees them, as a
 * preempted thread is. A new key of that window is not refused: the table
 * has room, and the slots will be FREE. Its call waits until they are,
 * then gets one.
 */
Test(stress, a_new_key_waits_for_the_slots_another_reclaim_holds, .timeout = 60)
{
    static struct settle_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(512);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = SEC };
    s.policy = add_policy(s.e, "settle", l, 0);
    tally__table *t = &tally__policy_get(s.e, s.policy)->table;

    /* TALLY__WINDOW keys of home group 0 fill its window; one more is new */
    static char keys[TALLY__WINDOW + 1][24];
    int n = 0;
    for (uint64_t c = 0; n <= TALLY__WINDOW; c++) {
        cr_assert_lt(c, UINT64_C(10000000));
        snprintf(keys[n], sizeof(keys[n]), "st-%" PRIu64, c);
        if (home_group_of(t, tally__key_digest(s.e, keys[n], strlen(keys[n]))) == 0)
            n++;
    }
    for (int i = 0; i < TALLY__WINDOW; i++) {
        tally_result r;
        cr_assert_eq(tally_hit_at(s.e, s.policy, keys[i], strlen(keys[i]), NULL, T0, &r), 0, "%d", i);
    }
    /* a reclaim at a time when all have expired, stopped before its free */
    s.key = keys[TALLY__WINDOW];
    tally__batch *b = tally__batch_new(t);
    cr_assert_not_null(b);
    tally__rcu_enter();
    size_t taken = tally__table_reclaim_take(t, tally__key_digest(s.e, s.key, strlen(s.key)),
                                             T0 + 2 * SEC, b);
    tally__rcu_exit();
    cr_assert_geq(taken, (size_t)TALLY__WINDOW);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, settle_worker, &s), 0);
    /* long enough for a call that gives up to have given up */
    struct timespec pause = { 0, 300 * 1000 * 1000 };
    nanosleep(&pause, NULL);
    atomic_store(&s.freed, 1);
    tally__rcu_wait();
    tally__table_reclaim_free(t, b);
    tally__batch_free(b);
    pthread_join(th, NULL);
    cr_assert_eq(s.rc, 0, "the new key got %d (%s)", s.rc, tally_strerror(s.rc));
    cr_assert(s.freed_at_return, "the call returned before the slots were free");
    tally_snapshot snap;
    cr_assert_eq(tally_read(s.e, s.policy, s.key, strlen(s.key), &snap), 0);
    cr_assert_eq(snap.c[0].used, 1);
    tally_close(s.e);
}

/*
 * The same with TALLY_EVICT_LRU and the table at its capacity: the held
 * slots are the window's expired half, the other half live, and every other
 * reservation taken by keys outside the window. The new key waits for the
 * held slots through as many grace periods as the holder takes, and once
 * they are free it gets one (evicting if it must): the waits do not use up
 * the evictions a call may make.
 */
Test(stress, an_lru_key_waits_for_held_slots_and_still_evicts, .timeout = 60)
{
    static struct settle_shared s;
    memset(&s, 0, sizeof(s));
    /* large enough that the keys outside the window fill the rest at the
       usual load, so that they evict nothing */
    s.e = open_engine(4096);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 100 * SEC };
    s.policy = add_policy(s.e, "settle-lru", l, TALLY_EVICT_LRU);
    tally__table *t = &tally__policy_get(s.e, s.policy)->table;
    size_t n_groups = t->n_slots / TALLY__GROUP;

    static char keys[TALLY__WINDOW + 1][24];
    int n = 0;
    for (uint64_t c = 0; n <= TALLY__WINDOW; c++) {
        cr_assert_lt(c, UINT64_C(10000000));
        snprintf(keys[n], sizeof(keys[n]), "sl-%" PRIu64, c);
        if (home_group_of(t, tally__key_digest(s.e, keys[n], strlen(keys[n]))) == 0)
            n++;
    }
    /* the window: half hit at T0, half at T0 + 150 s; by T0 + 200 s only the
       first half's 100 s windows have ended */
    for (int i = 0; i < TALLY__WINDOW; i++) {
        tally_result r;
        uint64_t at = i < TALLY__WINDOW / 2 ? T0 : T0 + 150 * SEC;
        cr_assert_eq(tally_hit_at(s.e, s.policy, keys[i], strlen(keys[i]), NULL, at, &r), 0, "%d", i);
    }
    s.key = keys[TALLY__WINDOW];
    tally__batch *b = tally__batch_new(t);
    cr_assert_not_null(b);
    tally__rcu_enter();
    size_t taken = tally__table_reclaim_take(t, tally__key_digest(s.e, s.key, strlen(s.key)),
                                             T0 + 200 * SEC, b);
    tally__rcu_exit();
    cr_assert_eq(taken, (size_t)TALLY__WINDOW / 2);
    /* the rest of the capacity, keys whose windows cannot reach group 0's */
    char key[24];
    size_t live = TALLY__WINDOW / 2;
    for (uint64_t c = 0; live < t->capacity; c++) {
        cr_assert_lt(c, UINT64_C(10000000));
        snprintf(key, sizeof(key), "so-%" PRIu64, c);
        size_t g = home_group_of(t, tally__key_digest(s.e, key, strlen(key)));
        if (g < TALLY__WINDOW / TALLY__GROUP || g + TALLY__WINDOW / TALLY__GROUP > n_groups)
            continue;
        tally_result r;
        cr_assert_eq(tally_hit_at(s.e, s.policy, key, strlen(key), NULL, T0 + 150 * SEC, &r), 0);
        live++;
    }

    /* the table is at its capacity: the new key needs an eviction */
    cr_assert_eq(tally__res_live(atomic_load(&t->res)), t->capacity);
    tally_stats st;
    tally_stats_read(s.e, &st);
    cr_assert_eq(st.lru_evictions, 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, settle_worker_late, &s), 0);
    struct timespec pause = { 0, 300 * 1000 * 1000 };
    nanosleep(&pause, NULL);
    atomic_store(&s.freed, 1);
    tally__rcu_wait();
    tally__table_reclaim_free(t, b);
    tally__batch_free(b);
    pthread_join(th, NULL);
    cr_assert_eq(s.rc, 0, "the new key got %d (%s)", s.rc, tally_strerror(s.rc));
    cr_assert(s.freed_at_return, "the call returned before the slots were free");
    tally_stats_read(s.e, &st);
    cr_assert_gt(st.lru_evictions, 0, "room came from an eviction");
    tally_close(s.e);
}

#define KB_PHASES 30
#define KB_KEYS   300           /* per phase: about two phases fit, older keys are reclaimed */

struct kb_shared {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t barrier;
    _Atomic uint32_t  errors;
};

/* Key i of phase @ph: its length changes from phase to phase (1 to 60
   bytes), so that a slot's spare buffer is sometimes big enough and
   sometimes not. */
static size_t kb_key(int ph, int i, char *buf)
{
    size_t len = 1 + (size_t)(ph * 7 + i) % 60;
    int n = snprintf(buf, 64, "kb-%d-%d-", ph, i);
    for (size_t j = (size_t)n; j < len; j++)
        buf[j] = (char)('a' + j % 26);
    return len > (size_t)n ? len : (size_t)n;
}

static void *kb_worker(void *p)
{
    struct kb_shared *s = p;
    char key[64];
    for (int ph = 0; ph < KB_PHASES; ph++) {
        pthread_barrier_wait(&s->barrier);
        for (int i = 0; i < KB_KEYS; i++) {
            tally_result r;
            size_t len = kb_key(ph, i, key);
            if (tally_hit_at(s->e, s->policy, key, len, NULL, T0 + (uint64_t)ph * SEC, &r) != 0)
                atomic_fetch_add(&s->errors, 1);
        }
        pthread_barrier_wait(&s->barrier);
        pthread_barrier_wait(&s->barrier);      /* the main thread checks the table */
    }
    return NULL;
}

/*
 * Keys of changing lengths stream through a table that keeps key copies,
 * from 4 threads at once: freed slots keep their last copy as a spare
 * buffer, and new keys write theirs into it. With no call running, every
 * LIVE slot's copy is the key of that slot's digest, and each of the phase's
 * keys counted every thread's hit.
 */
Test(stress, reused_key_buffers_hold_the_key_of_their_slot, .timeout = 600)
{
    static struct kb_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(512);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = SEC };
    s.policy = add_policy(s.e, "kb", l, 0);
    tally__table *t = &tally__policy_get(s.e, s.policy)->table;
    cr_assert_not_null(t->keys);

    pthread_barrier_init(&s.barrier, NULL, THREADS + 1);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, kb_worker, &s), 0);
    size_t checked = 0, reused_before = atomic_load(&t->reclaimed);
    char key[64];
    for (int ph = 0; ph < KB_PHASES; ph++) {
        pthread_barrier_wait(&s.barrier);
        pthread_barrier_wait(&s.barrier);
        cr_assert_eq(atomic_load(&s.errors), 0, "phase %d: a hit failed", ph);
        for (size_t i = 0; i < t->n_slots; i++) {
            tally__digest d;
            if (!tally__table_live(t, i, &d))
                continue;
            size_t len = 0;
            const void *k = tally__table_key(t, i, &len);
            cr_assert_not_null(k, "phase %d: LIVE slot %zu has no key copy", ph, i);
            tally__digest kd = tally__key_digest(s.e, k, len);
            cr_assert(kd.lo == d.lo && kd.hi == d.hi,
                      "phase %d: slot %zu holds the copy of another key (%zu bytes)", ph, i, len);
            tally__table_key_done(k);
            checked++;
        }
        for (int i = 0; i < KB_KEYS; i++) {
            tally_snapshot snap;
            size_t len = kb_key(ph, i, key);
            cr_assert_eq(tally_read(s.e, s.policy, key, len, &snap), 0, "phase %d key %d", ph, i);
            cr_assert_eq(snap.c[0].used, THREADS, "phase %d key %d counted %" PRIu64, ph, i,
                         snap.c[0].used);
        }
        pthread_barrier_wait(&s.barrier);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    cr_assert_gt(checked, (size_t)KB_KEYS);
    cr_assert_gt(atomic_load(&t->reclaimed), reused_before);   /* slots were freed and reused */
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}

#define CC_CAPACITY 2000
#define CC_KEYS     600         /* per phase: three phases fit, older keys must be reclaimed */
#define CC_PHASES   40

struct cc_shared {
    tally_engine     *e;
    uint32_t          policy;
    pthread_barrier_t barrier;
    _Atomic uint32_t  admitted[CC_KEYS];  /* this phase's hits counted, per key */
    _Atomic uint32_t  errors, refused;
};

static void *cc_worker(void *p)
{
    struct cc_shared *s = p;
    char key[32];
    for (int ph = 0; ph < CC_PHASES; ph++) {
        pthread_barrier_wait(&s->barrier);
        for (int i = 0; i < CC_KEYS; i++) {
            tally_result r;
            snprintf(key, sizeof(key), "cc-%d-%d", ph, i);
            int rc = tally_hit_at(s->e, s->policy, key, strlen(key), NULL, T0 + (uint64_t)ph * SEC, &r);
            if (rc == 0 && r.allowed)
                atomic_fetch_add(&s->admitted[i], 1);
            else if (rc == TALLY_EFULL)
                atomic_fetch_add(&s->refused, 1);   /* expired slots outside the sweeps: DESIGN.md */
            else
                atomic_fetch_add(&s->errors, 1);
        }
        pthread_barrier_wait(&s->barrier);
        pthread_barrier_wait(&s->barrier);      /* the main thread checks the table */
    }
    return NULL;
}

/*
 * Keys of random digests through a table that must reclaim a third of itself
 * each phase, every thread inserting the same new keys at once: after each
 * phase, with no call running, each key has one slot that counted every hit
 * admitted, and the control bytes and overflow counts are exact. (A hit may
 * be refused with TALLY_EFULL while expired slots wait outside the sweeps;
 * it then counts nowhere.)
 */
Test(stress, churn_keeps_control_bytes_and_overflow_counts_exact, .timeout = 600)
{
    static struct cc_shared s;
    memset(&s, 0, sizeof(s));
    s.e = open_engine(CC_CAPACITY);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = SEC };
    s.policy = add_policy(s.e, "cc", l, 0);
    tally__table *t = &tally__policy_get(s.e, s.policy)->table;
    pthread_barrier_init(&s.barrier, NULL, THREADS + 1);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, cc_worker, &s), 0);
    for (int ph = 0; ph < CC_PHASES; ph++) {
        pthread_barrier_wait(&s.barrier);
        pthread_barrier_wait(&s.barrier);
        for (int i = 0; i < CC_KEYS; i++) {
            char key[32];
            tally_snapshot snap;
            snprintf(key, sizeof(key), "cc-%d-%d", ph, i);
            uint32_t n = atomic_exchange(&s.admitted[i], 0);
            int rc = tally_read(s.e, s.policy, key, strlen(key), &snap);
            cr_assert_eq(rc, n ? 0 : TALLY_ENOENT, "phase %d: %s", ph, key);
            cr_assert(!n || snap.c[0].used == n, "phase %d: %s counted %" PRIu64 " of %u",
                      ph, key, snap.c[0].used, n);
        }
        size_t live;
        cr_assert_eq(table_at_rest_errors(t, &live), 0, "phase %d", ph);
        cr_assert_geq(live, (size_t)CC_KEYS);
        pthread_barrier_wait(&s.barrier);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(atomic_load(&s.errors), 0);
    /* all but the keys of the last phases that fit, or were refused, were reclaimed */
    cr_assert_geq(atomic_load(&t->reclaimed) + atomic_load(&s.refused),
                  (uint64_t)(CC_PHASES * CC_KEYS - CC_CAPACITY));
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
}
