/*
 * Two engines enforcing one limit through Redis, whatever the mode the
 * caller connected them with: each engine hits one key once a millisecond,
 * SHARED_HITS times, against SHARED_MAX in a one-hour aligned fixed window,
 * flushing every 20 ms. What the semantics give (docs/SYNC.md, "Cluster-wide
 * limits"): at least SHARED_MAX admitted in total, since an engine denies only
 * on counts that were admitted; at most SHARED_MAX plus the overshoot bound
 * R x 2 x (I + L), about 80 + 4 L here; and once both engines flushed, Redis
 * holding exactly what they admitted and each of them denying the next hit.
 * Include after ../test.h.
 */
#ifndef TALLY_TEST_SHARED_LIMIT_H
#define TALLY_TEST_SHARED_LIMIT_H

#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <tally.h>

#include "redis_server.h"

#define SHARED_MAX      1000
#define SHARED_HITS     1500
#define SHARED_INTERVAL 20                 /* ms, the engines' flush interval */
/* R x 2 x (I + L) with R = 2 hits/ms and I = 20 ms: 80 + 4 L, and a round
   trip on loopback is well under the 5 ms this leaves for L */
#define SHARED_SLACK    100
#define SHARED_PERIOD   (UINT64_C(3600) * 1000000000)

/* The limit both engines share; the same name, limits and flags on each. */
static uint32_t shared_limit_policy(tally_engine *e)
{
    tally_policy p = { .name = "shared", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = SHARED_MAX,
                                     .period_ns = SHARED_PERIOD } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

/* An engine of the shared limit, with the hash key @hash_key that every
   engine of the test shares; its policy's id in *@policy. */
static inline tally_engine *shared_limit_engine(const uint8_t hash_key[16], uint32_t *policy)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 64;
    memcpy(o.hash_key, hash_key, 16);
    tally_engine *e;
    cr_assert_eq(tally_open(&o, &e), 0);
    *policy = shared_limit_policy(e);
    return e;
}

struct shared_paced {
    tally_engine *e;
    uint32_t      policy;
    const char   *key;
    int           allowed;
};

static void *shared_paced_worker(void *arg)
{
    struct shared_paced *p = arg;
    for (int i = 0; i < SHARED_HITS; i++) {
        tally_result r;
        if (tally_hit(p->e, p->policy, p->key, strlen(p->key), NULL, &r) == 0 && r.allowed)
            p->allowed++;
        sleep_ms(1);
    }
    return NULL;
}

static int shared_flush(tally_engine *e)
{
    int rc = -1;
    for (int i = 0; i < 30 && rc != 0; i++)
        if ((rc = tally_flush(e, 3000)) != 0)
            sleep_ms(100);
    return rc;
}

/* Run the two engines' hits on @key; @stored reads what Redis holds for
   @key in the window that starts at @window (-2 when it cannot). */
static void shared_limit_run(const char *mode, tally_engine *a, uint32_t pa, tally_engine *b,
                             uint32_t pb, const char *key,
                             long long (*stored)(void *arg, const char *key, uint64_t window),
                             void *arg)
{
    /* the whole run in one window: across the top of an hour each engine
       would admit max again in the next */
    uint64_t now = tally_now_ns(), left = SHARED_PERIOD - now % SHARED_PERIOD;
    if (left < UINT64_C(30) * 1000000000)
        sleep_ms((unsigned)(left / 1000000) + 10);
    now = tally_now_ns();
    uint64_t window = now - now % SHARED_PERIOD;
    struct shared_paced wa = { a, pa, key, 0 }, wb = { b, pb, key, 0 };
    pthread_t ta, tb;
    cr_assert_eq(pthread_create(&ta, NULL, shared_paced_worker, &wa), 0);
    cr_assert_eq(pthread_create(&tb, NULL, shared_paced_worker, &wb), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    int total = wa.allowed + wb.allowed;
    fprintf(stderr, "%s: two engines admitted %d + %d = %d of max %d\n", mode, wa.allowed,
            wb.allowed, total, SHARED_MAX);
    cr_assert_geq(total, SHARED_MAX, "the limit is not stricter than max");
    cr_assert_leq(total, SHARED_MAX + SHARED_SLACK, "overshoot above the documented bound");
    cr_assert_gt(wa.allowed, 100);
    cr_assert_gt(wb.allowed, 100);

    /* a, b, a: each has then acknowledged all its cost and read the other's */
    cr_assert_eq(shared_flush(a), 0);
    cr_assert_eq(shared_flush(b), 0);
    cr_assert_eq(shared_flush(a), 0);
    cr_assert_eq(stored(arg, key, window), (long long)total,
                 "Redis holds exactly what the engines admitted");
    tally_result r;
    cr_assert_eq(tally_hit(a, pa, key, strlen(key), NULL, &r), 0);
    cr_assert_not(r.allowed, "the first engine knows the global count is at max");
    cr_assert_eq(tally_hit(b, pb, key, strlen(key), NULL, &r), 0);
    cr_assert_not(r.allowed, "the second engine knows the global count is at max");
}

#endif
