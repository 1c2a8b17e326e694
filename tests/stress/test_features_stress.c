/*
 * Stress tests of the limiter features: real threads racing on one key.
 * Policy updates against hits (never more admitted than the larger max),
 * reservations (exactly the slots that exist, each booked once),
 * concurrency holds (every acquire given back, ending at exactly 0), and
 * new keys sprayed into a full TALLY_EVICT_LRU table while hot keys are hit
 * at their limit (the hot keys stay, their counts exact).
 */
#include "../test.h"
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"
#include "../engine_open.h"

#define THREADS 4

/* ---- Updates racing hits ------------------------------------------------------ */

#define UPD_ROUNDS  2000
#define UPD_SMALL   40
#define UPD_LARGE   70
#define UPD_MOST    40000        /* updates, each keeping its old block until close */
#define UPD_TRIES   100          /* hits a thread makes in each window */

struct upd_arg {
    tally_engine *e;
    uint32_t      policy;
    int           t;             /* THREADS: the updater */
    _Atomic int  *go;
    uint64_t      admitted[UPD_ROUNDS];
    uint64_t      updates;
    int           errors;
};

static tally_policy upd_policy(uint64_t max)
{
    tally_policy p = { .name = "upd", .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = max, .period_ns = SEC } } };
    return p;
}

static void *upd_worker(void *p)
{
    struct upd_arg *a = p;
    while (!atomic_load(a->go))
        ;
    if (a->t == THREADS) {
        /* flip the max between the two values while the hitters run */
        for (uint64_t i = 0; atomic_load(a->go) == 1 && i < UPD_MOST; i++) {
            tally_policy np = upd_policy(i % 2 ? UPD_LARGE : UPD_SMALL);
            if (tally_policy_update(a->e, a->policy, &np) != 0)
                a->errors++;
            a->updates++;
        }
        return NULL;
    }
    for (int round = 0; round < UPD_ROUNDS; round++) {
        /* a key a round: the threads' rounds overlap, their windows do not */
        char key[16];
        int len = snprintf(key, sizeof(key), "k%d", round);
        for (int i = 0; i < UPD_TRIES; i++) {
            tally_result r;
            if (tally_hit_at(a->e, a->policy, key, (size_t)len, NULL, T0, &r) != 0)
                a->errors++;
            a->admitted[round] += r.allowed;
        }
    }
    return NULL;
}

Test(features_stress, updates_racing_hits_never_admit_more_than_the_larger_max, .timeout = 120)
{
    tally_engine *e = open_engine(2 * UPD_ROUNDS);
    tally_policy p = upd_policy(UPD_SMALL);
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    _Atomic int go = 0;
    struct upd_arg *args = calloc(THREADS + 1, sizeof(*args));
    pthread_t th[THREADS + 1];
    for (int i = 0; i <= THREADS; i++) {
        args[i] = (struct upd_arg){ .e = e, .policy = id, .t = i, .go = &go };
        cr_assert_eq(pthread_create(&th[i], NULL, upd_worker, &args[i]), 0);
    }
    atomic_store(&go, 1);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    atomic_store(&go, 2);
    pthread_join(th[THREADS], NULL);

    for (int round = 0; round < UPD_ROUNDS; round++) {
        uint64_t sum = 0;
        for (int i = 0; i < THREADS; i++)
            sum += args[i].admitted[round];
        /* the window's count is kept through every update: what passed is
           at most the larger max, and at least the smaller (every hit after
           the count reached it was denied under either) */
        cr_assert_leq(sum, UPD_LARGE, "window %d admitted %" PRIu64, round, sum);
        cr_assert_geq(sum, UPD_SMALL, "window %d admitted %" PRIu64, round, sum);
    }
    cr_assert_gt(args[THREADS].updates, 0);
    for (int i = 0; i <= THREADS; i++)
        cr_assert_eq(args[i].errors, 0);
    free(args);
    tally_close(e);
}

/* ---- Reservations: exactly the slots that exist -------------------------------- */

/* burst 10 of 1 ms cells, delays accepted up to 200 ms: 10 + 200 slots at T0 */
#define RES_BURST   10
#define RES_DELAY   (200 * MS)
#define RES_SLOTS   (RES_BURST + 200)
#define RES_ROUNDS  40

