/*
 * The limiter features through the public API, single-threaded: a caller's
 * max per hit (tally_hit_ex), replacing a policy's limits while keys keep
 * their usage (tally_policy_update), GCRA reservations (tally_reserve_at),
 * concurrency limits with their releases and leases, and the eviction of
 * the least recently hit keys of a full table, a batch per grace period
 * (TALLY_EVICT_LRU).
 */
#include "test.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"
#include "engine_open.h"
#include "engine/engine-internal.h"


static tally_policy policy_of(const char *name, unsigned flags, unsigned n, const tally_limit *l)
{
    tally_policy p = { .name = name, .n_limits = n, .flags = flags };
    memcpy(p.limits, l, n * sizeof(*l));
    return p;
}

static uint32_t add(tally_engine *e, const char *name, unsigned flags, unsigned n, const tally_limit *l)
{
    tally_policy p = policy_of(name, flags, n, l);
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

static tally_result hit(tally_engine *e, uint32_t pol, const char *key, const uint64_t *costs, uint64_t now)
{
    tally_result r;
    memset(&r, 0xab, sizeof(r));
    cr_assert_eq(tally_hit_at(e, pol, key, strlen(key), costs, now, &r), 0);
    return r;
}

static tally_result hit_max(tally_engine *e, uint32_t pol, const char *key, const uint64_t *max,
                            uint64_t now)
{
    tally_hit_opts o = { .max = max, .now_ns = now };
    tally_result r;
    memset(&r, 0xab, sizeof(r));
    cr_assert_eq(tally_hit_ex(e, pol, key, strlen(key), &o, &r), 0);
    return r;
}

static uint64_t used(tally_engine *e, uint32_t pol, const char *key, unsigned limit)
{
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, key, strlen(key), &s), 0);
    return s.c[limit].used;
}

static const tally_limit FIXED10 = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 10 * SEC };

/* ---- tally_hit_ex: a caller's max ------------------------------------------ */

Test(features, hit_ex_decides_the_keys_usage_against_each_calls_max)
{
    tally_engine *e = open_engine(64);
    uint32_t p = add(e, "plan", 0, 1, &FIXED10);
    uint64_t three[1] = { 3 }, five[1] = { 5 };

    for (int i = 0; i < 3; i++) {
        tally_result r = hit_max(e, p, "k", three, T0);
        cr_assert(r.allowed, "hit %d of a max of 3", i);
        cr_assert_eq(r.remaining, (uint64_t)(2 - i));
    }
    tally_result r = hit_max(e, p, "k", three, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 1u);
    cr_assert_eq(r.retry_after_ns, 10 * SEC);
    /* the same usage, a larger plan: two more fit */
    cr_assert(hit_max(e, p, "k", five, T0).allowed);
    r = hit_max(e, p, "k", five, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_not(hit_max(e, p, "k", five, T0).allowed);
    /* and the policy's own max of 10 for tally_hit_at */
    r = hit(e, p, "k", NULL, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 4);
    cr_assert_eq(used(e, p, "k", 0), 6);
    tally_close(e);
}

Test(features, hit_ex_null_max_and_zero_entries_mean_the_policys_max)
{
    tally_engine *e = open_engine(64);
    tally_limit l[2] = { { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = SEC },
                         { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 60 * SEC } };
    uint32_t p = add(e, "two", 0, 2, l);
    uint64_t zero_and_three[2] = { 0, 3 };

    cr_assert(hit_max(e, p, "a", NULL, T0).allowed);
    tally_result r = hit_max(e, p, "a", zero_and_three, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0, "limit 0 keeps its max of 2; limit 1 is at 2 of 3");
    r = hit_max(e, p, "a", zero_and_three, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 1u, "only limit 0 is over");
    /* limit 1 at 2 of a max of 3: a second key shows it binds alone */
    uint64_t big_and_one[2] = { 50, 1 };
    cr_assert(hit_max(e, p, "b", big_and_one, T0).allowed);
    r = hit_max(e, p, "b", big_and_one, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 2u);
    cr_assert_eq(used(e, p, "b", 0), 1, "all or none: limit 0 gave back the denied hit");

    /* NULL opts: cost 1 at tally_now_ns() */
    r.allowed = false;
    cr_assert_eq(tally_hit_ex(e, p, "c", 1, NULL, &r), 0);
    cr_assert(r.allowed);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, p, "c", 1, &s), 0);
    cr_assert_geq(s.c[0].window_start_ns, T0, "the engine's clock, not 0");
    tally_close(e);
}

Test(features, hit_ex_costs_and_gcra_emission_of_the_calls_max)
{
    tally_engine *e = open_engine(64);
    /* burst 10, refilled in 10 s: T = 1 s */
    tally_limit g = { .algo = TALLY_GCRA, .max = 10, .period_ns = 10 * SEC };
    uint32_t p = add(e, "g", 0, 1, &g);
    uint64_t five[1] = { 5 }, two[1] = { 2 };

    /* a max of 5 over the same period: T = 2 s, cost 2 takes 4 s of the 10 */
    tally_hit_opts o = { .costs = two, .max = five, .now_ns = T0 };
    tally_result r;
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 3);
    cr_assert_eq(r.reset_after_ns, 4 * SEC);
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), 0);
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), 0);
    cr_assert_not(r.allowed, "12 s would be in use, above the 10 s tolerance");
    cr_assert_eq(r.retry_after_ns, 2 * SEC);
    /* the policy's max reads the same 8 s in use as 8 of 10 cells */
    r = hit(e, p, "k", NULL, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 1);
    tally_close(e);
}

Test(features, hit_ex_refuses_a_max_out_of_bounds_and_changes_nothing)
{
    tally_engine *e = open_engine(64);
    tally_limit l[2] = { FIXED10, { .algo = TALLY_GCRA, .max = 10, .period_ns = 1000 } };
    uint32_t p = add(e, "b", 0, 2, l);
    uint64_t over_fixed[2] = { TALLY_MAX_COUNT + 1, 0 };
    uint64_t over_period[2] = { 1, 1001 };     /* GCRA: emission interval 1000/1001 = 0 */
    tally_hit_opts o = { .max = over_fixed, .now_ns = T0 };
    tally_result r;
    tally_snapshot s;

    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), TALLY_EINVAL);
    o.max = over_period;
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, p, "k", 1, &s), TALLY_ENOENT, "no slot was taken");
    o.max = NULL;
    o.now_ns = (uint64_t)INT64_MAX + 1;
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, &o, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_ex(e, 99, "k", 1, NULL, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_ex(e, p, "k", 1, NULL, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_hit_ex(NULL, p, "k", 1, NULL, &r), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, p, "k", 1, &s), TALLY_ENOENT);
    tally_close(e);
}

