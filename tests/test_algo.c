/*
 * Unit tests of the pure algorithm functions of src/algo.c: limit validation,
 * and state x now x cost -> state for the fixed window, the sliding window and
 * GCRA, plus undo, expiry and the public counter view. No engine, no threads:
 * every state is built by feeding one step's `next` into the following step.
 */
#include "test.h"   /* Criterion, or tests/harness.h under TSan */
#include <inttypes.h>
#include <stdint.h>

#include "engine/engine-internal.h"

#define NS_PER_MS UINT64_C(1000000)
#define NS_PER_S  UINT64_C(1000000000)
/* A realistic "now": 2023-11-14, far from 0 and from INT64_MAX. */
#define S         (UINT64_C(1700000000) * NS_PER_S)

#define IF_FITS TALLY__ADD_IF_FITS
#define ALWAYS  TALLY__ADD_ALWAYS
#define PEEK    (TALLY__ADD_NEVER | TALLY__NO_MARK)

/* cr_assert_eq with both values printed on failure (arguments must be pure). */
#define EQ(a, b)                                                                   \
    cr_assert_eq((uint64_t)(a), (uint64_t)(b), "%s = %" PRIu64 ", expected %s = %" PRIu64, \
                 #a, (uint64_t)(a), #b, (uint64_t)(b))

static const tally__state EMPTY = { 0, 0 };

static tally__limit limit_of(tally_algo algo, uint64_t max, uint64_t period_ns)
{
    tally_limit spec = { .algo = algo, .max = max, .period_ns = period_ns };
    tally__limit l;
    cr_assert_eq(tally__limit_compile(&spec, &l), 0, "valid limit rejected");
    return l;
}

static tally__step step(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                        unsigned how)
{
    tally__step o;
    tally__algo_step(l, cur, now, cost, how, NULL, &o);
    /* Invariant of every step: an unchanged step hands back the very same state. */
    if (!o.changed)
        cr_assert(o.next.w0 == cur.w0 && o.next.w1 == cur.w1, "unchanged step altered the state");
    /* Invariant: retry_after is 0 exactly when the cost fits. */
    cr_assert_eq(o.fits, o.retry_after_ns == 0, "fits=%d but retry_after=%" PRIu64, o.fits,
                 o.retry_after_ns);
    return o;
}

/* Apply a step and return the state to store, as the engine would. */
static tally__state apply(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                          unsigned how)
{
    tally__step o = step(l, cur, now, cost, how);
    return o.changed ? o.next : cur;
}

static tally_counter counter(const tally__limit *l, tally__state s, uint64_t now)
{
    tally_counter c;
    tally__algo_counter(l, s, now, &c);
    return c;
}

static int compile(tally_algo algo, uint64_t max, uint64_t period, tally_calendar_unit unit,
                   int32_t off)
{
    tally_limit spec = { .algo = algo, .max = max, .period_ns = period, .unit = unit,
                         .utc_offset_s = off };
    tally__limit l;
    return tally__limit_compile(&spec, &l);
}

/* ======================================================================== */
/* tally__limit_compile                                                     */
/* ======================================================================== */

/* max 0 would be a limit that allows nothing: rejected for every algorithm. */
Test(algo, compile_rejects_max_zero)
{
    EQ(compile(TALLY_FIXED_WINDOW, 0, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_SLIDING_WINDOW, 0, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, 0, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 0, 0, TALLY_DAY, 0), (uint64_t)TALLY_EINVAL);
    /* and 1 is fine: the check is "== 0", not "<= 1" */
    EQ(compile(TALLY_FIXED_WINDOW, 1, NS_PER_S, 0, 0), 0);
}

/* The counters have 63 bits (44 for sliding): a larger max could never be reached. */
Test(algo, compile_rejects_max_above_bound)
{
    EQ(compile(TALLY_FIXED_WINDOW, TALLY_MAX_COUNT + 1, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, TALLY_MAX_COUNT + 1, 0, TALLY_DAY, 0),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, TALLY_MAX_COUNT + 1, TALLY_MAX_PERIOD_NS, 0, 0),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_SLIDING_WINDOW, TALLY_SLIDING_MAX_COUNT + 1, NS_PER_S, 0, 0),
       (uint64_t)TALLY_EINVAL);
    /* the sliding bound is its own, much smaller one */
    EQ(compile(TALLY_SLIDING_WINDOW, TALLY_MAX_COUNT, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    /* the bounds themselves are accepted */
    EQ(compile(TALLY_FIXED_WINDOW, TALLY_MAX_COUNT, NS_PER_S, 0, 0), 0);
    EQ(compile(TALLY_CALENDAR_WINDOW, TALLY_MAX_COUNT, 0, TALLY_DAY, 0), 0);
    EQ(compile(TALLY_SLIDING_WINDOW, TALLY_SLIDING_MAX_COUNT, NS_PER_S, 0, 0), 0);
}

/* A zero-length window has no meaning (and sliding divides by it). */
Test(algo, compile_rejects_period_zero)
{
    EQ(compile(TALLY_FIXED_WINDOW, 10, 0, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_SLIDING_WINDOW, 10, 0, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, 10, 0, 0, 0), (uint64_t)TALLY_EINVAL);
}

/* Periods above 2^62 could overflow start + period. */
Test(algo, compile_rejects_period_above_max)
{
    EQ(compile(TALLY_FIXED_WINDOW, 10, TALLY_MAX_PERIOD_NS + 1, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_SLIDING_WINDOW, 10, TALLY_MAX_PERIOD_NS + 1, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, 10, TALLY_MAX_PERIOD_NS + 1, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_FIXED_WINDOW, 10, TALLY_MAX_PERIOD_NS, 0, 0), 0);
    EQ(compile(TALLY_SLIDING_WINDOW, 10, TALLY_MAX_PERIOD_NS, 0, 0), 0);
    EQ(compile(TALLY_GCRA, 10, TALLY_MAX_PERIOD_NS, 0, 0), 0);
}

/* GCRA needs an emission interval period/max of at least 1 ns. */
Test(algo, compile_rejects_gcra_period_below_max)
{
    EQ(compile(TALLY_GCRA, 10, 9, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, 1000, 1, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_GCRA, 10, 10, 0, 0), 0);   /* emission 1 ns: the smallest valid */
}

/* The derived GCRA constants: emission = period / max (floored), tau = emission * max. */
Test(algo, compile_derives_gcra_constants)
{
    tally__limit l = limit_of(TALLY_GCRA, 5, 5 * NS_PER_S);
    EQ(l.emission_ns, NS_PER_S);
    EQ(l.tau_ns, 5 * NS_PER_S);
    l = limit_of(TALLY_GCRA, 3, 10);
    EQ(l.emission_ns, 3);
    EQ(l.tau_ns, 9);
    EQ(l.spec.max, 3);
}

/* An enum value outside TALLY_MINUTE..TALLY_MONTH must not reach the calendar code. */
Test(algo, compile_rejects_calendar_unit_out_of_range)
{
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, (tally_calendar_unit)7, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, (tally_calendar_unit)(TALLY_MONTH + 1), 0),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, (tally_calendar_unit)-1, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_MINUTE, 0), 0);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_MONTH, 0), 0);
}

/* UTC offsets are bounded by +-18 h; the bound itself is valid. */
Test(algo, compile_rejects_utc_offset_out_of_range)
{
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_DAY, TALLY_MAX_UTC_OFFSET_S + 1),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_DAY, -TALLY_MAX_UTC_OFFSET_S - 1),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_DAY, INT32_MIN), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_DAY, TALLY_MAX_UTC_OFFSET_S), 0);
    EQ(compile(TALLY_CALENDAR_WINDOW, 10, 0, TALLY_DAY, -TALLY_MAX_UTC_OFFSET_S), 0);
}

Test(algo, compile_rejects_unknown_algo)
{
    EQ(compile((tally_algo)7, 10, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile((tally_algo)(TALLY_CONCURRENCY + 1), 10, NS_PER_S, 0, 0), (uint64_t)TALLY_EINVAL);
}

/* ======================================================================== */
/* Fixed window                                                             */
/* ======================================================================== */

#define FW_P  (10 * NS_PER_S)
#define FW_T0 (S + 123)          /* deliberately not aligned to anything */

/* The window opens at the first hit: window_start is that hit's time, not a multiple of P. */
Test(algo, fixed_opens_at_first_hit)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__step o = step(&l, EMPTY, FW_T0, 1, IF_FITS);
    cr_assert(o.fits && o.changed && !o.first);
    EQ(o.next.w1, FW_T0);
    EQ(o.next.w0, 1);
    EQ(o.remaining, 4);
    EQ(o.reset_after_ns, FW_P);
    EQ(o.retry_after_ns, 0);
    tally_counter c = counter(&l, o.next, FW_T0);
    EQ(c.used, 1);
    EQ(c.window_start_ns, FW_T0);
}

/* start+P-1 is the last ns of the window; start+P opens a new one with a fresh count. */
Test(algo, fixed_window_edge)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 3, IF_FITS);

    tally__step in = step(&l, st, FW_T0 + FW_P - 1, 1, IF_FITS);
    EQ(in.next.w1, FW_T0);
    EQ(in.next.w0, 4);
    EQ(in.remaining, 1);
    EQ(in.reset_after_ns, 1);

    tally__step out = step(&l, in.next, FW_T0 + FW_P, 1, IF_FITS);
    EQ(out.next.w1, FW_T0 + FW_P);
    EQ(out.next.w0, 1);
    EQ(out.remaining, 4);
    EQ(out.reset_after_ns, FW_P);
}