struct res_arg {
    tally_engine *e;
    uint32_t      policy;
    uint64_t      now;
    _Atomic int  *go;
    int           n;
    uint64_t      delays[RES_SLOTS + 1];
    int           errors;
};

static void *res_worker(void *p)
{
    struct res_arg *a = p;
    while (!atomic_load(a->go))
        ;
    for (int denied = 0; denied < 20;) {
        uint64_t d;
        tally_result r;
        if (tally_reserve_at(a->e, a->policy, "k", 1, NULL, a->now, RES_DELAY, &d, &r) != 0) {
            a->errors++;
            break;
        }
        if (!r.allowed) {
            denied++;
            continue;
        }
        if (a->n == RES_SLOTS + 1) {
            a->errors++;                      /* more bookings than slots */
            break;
        }
        a->delays[a->n++] = d;
    }
    return NULL;
}

Test(features_stress, reservations_from_four_threads_book_exactly_the_slots_that_exist, .timeout = 120)
{
    tally_engine *e = open_engine(64);
    tally_policy p = { .name = "res", .n_limits = 1,
                       .limits = { { .algo = TALLY_GCRA, .max = RES_BURST,
                                     .period_ns = RES_BURST * MS } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    struct res_arg *args = calloc(THREADS, sizeof(*args));

    for (int round = 0; round < RES_ROUNDS; round++) {
        /* a new key state each round: far enough apart to drain */
        uint64_t now = T0 + (uint64_t)round * 10 * SEC;
        _Atomic int go = 0;
        pthread_t th[THREADS];
        for (int i = 0; i < THREADS; i++) {
            memset(&args[i], 0, sizeof(args[i]));
            args[i] = (struct res_arg){ .e = e, .policy = id, .now = now, .go = &go };
            cr_assert_eq(pthread_create(&th[i], NULL, res_worker, &args[i]), 0);
        }
        atomic_store(&go, 1);
        for (int i = 0; i < THREADS; i++)
            pthread_join(th[i], NULL);

        /* every slot booked once: the k-th booking waits (k - burst) ms */
        int seen[RES_SLOTS] = { 0 };
        int total = 0;
        for (int i = 0; i < THREADS; i++) {
            cr_assert_eq(args[i].errors, 0);
            for (int j = 0; j < args[i].n; j++) {
                uint64_t d = args[i].delays[j];
                cr_assert_eq(d % MS, 0, "delay %" PRIu64 " is not a slot", d);
                cr_assert_leq(d, RES_DELAY);
                int k = d == 0 ? -1 : (int)(d / MS) + RES_BURST - 1;
                if (k < 0) {
                    total++;
                    continue;                 /* the burst: counted below */
                }
                cr_assert_eq(seen[k], 0, "slot %d booked twice", k);
                seen[k] = 1;
                total++;
            }
        }
        cr_assert_eq(total, RES_SLOTS, "round %d: %d bookings", round, total);
        for (int k = RES_BURST; k < RES_SLOTS; k++)
            cr_assert_eq(seen[k], 1, "slot %d never booked", k);
    }
    free(args);
    tally_close(e);
}

/* ---- Concurrency holds: acquire and release ending at 0 -------------------------- */

#define CONC_MAX   3
#define CONC_LOOPS 20000

struct conc_arg {
    tally_engine   *e;
    uint32_t        policy;
    _Atomic int    *go;
    _Atomic int    *inside;      /* holders right now, as the threads count them */
    int             most;
    uint64_t        acquired, released;
    int             errors;
};

static void *conc_worker(void *p)
{
    struct conc_arg *a = p;
    uint64_t costs[2] = { 1, 1 };
    while (!atomic_load(a->go))
        ;
    for (int i = 0; i < CONC_LOOPS; i++) {
        tally_result r;
        if (tally_hit_at(a->e, a->policy, "k", 1, costs, T0, &r) != 0) {
            a->errors++;
            continue;
        }
        if (!r.allowed)
            continue;
        a->acquired++;
        int now_in = atomic_fetch_add(a->inside, 1) + 1;
        if (now_in > a->most)
            a->most = now_in;
        atomic_fetch_sub(a->inside, 1);
        if (tally_release_at(a->e, a->policy, "k", 1, costs, T0) != 0)
            a->errors++;
        else
            a->released++;
    }
    return NULL;
}

Test(features_stress, concurrent_acquires_and_releases_end_at_exactly_zero, .timeout = 120)
{
    tally_engine *e = open_engine(64);
    /* with a rate limit beside it that never binds: the all-or-none path */
    tally_policy p = { .name = "conc", .n_limits = 2,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = TALLY_MAX_COUNT,
                                     .period_ns = 3600 * SEC },
                                   { .algo = TALLY_CONCURRENCY, .max = CONC_MAX,
                                     .period_ns = 3600 * SEC } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    _Atomic int go = 0, inside = 0;
    struct conc_arg args[THREADS];
    for (int i = 0; i < THREADS; i++)
        args[i] = (struct conc_arg){ .e = e, .policy = id, .go = &go, .inside = &inside };
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, conc_worker, &args[i]), 0);
    atomic_store(&go, 1);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);

    uint64_t acquired = 0, released = 0;
    for (int i = 0; i < THREADS; i++) {
        cr_assert_eq(args[i].errors, 0, "a release of a hold that was acquired failed");
        cr_assert_leq(args[i].most, CONC_MAX, "more holders at once than max");
        acquired += args[i].acquired;
        released += args[i].released;
    }
    cr_assert_gt(acquired, 0);
    cr_assert_eq(acquired, released);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, id, "k", 1, &s), 0);
    cr_assert_eq(s.c[1].used, 0, "every hold given back");
    cr_assert_eq(s.c[0].used, acquired, "the rate limit counts the admitted hits only");
    cr_assert_eq(tally_release_at(e, id, "k", 1, NULL, T0), TALLY_ENOENT);
    tally_close(e);
}

