/*
 * The five algorithms as pure functions: state x now x cost -> state.
 *
 * Nothing here touches shared memory; the CAS loop around these functions
 * lives in engine.c and is written once. The steps themselves are in
 * algo-step.h, inline, for the hot path. Every function is total: any state
 * words and any time give a defined answer, with arithmetic that saturates
 * instead of wrapping.
 */
#include "engine/algo-step.h"

#define NS_PER_S   UINT64_C(1000000000)
#define NS_PER_DAY (UINT64_C(86400) * NS_PER_S)

/* ---- Validation ----------------------------------------------------------- */

int tally__limit_compile(const tally_limit *l, tally__limit *out)
{
    tally__limit c = { .spec = *l };

    if (l->max == 0)
        return TALLY_EINVAL;
    switch (l->algo) {
    case TALLY_FIXED_WINDOW:
    case TALLY_SLIDING_WINDOW:
        if (l->period_ns == 0 || l->period_ns > TALLY_MAX_PERIOD_NS)
            return TALLY_EINVAL;
        if (l->max > (l->algo == TALLY_SLIDING_WINDOW ? TALLY_SLIDING_MAX_COUNT : TALLY_MAX_COUNT))
            return TALLY_EINVAL;
        break;
    case TALLY_CALENDAR_WINDOW:
        if ((unsigned)l->unit > TALLY_MONTH || l->max > TALLY_MAX_COUNT)
            return TALLY_EINVAL;
        if (l->utc_offset_s > TALLY_MAX_UTC_OFFSET_S || l->utc_offset_s < -TALLY_MAX_UTC_OFFSET_S)
            return TALLY_EINVAL;
        break;
    case TALLY_GCRA:
        if (l->period_ns == 0 || l->period_ns > TALLY_MAX_PERIOD_NS || l->max > TALLY_MAX_COUNT)
            return TALLY_EINVAL;
        c.emission_ns = l->period_ns / l->max;
        if (c.emission_ns == 0)
            return TALLY_EINVAL;
        c.tau_ns = c.emission_ns * l->max;
        break;
    case TALLY_CONCURRENCY:
        if (l->period_ns == 0 || l->period_ns > TALLY_MAX_PERIOD_NS
            || l->max > TALLY_CONCURRENCY_MAX_COUNT)
            return TALLY_EINVAL;
        break;
    default:
        return TALLY_EINVAL;
    }
    *out = c;
    return 0;
}

int tally__limit_with_max(const tally__limit *l, uint64_t max, tally__limit *out)
{
    if (max == 0 || max == l->spec.max) {
        *out = *l;
        return 0;
    }
    tally_limit spec = l->spec;
    spec.max = max;
    int rc = tally__limit_compile(&spec, out);
    if (!rc)
        out->aligned = l->aligned;
    return rc;
}

bool tally__limit_state_compatible(const tally__limit *from, const tally__limit *to)
{
    tally_algo a = from->spec.algo, b = to->spec.algo;
    /* both keep {used, window start}: the start is read against the new windows */
    bool windows = (a == TALLY_FIXED_WINDOW || a == TALLY_CALENDAR_WINDOW)
                && (b == TALLY_FIXED_WINDOW || b == TALLY_CALENDAR_WINDOW);
    if (windows)
        return true;
    if (a != b)
        return false;
    /* the stored window number counts periods */
    return a != TALLY_SLIDING_WINDOW || from->spec.period_ns == to->spec.period_ns;
}

/* ---- Calendar arithmetic (proleptic Gregorian, days since 1970-01-01) ----- */

/* Howard Hinnant's days_from_civil/civil_from_days: the calendar repeats
   every 400-year era of DAYS_PER_ERA days; a year of the era starts in March
   so that February's leap day ends it; 153 days span each 5 months from
   March; 1970-01-01 is day EPOCH_SHIFT counted from 0000-03-01. */
#define DAYS_PER_ERA 146097
#define EPOCH_SHIFT  719468

static int64_t floor_div(__int128 a, int64_t b)
{
    __int128 q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q--;
    return (int64_t)q;
}

static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * DAYS_PER_ERA + (int64_t)doe - EPOCH_SHIFT;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += EPOCH_SHIFT;
    int64_t era = (z >= 0 ? z : z - (DAYS_PER_ERA - 1)) / DAYS_PER_ERA;
    unsigned doe = (unsigned)(z - era * DAYS_PER_ERA);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