/* ---- tally_policy_update ----------------------------------------------------- */

Test(features, update_of_max_keeps_every_keys_usage)
{
    tally_engine *e = open_engine(64);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = 10 * SEC };
    uint32_t p = add(e, "u", 0, 1, &l);
    for (int i = 0; i < 3; i++)
        cr_assert(hit(e, p, "k", NULL, T0).allowed);
    cr_assert(hit(e, p, "other", NULL, T0).allowed);

    l.max = 10;
    tally_policy np = policy_of("u", 0, 1, &l);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    tally_result r = hit(e, p, "k", NULL, T0 + SEC);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 6, "new max 10 - used 4");
    cr_assert_eq(used(e, p, "other", 0), 1);

    np.limits[0].max = 2;
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    r = hit(e, p, "k", NULL, T0 + SEC);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.remaining, 0, "used 4 is above the new max: 0, never negative");
    cr_assert_eq(r.retry_after_ns, 9 * SEC);
    cr_assert(hit(e, p, "other", NULL, T0 + SEC).allowed, "1 of 2");
    cr_assert_not(hit(e, p, "other", NULL, T0 + SEC).allowed);
    tally_close(e);
}

Test(features, update_flags_apply_to_the_next_hit)
{
    tally_engine *e = open_engine(64);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = 10 * SEC };
    uint32_t p = add(e, "f", 0, 1, &l);
    cr_assert(hit(e, p, "k", NULL, T0).allowed);
    cr_assert_not(hit(e, p, "k", NULL, T0).allowed);

    tally_policy np = policy_of("f", TALLY_SHADOW, 1, &l);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    tally_result r = hit(e, p, "k", NULL, T0);
    cr_assert(r.allowed, "shadow: reported, not denied");
    cr_assert_eq(r.exceeded, 1u);
    cr_assert_eq(used(e, p, "k", 0), 2, "shadow hits consume");

    np.flags = 1u << 4;                   /* no such flag: refused, nothing changes */
    cr_assert_eq(tally_policy_update(e, p, &np), TALLY_EINVAL);
    cr_assert(hit(e, p, "k", NULL, T0).allowed, "still shadow");
    cr_assert_eq(used(e, p, "k", 0), 3);
    np.flags = 0;
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    cr_assert_not(hit(e, p, "k", NULL, T0).allowed, "back to denying");
    cr_assert_eq(used(e, p, "k", 0), 3, "a denied hit consumes nothing again");
    tally_close(e);
}

Test(features, update_refuses_bad_input_and_changes_nothing)
{
    tally_engine *e = open_engine(64);
    tally_limit l[2] = { { .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = 10 * SEC },
                         { .algo = TALLY_SLIDING_WINDOW, .max = 5, .period_ns = SEC } };
    uint32_t p = add(e, "x", 0, 2, l);
    cr_assert(hit(e, p, "k", NULL, T0).allowed);

    tally_policy np = policy_of("x", 0, 2, l);
    np.limits[0].max = 100;
    tally_policy bad = np;
    bad.name = "y";
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "another name");
    bad = np;
    bad.n_limits = 1;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "another limit count");
    bad = np;
    bad.limits[0].algo = TALLY_GCRA;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "fixed to GCRA");
    bad = np;
    bad.limits[1].period_ns = 2 * SEC;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "a sliding window's period");
    bad = np;
    bad.limits[1].algo = TALLY_FIXED_WINDOW;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "sliding to fixed");
    bad = np;
    bad.limits[0].max = 0;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "a limit add would refuse");
    bad = np;
    bad.flags = 1u << 9;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL, "unknown flag");
    bad = np;
    bad.name = NULL;
    cr_assert_eq(tally_policy_update(e, p, &bad), TALLY_EINVAL);
    cr_assert_eq(tally_policy_update(e, p + 1, &np), TALLY_EINVAL, "unknown id");
    cr_assert_eq(tally_policy_update(e, p, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_policy_update(NULL, p, &np), TALLY_EINVAL);

    cr_assert_not(hit(e, p, "k", NULL, T0).allowed, "still the max of 1");
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    cr_assert(hit(e, p, "k", NULL, T0).allowed, "now the max of 100");
    tally_close(e);
}

Test(features, update_of_a_fixed_period_keeps_the_window_start)
{
    tally_engine *e = open_engine(64);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = 10 * SEC };
    uint32_t p = add(e, "w", 0, 1, &l);
    cr_assert(hit(e, p, "k", NULL, T0).allowed);

    l.period_ns = 20 * SEC;
    tally_policy np = policy_of("w", 0, 1, &l);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    tally_result r = hit(e, p, "k", NULL, T0 + 15 * SEC);
    cr_assert_not(r.allowed, "the window [T0, T0 + 20 s) still holds the hit");
    cr_assert_eq(r.retry_after_ns, 5 * SEC);
    cr_assert(hit(e, p, "k", NULL, T0 + 20 * SEC).allowed);
    tally_close(e);
}

Test(features, update_between_fixed_and_calendar_reads_the_window_start)
{
    tally_engine *e = open_engine(64);
    uint64_t minute = T0 - T0 % (60 * SEC);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = 60 * SEC };
    uint32_t p = add(e, "c", TALLY_ALIGNED, 1, &l);
    cr_assert(hit(e, p, "k", NULL, minute + SEC).allowed);
    cr_assert(hit(e, p, "late", NULL, minute + 59 * SEC).allowed);

    tally_limit cal = { .algo = TALLY_CALENDAR_WINDOW, .max = 2, .unit = TALLY_MINUTE };
    tally_policy np = policy_of("c", 0, 1, &cal);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    /* the stored start is the calendar minute's start: the count stays */
    tally_result r = hit(e, p, "k", NULL, minute + 2 * SEC);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_not(hit(e, p, "k", NULL, minute + 3 * SEC).allowed);

    /* and back: the calendar minute is a fixed window of 120 s from its start */
    tally_limit fx = { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = 120 * SEC };
    np = policy_of("c", 0, 1, &fx);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    cr_assert_not(hit(e, p, "k", NULL, minute + 119 * SEC).allowed);
    cr_assert(hit(e, p, "k", NULL, minute + 120 * SEC).allowed);
    tally_close(e);
}