/* ---- Eviction: keys sprayed into a full table beside hot keys at a limit ----- */

#define LRU_CAP     2048
#define LRU_HOT     8
#define LRU_MAX     500          /* admitted per hot key and window */
#define LRU_SPRAY   3000         /* new keys per sprayer */
#define LRU_PACE    16           /* new keys a sprayer adds per round of each hitter */
#define LRU_SIDES   2            /* hitters, and as many sprayers */
#define LRU_BATCH   (LRU_CAP / 256) /* keys one eviction takes in this table */

struct lru_arg {
    tally_engine    *e;
    uint32_t         policy;
    int              t;
    _Atomic int     *go;
    _Atomic int     *sprayers_left;
    _Atomic uint64_t *rounds;    /* per hitter: rounds over every hot key */
    uint64_t         admitted[LRU_HOT];
    int              errors, refused;
};

static void *lru_hitter(void *p)
{
    struct lru_arg *a = p;
    while (!atomic_load(a->go))
        ;
    do {
        for (int k = 0; k < LRU_HOT; k++) {
            char key[16];
            int len = snprintf(key, sizeof(key), "hot-%d", k);
            tally_result r;
            if (tally_hit(a->e, a->policy, key, (size_t)len, NULL, &r) != 0)
                a->errors++;
            else
                a->admitted[k] += r.allowed;
        }
        atomic_fetch_add(&a->rounds[a->t], 1);
    } while (atomic_load(a->sprayers_left) > 0);
    return NULL;
}

static void *lru_sprayer(void *p)
{
    struct lru_arg *a = p;
    uint64_t seen[LRU_SIDES] = { 0 };
    while (!atomic_load(a->go))
        ;
    for (int i = 0; i < LRU_SPRAY; i++) {
        /* The hot keys are hit again every LRU_PACE new keys of each
           sprayer, whatever the scheduler does: recency, not speed. */
        if (i % LRU_PACE == 0)
            for (int h = 0; h < LRU_SIDES; h++) {
                while (atomic_load(&a->rounds[h]) == seen[h])
                    sched_yield();
                seen[h] = atomic_load(&a->rounds[h]);
            }
        char key[24];
        int len = snprintf(key, sizeof(key), "spray-%d-%d", a->t, i);
        tally_result r;
        int rc = tally_hit(a->e, a->policy, key, (size_t)len, NULL, &r);
        if (rc == TALLY_EFULL)
            a->refused++;
        else if (rc != 0 || !r.allowed)
            a->errors++;
    }
    atomic_fetch_sub(a->sprayers_left, 1);
    return NULL;
}