/* Start, in local days, of the calendar unit holding local day @days. */
static int64_t unit_first_day(tally_calendar_unit unit, int64_t days)
{
    if (unit == TALLY_WEEK)     /* 1970-01-01 was a Thursday: +3 makes Monday 0 */
        return days - (int64_t)(((days + 3) % 7 + 7) % 7);
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    return days - (int64_t)(d - 1);
}

/* Local-time start (ns since the local epoch) of the unit holding @local. */
static __int128 local_unit_start(tally_calendar_unit unit, __int128 local)
{
    int64_t len;

    switch (unit) {
    case TALLY_MINUTE: len = 60 * (int64_t)NS_PER_S; break;
    case TALLY_HOUR:   len = 3600 * (int64_t)NS_PER_S; break;
    case TALLY_DAY:    len = (int64_t)NS_PER_DAY; break;
    default:
        return (__int128)unit_first_day(unit, floor_div(local, (int64_t)NS_PER_DAY)) * (int64_t)NS_PER_DAY;
    }
    return (__int128)floor_div(local, len) * len;
}

uint64_t tally__calendar_start(tally_calendar_unit unit, int32_t utc_offset_s, uint64_t now)
{
    __int128 off = (__int128)utc_offset_s * (int64_t)NS_PER_S;
    return clamp_time(local_unit_start(unit, (__int128)now + off) - off);
}

uint64_t tally__calendar_next(tally_calendar_unit unit, int32_t utc_offset_s, uint64_t start)
{
    /* From the unclamped start: a unit that began before 1970 still ends on time. */
    __int128 off = (__int128)utc_offset_s * (int64_t)NS_PER_S;
    __int128 local = local_unit_start(unit, (__int128)start + off);
    int64_t days = floor_div(local, (int64_t)NS_PER_DAY);
    __int128 next;

    switch (unit) {
    case TALLY_MINUTE: next = local + 60 * (__int128)NS_PER_S; break;
    case TALLY_HOUR:   next = local + 3600 * (__int128)NS_PER_S; break;
    case TALLY_DAY:    next = local + NS_PER_DAY; break;
    case TALLY_WEEK:   next = local + 7 * (__int128)NS_PER_DAY; break;
    default: {
        int64_t y;
        unsigned m, d;
        civil_from_days(days, &y, &m, &d);
        next = (__int128)(m == 12 ? days_from_civil(y + 1, 1, 1) : days_from_civil(y, m + 1, 1))
               * (int64_t)NS_PER_DAY;
    }
    }
    return clamp_time(next - off);
}

void tally__algo_step(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                      unsigned how, const tally__remote *rem, tally__step *out)
{
    algo_step(l, cur, now, cost, how, rem, out);
}

tally__state tally__algo_undo(const tally__limit *l, tally__state cur, tally__state added,
                              uint64_t now, uint64_t cost)
{
    (void)now;
    switch (l->spec.algo) {
    case TALLY_SLIDING_WINDOW: {
        sliding v = sliding_decode(cur), a = sliding_decode(added);
        if (v.idx == a.idx)
            v.cur -= cost < v.cur ? cost : v.cur;
        else if (v.idx == ((a.idx + 1) & SLIDING_IDX_MASK))
            v.prev -= cost < v.prev ? cost : v.prev;
        else
            return cur;                       /* the window it went to has slid out */
        return sliding_encode(v);
    }
    case TALLY_GCRA: {
        /*
         * Hit X, whose step stored @added (at: the time that step used), takes
         * back inc = cost * T from the stored TAT, tat = last + w1. The
         * bucket's true TAT is the replay of the hits it holds, in the order
         * of their steps, each at its own time: the largest, over the hits j,
         * of at_j plus the cost of j and of every later hit. Split these terms
         * into A (hits up to X) and B (later hits): max(A, B) <= tat, and
         * without X the bucket is max(A - inc, B). A - inc <= tat - inc. A
         * later hit's time is at most last (last never goes back), so
         * B <= last + S, S the later hits' cost; X's own term at + inc + S is
         * in A, so S <= tat - at - inc and B <= tat - inc + (last - at). Hence
         *     new tat = tat - inc + min(inc, last - at)
         * is at least the bucket without X: no other hit loses any of its
         * cost, whatever clocks and take-backs came in between. At most
         * min(inc, last - at) of X's cost stays (a TAT above its replay, which
         * only loosens the bounds of later take-backs): the part a later hit
         * with a later clock may have counted from its own clock (a TAT jump),
         * which these two states cannot tell from X's. None stays when the
         * clock did not move since X.
         */
        uint64_t inc = sat_mul(cost, l->emission_ns, TALLY__TIME_MAX);
        uint64_t last = cur.w0 & ~TALLY__MARK, at = added.w0 & ~TALLY__MARK;
        cur.w1 = sub0(cur.w1, sub0(inc, sub0(last, at)));
        return cur;
    }
    case TALLY_CONCURRENCY: {
        /* holds that expired since took ours with them; later ones are others' */
        if (cur.w1 >> 32 != added.w1 >> 32)
            return cur;
        uint64_t holders = cur.w1 & CONC_HOLDERS_MASK;
        cur.w1 -= cost < holders ? cost : holders;
        return cur;
    }
    default: {
        if (cur.w1 != added.w1)
            return cur;                       /* a later window: the cost left with the old one */
        uint64_t used = cur.w0 & ~TALLY__MARK;
        cur.w0 = (cur.w0 & TALLY__MARK) | (used - (cost < used ? cost : used));
        return cur;
    }
    }
}