/* reset_after is the time left in the window; retry_after the same when denied. */
Test(algo, fixed_reset_and_retry_after)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 2, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 1, IF_FITS);

    tally__step o = step(&l, st, FW_T0 + 300, 1, IF_FITS);
    cr_assert(o.fits);
    EQ(o.reset_after_ns, FW_P - 300);
    EQ(o.remaining, 0);

    tally__step d = step(&l, o.next, FW_T0 + 400, 1, IF_FITS);
    cr_assert(!d.fits);
    EQ(d.retry_after_ns, FW_P - 400);
    EQ(d.reset_after_ns, FW_P - 400);
    EQ(d.remaining, 0);
    EQ(d.next.w0 & ~TALLY__MARK, 2);               /* a denied hit consumes nothing */
    /* and retry_after is right: at now + retry_after the hit fits */
    cr_assert(step(&l, d.next, FW_T0 + 400 + d.retry_after_ns, 1, IF_FITS).fits);
    cr_assert(!step(&l, d.next, FW_T0 + 400 + d.retry_after_ns - 1, 1, PEEK).fits);
}

/* A cost above max can never be allowed, however long one waits. */
Test(algo, fixed_never_when_cost_above_max)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__step o = step(&l, EMPTY, FW_T0, 6, IF_FITS);
    cr_assert(!o.fits);
    EQ(o.retry_after_ns, TALLY_NEVER);
    EQ(o.remaining, 5);
    /* but exactly max fits in an empty window */
    cr_assert(step(&l, EMPTY, FW_T0, 5, IF_FITS).fits);
    /* and a cost <= max on a full window is not NEVER */
    tally__state full = apply(&l, EMPTY, FW_T0, 5, IF_FITS);
    tally__step d = step(&l, full, FW_T0, 5, IF_FITS);
    cr_assert(!d.fits);
    EQ(d.retry_after_ns, FW_P);
}

/* Costs are weights: they add up, and a cost fits only if all of it fits. */
Test(algo, fixed_weighted_costs)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 10, FW_P);
    tally__step o = step(&l, EMPTY, FW_T0, 3, IF_FITS);
    EQ(o.remaining, 7);
    o = step(&l, o.next, FW_T0 + 1, 5, IF_FITS);
    EQ(o.remaining, 2);
    EQ(o.next.w0, 8);
    tally__step d = step(&l, o.next, FW_T0 + 2, 3, IF_FITS);  /* 3 > 2 left: all or nothing */
    cr_assert(!d.fits);
    EQ(d.next.w0 & ~TALLY__MARK, 8);
    EQ(d.remaining, 2);
    o = step(&l, d.next, FW_T0 + 3, 2, IF_FITS);              /* exactly what is left */
    cr_assert(o.fits);
    EQ(o.remaining, 0);
    EQ(o.next.w0 & ~TALLY__MARK, 10);
}

/* ADD_ALWAYS with a huge cost saturates at TALLY_MAX_COUNT: never wraps, never reaches the mark bit. */
Test(algo, fixed_saturation)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 10, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 4, IF_FITS);
    tally__step o = step(&l, st, FW_T0 + 1, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    cr_assert(!o.fits);
    EQ(o.retry_after_ns, TALLY_NEVER);
    EQ(o.next.w0, TALLY_MAX_COUNT);                 /* no mark: NO_MARK was given */
    EQ(o.remaining, 0);
    o = step(&l, o.next, FW_T0 + 2, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    EQ(o.next.w0, TALLY_MAX_COUNT);                 /* still saturated, not wrapped */
    EQ(counter(&l, o.next, FW_T0 + 2).used, TALLY_MAX_COUNT);

    /* Two big costs that each fit in 63 bits but not together. */
    tally__limit big = limit_of(TALLY_FIXED_WINDOW, TALLY_MAX_COUNT, FW_P);
    tally__step a = step(&big, EMPTY, FW_T0, UINT64_C(1) << 62, IF_FITS);
    cr_assert(a.fits);
    tally__step b = step(&big, a.next, FW_T0, UINT64_C(1) << 62, ALWAYS | TALLY__NO_MARK);
    cr_assert(!b.fits);
    EQ(b.next.w0, TALLY_MAX_COUNT);
    EQ(b.next.w1, FW_T0);
}

/* first is true on exactly the first denial of a window; the mark resets with the window. */
Test(algo, fixed_exceeded_mark_once_per_window)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 2, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 2, IF_FITS);

    tally__step d1 = step(&l, st, FW_T0 + 1, 1, IF_FITS);
    cr_assert(!d1.fits && d1.first && d1.changed);
    cr_assert(d1.next.w0 & TALLY__MARK);
    EQ(d1.next.w0 & ~TALLY__MARK, 2);               /* the mark alone changed */

    tally__step d2 = step(&l, d1.next, FW_T0 + 2, 1, IF_FITS);
    cr_assert(!d2.fits && !d2.first && !d2.changed);

    /* a hit that fits in a marked window does not report first either, and keeps the mark */
    tally__state m = apply(&l, apply(&l, EMPTY, FW_T0, 1, IF_FITS), FW_T0, 5, IF_FITS);
    tally__step f = step(&l, m, FW_T0 + 3, 1, IF_FITS);
    cr_assert(f.fits && !f.first);
    cr_assert(f.next.w0 & TALLY__MARK);

    /* next window: fresh count, mark cleared, first again on its first denial */
    tally__step n = step(&l, d2.next, FW_T0 + FW_P, 2, IF_FITS);
    cr_assert(n.fits && !n.first);
    cr_assert(!(n.next.w0 & TALLY__MARK));
    tally__step d3 = step(&l, n.next, FW_T0 + FW_P + 1, 1, IF_FITS);
    cr_assert(!d3.fits && d3.first);
}

/* A time before the window start (clock went back) is the window start: same window. */
Test(algo, fixed_time_backwards)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 1, IF_FITS);
    tally__step o = step(&l, st, FW_T0 - 500, 1, IF_FITS);
    EQ(o.next.w1, FW_T0);                           /* not a new window at FW_T0 - 500 */
    EQ(o.next.w0, 2);
    EQ(o.reset_after_ns, FW_P);                     /* measured from the window start */
    /* far in the past too (unsigned now - start must not wrap into "a later window") */
    o = step(&l, o.next, 1, 1, IF_FITS);
    EQ(o.next.w1, FW_T0);
    EQ(o.next.w0, 3);
}

/* ADD_NEVER | NO_MARK is a peek: it reports but changes nothing, even on a denial. */
Test(algo, fixed_peek_changes_nothing)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 2, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 1, IF_FITS);

    tally__step p = step(&l, st, FW_T0 + 5, 1, PEEK);
    cr_assert(p.fits && !p.changed && !p.first);
    EQ(p.remaining, 1);                             /* nothing consumed */

    tally__step d = step(&l, st, FW_T0 + 5, 2, PEEK);   /* would deny: still no mark */
    cr_assert(!d.fits && !d.changed && !d.first);
    EQ(d.retry_after_ns, FW_P - 5);

    tally__step e = step(&l, EMPTY, FW_T0, 3, PEEK);   /* on the empty state, too */
    cr_assert(!e.changed);
    cr_assert(tally__state_is_empty(e.next));
}

/* ADD_NEVER without NO_MARK (another limit denied) consumes nothing but may mark. */
Test(algo, fixed_add_never_consumes_nothing)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 2, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 1, IF_FITS);
    tally__step o = step(&l, st, FW_T0 + 1, 1, TALLY__ADD_NEVER);
    cr_assert(o.fits && !o.changed);
    EQ(o.remaining, 1);
    tally__step d = step(&l, st, FW_T0 + 1, 2, TALLY__ADD_NEVER);
    cr_assert(!d.fits && d.first && d.changed);
    EQ(d.next.w0, TALLY__MARK | 1);
}

/* A cost-0 hit counts nothing and must not open a window or write anything. */
Test(algo, fixed_cost_zero_changes_nothing)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 2, FW_P);
    tally__step e = step(&l, EMPTY, FW_T0, 0, IF_FITS);
    cr_assert(e.fits && !e.changed);
    cr_assert(tally__state_is_empty(e.next));
    EQ(e.remaining, 2);
    EQ(e.reset_after_ns, 0);

    tally__state st = apply(&l, EMPTY, FW_T0, 2, IF_FITS);
    tally__step z = step(&l, st, FW_T0 + 1, 0, IF_FITS);   /* on a full window: 0 still fits */
    cr_assert(z.fits && !z.changed && !z.first);
    EQ(z.remaining, 0);
}

/* ======================================================================== */
/* Sliding window                                                           */
/* ======================================================================== */

#define SW_P UINT64_C(1000)
/* Window number of S at P=1000 is ~1.7e15, far beyond the 2^38 stored: exercises the wrap. */
#define SW_K (S / SW_P)

/* Build a state with `prev` counted in window k and `cur` in window k+1. */
static tally__state sliding_state(const tally__limit *l, uint64_t k, uint64_t prev, uint64_t cur)
{
    uint64_t P = l->spec.period_ns;
    tally__state st = apply(l, EMPTY, k * P, prev, ALWAYS | TALLY__NO_MARK);
    return apply(l, st, (k + 1) * P, cur, ALWAYS | TALLY__NO_MARK);
}

