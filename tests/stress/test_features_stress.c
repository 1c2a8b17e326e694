/*
 * Stress tests of the limiter features: real threads racing on one key.
 * Policy updates against hits (never more admitted than the larger max),
 * reservations (exactly the slots that exist, each booked once) and
 * concurrency holds (every acquire given back, ending at exactly 0).
 */
#include "../test.h"
#include <inttypes.h>
#include <pthread.h>
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