Test(features, update_of_a_gcra_burst_at_the_same_rate_keeps_used)
{
    tally_engine *e = open_engine(64);
    /* 1/s burst 4, then burst 8: the emission interval stays 1 s */
    tally_limit g = { .algo = TALLY_GCRA, .max = 4, .period_ns = 4 * SEC };
    uint32_t p = add(e, "g", 0, 1, &g);
    for (int i = 0; i < 4; i++)
        cr_assert(hit(e, p, "k", NULL, T0).allowed);
    cr_assert_not(hit(e, p, "k", NULL, T0).allowed);

    g.max = 8;
    g.period_ns = 8 * SEC;
    tally_policy np = policy_of("g", 0, 1, &g);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    cr_assert_eq(used(e, p, "k", 0), 4);
    tally_result r = hit(e, p, "k", NULL, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 3, "new max 8 - used 5");
    tally_close(e);
}

/* ---- tally_reserve_at ----------------------------------------------------------- */

Test(features, reserve_books_each_hit_at_the_first_time_it_conforms)
{
    tally_engine *e = open_engine(64);
    /* burst 2, one cell a second */
    tally_limit g = { .algo = TALLY_GCRA, .max = 2, .period_ns = 2 * SEC };
    uint32_t p = add(e, "r", 0, 1, &g);
    uint64_t d = 77;
    tally_result r;

    for (uint64_t i = 0; i < 6; i++) {
        cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 4 * SEC, &d, &r), 0);
        cr_assert(r.allowed, "reservation %" PRIu64, i);
        cr_assert_eq(d, i < 2 ? 0 : (i - 1) * SEC, "reservation %" PRIu64, i);
        cr_assert_eq(r.retry_after_ns, 0);
        cr_assert_eq(r.exceeded, 0);
    }
    /* a fifth second of delay is above 4 s: nothing is booked */
    tally_snapshot before, after;
    cr_assert_eq(tally_read(e, p, "k", 1, &before), 0);
    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 4 * SEC, &d, &r), 0);
    cr_assert_not(r.allowed);
    cr_assert_eq(d, 0);
    cr_assert_eq(r.exceeded, 1u);
    cr_assert_eq(r.first_exceeded, 1u);
    cr_assert_eq(r.retry_after_ns, 5 * SEC, "as a denied hit: until the hit itself conforms");
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(tally_read(e, p, "k", 1, &after), 0);
    cr_assert(after.c[0].raw[1] == before.c[0].raw[1], "nothing consumed");
    /* hits see the bookings: the bucket is 4 s past full */
    r = hit(e, p, "k", NULL, T0 + 3 * SEC);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.retry_after_ns, 2 * SEC);
    /* a reservation a second later books the next second */
    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0 + SEC, 4 * SEC, &d, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(d, 4 * SEC);
    tally_close(e);
}

Test(features, reserve_without_delay_is_a_hit_and_a_cost_above_max_is_never_booked)
{
    tally_engine *e = open_engine(64);
    tally_limit g = { .algo = TALLY_GCRA, .max = 2, .period_ns = 2 * SEC };
    uint32_t p = add(e, "r", 0, 1, &g);
    uint64_t d, three[1] = { 3 };
    tally_result r;

    for (int i = 0; i < 2; i++) {
        cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 0, &d, &r), 0);
        cr_assert(r.allowed);
        cr_assert_eq(d, 0);
    }
    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 0, &d, &r), 0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.retry_after_ns, SEC);

    cr_assert_eq(tally_reserve_at(e, p, "big", 3, three, T0, 1000 * SEC, &d, &r), 0);
    cr_assert_not(r.allowed, "3 cells never fit a burst of 2, whatever the wait");
    cr_assert_eq(r.retry_after_ns, TALLY_NEVER);
    cr_assert_eq(d, 0);
    cr_assert(hit(e, p, "big", NULL, T0).allowed);
    cr_assert(hit(e, p, "big", NULL, T0).allowed);
    tally_close(e);
}

Test(features, reserve_on_several_gcra_limits_waits_for_the_slowest)
{
    tally_engine *e = open_engine(64);
    tally_limit g[2] = { { .algo = TALLY_GCRA, .max = 1, .period_ns = SEC },
                         { .algo = TALLY_GCRA, .max = 1, .period_ns = 3 * SEC } };
    uint32_t p = add(e, "two", 0, 2, g);
    uint64_t d;
    tally_result r;

    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 10 * SEC, &d, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(d, 0);
    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 10 * SEC, &d, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(d, 3 * SEC, "limit 1 conforms after 3 s, limit 0 after 1 s");
    cr_assert_eq(tally_reserve_at(e, p, "k", 1, NULL, T0, 5 * SEC, &d, &r), 0);
    cr_assert_not(r.allowed, "6 s is above 5 s");
    cr_assert_eq(r.exceeded, 2u, "limit 0 would wait 2 s only");
    tally_close(e);
}

Test(features, reserve_refuses_policies_that_are_not_all_gcra)
{
    tally_engine *e = open_engine(64);
    tally_limit l[2] = { { .algo = TALLY_GCRA, .max = 1, .period_ns = SEC }, FIXED10 };
    uint32_t mixed = add(e, "mixed", 0, 2, l);
    uint32_t fixed = add(e, "fixed", 0, 1, &FIXED10);
    uint32_t gcra = add(e, "gcra", 0, 1, l);
    uint64_t d = 5;
    tally_result r;
    tally_snapshot s;

    cr_assert_eq(tally_reserve_at(e, mixed, "k", 1, NULL, T0, SEC, &d, &r), TALLY_EINVAL);
    cr_assert_eq(tally_reserve_at(e, fixed, "k", 1, NULL, T0, SEC, &d, &r), TALLY_EINVAL);
    cr_assert_eq(tally_reserve_at(e, gcra, "k", 1, NULL, T0, SEC, NULL, &r), TALLY_EINVAL);
    cr_assert_eq(tally_reserve_at(e, gcra, "k", 1, NULL, (uint64_t)INT64_MAX + 1, SEC, &d, &r),
                 TALLY_EINVAL);
    cr_assert_eq(d, 5, "untouched on failure");
    cr_assert_eq(tally_read(e, mixed, "k", 1, &s), TALLY_ENOENT);
    cr_assert_eq(tally_read(e, gcra, "k", 1, &s), TALLY_ENOENT);
    tally_close(e);
}