/* The previous window counts with the weight of the part of it still inside the sliding span. */
Test(algo, sliding_weight_of_previous_window)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 200, SW_P);
    tally__state st = sliding_state(&l, SW_K, 100, 20);
    uint64_t w = (SW_K + 1) * SW_P;

    /* 25% into the current window: 75% of prev still counts, floor(100*750/1000) = 75 */
    EQ(step(&l, st, w + 250, 0, PEEK).remaining, 200 - 20 - 75);
    tally__step o = step(&l, st, w + 250, 10, IF_FITS);
    EQ(o.remaining, 200 - 30 - 75);
    /* at the window start all of prev counts; at its last ns floor(100*1/1000) = 0 */
    EQ(step(&l, st, w, 0, PEEK).remaining, 200 - 20 - 100);
    EQ(step(&l, st, w + 999, 0, PEEK).remaining, 200 - 20 - 0);
    /* rounding down: 33.3% in -> floor(100*667/1000) = 66 */
    EQ(step(&l, st, w + 333, 0, PEEK).remaining, 200 - 20 - 66);
    /* the estimate decides fits: at 25% in, 105 more fit exactly, 106 do not */
    cr_assert(step(&l, st, w + 250, 105, PEEK).fits);
    cr_assert(!step(&l, st, w + 250, 106, PEEK).fits);
}

/* Rolling by one window: cur becomes prev; the counter moves to the new window. */
Test(algo, sliding_roll_one_window)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__state st = apply(&l, EMPTY, SW_K * SW_P + 10, 40, IF_FITS);
    tally_counter c = counter(&l, st, SW_K * SW_P + 10);
    EQ(c.used, 40);
    EQ(c.window_start_ns, SW_K * SW_P);

    uint64_t w = (SW_K + 1) * SW_P;
    tally__step o = step(&l, st, w, 5, IF_FITS);
    EQ(o.remaining, 100 - 5 - 40);                  /* prev = 40 with full weight */
    c = counter(&l, o.next, w);
    EQ(c.used, 5);                                  /* cur restarted */
    EQ(c.window_start_ns, w);
    /* prev really is 40 in the stored state: half-way it weighs 20 */
    EQ(step(&l, o.next, w + 500, 0, PEEK).remaining, 100 - 5 - 20);
}

/* Rolling by two or more windows clears both counts. */
Test(algo, sliding_roll_two_or_more_windows)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__state st = sliding_state(&l, SW_K, 70, 60);    /* window k+1 holds 60 */
    for (uint64_t skip = 2; skip <= 5; skip++) {
        uint64_t w = (SW_K + 1 + skip) * SW_P;
        tally__step o = step(&l, st, w, 1, IF_FITS);
        EQ(o.remaining, 99);
        tally_counter c = counter(&l, o.next, w);
        EQ(c.used, 1);
        EQ(c.window_start_ns, w);
    }
    /* the last ns of window k+2 still carries k+1's count as prev at weight 1/1000 */
    EQ(step(&l, st, (SW_K + 3) * SW_P - 1, 0, PEEK).remaining, 100);
    EQ(step(&l, st, (SW_K + 2) * SW_P, 0, PEEK).remaining, 40);
}

/*
 * retry_after, checked against its definition by brute force: no time in
 * [now, now+retry_after) lets the hit fit, and now+retry_after does. With
 * ADD_ALWAYS (count rejected) the denied hit is itself counted, and the
 * property holds for the state that includes it.
 * Returns 1 if the case fitted in the current window, 2 if it had to wait
 * for the next one, 0 if the hit was not denied.
 */
static int check_sliding_retry(const tally__limit *l, tally__state st, uint64_t now, uint64_t cost,
                               unsigned how)
{
    uint64_t P = l->spec.period_ns;
    tally__step d = step(l, st, now, cost, how);
    if (d.fits)
        return 0;
    cr_assert_neq(d.retry_after_ns, TALLY_NEVER);
    /* at the latest, two window starts from now everything in the state has slid out */
    cr_assert_leq(d.retry_after_ns, 2 * P, "retry %" PRIu64 " beyond two windows",
                  d.retry_after_ns);
    uint64_t at = now + d.retry_after_ns;
    for (uint64_t t = now; t < at; t++)
        cr_assert(!step(l, d.next, t, cost, PEEK).fits,
                  "fits at now+%" PRIu64 " < retry_after %" PRIu64, t - now, d.retry_after_ns);
    cr_assert(step(l, d.next, at, cost, PEEK).fits,
              "does not fit at now+retry_after (%" PRIu64 ")", d.retry_after_ns);
    return at / P == now / P ? 1 : 2;
}

/* Two worked examples, one per branch of the retry computation. */
Test(algo, sliding_retry_after_examples)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    uint64_t w = (SW_K + 1) * SW_P;

    /* Room in this window: prev 80, cur 10, cost 20, 10% in (weight 900/1000 -> 72):
       need floor(80*m/1000) <= 70, m <= 887, i.e. wait 900-887 = 13 ns. */
    tally__state a = sliding_state(&l, SW_K, 80, 10);
    tally__step d = step(&l, a, w + 100, 20, IF_FITS);
    cr_assert(!d.fits);
    EQ(d.retry_after_ns, 13);
    EQ(check_sliding_retry(&l, a, w + 100, 20, IF_FITS), 1);

    /* Must wait for the next window: cur 90 + cost 20 > 100 whatever prev does.
       Next window: floor(90*m/1000) <= 80, m <= 899: wait 1000 + (1000-899) = 1101 ns. */
    tally__state b = sliding_state(&l, SW_K, 0, 90);
    d = step(&l, b, w, 20, IF_FITS);
    cr_assert(!d.fits);
    EQ(d.retry_after_ns, 1101);
    EQ(check_sliding_retry(&l, b, w, 20, IF_FITS), 2);
}

/* The same property over a grid of states, with an awkward (prime) period too. */
Test(algo, sliding_retry_after_brute_force)
{
    static const uint64_t periods[] = { 1000, 997 };
    static const uint64_t prevs[] = { 0, 1, 30, 80, 100, 150, 1000 };  /* > max: count rejected */
    static const uint64_t curs[] = { 0, 10, 50, 90, 100, 120 };
    static const uint64_t offs[] = { 0, 1, 250, 500, 998 };
    static const uint64_t costs[] = { 1, 20, 60, 100 };
    unsigned branch[3] = { 0, 0, 0 };

    for (size_t pi = 0; pi < 2; pi++) {
        uint64_t P = periods[pi], k = S / P;
        tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, P);
        for (size_t a = 0; a < sizeof prevs / sizeof *prevs; a++)
            for (size_t b = 0; b < sizeof curs / sizeof *curs; b++)
                for (size_t c = 0; c < sizeof offs / sizeof *offs; c++)
                    for (size_t e = 0; e < sizeof costs / sizeof *costs; e++) {
                        tally__state st = sliding_state(&l, k, prevs[a], curs[b]);
                        uint64_t now = (k + 1) * P + offs[c];
                        branch[check_sliding_retry(&l, st, now, costs[e], IF_FITS)]++;
                        check_sliding_retry(&l, st, now, costs[e], ALWAYS);
                    }
    }
    /* both branches were really exercised, not skipped as "fits" */
    cr_assert_gt(branch[1], 50, "room-in-this-window cases: %u", branch[1]);
    cr_assert_gt(branch[2], 50, "next-window cases: %u", branch[2]);
}

Test(algo, sliding_never_when_cost_above_max)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__step o = step(&l, EMPTY, SW_K * SW_P, 101, IF_FITS);
    cr_assert(!o.fits);
    EQ(o.retry_after_ns, TALLY_NEVER);
}

/* reset_after: until cur has slid out (end of next window), or prev (end of this one). */
Test(algo, sliding_reset_after)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    uint64_t w = (SW_K + 1) * SW_P;
    tally__state st = sliding_state(&l, SW_K, 30, 5);
    EQ(step(&l, st, w + 300, 1, IF_FITS).reset_after_ns, 2 * SW_P - 300);
    /* only prev counts in window k+1: it is gone at the end of k+1 */
    tally__state p = apply(&l, EMPTY, SW_K * SW_P, 30, IF_FITS);
    EQ(step(&l, p, w + 300, 0, PEEK).reset_after_ns, SW_P - 300);
    /* nothing counts */
    EQ(step(&l, EMPTY, w + 300, 0, PEEK).reset_after_ns, 0);
}

/* cur saturates at TALLY_SLIDING_MAX_COUNT without spilling into the mark or the window number. */
Test(algo, sliding_saturation)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, TALLY_SLIDING_MAX_COUNT, SW_P);
    uint64_t w = SW_K * SW_P;
    tally__step o = step(&l, EMPTY, w, TALLY_SLIDING_MAX_COUNT - 1, IF_FITS);
    cr_assert(o.fits);
    o = step(&l, o.next, w + 1, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    cr_assert(!o.fits);
    cr_assert(!(o.next.w0 & TALLY__MARK));
    tally_counter c = counter(&l, o.next, w + 1);
    EQ(c.used, TALLY_SLIDING_MAX_COUNT);
    EQ(c.window_start_ns, w);                       /* window number intact */
    o = step(&l, o.next, w + 2, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    EQ(counter(&l, o.next, w + 2).used, TALLY_SLIDING_MAX_COUNT);
    EQ(o.remaining, 0);
    /* rolled into prev, the saturated count is still whole: at the next window start it
       weighs all of it, so nothing fits, and the stored w1 stays <= INT64_MAX */
    tally__step n = step(&l, o.next, w + SW_P, 1, IF_FITS);
    cr_assert(!n.fits);
    EQ(n.remaining, 0);
    cr_assert_leq(n.next.w1, (uint64_t)INT64_MAX);
    EQ(counter(&l, n.next, w + SW_P).window_start_ns, w + SW_P);
}

/* The exceeded mark: once per window, cleared by the roll. */
Test(algo, sliding_mark_once_per_window)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 10, SW_P);
    uint64_t w = SW_K * SW_P;
    tally__state st = apply(&l, EMPTY, w, 10, IF_FITS);
    tally__step d1 = step(&l, st, w + 1, 1, IF_FITS);
    cr_assert(!d1.fits && d1.first && d1.changed);
    EQ(counter(&l, d1.next, w + 1).used, 10);       /* the mark alone changed */
    tally__step d2 = step(&l, d1.next, w + 2, 1, IF_FITS);
    cr_assert(!d2.fits && !d2.first && !d2.changed);
    /* next window: prev = 10 weighs fully at its start, so a hit is denied, first again */
    tally__step d3 = step(&l, d2.next, w + SW_P, 1, IF_FITS);
    cr_assert(!d3.fits && d3.first);
    /* 1 ns later prev weighs floor(10*999/1000) = 9: a cost of 2 is still denied, not first */
    tally__step d4 = step(&l, d3.next, w + SW_P + 1, 2, IF_FITS);
    cr_assert(!d4.fits && !d4.first && !d4.changed);
}