uint64_t tally__gcra_reserve_report(const tally__limit *l, uint64_t cost, tally__step *r)
{
    const uint64_t T = l->emission_ns, tau = l->tau_ns;
    uint64_t after = r->reset_after_ns, inc = sat_mul(cost, T, TALLY__TIME_MAX);

    r->remaining = after <= tau ? (tau - after) / T : 0;
    if (r->fits)
        return sub0(after, tau);
    /* not booked: after is the span in use now, as a denied hit reports */
    r->retry_after_ns = inc > tau ? TALLY_NEVER : sub0(after, tau - inc);
    return 0;
}

int tally__concurrency_release(const tally__limit *l, tally__state cur, uint64_t now,
                               uint64_t cost, tally__state *next)
{
    uint64_t mark = cur.w0 & TALLY__MARK, last = cur.w0 & ~TALLY__MARK;
    uint64_t holders = cur.w1 & CONC_HOLDERS_MASK;

    if (now < last)
        now = last;
    if (holders == 0 || now - last >= l->spec.period_ns || cost > holders)
        return TALLY_ENOENT;
    holders -= cost;
    /* the lease keeps counting from the latest acquire */
    next->w0 = (holders ? mark : 0) | last;
    next->w1 = (cur.w1 & ~CONC_HOLDERS_MASK) | holders;
    return 0;
}

bool tally__algo_expired(const tally__limit *l, tally__state s, uint64_t now)
{
    const tally_limit *spec = &l->spec;

    if (tally__state_is_empty(s))
        return true;
    switch (spec->algo) {
    case TALLY_FIXED_WINDOW:
        return now >= s.w1 && now - s.w1 >= spec->period_ns;
    case TALLY_CALENDAR_WINDOW:
        return now >= tally__calendar_next(spec->unit, spec->utc_offset_s, s.w1);
    case TALLY_SLIDING_WINDOW: {
        uint64_t idx = now / spec->period_ns;
        uint64_t full = sliding_full_idx(sliding_decode(s).idx, idx);
        return full < idx && idx - full >= 2;
    }
    case TALLY_CONCURRENCY: {
        uint64_t last = s.w0 & ~TALLY__MARK;
        return (s.w1 & CONC_HOLDERS_MASK) == 0 || (now >= last && now - last >= spec->period_ns);
    }
    default:                                  /* GCRA: nothing in use at now */
        return s.w1 <= sub0(now, s.w0 & ~TALLY__MARK);
    }
}

void tally__algo_counter(const tally__limit *l, tally__state s, uint64_t now, tally_counter *out)
{
    out->raw[0] = s.w0;
    out->raw[1] = s.w1;
    switch (l->spec.algo) {
    case TALLY_SLIDING_WINDOW: {
        sliding v = sliding_decode(s);
        out->used = v.cur;
        out->window_start_ns = tally__state_is_empty(s)
            ? 0 : sliding_full_idx(v.idx, now / l->spec.period_ns) * l->spec.period_ns;
        break;
    }
    case TALLY_GCRA: {
        out->used = s.w1 / l->emission_ns + (s.w1 % l->emission_ns != 0);
        out->window_start_ns = 0;
        break;
    }
    case TALLY_CONCURRENCY:
        out->used = s.w1 & CONC_HOLDERS_MASK;
        out->window_start_ns = 0;
        break;
    default:
        out->used = s.w0 & ~TALLY__MARK;
        out->window_start_ns = s.w1;
        break;
    }
}