/* ---- TALLY_CONCURRENCY ------------------------------------------------------------ */

static const tally_limit CONC2 = { .algo = TALLY_CONCURRENCY, .max = 2, .period_ns = 30 * SEC };

Test(features, concurrency_admits_max_holders_and_releases_give_back)
{
    tally_engine *e = open_engine(64);
    uint32_t p = add(e, "c", 0, 1, &CONC2);

    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0), TALLY_ENOENT, "untracked");
    tally_result r = hit(e, p, "k", NULL, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 1);
    cr_assert_eq(r.reset_after_ns, 30 * SEC);
    cr_assert(hit(e, p, "k", NULL, T0 + SEC).allowed);
    r = hit(e, p, "k", NULL, T0 + 2 * SEC);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.first_exceeded, 1u);
    cr_assert_eq(r.retry_after_ns, 29 * SEC, "until the holds' lease ends");
    cr_assert_eq(hit(e, p, "k", NULL, T0 + 2 * SEC).first_exceeded, 0u, "once per episode");

    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 3 * SEC), 0);
    cr_assert_eq(used(e, p, "k", 0), 1);
    cr_assert(hit(e, p, "k", NULL, T0 + 3 * SEC).allowed, "the released hold is free again");
    uint64_t three[1] = { 3 };
    cr_assert_eq(tally_release_at(e, p, "k", 1, three, T0 + 3 * SEC), TALLY_ENOENT,
                 "more than is held");
    cr_assert_eq(used(e, p, "k", 0), 2, "nothing changed");
    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 4 * SEC), 0);
    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 4 * SEC), 0);
    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 4 * SEC), TALLY_ENOENT,
                 "holds nothing: never negative");
    cr_assert_eq(used(e, p, "k", 0), 0);
    /* an episode ended with the last hold: a new one marks again */
    hit(e, p, "k", NULL, T0 + 5 * SEC);
    hit(e, p, "k", NULL, T0 + 5 * SEC);
    cr_assert_eq(hit(e, p, "k", NULL, T0 + 5 * SEC).first_exceeded, 1u);
    tally_close(e);
}

Test(features, concurrency_holds_expire_a_lease_after_the_latest_acquire)
{
    tally_engine *e = open_engine(64);
    uint32_t p = add(e, "c", 0, 1, &CONC2);
    hit(e, p, "k", NULL, T0);
    hit(e, p, "k", NULL, T0 + 10 * SEC);

    cr_assert_not(hit(e, p, "k", NULL, T0 + 40 * SEC - 1).allowed, "both still held");
    tally_result r = hit(e, p, "k", NULL, T0 + 40 * SEC);
    cr_assert(r.allowed, "a lease after the latest acquire, every hold expired");
    cr_assert_eq(r.remaining, 1);
    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 70 * SEC), TALLY_ENOENT,
                 "that hold expired too");
    cr_assert_eq(tally_release_at(e, p, "k", 1, NULL, T0 + 70 * SEC - 1), 0);
    tally_close(e);
}

Test(features, concurrency_with_a_rate_limit_is_all_or_none)
{
    tally_engine *e = open_engine(64);
    tally_limit l[2] = { { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = 60 * SEC }, CONC2 };
    uint32_t p = add(e, "both", 0, 2, l);
    uint64_t costs[2] = { 1, 1 };

    cr_assert(hit(e, p, "k", costs, T0).allowed);
    cr_assert(hit(e, p, "k", costs, T0).allowed);
    tally_result r = hit(e, p, "k", costs, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 2u);
    cr_assert_eq(used(e, p, "k", 0), 2, "the rate limit gave the denied hit back");
    cr_assert_eq(tally_release_at(e, p, "k", 1, costs, T0), 0);
    cr_assert(hit(e, p, "k", costs, T0).allowed);
    cr_assert_eq(tally_release_at(e, p, "k", 1, costs, T0), 0);
    r = hit(e, p, "k", costs, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 1u, "the rate limit is out");
    cr_assert_eq(used(e, p, "k", 1), 1, "no hold was taken by the denied hit");
    tally_close(e);
}

Test(features, concurrency_bad_input)
{
    tally_engine *e = open_engine(64);
    uint32_t fixed = add(e, "fixed", 0, 1, &FIXED10);
    tally_limit two[2] = { CONC2, CONC2 };
    tally_policy p2 = policy_of("two", 0, 2, two);
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p2, &id), TALLY_EINVAL, "one concurrency limit a policy");
    tally_limit big = CONC2;
    big.max = TALLY_CONCURRENCY_MAX_COUNT + 1;
    tally_policy pb = policy_of("big", 0, 1, &big);
    cr_assert_eq(tally_policy_add(e, &pb, &id), TALLY_EINVAL);
    big.max = 1;
    big.period_ns = 0;
    pb = policy_of("big", 0, 1, &big);
    cr_assert_eq(tally_policy_add(e, &pb, &id), TALLY_EINVAL, "a lease of 0");

    hit(e, fixed, "k", NULL, T0);
    cr_assert_eq(tally_release_at(e, fixed, "k", 1, NULL, T0), TALLY_EINVAL, "no concurrency limit");
    cr_assert_eq(used(e, fixed, "k", 0), 1);
    uint32_t c = add(e, "c", 0, 1, &CONC2);
    cr_assert_eq(tally_release_at(e, c, "k", 0, NULL, T0), TALLY_EINVAL);
    cr_assert_eq(tally_release_at(e, c, NULL, 1, NULL, T0), TALLY_EINVAL);
    cr_assert_eq(tally_release_at(NULL, c, "k", 1, NULL, T0), TALLY_EINVAL);
    cr_assert_eq(tally_release_at(e, c, "k", 1, NULL, (uint64_t)INT64_MAX + 1), TALLY_EINVAL);
    cr_assert_eq(tally_release(e, c, "k", 1, NULL), TALLY_ENOENT);

    /* an update keeps the holds: a smaller max denies until they are given back */
    hit(e, c, "k", NULL, T0);
    hit(e, c, "k", NULL, T0);
    tally_limit one = CONC2;
    one.max = 1;
    tally_policy np = policy_of("c", 0, 1, &one);
    cr_assert_eq(tally_policy_update(e, c, &np), 0);
    cr_assert_eq(tally_release_at(e, c, "k", 1, NULL, T0), 0);
    cr_assert_not(hit(e, c, "k", NULL, T0).allowed, "1 held of a max of 1");
    cr_assert_eq(tally_release_at(e, c, "k", 1, NULL, T0), 0);
    cr_assert(hit(e, c, "k", NULL, T0).allowed);
    tally_close(e);
}