/* The state keeps the window number mod 2^38: a roll across the wrap is still a roll by one. */
Test(algo, sliding_window_number_wrap)
{
    uint64_t k = 6000 * (UINT64_C(1) << 38) - 1;    /* k mod 2^38 = 2^38 - 1; k*P is in 2022 */
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__state st = apply(&l, EMPTY, k * SW_P, 40, IF_FITS);
    EQ(counter(&l, st, k * SW_P).window_start_ns, k * SW_P);

    /* window k+1 is stored as number 0: prev = 40 at half weight */
    tally__step o = step(&l, st, (k + 1) * SW_P + 500, 5, IF_FITS);
    EQ(o.remaining, 100 - 5 - 20);
    EQ(counter(&l, o.next, (k + 1) * SW_P + 500).window_start_ns, (k + 1) * SW_P);
    /* undo of the 40 recognises window 0 as the successor of 2^38 - 1 */
    tally__state u = tally__algo_undo(&l, o.next, st, (k + 1) * SW_P + 500, 40);
    EQ(step(&l, u, (k + 1) * SW_P, 0, PEEK).remaining, 100 - 5);
    cr_assert(!tally__algo_expired(&l, st, (k + 2) * SW_P - 1));
    cr_assert(tally__algo_expired(&l, st, (k + 2) * SW_P));
}

/* A time in an earlier window than the state's is taken as the state's window start. */
Test(algo, sliding_time_backwards)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__state st = sliding_state(&l, SW_K, 40, 10);   /* state in window k+1 */
    tally__step o = step(&l, st, SW_K * SW_P + 500, 1, IF_FITS);  /* now in window k */
    EQ(o.remaining, 100 - 11 - 40);                 /* prev still weighs fully: no roll back */
    tally_counter c = counter(&l, o.next, (SW_K + 1) * SW_P);
    EQ(c.used, 11);
    EQ(c.window_start_ns, (SW_K + 1) * SW_P);
}

/* ======================================================================== */
/* GCRA                                                                     */
/* ======================================================================== */

/* The last hit of a GCRA state, and its theoretical arrival time read through
   the step itself (a cost-0 peek at the last hit reports tat - last). */
static uint64_t gcra_last(tally__state st)
{
    return st.w0 & ~TALLY__MARK;
}

static unsigned __int128 gcra_tat(const tally__limit *l, tally__state st)
{
    return (unsigned __int128)gcra_last(st) + step(l, st, gcra_last(st), 0, PEEK).reset_after_ns;
}

#define TOP    ((uint64_t)INT64_MAX)
#define YEAR   (UINT64_C(31556952) * NS_PER_S)       /* mean Gregorian year */
#define TODAY  (UINT64_C(1800000000) * NS_PER_S)     /* 2027-01-15 */

/* redis-cell's max_burst 4 at 1/s: limit 5, emission interval 1 s. */
static tally__limit gcra_5_per_5s(void)
{
    return limit_of(TALLY_GCRA, 5, 5 * NS_PER_S);
}

/* redis-cell's own CL.THROTTLE test table (src/cell/mod.rs, it_rate_limits). */
Test(algo, gcra_redis_cell_table)
{
    static const struct {
        uint64_t at_ms, cost;
        bool allowed;
        uint64_t remaining, reset_ms, retry_ms;   /* retry UINT64_MAX: never */
    } cases[] = {
        { 0,    6, false, 5, 0,    UINT64_MAX },   /* never more than the burst */
        { 0,    1, true,  4, 1000, 0 },
        { 0,    1, true,  3, 2000, 0 },
        { 0,    1, true,  2, 3000, 0 },
        { 0,    1, true,  1, 4000, 0 },
        { 0,    1, true,  0, 5000, 0 },
        { 0,    1, false, 0, 5000, 1000 },
        { 3000, 1, true,  2, 3000, 0 },
        { 3100, 1, true,  1, 3900, 0 },
        { 4000, 1, true,  1, 4000, 0 },
        { 8000, 1, true,  4, 1000, 0 },
        { 9500, 1, true,  4, 1000, 0 },
        { 9500, 0, true,  4, 1000, 0 },            /* cost 0 peeks */
        { 9500, 2, true,  2, 3000, 0 },
        { 9500, 5, false, 2, 3000, 3000 },
    };
    tally__limit l = gcra_5_per_5s();
    tally__state cur = EMPTY;

    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        tally__step o = step(&l, cur, S + cases[i].at_ms * NS_PER_MS, cases[i].cost, IF_FITS);
        cr_assert_eq(o.fits, cases[i].allowed, "case %zu: allowed", i);
        cr_assert_eq(o.remaining, cases[i].remaining, "case %zu: remaining %" PRIu64, i,
                     o.remaining);
        cr_assert_eq(o.reset_after_ns, cases[i].reset_ms * NS_PER_MS,
                     "case %zu: reset_after %" PRIu64, i, o.reset_after_ns);
        uint64_t retry = cases[i].retry_ms == UINT64_MAX ? TALLY_NEVER
                                                         : cases[i].retry_ms * NS_PER_MS;
        cr_assert_eq(o.retry_after_ns, retry, "case %zu: retry_after %" PRIu64, i,
                     o.retry_after_ns);
        if (cases[i].cost == 0)
            cr_assert(!o.changed, "case %zu: a cost-0 hit wrote", i);
        if (o.changed)
            cur = o.next;
    }
}

/* The mark: set on the first denial of a throttling episode, kept while the bucket
   refills partially, cleared once the bucket is full again (tat <= now). */
Test(algo, gcra_mark_once_per_episode)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = EMPTY;
    for (int i = 0; i < 5; i++)
        st = apply(&l, st, S, 1, IF_FITS);          /* tat = S + 5 s */

    tally__step d1 = step(&l, st, S, 1, IF_FITS);
    cr_assert(!d1.fits && d1.first && d1.changed);
    cr_assert(d1.next.w0 & TALLY__MARK);
    EQ(d1.next.w1, 5 * NS_PER_S);                   /* nothing consumed: 5 s in use at S */

    tally__step d2 = step(&l, d1.next, S + 500 * NS_PER_MS, 1, IF_FITS);
    cr_assert(!d2.fits && !d2.first && !d2.changed);

    /* partial refill: the hit fits (tat - now = 4.8 s), the episode goes on */
    tally__step a = step(&l, d2.next, S + 1200 * NS_PER_MS, 1, IF_FITS);
    cr_assert(a.fits && !a.first);
    cr_assert(a.next.w0 & TALLY__MARK);
    tally__step d3 = step(&l, a.next, S + 1300 * NS_PER_MS, 1, IF_FITS);
    cr_assert(!d3.fits && !d3.first);

    /* tat = S + 6 s: at S + 6 s the bucket is full again, a new episode begins */
    tally__step n = step(&l, d3.next, S + 6 * NS_PER_S, 1, IF_FITS);
    cr_assert(n.fits && !n.first);
    cr_assert(!(n.next.w0 & TALLY__MARK));
    st = n.next;
    for (int i = 0; i < 4; i++)
        st = apply(&l, st, S + 6 * NS_PER_S, 1, IF_FITS);
    tally__step d4 = step(&l, st, S + 6 * NS_PER_S, 1, IF_FITS);
    cr_assert(!d4.fits && d4.first);
}

/* A time before the last hit is taken as the last hit. */
Test(algo, gcra_time_backwards)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = apply(&l, EMPTY, S + 2 * NS_PER_S, 1, IF_FITS);  /* tat = S + 3 s */
    EQ(st.w0, S + 2 * NS_PER_S);
    tally__step o = step(&l, st, S + 1 * NS_PER_S, 1, IF_FITS);
    cr_assert(o.fits);
    EQ(o.next.w0 & ~TALLY__MARK, S + 2 * NS_PER_S); /* last hit does not go back */
    EQ(o.next.w1, 2 * NS_PER_S);                    /* tat S + 4 s, in use as of S + 2 s */
    EQ(o.reset_after_ns, 2 * NS_PER_S);             /* from S+2 s, not 3 s from S+1 s */
    EQ(o.remaining, 3);
}

/* Huge costs: NEVER, and with ADD_ALWAYS the time in use saturates at INT64_MAX,
   never reaching the DEAD value, and still denies a century later. */