Test(features_stress, keys_sprayed_into_a_full_lru_table_leave_hot_keys_exact, .timeout = 240)
{
    tally_engine *e = open_engine(LRU_CAP);
    /* two limits: the second counts every admitted hit, so that a hot key
       evicted and back would show a count below what was admitted */
    tally_policy p = { .name = "lru", .n_limits = 2, .flags = TALLY_EVICT_LRU,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = LRU_MAX, .period_ns = 3600 * SEC },
                                   { .algo = TALLY_FIXED_WINDOW, .max = TALLY_MAX_COUNT,
                                     .period_ns = 7200 * SEC } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    _Atomic int go = 0, sprayers_left = LRU_SIDES;
    _Atomic uint64_t rounds[LRU_SIDES] = { 0 };
    struct lru_arg *args = calloc(2 * LRU_SIDES, sizeof(*args));
    pthread_t th[2 * LRU_SIDES];
    for (int i = 0; i < 2 * LRU_SIDES; i++) {
        args[i] = (struct lru_arg){ .e = e, .policy = id, .t = i % LRU_SIDES, .go = &go,
                                    .sprayers_left = &sprayers_left, .rounds = rounds };
        cr_assert_eq(pthread_create(&th[i], NULL, i < LRU_SIDES ? lru_hitter : lru_sprayer, &args[i]), 0);
    }
    atomic_store(&go, 1);
    for (int i = 0; i < 2 * LRU_SIDES; i++)
        pthread_join(th[i], NULL);

    for (int i = 0; i < 2 * LRU_SIDES; i++)
        cr_assert_eq(args[i].errors, 0, "thread %d: a call failed, or a new key was denied", i);
    for (int i = LRU_SIDES; i < 2 * LRU_SIDES; i++)
        cr_assert_eq(args[i].refused, 0, "sprayer %d: a new key refused while keys could go", i);
    for (int k = 0; k < LRU_HOT; k++) {
        uint64_t admitted = 0;
        for (int i = 0; i < LRU_SIDES; i++)
            admitted += args[i].admitted[k];
        char key[16];
        int len = snprintf(key, sizeof(key), "hot-%d", k);
        tally_snapshot s;
        cr_assert_eq(tally_read(e, id, key, (size_t)len, &s), 0, "hot key %d was evicted", k);
        cr_assert_eq(admitted, LRU_MAX, "hot key %d: %" PRIu64 " admitted in its window", k, admitted);
        cr_assert_eq(s.c[0].used, LRU_MAX, "hot key %d", k);
        cr_assert_eq(s.c[1].used, LRU_MAX, "hot key %d: cost lost", k);
    }
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    /* Nothing expires: every key that left the table was evicted, and
       counted once. An eviction takes a batch (LRU_BATCH here), so the last
       ones may leave room for a few keys that never came. */
    uint64_t present = LRU_HOT;
    for (int t = 0; t < LRU_SIDES; t++)
        for (int i = 0; i < LRU_SPRAY; i++) {
            char key[24];
            int len = snprintf(key, sizeof(key), "spray-%d-%d", t, i);
            tally_snapshot s;
            int rc = tally_read(e, id, key, (size_t)len, &s);
            cr_assert(rc == 0 || rc == TALLY_ENOENT, "read: %d", rc);
            present += rc == 0;
        }
    cr_assert_leq(present, LRU_CAP);
    cr_assert_gt(present + LRU_SIDES * LRU_BATCH, LRU_CAP, "%" PRIu64 " keys left", present);
    cr_assert_eq(st.lru_evictions, LRU_HOT + LRU_SIDES * LRU_SPRAY - present);
    cr_assert_eq(st.full_refusals, 0);
    fprintf(stderr, "lru spray: %" PRIu64 " evictions, %" PRIu64 " keys left, %" PRIu64 " hits of the hot keys\n",
            st.lru_evictions, present, st.hits - (uint64_t)(LRU_SIDES * LRU_SPRAY));
    free(args);
    tally_close(e);
}