/* ---- TALLY_EVICT_LRU: the least recently hit key makes room ------------------- */

#define LRU_CAP 64                     /* keys of a full table */
#define LRU_KEYS (LRU_CAP + 40)        /* and new ones to come */

/* Names of keys whose windows all start at one home group: each key's slot is
   in every other's window, so every key of the table is a candidate of every
   eviction, and the least recently hit of the table is the one to go. */
static char lru_names[LRU_KEYS][24];

/* @n names "@prefix-<i>" whose keys have one home group in @pol's table. */
static void home_group_keys(tally_engine *e, uint32_t pol, const char *prefix, char (*names)[24], int n)
{
    tally__table *t = &tally__policy_get(e, pol)->table;
    size_t home = SIZE_MAX;
    int found = 0;
    for (unsigned i = 0; found < n; i++) {
        char name[24];
        snprintf(name, sizeof(name), "%s-%u", prefix, i);
        size_t h = tally__home_of(t, tally__key_digest(e, name, strlen(name)));
        if (home == SIZE_MAX)
            home = h;
        if (h == home)
            memcpy(names[found++], name, sizeof(name));
        cr_assert_lt(i, 10000000u, "no keys share a home group");
    }
}

static void same_window_keys(tally_engine *e, uint32_t pol)
{
    home_group_keys(e, pol, "lru", lru_names, LRU_KEYS);
}

static bool present(tally_engine *e, uint32_t pol, const char *key)
{
    tally_snapshot s;
    int rc = tally_read(e, pol, key, strlen(key), &s);
    cr_assert(rc == 0 || rc == TALLY_ENOENT, "read: %d", rc);
    return rc == 0;
}

static int try_hit(tally_engine *e, uint32_t pol, const char *key, uint64_t now)
{
    tally_result r;
    return tally_hit_at(e, pol, key, strlen(key), NULL, now, &r);
}

static const tally_limit HOURLY5 = { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = 3600 * SEC };

/* A full table: key i of lru_names hit @hits times at T0 + i seconds. */
static uint32_t full_table(tally_engine *e, unsigned flags, int hits)
{
    uint32_t p = add(e, "lru", flags, 1, &HOURLY5);
    same_window_keys(e, p);
    for (int i = 0; i < LRU_CAP; i++)
        for (int j = 0; j < hits; j++)
            cr_assert_eq(try_hit(e, p, lru_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    return p;
}

static tally_stats stats(tally_engine *e)
{
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    return st;
}

Test(features, without_evict_lru_a_full_table_refuses_a_new_key)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = full_table(e, 0, 1);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), TALLY_EFULL);
    for (int i = 0; i < LRU_CAP; i++)
        cr_assert(present(e, p, lru_names[i]), "key %d", i);
    tally_stats st = stats(e);
    cr_assert_eq(st.full_refusals, 1);
    cr_assert_eq(st.lru_evictions, 0);
    tally_close(e);
}

Test(features, evict_lru_admits_a_new_key_in_place_of_the_least_recently_hit)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = full_table(e, TALLY_EVICT_LRU, 3);
    /* keys 0 to 9 hit again: key 10 is now the least recently hit */
    for (int i = 0; i < 10; i++)
        cr_assert_eq(try_hit(e, p, lru_names[i], T0 + 100 * SEC), 0);
    tally_result r = hit(e, p, lru_names[LRU_CAP], NULL, T0 + 200 * SEC);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 4, "the victim's count of 3 is not the new key's");
    for (int i = 0; i < LRU_CAP; i++)
        cr_assert_eq(present(e, p, lru_names[i]), i != 10, "key %d", i);
    cr_assert(present(e, p, lru_names[LRU_CAP]));
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + 1], T0 + 201 * SEC), 0);
    cr_assert_not(present(e, p, lru_names[11]), "then key 11");
    cr_assert(present(e, p, lru_names[12]));

    tally_stats st = stats(e);
    cr_assert_eq(st.lru_evictions, 2);
    cr_assert_eq(st.evictions, 0, "no expired slot was reclaimed");
    cr_assert_eq(st.full_refusals, 0);
    char text[8192];
    int n = tally_stats_prometheus(e, text, sizeof(text));
    cr_assert(n > 0 && (size_t)n < sizeof(text));
    cr_assert_not_null(strstr(text, "\ntally_lru_evictions 2\n"), "%s", text);
    cr_assert_not_null(strstr(text, "# TYPE tally_lru_evictions counter\n"), "%s", text);
    cr_assert_not_null(strstr(text, "\ntally_evictions 0\n"), "%s", text);
    tally_close(e);
}

Test(features, evict_lru_keeps_a_recently_hit_key_while_older_ones_exist)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = full_table(e, TALLY_EVICT_LRU, 1);
    /* the oldest key, hit once more (a denial stamps too: max is 5) */
    for (int j = 0; j < 6; j++)
        try_hit(e, p, lru_names[0], T0 + 100 * SEC);
    cr_assert_not(hit(e, p, lru_names[0], NULL, T0 + 100 * SEC).allowed);
    for (int k = 0; k < 32; k++)
        cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + k], T0 + (200 + (uint64_t)k) * SEC), 0, "new key %d", k);
    cr_assert(present(e, p, lru_names[0]), "hit at 100 s, while keys hit at 1 to 32 s were there");
    for (int i = 1; i < LRU_CAP; i++)
        cr_assert_eq(present(e, p, lru_names[i]), i > 32, "key %d", i);
    /* a key that comes back starts afresh: its count went with its slot */
    tally_result r = hit(e, p, lru_names[1], NULL, T0 + 300 * SEC);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 4);
    cr_assert_eq(stats(e).lru_evictions, 33);
    tally_close(e);
}

/* A flusher that pushes only when told (no Redis): deltas wait in the slots. */
static void start_idle_flusher(tally_engine *e)
{
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 3600 * 1000;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
}