Test(algo, gcra_huge_cost)
{
    tally__limit l = gcra_5_per_5s();
    tally__step o = step(&l, EMPTY, S, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    cr_assert(!o.fits);
    EQ(o.retry_after_ns, TALLY_NEVER);
    EQ(o.next.w1, (uint64_t)INT64_MAX);
    EQ(o.remaining, 0);
    o = step(&l, o.next, S, UINT64_MAX, ALWAYS | TALLY__NO_MARK);
    EQ(o.next.w1, (uint64_t)INT64_MAX);
    tally__step d = step(&l, o.next, S + 100 * YEAR, 1, IF_FITS);
    cr_assert(!d.fits);
    cr_assert(d.retry_after_ns > 100 * YEAR);
}

/*
 * Near the top of the accepted time range a full bucket's TAT lies beyond
 * INT64_MAX: it must still deny. 1000 hits within 1 us (no refill: T = 1 s)
 * admit exactly max, whether the burst starts tau/2 below the top, at it, or
 * (as a control) far below it, and the denial's retry_after and reset_after
 * are exact.
 */
Test(algo, gcra_limits_near_the_top_of_time)
{
    tally__limit l = limit_of(TALLY_GCRA, 10, 10 * NS_PER_S);
    const uint64_t starts[] = { TOP - 5 * NS_PER_S, TOP - 999, TOP - 1000 * NS_PER_S };

    for (size_t k = 0; k < sizeof starts / sizeof *starts; k++) {
        tally__state st = EMPTY;
        uint64_t admitted = 0, t = 0;
        for (uint64_t i = 0; i < 1000; i++) {
            t = starts[k] + i < TOP ? starts[k] + i : TOP;
            tally__step o = step(&l, st, t, 1, IF_FITS);
            admitted += o.fits;
            if (o.changed)
                st = o.next;
            if (i == 9) {
                EQ(o.reset_after_ns, 10 * NS_PER_S - 9);
                EQ(o.remaining, 0);
            }
        }
        cr_assert_eq(admitted, 10, "start TOP - %" PRIu64 ": %" PRIu64 " of 1000 admitted",
                     TOP - starts[k], admitted);
        tally__step d = step(&l, st, t, 1, IF_FITS);
        cr_assert(!d.fits);
        /* the first hit was at starts[k], so the bucket frees one T after it */
        EQ(d.retry_after_ns, starts[k] + NS_PER_S - t);
        EQ(d.reset_after_ns, starts[k] + 10 * NS_PER_S - t);
        EQ(counter(&l, st, t).used, 10);
    }

    /* every hit at INT64_MAX itself: the clock cannot move, max hits and no more */
    tally__state st = EMPTY;
    uint64_t admitted = 0;
    for (int i = 0; i < 1000; i++) {
        tally__step o = step(&l, st, TOP, 1, IF_FITS);
        admitted += o.fits;
        if (o.changed)
            st = o.next;
    }
    EQ(admitted, 10);
    cr_assert(!tally__algo_expired(&l, st, TOP));
    cr_assert(st.w1 <= TOP, "state word 1 above INT64_MAX");
}

/*
 * Periods up to TALLY_MAX_PERIOD_NS (146 years) at today's clock: the TAT of a
 * full bucket plus one more cost goes past INT64_MAX. The burst is admitted,
 * then denied with retry_after exact to the nanosecond (a saturated TAT made
 * it decades short), for several bursts and for a cost of a whole burst.
 */
Test(algo, gcra_huge_period_at_todays_clock)
{
    const struct { uint64_t max, period; } cases[] = {
        { 1, 140 * YEAR }, { 2, 140 * YEAR }, { 10, 140 * YEAR }, { 3, TALLY_MAX_PERIOD_NS },
        { 1, 120 * YEAR },
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        tally__limit l = limit_of(TALLY_GCRA, cases[k].max, cases[k].period);
        const uint64_t T = l.emission_ns, tau = l.tau_ns;
        tally__state st = EMPTY;
        uint64_t admitted = 0;
        for (int i = 0; i < 1000; i++) {
            tally__step o = step(&l, st, TODAY + (uint64_t)i, 1, IF_FITS);
            admitted += o.fits;
            if (o.changed)
                st = o.next;
        }
        cr_assert_eq(admitted, cases[k].max, "case %zu: %" PRIu64 " admitted", k, admitted);
        uint64_t now = TODAY + 1000;
        tally__step d = step(&l, st, now, 1, PEEK);
        cr_assert(!d.fits);
        cr_assert_eq(d.retry_after_ns, TODAY + T - now, "case %zu: retry_after %" PRIu64
                     ", expected %" PRIu64, k, d.retry_after_ns, TODAY + T - now);
        EQ(d.reset_after_ns, TODAY + tau - now);
        /* retry_after is the first ns at which it fits */
        cr_assert(step(&l, st, now + d.retry_after_ns, 1, PEEK).fits);
        cr_assert(!step(&l, st, now + d.retry_after_ns - 1, 1, PEEK).fits);
        /* a whole burst fits again only once the bucket is empty */
        tally__step w = step(&l, st, now, cases[k].max, PEEK);
        cr_assert(!w.fits);
        EQ(w.retry_after_ns, TODAY + tau - now);
    }
}

/*
 * The reference GCRA in 128-bit arithmetic: an absolute TAT that never
 * saturates, the last hit, the mark. It is the definition the step implements
 * (docs/ALGORITHMS.md "GCRA", plus the mark and time-backwards rules of algo-step.h).
 */
typedef struct gmodel {
    __int128 tat;
    uint64_t last;
    bool mark;
} gmodel;

typedef struct gout {
    bool fits, first, changed;
    uint64_t remaining, reset_after, retry_after, used;
} gout;

static gout gmodel_step(gmodel *m, uint64_t T, uint64_t tau, uint64_t now, uint64_t cost,
                        unsigned how)
{
    gout r;
    bool mark = m->mark;
    if (now < m->last)
        now = m->last;
    if (m->tat <= (__int128)now && m->tat > (__int128)m->last)
        mark = false;
    __int128 eff = m->tat > (__int128)now ? m->tat : (__int128)now;
    __int128 inc = (__int128)cost * T;
    __int128 next = eff + inc;
    r.fits = next - now <= (__int128)tau;
    unsigned add = how & 3;
    bool consume = inc && (add == TALLY__ADD_ALWAYS || (add == TALLY__ADD_IF_FITS && r.fits));
    __int128 after = consume ? next : eff;
    r.first = !r.fits && !mark && !(how & TALLY__NO_MARK);
    r.changed = consume || r.first;
    if (r.changed) {
        m->last = now;
        m->mark = mark || r.first;
        if (consume)
            m->tat = next;
    }
    uint64_t ttl = (uint64_t)(after - now);
    r.used = ttl / T + (ttl % T != 0);
    r.remaining = ttl <= tau ? (tau - ttl) / T : 0;
    r.reset_after = ttl;
    r.retry_after = r.fits ? 0 : inc > (__int128)tau ? TALLY_NEVER : (uint64_t)(ttl + inc - tau);
    return r;
}

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/*
 * Brute force against the reference: small emission intervals and bursts,
 * random costs (0 to max + 2), every kind of step, clocks that move forward,
 * stand still or go back a little, from bases at 0, today and within a few
 * tau of INT64_MAX. Every output of every step, the counter, expiry and the
 * TAT must be the reference's.
 */
Test(algo, gcra_matches_128_bit_reference)
{
    static const unsigned hows[] = { IF_FITS, IF_FITS, ALWAYS, TALLY__ADD_NEVER, PEEK,
                                     IF_FITS | TALLY__NO_MARK };
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15);
    uint64_t steps = 0;

    for (uint64_t T = 1; T <= 4; T++) {
        for (uint64_t max = 1; max <= 5; max++) {
            tally__limit l = limit_of(TALLY_GCRA, max, T * max);
            const uint64_t tau = l.tau_ns;
            const uint64_t bases[] = { 0, S, TOP - 3 * tau, TOP - tau, TOP - 2 };
            for (size_t b = 0; b < sizeof bases / sizeof *bases; b++) {
                for (int run = 0; run < 200; run++) {
                    gmodel m = { 0, 0, false };
                    tally__state st = EMPTY;
                    uint64_t now = bases[b];
                    for (int i = 0; i < 24; i++, steps++) {
                        uint64_t r = rng_next(&seed);
                        uint64_t dt = r % (2 * tau + 2);
                        if (r >> 61 == 0)                  /* one in eight: back a little */
                            now = now > dt % 4 ? now - dt % 4 : 0;
                        else if (!(r >> 58 & 1))           /* else one in two: forward */
                            now = TOP - now < dt ? TOP : now + dt;
                        uint64_t cost = (r >> 20) % (max + 3);
                        unsigned how = hows[(r >> 30) % (sizeof hows / sizeof *hows)];
                        gout want = gmodel_step(&m, T, tau, now, cost, how);
                        tally__step got = step(&l, st, now, cost, how);
                        cr_assert(got.fits == want.fits && got.first == want.first &&
                                  got.changed == want.changed,
                                  "T %" PRIu64 " max %" PRIu64 " base %zu run %d step %d: fits %d/%d "
                                  "first %d/%d changed %d/%d", T, max, b, run, i, got.fits,
                                  want.fits, got.first, want.first, got.changed, want.changed);
                        cr_assert(got.remaining == want.remaining &&
                                  got.reset_after_ns == want.reset_after &&
                                  got.retry_after_ns == want.retry_after && got.used == want.used,
                                  "T %" PRIu64 " max %" PRIu64 " base %zu run %d step %d: remaining "
                                  "%" PRIu64 "/%" PRIu64 " reset %" PRIu64 "/%" PRIu64 " retry %"
                                  PRIu64 "/%" PRIu64 " used %" PRIu64 "/%" PRIu64, T, max, b, run, i,
                                  got.remaining, want.remaining, got.reset_after_ns,
                                  want.reset_after, got.retry_after_ns, want.retry_after,
                                  got.used, want.used);
                        if (got.changed)
                            st = got.next;
                        cr_assert(st.w1 <= TOP && !tally__state_is_dead(st));
                        EQ(gcra_last(st), m.last);
                        cr_assert_eq(!!(st.w0 & TALLY__MARK), m.mark, "mark");
                        /* a TAT at or below the last hit reads as the last hit */
                        __int128 tat = m.tat > (__int128)m.last ? m.tat : (__int128)m.last;
                        cr_assert(gcra_tat(&l, st) == (unsigned __int128)tat,
                                  "T %" PRIu64 " max %" PRIu64 " base %zu run %d step %d: TAT",
                                  T, max, b, run, i);
                        uint64_t in_use = (uint64_t)(tat - m.last);
                        EQ(counter(&l, st, now).used, in_use / T + (in_use % T != 0));
                        uint64_t later = TOP - now < tau ? TOP : now + tau;
                        cr_assert_eq(tally__algo_expired(&l, st, later),
                                     m.tat <= (__int128)(later > m.last ? later : m.last),
                                     "expired at now + tau");
                    }
                }
            }
        }
    }
    cr_assert(steps > 100000);
}

/* ======================================================================== */
/* Undo                                                                     */
/* ======================================================================== */

/* Undo in the same window takes the cost back and keeps the mark. */
Test(algo, undo_fixed_same_window)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 10, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 2, IF_FITS);
    tally__state added = apply(&l, st, FW_T0 + 1, 3, IF_FITS);
    EQ(added.w0, 5);
    tally__state u = tally__algo_undo(&l, added, added, FW_T0 + 2, 3);
    EQ(u.w0, 2);
    EQ(u.w1, FW_T0);
    /* the state moved on since (another hit of 1, then a denial set the mark):
       only our 3 leave, the other hit and the mark stay */
    tally__state later = apply(&l, apply(&l, added, FW_T0 + 2, 1, IF_FITS), FW_T0 + 3, 9, IF_FITS);
    EQ(later.w0, TALLY__MARK | 6);
    u = tally__algo_undo(&l, later, added, FW_T0 + 4, 3);
    EQ(u.w0, TALLY__MARK | 3);
    EQ(u.w1, FW_T0);
}

/* In a later window the cost left with the old window: nothing to undo. */
Test(algo, undo_fixed_later_window)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__state added = apply(&l, EMPTY, FW_T0, 3, IF_FITS);
    tally__state now = apply(&l, added, FW_T0 + FW_P, 1, IF_FITS);
    tally__state u = tally__algo_undo(&l, now, added, FW_T0 + FW_P, 3);
    EQ(u.w0, now.w0);
    EQ(u.w1, now.w1);
}

/* Sliding: same window -> from cur; after one roll -> from prev; two rolls -> nothing. */
Test(algo, undo_sliding)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    uint64_t w = SW_K * SW_P;
    tally__state base = apply(&l, EMPTY, w, 6, IF_FITS);
    tally__state added = apply(&l, base, w + 1, 4, IF_FITS);    /* cur = 10 */

    tally__state u = tally__algo_undo(&l, added, added, w + 2, 4);
    EQ(counter(&l, u, w + 2).used, 6);

    /* the key moved to window k+1 (cur 1, prev 10): the 4 are taken from prev */
    tally__state rolled = apply(&l, added, w + SW_P, 1, IF_FITS);
    EQ(step(&l, rolled, w + SW_P, 0, PEEK).remaining, 100 - 1 - 10);
    u = tally__algo_undo(&l, rolled, added, w + SW_P, 4);
    EQ(step(&l, u, w + SW_P, 0, PEEK).remaining, 100 - 1 - 6);
    EQ(counter(&l, u, w + SW_P).used, 1);           /* cur untouched */

    /* two windows on, the cost has slid out: nothing changes */
    tally__state gone = apply(&l, added, w + 2 * SW_P, 1, IF_FITS);
    u = tally__algo_undo(&l, gone, added, w + 2 * SW_P, 4);
    EQ(u.w0, gone.w0);
    EQ(u.w1, gone.w1);
}

/* GCRA: undo moves the TAT back by cost * emission interval. */
Test(algo, undo_gcra)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = apply(&l, EMPTY, S, 1, IF_FITS);
    tally__state added = apply(&l, st, S, 3, IF_FITS);
    EQ(added.w1, 4 * NS_PER_S);                     /* tat S + 4 s, in use as of S */
    tally__state u = tally__algo_undo(&l, added, added, S, 3);
    EQ(u.w1, 1 * NS_PER_S);
    EQ(u.w0, added.w0);
    /* the undone state behaves like one that never had the 3: 4 left at S */
    EQ(step(&l, u, S, 0, PEEK).remaining, 4);
    /* an undo larger than the TAT floors at 0, never wraps */
    tally__state small = { S, 2 * NS_PER_S };
    EQ(tally__algo_undo(&l, small, small, S, 3).w1, 0);
}

/*
 * A take-back must not erase another hit. X (at t) consumes from an empty
 * bucket; Y, with a clock 2 s later, finds the bucket drained and starts its
 * own cost from its own clock; then X takes its cost back. The bucket must
 * still hold Y's cost: of a burst of max right after, max - 1 are admitted.
 */
Test(algo, undo_gcra_keeps_a_later_clock_hit)
{
    tally__limit l = gcra_5_per_5s();
    const uint64_t tx = S + 100, ty = S + 2 * NS_PER_S;
    tally__state added = apply(&l, EMPTY, tx, 1, IF_FITS);       /* tat = tx + 1 s */
    tally__state cur = apply(&l, added, ty, 1, IF_FITS);          /* tat = ty + 1 s */
    cr_assert(gcra_tat(&l, cur) == ty + NS_PER_S);

    tally__state u = tally__algo_undo(&l, cur, added, tx, 1);
    cr_assert(gcra_tat(&l, u) == ty + NS_PER_S, "Y's cost was taken back with X's");
    EQ(step(&l, u, ty, 0, PEEK).remaining, 4);
    uint64_t admitted = 0;
    for (int i = 0; i < 5; i++) {
        tally__step o = step(&l, u, ty, 1, IF_FITS);
        admitted += o.fits;
        if (o.changed)
            u = o.next;
    }
    EQ(admitted, 4);

    /* X's cost larger than the clock advance: X 3 at tx, Y 1 at tx + 1 s. Alone,
       Y reads tx + 2 s, which is what the take-back must leave (X began at its own
       clock, so nothing of the bucket before X is in doubt) */
    added = apply(&l, EMPTY, tx, 3, IF_FITS);                      /* tat = tx + 3 s */
    cur = apply(&l, added, tx + NS_PER_S, 1, IF_FITS);             /* tat = tx + 4 s */
    u = tally__algo_undo(&l, cur, added, tx, 3);
    cr_assert(gcra_tat(&l, u) == tx + 2 * NS_PER_S);
    EQ(step(&l, u, tx + NS_PER_S, 0, PEEK).remaining, 4);
}

/* With the same clock for every hit the take-back is exact, also after later hits. */
Test(algo, undo_gcra_exact_on_one_clock)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = apply(&l, EMPTY, S, 1, IF_FITS);
    tally__state added = apply(&l, st, S, 2, IF_FITS);
    tally__state cur = apply(&l, apply(&l, added, S, 1, IF_FITS), S, 1, IF_FITS);
    tally__state u = tally__algo_undo(&l, cur, added, S, 2);
    cr_assert(gcra_tat(&l, u) == S + 3 * NS_PER_S);
    EQ(step(&l, u, S, 0, PEEK).remaining, 2);
}

/*
 * Property: random hits on clocks that skew back and forth, each consumed hit
 * taken back later at a random point, in any order. The reference TAT is the
 * bucket recomputed from the hits that survive (each at the time its step
 * used). The TAT kept may be above the reference, never below it: a take-back
 * knows only the state it undoes and the one it finds, and when the clock
 * moved on since its hit, part of its cost may be in a later hit's cost that
 * started from a later clock (which the take-back cannot tell). So each
 * take-back may leave at most its own cost, and exactly nothing when the
 * clock did not move since its hit; steps never add to that excess.
 */
Test(algo, undo_gcra_never_below_the_surviving_hits)
{
    enum { HITS = 48 };
    static const unsigned hows[] = { IF_FITS, IF_FITS, IF_FITS, ALWAYS, TALLY__ADD_NEVER };
    uint64_t seed = UINT64_C(0x2545f4914f6cdd1d);
    struct hit { tally__state added; uint64_t at, inc, cost; bool alive; } h[HITS];
    uint64_t undos = 0, slack_seen = 0;

    for (int run = 0; run < 3000; run++) {
        uint64_t T = 1 + run % 5, max = 1 + (run / 5) % 6;
        tally__limit l = limit_of(TALLY_GCRA, max, T * max);
        uint64_t base = run % 3 == 0 ? S : run % 3 == 1 ? TOP - 40 * l.tau_ns : 1000;
        tally__state st = EMPTY;
        uint64_t clock = base, excess = 0;
        int n = 0;
        for (int op = 0; op < 80 && n < HITS; op++) {
            uint64_t r = rng_next(&seed);
            int alive = 0;
            for (int i = 0; i < n; i++)
                alive += h[i].alive;
            uint64_t last = gcra_last(st), inc = 0;
            bool same_clock = false;
            if (alive && (r & 3) == 0) {
                int k = (int)((r >> 8) % (uint64_t)alive), i = 0;
                for (;; i++)
                    if (h[i].alive && k-- == 0)
                        break;
                same_clock = h[i].at == last;
                inc = h[i].inc;
                st = tally__algo_undo(&l, st, h[i].added, clock, h[i].cost);
                h[i].alive = false;
                undos++;
            } else {
                /* skewed clocks: mostly forward, one in four behind the latest */
                uint64_t dt = (r >> 8) % (3 * l.tau_ns + 1);
                bool behind = (r >> 40) % 4 == 0;
                uint64_t now = behind ? (clock > dt ? clock - dt : 0)
                                      : (TOP - clock < dt ? TOP : clock + dt);
                if (!behind)
                    clock = now;
                uint64_t cost = 1 + (r >> 24) % max;
                unsigned how = hows[(r >> 32) % (sizeof hows / sizeof *hows)];
                tally__step o = step(&l, st, now, cost, how);
                if (!o.changed)
                    continue;
                st = o.next;
                if ((how & 3) == ALWAYS || ((how & 3) == IF_FITS && o.fits))
                    h[n++] = (struct hit){ st, gcra_last(st), cost * T, cost, true };
            }
            cr_assert(st.w1 <= TOP && !tally__state_is_dead(st));
            /* the reference: the surviving hits replayed, each at the time its step used */
            __int128 ref = 0;
            for (int j = 0; j < n; j++)
                if (h[j].alive)
                    ref = (ref > (__int128)h[j].at ? ref : (__int128)h[j].at) + h[j].inc;
            __int128 tat = (__int128)gcra_tat(&l, st);
            cr_assert(tat >= ref, "run %d op %d: TAT %" PRIu64 " below the surviving hits'",
                      run, op, (uint64_t)(ref - tat));
            /* excess over the reference, as the next hit (at or after the last) sees it */
            __int128 low = ref > (__int128)gcra_last(st) ? ref : (__int128)gcra_last(st);
            uint64_t e = (uint64_t)(tat - low);
            cr_assert(e <= excess + inc, "run %d op %d: excess %" PRIu64 " -> %" PRIu64
                      " for a cost of %" PRIu64, run, op, excess, e, inc);
            if (!inc || same_clock)
                cr_assert(e <= excess, "run %d op %d: excess %" PRIu64 " -> %" PRIu64 " (%s)",
                          run, op, excess, e, inc ? "take-back on an unmoved clock" : "step");
            slack_seen += e > excess;
            excess = e;
        }
    }
    cr_assert(undos > 10000 && slack_seen > 0, "%" PRIu64 " undos, %" PRIu64 " with slack",
              undos, slack_seen);
}