Test(features, evict_lru_never_takes_a_key_with_unflushed_cost)
{
    tally_engine *e = open_engine(LRU_CAP);
    start_idle_flusher(e);
    uint32_t p = full_table(e, TALLY_EVICT_LRU, 1);
    /* every key has cost for the sinks: none may go */
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), TALLY_EFULL);
    cr_assert_eq(stats(e).lru_evictions, 0);
    cr_assert_eq(stats(e).full_refusals, 1);
    cr_assert_eq(tally_flush(e, 5000), 0);
    /* the oldest key gets cost again (at its old time: still the oldest) */
    cr_assert_eq(try_hit(e, p, lru_names[0], T0), 0);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), 0);
    cr_assert(present(e, p, lru_names[0]), "its cost is not pushed yet");
    cr_assert_not(present(e, p, lru_names[1]), "the oldest key without pending cost went");
    cr_assert_eq(tally_flush(e, 5000), 0);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + 1], T0 + 101 * SEC), 0);
    cr_assert_not(present(e, p, lru_names[0]), "once pushed, the oldest goes");
    cr_assert_eq(stats(e).lru_evictions, 2);
    tally_close(e);
}

Test(features, evict_lru_never_takes_a_flagged_key)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = full_table(e, TALLY_EVICT_LRU, 5);
    tally_watch w = { .threshold = 1, .window_ns = 3600 * SEC };
    cr_assert_eq(tally_watch_set(e, p, &w), 0);
    cr_assert_not(hit(e, p, lru_names[0], NULL, T0).allowed, "a denial flags the oldest key");
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), 0);
    cr_assert(present(e, p, lru_names[0]), "a flag stays until an operator clears it");
    cr_assert_not(present(e, p, lru_names[1]));
    cr_assert_eq(tally_watch_clear(e, p, lru_names[0], strlen(lru_names[0])), 0);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + 1], T0 + 101 * SEC), 0);
    cr_assert_not(present(e, p, lru_names[0]), "cleared, the oldest goes");
    cr_assert_eq(stats(e).lru_evictions, 2);
    tally_close(e);
}

/* A window limit and a concurrency limit whose holds protect a key. */
static const tally_limit HOLDS[2] = {
    { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = 3600 * SEC },
    { .algo = TALLY_CONCURRENCY, .max = 2, .period_ns = 3600 * SEC },
};

Test(features, evict_lru_never_takes_a_key_that_holds)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 2, HOLDS);
    same_window_keys(e, p);
    for (int i = 0; i < LRU_CAP; i++)
        cr_assert_eq(try_hit(e, p, lru_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    for (int i = 1; i < LRU_CAP; i++)          /* every key but the oldest gives its hold back */
        cr_assert_eq(tally_release_at(e, p, lru_names[i], strlen(lru_names[i]), NULL,
                                      T0 + 90 * SEC), 0, "key %d", i);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), 0);
    cr_assert(present(e, p, lru_names[0]), "a key that holds is never the victim");
    cr_assert_not(present(e, p, lru_names[1]), "the oldest key that holds nothing goes");
    cr_assert_eq(tally_release_at(e, p, lru_names[0], strlen(lru_names[0]), NULL, T0 + 101 * SEC), 0,
                 "its hold is still there to give back");
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + 1], T0 + 102 * SEC), 0);
    cr_assert_not(present(e, p, lru_names[0]), "released, it goes");
    cr_assert_eq(stats(e).lru_evictions, 2);
    tally_close(e);
}

Test(features, update_sets_and_clears_evict_lru)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = full_table(e, 0, 1);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 100 * SEC), TALLY_EFULL);
    tally_policy np = policy_of("lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    /* keys hit before the flag have no stamp: older than any hit since */
    for (int i = 0; i < LRU_CAP; i++)
        if (i != 40)
            cr_assert_eq(try_hit(e, p, lru_names[i], T0 + 110 * SEC), 0);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP], T0 + 120 * SEC), 0);
    for (int i = 0; i < LRU_CAP; i++)
        cr_assert_eq(present(e, p, lru_names[i]), i != 40, "key %d", i);
    np.flags = 0;
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + 1], T0 + 130 * SEC), TALLY_EFULL);
    cr_assert_eq(stats(e).lru_evictions, 1);
    tally_close(e);
}