/* ======================================================================== */
/* Expiry                                                                   */
/* ======================================================================== */

Test(algo, expired_empty_state)
{
    tally__limit ls[] = {
        limit_of(TALLY_FIXED_WINDOW, 5, FW_P), limit_of(TALLY_SLIDING_WINDOW, 5, SW_P),
        limit_of(TALLY_GCRA, 5, 5 * NS_PER_S),
    };
    for (size_t i = 0; i < 3; i++) {
        cr_assert(tally__algo_expired(&ls[i], EMPTY, 0));
        cr_assert(tally__algo_expired(&ls[i], EMPTY, S));
    }
    tally_limit cal = { .algo = TALLY_CALENDAR_WINDOW, .max = 5, .unit = TALLY_DAY };
    tally__limit c;
    EQ(tally__limit_compile(&cal, &c), 0);
    cr_assert(tally__algo_expired(&c, EMPTY, S));
}

/* A fixed window expires exactly at start + period. */
Test(algo, expired_fixed)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__state st = apply(&l, EMPTY, FW_T0, 1, IF_FITS);
    cr_assert(!tally__algo_expired(&l, st, FW_T0));
    cr_assert(!tally__algo_expired(&l, st, FW_T0 + FW_P - 1));
    cr_assert(tally__algo_expired(&l, st, FW_T0 + FW_P));
    cr_assert(!tally__algo_expired(&l, st, FW_T0 - 1));   /* before the start: not expired */
}

/* A sliding state counts until two full windows have passed (it weighs as prev in the next). */
Test(algo, expired_sliding)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 5, SW_P);
    uint64_t w = SW_K * SW_P;
    tally__state st = apply(&l, EMPTY, w + 300, 1, IF_FITS);
    cr_assert(!tally__algo_expired(&l, st, w + 300));
    cr_assert(!tally__algo_expired(&l, st, w + SW_P));
    cr_assert(!tally__algo_expired(&l, st, w + 2 * SW_P - 1));
    cr_assert(tally__algo_expired(&l, st, w + 2 * SW_P));
    cr_assert(tally__algo_expired(&l, st, w + 7 * SW_P));
}

/* GCRA expires once the bucket is full again: tat <= now. */
Test(algo, expired_gcra)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = apply(&l, EMPTY, S, 2, IF_FITS);       /* tat = S + 2 s */
    cr_assert(!tally__algo_expired(&l, st, S));
    cr_assert(!tally__algo_expired(&l, st, S + 2 * NS_PER_S - 1));
    cr_assert(tally__algo_expired(&l, st, S + 2 * NS_PER_S));
}

/* A calendar window expires at the next calendar boundary. */
Test(algo, expired_calendar)
{
    tally_limit spec = { .algo = TALLY_CALENDAR_WINDOW, .max = 5, .unit = TALLY_HOUR,
                         .utc_offset_s = 1800 };       /* hours start at :30 UTC */
    tally__limit l;
    EQ(tally__limit_compile(&spec, &l), 0);
    /* S = 2023-11-14T22:13:20Z, so the local hour began at 21:30Z and ends at 22:30Z */
    uint64_t start = S - (43 * 60 + 20) * NS_PER_S;
    uint64_t end = start + 3600 * NS_PER_S;
    tally__state st = apply(&l, EMPTY, S, 1, IF_FITS);
    EQ(st.w1, start);
    cr_assert(!tally__algo_expired(&l, st, end - 1));
    cr_assert(tally__algo_expired(&l, st, end));
}

/* ======================================================================== */
/* The public counter view                                                  */
/* ======================================================================== */

Test(algo, counter_fixed)
{
    tally__limit l = limit_of(TALLY_FIXED_WINDOW, 5, FW_P);
    tally__state st = apply(&l, apply(&l, EMPTY, FW_T0, 2, IF_FITS), FW_T0 + 1, 9, IF_FITS);
    tally_counter c = counter(&l, st, FW_T0 + 2);
    EQ(c.used, 2);                                  /* the mark bit is not part of used */
    EQ(c.window_start_ns, FW_T0);
    EQ(c.raw[0], st.w0);
    EQ(c.raw[1], st.w1);
    cr_assert(c.raw[0] & TALLY__MARK);
}

Test(algo, counter_sliding)
{
    tally__limit l = limit_of(TALLY_SLIDING_WINDOW, 100, SW_P);
    tally__state st = sliding_state(&l, SW_K, 30, 12);
    tally_counter c = counter(&l, st, (SW_K + 1) * SW_P + 5);
    EQ(c.used, 12);                                 /* cur only; prev is not "used" */
    EQ(c.window_start_ns, (SW_K + 1) * SW_P);
    EQ(c.raw[0], st.w0);
    EQ(c.raw[1], st.w1);
    /* read much later, the state still reports the window it belongs to */
    EQ(counter(&l, st, (SW_K + 50) * SW_P).window_start_ns, (SW_K + 1) * SW_P);
    c = counter(&l, EMPTY, S);
    EQ(c.used, 0);
    EQ(c.window_start_ns, 0);
}

/* GCRA used = burst in use as of the last hit = ceil((tat - last) / emission). */
Test(algo, counter_gcra)
{
    tally__limit l = gcra_5_per_5s();
    tally__state st = apply(&l, EMPTY, S, 3, IF_FITS);      /* tat - last = 3 s */
    tally_counter c = counter(&l, st, S);
    EQ(c.used, 3);
    EQ(c.window_start_ns, 0);
    EQ(c.raw[0], st.w0);
    EQ(c.raw[1], st.w1);
    /* at S+1.5 s: tat = S+4 s, last = S+1.5 s -> 2.5 s in use -> 3 (rounded up) */
    st = apply(&l, st, S + 1500 * NS_PER_MS, 1, IF_FITS);
    EQ(counter(&l, st, S + 1500 * NS_PER_MS).used, 3);
    /* as of the last hit, not as of the read: reading later changes nothing */
    EQ(counter(&l, st, S + 100 * NS_PER_S).used, 3);
    /* a denied hit that set the mark still counts from the (new) last hit */
    st = apply(&l, st, S + 2 * NS_PER_S, 5, IF_FITS);
    cr_assert(st.w0 & TALLY__MARK);
    EQ(counter(&l, st, S + 2 * NS_PER_S).used, 2);
}

/*
 * A hit whose cost is above max, at a full bucket, is refused without
 * touching the bucket: the exceeded mark must still go to the first such
 * call only, until the bucket has been used and drained again.
 */
Test(algo, gcra_mark_once_for_oversized_cost_at_full_bucket)
{
    tally__limit l;
    tally_limit spec = { .algo = TALLY_GCRA, .max = 5, .period_ns = 5 * NS_PER_S };
    cr_assert_eq(tally__limit_compile(&spec, &l), 0);
    tally__state st = { 0, 0 };
    tally__step r;
    int firsts = 0;
    for (int i = 0; i < 5; i++) {
        tally__algo_step(&l, st, S + (uint64_t)i, 6, TALLY__ADD_IF_FITS, NULL, &r);
        cr_assert_not(r.fits);
        firsts += r.first;
        if (r.changed)
            st = r.next;
    }
    cr_assert_eq(firsts, 1);
    /* use the bucket, let it drain: a new episode may be marked again */
    tally__algo_step(&l, st, S + 10, 1, TALLY__ADD_IF_FITS, NULL, &r);
    cr_assert(r.fits);
    st = r.next;
    tally__algo_step(&l, st, S + 10 * NS_PER_S, 6, TALLY__ADD_IF_FITS, NULL, &r);
    cr_assert(r.first);
}

/* ======================================================================== */
/* Concurrency                                                              */
/* ======================================================================== */

#define CC_LEASE (30 * NS_PER_S)

Test(algo, compile_concurrency_bounds)
{
    EQ(compile(TALLY_CONCURRENCY, TALLY_CONCURRENCY_MAX_COUNT, CC_LEASE, 0, 0), 0);
    EQ(compile(TALLY_CONCURRENCY, TALLY_CONCURRENCY_MAX_COUNT + 1, CC_LEASE, 0, 0),
       (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CONCURRENCY, 1, 0, 0, 0), (uint64_t)TALLY_EINVAL);
    EQ(compile(TALLY_CONCURRENCY, 1, TALLY_MAX_PERIOD_NS, 0, 0), 0);
    EQ(compile(TALLY_CONCURRENCY, 1, TALLY_MAX_PERIOD_NS + 1, 0, 0), (uint64_t)TALLY_EINVAL);
}

Test(algo, concurrency_holds_up_to_max_until_the_lease_after_the_last_acquire)
{
    tally__limit l = limit_of(TALLY_CONCURRENCY, 2, CC_LEASE);
    tally__state s = apply(&l, EMPTY, S, 1, IF_FITS);
    s = apply(&l, s, S + NS_PER_S, 1, IF_FITS);
    tally__step o = step(&l, s, S + 2 * NS_PER_S, 1, IF_FITS);
    cr_assert_not(o.fits);
    cr_assert(o.first);
    EQ(o.added, 0);                   /* never a delta for the flusher */
    EQ(o.retry_after_ns, CC_LEASE - NS_PER_S);
    EQ(o.reset_after_ns, CC_LEASE - NS_PER_S);
    s = o.next;
    o = step(&l, s, S + NS_PER_S + CC_LEASE - 1, 1, IF_FITS);
    cr_assert_not(o.fits, "1 ns before the lease ends");
    cr_assert_not(o.first, "one mark an episode");
    o = step(&l, s, S + NS_PER_S + CC_LEASE, 1, IF_FITS);
    cr_assert(o.fits, "at the lease's end every hold expired");
    EQ(o.used, 1);
    EQ(o.remaining, 1);
    cr_assert_eq(o.next.w0 & TALLY__MARK, 0, "a new episode");
    EQ(o.next.w1 >> 32, 1);           /* one expiry counted */
}

Test(algo, concurrency_cost_above_max_never_and_cost_zero)
{
    tally__limit l = limit_of(TALLY_CONCURRENCY, 3, CC_LEASE);
    tally__step o = step(&l, EMPTY, S, 4, IF_FITS);
    EQ(o.retry_after_ns, TALLY_NEVER);
    o = step(&l, EMPTY, S, 0, IF_FITS);
    cr_assert(o.fits);
    cr_assert_not(o.changed, "a cost of 0 acquires nothing");
    tally__state s = apply(&l, EMPTY, S, 3, ALWAYS);
    s = apply(&l, s, S, 3, ALWAYS);
    EQ(counter(&l, s, S).used, 6);    /* shadow: counted past max */
    o = step(&l, s, S, 0, IF_FITS);
    cr_assert_not(o.fits, "usage above max denies a cost of 0");
    o = step(&l, s, S - NS_PER_S, 1, PEEK);
    EQ(o.reset_after_ns, CC_LEASE);   /* an older time is the state's own */
}

Test(algo, concurrency_release_and_its_refusals)
{
    tally__limit l = limit_of(TALLY_CONCURRENCY, 5, CC_LEASE);
    tally__state s = apply(&l, EMPTY, S, 3, IF_FITS), n;
    EQ(tally__concurrency_release(&l, EMPTY, S, 1, &n), (uint64_t)TALLY_ENOENT);
    EQ(tally__concurrency_release(&l, s, S, 4, &n), (uint64_t)TALLY_ENOENT);
    EQ(tally__concurrency_release(&l, s, S + CC_LEASE, 1, &n), (uint64_t)TALLY_ENOENT);
    EQ(tally__concurrency_release(&l, s, S + CC_LEASE - 1, 3, &n), 0);
    EQ(counter(&l, n, S).used, 0);
    EQ(n.w0, S);                      /* the lease still counts from the acquire */
    EQ(tally__concurrency_release(&l, s, S, 1, &n), 0);
    EQ(counter(&l, n, S).used, 2);
}

Test(algo, undo_concurrency_takes_back_only_its_own_holds)
{
    tally__limit l = limit_of(TALLY_CONCURRENCY, 5, CC_LEASE);
    tally__state mine = apply(&l, EMPTY, S, 2, IF_FITS);
    tally__state later = apply(&l, mine, S + 1, 1, IF_FITS);
    EQ(counter(&l, tally__algo_undo(&l, later, mine, S + 1, 2), S).used, 1);
    /* the holds expired and others acquired: nothing of theirs is taken */
    tally__state after_expiry = apply(&l, later, S + 1 + CC_LEASE, 1, IF_FITS);
    tally__state u = tally__algo_undo(&l, after_expiry, mine, S + 1 + CC_LEASE, 2);
    cr_assert(u.w0 == after_expiry.w0 && u.w1 == after_expiry.w1);
}

Test(algo, expired_concurrency)
{
    tally__limit l = limit_of(TALLY_CONCURRENCY, 5, CC_LEASE);
    tally__state s = apply(&l, EMPTY, S, 1, IF_FITS), n;
    cr_assert_not(tally__algo_expired(&l, s, S + CC_LEASE - 1));
    cr_assert(tally__algo_expired(&l, s, S + CC_LEASE));
    cr_assert_not(tally__algo_expired(&l, s, S - 1), "a time before the acquire");
    EQ(tally__concurrency_release(&l, s, S, 1, &n), 0);
    cr_assert(tally__algo_expired(&l, n, S), "nothing held");
    tally_counter c = counter(&l, s, S);
    EQ(c.used, 1);
    EQ(c.window_start_ns, 0);
}

/* ======================================================================== */
/* Per-call max, policy updates, reservations                               */
/* ======================================================================== */

Test(algo, limit_with_max_derives_again)
{
    tally__limit g = limit_of(TALLY_GCRA, 10, 10 * NS_PER_S), o;
    EQ(tally__limit_with_max(&g, 5, &o), 0);
    EQ(o.spec.max, 5);
    EQ(o.emission_ns, 2 * NS_PER_S);
    EQ(o.tau_ns, 10 * NS_PER_S);
    EQ(tally__limit_with_max(&g, 0, &o), 0);
    EQ(o.spec.max, 10);
    EQ(tally__limit_with_max(&g, 10 * NS_PER_S + 1, &o), (uint64_t)TALLY_EINVAL);
    tally__limit f = limit_of(TALLY_FIXED_WINDOW, 10, NS_PER_S);
    f.aligned = true;
    EQ(tally__limit_with_max(&f, 3, &o), 0);
    cr_assert(o.aligned, "the policy's alignment stays");
    tally__limit sl = limit_of(TALLY_SLIDING_WINDOW, 10, NS_PER_S);
    EQ(tally__limit_with_max(&sl, TALLY_SLIDING_MAX_COUNT + 1, &o), (uint64_t)TALLY_EINVAL);
}

Test(algo, state_compatible_changes)
{
    tally__limit fx = limit_of(TALLY_FIXED_WINDOW, 10, NS_PER_S);
    tally__limit fx2 = limit_of(TALLY_FIXED_WINDOW, 99, 7 * NS_PER_S);
    tally_limit cs = { .algo = TALLY_CALENDAR_WINDOW, .max = 3, .unit = TALLY_DAY };
    tally__limit cal;
    cr_assert_eq(tally__limit_compile(&cs, &cal), 0);
    tally__limit sl = limit_of(TALLY_SLIDING_WINDOW, 10, NS_PER_S);
    tally__limit sl_max = limit_of(TALLY_SLIDING_WINDOW, 20, NS_PER_S);
    tally__limit sl_per = limit_of(TALLY_SLIDING_WINDOW, 10, 2 * NS_PER_S);
    tally__limit g = limit_of(TALLY_GCRA, 10, NS_PER_S), g2 = limit_of(TALLY_GCRA, 3, 9 * NS_PER_S);
    tally__limit cc = limit_of(TALLY_CONCURRENCY, 10, NS_PER_S);
    cr_assert(tally__limit_state_compatible(&fx, &fx2));
    cr_assert(tally__limit_state_compatible(&fx, &cal));
    cr_assert(tally__limit_state_compatible(&cal, &fx));
    cr_assert(tally__limit_state_compatible(&sl, &sl_max));
    cr_assert_not(tally__limit_state_compatible(&sl, &sl_per));
    cr_assert(tally__limit_state_compatible(&g, &g2));
    cr_assert(tally__limit_state_compatible(&cc, &cc));
    cr_assert_not(tally__limit_state_compatible(&fx, &sl));
    cr_assert_not(tally__limit_state_compatible(&g, &fx));
    cr_assert_not(tally__limit_state_compatible(&cc, &g));
    cr_assert_not(tally__limit_state_compatible(&sl, &cc));
}

Test(algo, gcra_reserve_report_against_the_limits_own_tolerance)
{
    tally__limit g = limit_of(TALLY_GCRA, 2, 2 * NS_PER_S), wide = g;
    wide.tau_ns += 3 * NS_PER_S;
    tally__state s = EMPTY;
    for (int i = 0; i < 4; i++)
        s = apply(&wide, s, S, 1, IF_FITS);
    tally__step o = step(&wide, s, S, 1, IF_FITS);
    cr_assert(o.fits, "5 s in use fits 2 s + 3 s");
    EQ(tally__gcra_reserve_report(&g, 1, &o), 3 * NS_PER_S);
    EQ(o.remaining, 0);
    o = step(&wide, o.next, S, 1, IF_FITS);
    cr_assert_not(o.fits);
    EQ(tally__gcra_reserve_report(&g, 1, &o), 0);
    EQ(o.retry_after_ns, 4 * NS_PER_S);   /* 5 s in use + 1 - 2: as a denied hit */
    o = step(&wide, EMPTY, S, 1, IF_FITS);
    EQ(tally__gcra_reserve_report(&g, 1, &o), 0);
    EQ(o.remaining, 1);
}