Test(features, evict_lru_dates_a_key_from_its_claim)
{
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    same_window_keys(e, p);
    for (int i = 0; i < LRU_CAP - 4; i++)
        cr_assert_eq(try_hit(e, p, lru_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    /* four keys arrive while the flag is off: no hit stamps them, their
       claims do */
    tally_policy np = policy_of("lru", 0, 1, &HOURLY5);
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    for (int i = LRU_CAP - 4; i < LRU_CAP; i++)
        cr_assert_eq(try_hit(e, p, lru_names[i], T0 + 100 * SEC), 0, "key %d", i);
    np.flags = TALLY_EVICT_LRU;
    cr_assert_eq(tally_policy_update(e, p, &np), 0);
    for (int k = 0; k < 8; k++)
        cr_assert_eq(try_hit(e, p, lru_names[LRU_CAP + k], T0 + 200 * SEC), 0, "new key %d", k);
    for (int i = 0; i < LRU_CAP; i++)
        cr_assert_eq(present(e, p, lru_names[i]), i >= 8, "key %d", i);
    tally_close(e);
}

/* ---- TALLY_EVICT_LRU in a larger table: a batch per grace period ------------ */

#define BATCH_CAP  4096                /* keys of a full table: capacity / 256 = 16 */
#define BATCH      16                  /* keys one eviction pass takes there */
#define BATCH_WIN  48                  /* keys homed in the new keys' home group */

static char batch_names[BATCH_WIN + 2][24];

static void fill_name(char *name, int i)
{
    snprintf(name, 24, "fill-%d", i);
}

/* Fill a table that holds the BATCH_WIN keys of batch_names with other keys,
   all hit at @now, up to its capacity. */
static void fill_rest(tally_engine *e, uint32_t p, uint64_t now)
{
    for (int i = 0; i < BATCH_CAP - BATCH_WIN; i++) {
        char name[24];
        fill_name(name, i);
        cr_assert_eq(try_hit(e, p, name, now), 0, "fill key %d", i);
    }
}

/* The keys of the table that are gone: none of the fill keys (each hit after
   every key a batch takes), and exactly @gone of batch_names[0 .. BATCH_WIN),
   those @expect_gone says. */
static void check_gone(tally_engine *e, uint32_t p, bool (*expect_gone)(int), int gone)
{
    int n = 0;
    for (int i = 0; i < BATCH_WIN; i++) {
        bool there = present(e, p, batch_names[i]);
        cr_assert_eq(there, !expect_gone(i), "window key %d", i);
        n += !there;
    }
    cr_assert_eq(n, gone);
    for (int i = 0; i < BATCH_CAP - BATCH_WIN; i++) {
        char name[24];
        fill_name(name, i);
        cr_assert(present(e, p, name), "fill key %d", i);
    }
}

static bool gone_first_batch(int i)
{
    return i >= 1 && i <= BATCH + 1 && i != 2;        /* keys 0 and 2 are protected */
}

static bool gone_second_batch(int i)
{
    return gone_first_batch(i) || (i > BATCH + 1 && i <= 2 * BATCH + 1);
}

Test(features, evict_lru_batch_takes_the_oldest_unprotected_keys_and_counts_each)
{
    tally_engine *e = open_engine(BATCH_CAP);
    start_idle_flusher(e);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    tally_watch w = { .threshold = 1, .window_ns = 3600 * SEC };
    cr_assert_eq(tally_watch_set(e, p, &w), 0);
    home_group_keys(e, p, "batch", batch_names, BATCH_WIN + 2);
    for (int i = 0; i < BATCH_WIN; i++)
        cr_assert_eq(try_hit(e, p, batch_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    for (int j = 0; j < 4; j++)
        cr_assert(hit(e, p, batch_names[2], NULL, T0 + 2 * SEC).allowed);
    cr_assert_not(hit(e, p, batch_names[2], NULL, T0 + 2 * SEC).allowed, "a denial flags key 2");
    fill_rest(e, p, T0 + 1000 * SEC);
    cr_assert_eq(tally_flush(e, 5000), 0);
    /* key 0 gets cost again, at its old time: the oldest key, not yet pushed */
    cr_assert_eq(try_hit(e, p, batch_names[0], T0), 0);
    tally_stats st = stats(e);
    cr_assert_eq(st.lru_evictions, 0, "the table was filled to its capacity, no more");

    /* The first new key of the window evicts the BATCH oldest keys that are
       neither flagged nor waiting for the sinks: 1, 3, 4, ... BATCH + 1. */
    tally_result r = hit(e, p, batch_names[BATCH_WIN], NULL, T0 + 2000 * SEC);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 4, "a new count, none of a victim's");
    st = stats(e);
    cr_assert_eq(st.lru_evictions, BATCH);
    cr_assert_eq(st.evictions, 0, "no key had expired");
    check_gone(e, p, gone_first_batch, BATCH);
    cr_assert(present(e, p, batch_names[BATCH_WIN]));

    /* The room it made takes BATCH - 1 more new keys, from anywhere, without
       another eviction... */
    for (int k = 0; k < BATCH - 1; k++) {
        char name[24];
        snprintf(name, sizeof(name), "more-%d", k);
        cr_assert_eq(try_hit(e, p, name, T0 + 2001 * SEC), 0, "new key %d", k);
    }
    st = stats(e);
    cr_assert_eq(st.lru_evictions, BATCH, "new keys that found room evicted nothing");
    cr_assert_eq(st.full_refusals, 0);
    /* ...and the next one evicts the next BATCH oldest */
    cr_assert_eq(try_hit(e, p, batch_names[BATCH_WIN + 1], T0 + 2002 * SEC), 0);
    st = stats(e);
    cr_assert_eq(st.lru_evictions, 2 * BATCH);
    cr_assert_eq(st.evictions, 0);
    check_gone(e, p, gone_second_batch, 2 * BATCH);
    cr_assert(present(e, p, batch_names[0]), "cost not yet pushed");
    cr_assert(present(e, p, batch_names[2]), "flagged");
    tally_close(e);
}

Test(features, evict_lru_batch_never_takes_a_key_that_holds)
{
    tally_engine *e = open_engine(BATCH_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 2, HOLDS);
    home_group_keys(e, p, "batch", batch_names, BATCH_WIN + 2);
    for (int i = 0; i < BATCH_WIN; i++)
        cr_assert_eq(try_hit(e, p, batch_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    fill_rest(e, p, T0 + 1000 * SEC);
    /* every key gives its hold back, but keys 0 and 2 */
    for (int i = 0; i < BATCH_WIN; i++)
        if (i != 0 && i != 2)
            cr_assert_eq(tally_release_at(e, p, batch_names[i], strlen(batch_names[i]), NULL,
                                          T0 + 1500 * SEC), 0, "key %d", i);
    for (int i = 0; i < BATCH_CAP - BATCH_WIN; i++) {
        char name[24];
        fill_name(name, i);
        cr_assert_eq(tally_release_at(e, p, name, strlen(name), NULL, T0 + 1500 * SEC), 0);
    }
    cr_assert_eq(try_hit(e, p, batch_names[BATCH_WIN], T0 + 2000 * SEC), 0);
    tally_stats st = stats(e);
    cr_assert_eq(st.lru_evictions, BATCH);
    cr_assert_eq(st.evictions, 0);
    check_gone(e, p, gone_first_batch, BATCH);
    cr_assert_eq(tally_release_at(e, p, batch_names[0], strlen(batch_names[0]), NULL, T0 + 2001 * SEC), 0,
                 "its hold is still there to give back");
    tally_close(e);
}

/* Window key 20 expires first, though its last hit is newer than any other
   window key's: its window opened at T0, theirs at T0 + 1000 s or later. */
static bool gone_expired(int i)
{
    return i == 20;
}

static bool gone_expired_then_batch(int i)
{
    return i == 20 || i < BATCH;
}

Test(features, evict_lru_takes_an_expired_key_of_the_window_before_any_live_one)
{
    tally_engine *e = open_engine(BATCH_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    home_group_keys(e, p, "batch", batch_names, BATCH_WIN + 2);
    cr_assert_eq(try_hit(e, p, batch_names[20], T0), 0);
    for (int i = 0; i < BATCH_WIN; i++)
        if (i != 20)
            cr_assert_eq(try_hit(e, p, batch_names[i], T0 + (1000 + (uint64_t)i) * SEC), 0, "key %d", i);
    cr_assert_eq(try_hit(e, p, batch_names[20], T0 + 3000 * SEC), 0);
    fill_rest(e, p, T0 + 2000 * SEC);

    /* at T0 + 3700 s only key 20's window has ended */
    cr_assert_eq(try_hit(e, p, batch_names[BATCH_WIN], T0 + 3700 * SEC), 0);
    tally_stats st = stats(e);
    cr_assert_eq(st.evictions, 1, "the expired key was reclaimed");
    cr_assert_eq(st.lru_evictions, 0, "and no live key evicted in its stead");
    check_gone(e, p, gone_expired, 1);

    /* nothing of the window has expired now: a batch of the oldest goes */
    cr_assert_eq(try_hit(e, p, batch_names[BATCH_WIN + 1], T0 + 3701 * SEC), 0);
    st = stats(e);
    cr_assert_eq(st.evictions, 1);
    cr_assert_eq(st.lru_evictions, BATCH);
    check_gone(e, p, gone_expired_then_batch, BATCH + 1);
    tally_close(e);
}

/* Keys through a full table, each new: every one is admitted, the evictions
   come out of its window and the room they make goes to keys anywhere, so no
   region may drain until a window has no key left to give. */
Test(features, evict_lru_churn_admits_every_new_key_and_counts_each_eviction)
{
    enum { KEYS = 100000 };
    tally_engine *e = open_engine(BATCH_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    for (int i = 0; i < KEYS; i++) {
        char name[24];
        snprintf(name, sizeof(name), "churn-%d", i);
        cr_assert_eq(try_hit(e, p, name, T0 + (uint64_t)i * MS), 0, "new key %d", i);
    }
    uint64_t left = 0;
    for (int i = 0; i < KEYS; i++) {
        char name[24];
        snprintf(name, sizeof(name), "churn-%d", i);
        left += present(e, p, name);
    }
    tally_stats st = stats(e);
    cr_assert_eq(st.full_refusals, 0);
    cr_assert_eq(st.evictions, 0, "no key expired");
    cr_assert_eq(st.lru_evictions, KEYS - left, "each key gone is counted once");
    cr_assert_leq(left, BATCH_CAP);
    cr_assert_gt(left + BATCH, BATCH_CAP, "the last batch left less room than it takes");
    tally_close(e);
}

/* A window that holds about a quarter of a full table's mean gives up about
   a quarter of a batch: the new keys that take the room come from anywhere. */
#define MEAN   (BATCH_CAP * 256 / (BATCH_CAP + BATCH_CAP / 2))  /* keys of a window, 1.5 slots a key */
#define SPARSE 48

static bool gone_sparse(int i)
{
    return i < BATCH * SPARSE / MEAN;
}

Test(features, evict_lru_batch_from_a_sparse_window_is_smaller)
{
    tally_engine *e = open_engine(BATCH_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU, 1, &HOURLY5);
    tally__table *t = &tally__policy_get(e, p)->table;
    cr_assert_eq(t->n_slots, BATCH_CAP + BATCH_CAP / 2, "a full table's window holds MEAN keys on average");
    home_group_keys(e, p, "batch", batch_names, BATCH_WIN + 2);
    size_t groups = t->n_slots / 16, home = tally__home_of(t, tally__key_digest(e, batch_names[0], strlen(batch_names[0]))) / 16;
    for (int i = 0; i < SPARSE; i++)
        cr_assert_eq(try_hit(e, p, batch_names[i], T0 + (uint64_t)i * SEC), 0, "key %d", i);
    /* the other keys live where none can reach the window */
    int n = SPARSE;
    for (unsigned i = 0; n < BATCH_CAP; i++) {
        char name[24];
        snprintf(name, sizeof(name), "far-%u", i);
        size_t g = tally__home_of(t, tally__key_digest(e, name, strlen(name))) / 16;
        if ((g + groups - home) % groups < 16 || (home + groups - g) % groups < 16)
            continue;
        cr_assert_eq(try_hit(e, p, name, T0 + 1000 * SEC), 0, "far key %u", i);
        n++;
    }
    cr_assert_eq(try_hit(e, p, batch_names[BATCH_WIN], T0 + 2000 * SEC), 0);
    tally_stats st = stats(e);
    cr_assert_eq(st.lru_evictions, BATCH * SPARSE / MEAN);
    cr_assert_lt(st.lru_evictions, BATCH);
    for (int i = 0; i < SPARSE; i++)
        cr_assert_eq(present(e, p, batch_names[i]), !gone_sparse(i), "window key %d", i);
    tally_close(e);
}

static void count_deltas(void *ctx, const tally_delta *d, size_t n)
{
    (void)d;
    *(size_t *)ctx += n;
}

/* Evictions after the flusher stopped leave no notes behind: nothing would
   take them until a next start, and they would grow with every eviction. */
Test(features, evictions_after_the_flusher_stopped_leave_no_notes)
{
    static const tally_limit HOURLY_ALIGNED = { .algo = TALLY_FIXED_WINDOW, .max = 5,
                                                .period_ns = 3600 * SEC };
    tally_engine *e = open_engine(LRU_CAP);
    uint32_t p = add(e, "lru", TALLY_EVICT_LRU | TALLY_ALIGNED, 1, &HOURLY_ALIGNED);
    size_t delivered = 0;
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.on_deltas = count_deltas;
    fo.ctx = &delivered;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    char name[24];
    for (int i = 0; i < LRU_CAP; i++) {
        snprintf(name, sizeof(name), "before-%d", i);
        cr_assert_eq(try_hit(e, p, name, T0), 0);
    }
    cr_assert_eq(tally_flush(e, 5000), 0);
    cr_assert_eq(tally_flusher_stop(e), 0);
    cr_assert_gt(delivered, 0);
    for (int i = 0; i < 4 * LRU_CAP; i++) {
        snprintf(name, sizeof(name), "after-%d", i);
        cr_assert_eq(try_hit(e, p, name, T0 + SEC), 0, "key %d", i);
    }
    cr_assert_gt(stats(e).lru_evictions, (uint64_t)(2 * LRU_CAP));
    size_t left = 0;
    tally__note *n = tally__notes_take(&e->notes);
    while (n) {
        tally__note *next = n->next;
        left++;
        free(n);
        n = next;
    }
    cr_assert_eq(left, 0, "%zu notes left after the flusher stopped", left);
    tally_close(e);
}
