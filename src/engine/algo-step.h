/*
 * The algorithm steps as static inline functions, so that the hot path in
 * engine.c compiles them into its CAS loop. algo.c wraps them for tests and
 * holds everything that is not on the hot path. Private to src/.
 */
#ifndef TALLY_ALGO_STEP_H
#define TALLY_ALGO_STEP_H

#include "engine/engine-internal.h"

#define SLIDING_IDX_BITS  38
#define SLIDING_IDX_MASK  ((UINT64_C(1) << SLIDING_IDX_BITS) - 1)
#define SLIDING_LO_BITS   19
#define SLIDING_LO_MASK   ((UINT64_C(1) << SLIDING_LO_BITS) - 1)
#define SLIDING_CNT_MASK  TALLY_SLIDING_MAX_COUNT

static inline uint64_t sat_add(uint64_t a, uint64_t b, uint64_t cap)
{
    return (a > cap || b > cap - a) ? cap : a + b;
}

static inline uint64_t sat_mul(uint64_t a, uint64_t b, uint64_t cap)
{
    unsigned __int128 p = (unsigned __int128)a * b;
    return p > cap ? cap : (uint64_t)p;
}

static inline uint64_t sub0(uint64_t a, uint64_t b)
{
    return a > b ? a - b : 0;
}

static inline uint64_t clamp_time(__int128 t)
{
    if (t < 0)
        return 0;
    if (t > (__int128)TALLY__TIME_MAX)
        return TALLY__TIME_MAX;
    return (uint64_t)t;
}

/* ---- Fixed and calendar windows: {mark | used, window start} --------------- */

/* Other engines' cost counted in window @win. */
static inline uint64_t remote_in(const tally__remote *rem, uint64_t win)
{
    return rem && rem->count && rem->win == win ? rem->count : 0;
}

static inline __attribute__((always_inline)) void step_window(const tally__limit *l, tally__state cur,
                                                              uint64_t now, uint64_t cost, unsigned how,
                                                              const tally__remote *rem, tally__step *out)
{
    const tally_limit *s = &l->spec;
    bool empty = tally__state_is_empty(cur);
    uint64_t start = cur.w1, end;
    bool same;

    if (!empty && now < start)
        now = start;                          /* time never runs backwards in a key */
    if (s->algo == TALLY_FIXED_WINDOW) {
        same = !empty && now - start < s->period_ns;
        if (!same)                            /* aligned: every engine agrees on the window */
            start = l->aligned ? now - now % s->period_ns : now;
        end = start + s->period_ns;           /* start <= 2^63, period <= 2^62: no wrap */
    } else {
        uint64_t b = tally__calendar_start(s->unit, s->utc_offset_s, now);
        same = !empty && b == start;
        start = b;
        end = tally__calendar_next(s->unit, s->utc_offset_s, start);
    }

    uint64_t used = same ? cur.w0 & ~TALLY__MARK : 0;
    uint64_t mark = same ? cur.w0 & TALLY__MARK : 0;
    uint64_t others = remote_in(rem, start);
    /* used <= TALLY_MAX_COUNT: without others, seen is used */
    uint64_t seen = others ? sat_add(used, others, TALLY_MAX_COUNT) : used;
    bool fits = seen <= s->max && cost <= s->max - seen;
    unsigned add = how & 3;
    /* a cost that fits lands at most at max: no saturation */
    uint64_t new_used = fits && add != TALLY__ADD_NEVER ? used + cost
                      : add == TALLY__ADD_ALWAYS ? sat_add(used, cost, TALLY_MAX_COUNT) : used;
    uint64_t new_seen = others ? sat_add(new_used, others, TALLY_MAX_COUNT) : new_used;

    out->added = new_used - used;
    out->win = start;
    out->used = new_seen;
    out->fits = fits;
    out->first = !fits && !mark && !(how & TALLY__NO_MARK);
    out->changed = new_used != used || out->first;
    if (out->changed) {
        out->next.w0 = new_used | mark | (out->first ? TALLY__MARK : 0);
        out->next.w1 = start;
    } else {
        out->next = cur;
    }
    out->remaining = sub0(s->max, new_seen);
    out->reset_after_ns = new_seen ? end - now : 0;
    if (fits)
        out->retry_after_ns = 0;
    else if (cost > s->max)
        out->retry_after_ns = TALLY_NEVER;
    else
        out->retry_after_ns = end - now;
}

/* ---- Sliding window: {mark | cur | idx_hi, prev | idx_lo} ----------------- */

typedef struct sliding {
    uint64_t mark, cur, prev, idx;
} sliding;

static inline sliding sliding_decode(tally__state s)
{
    sliding v;
    v.mark = s.w0 & TALLY__MARK;
    v.cur = (s.w0 >> SLIDING_LO_BITS) & SLIDING_CNT_MASK;
    v.prev = (s.w1 >> SLIDING_LO_BITS) & SLIDING_CNT_MASK;
    v.idx = ((s.w0 & SLIDING_LO_MASK) << SLIDING_LO_BITS) | (s.w1 & SLIDING_LO_MASK);
    return v;
}

static inline tally__state sliding_encode(sliding v)
{
    uint64_t idx = v.idx & SLIDING_IDX_MASK;
    tally__state s = {
        v.mark | (v.cur << SLIDING_LO_BITS) | (idx >> SLIDING_LO_BITS),
        (v.prev << SLIDING_LO_BITS) | (idx & SLIDING_LO_MASK),
    };
    return s;
}

/*
 * The full window number of a stored state, given the window number at @now.
 * The state keeps it modulo 2^38; a state "ahead" of now (time ran backwards)
 * is told apart by the half-range rule.
 */
static inline uint64_t sliding_full_idx(uint64_t stored, uint64_t idx_now)
{
    uint64_t d = (idx_now - stored) & SLIDING_IDX_MASK;
    if (d < (UINT64_C(1) << (SLIDING_IDX_BITS - 1)))
        return idx_now - d;
    return idx_now + ((SLIDING_IDX_MASK + 1) - d);
}

/* Largest m with floor(prev * m / P) <= r, i.e. ceil((r + 1) * P / prev) - 1. */
static inline uint64_t sliding_slack(uint64_t r, uint64_t prev, uint64_t period)
{
    unsigned __int128 x = ((unsigned __int128)r + 1) * period;
    unsigned __int128 m = (x + prev - 1) / prev - 1;
    return m > UINT64_MAX ? UINT64_MAX : (uint64_t)m;
}

static inline void step_sliding(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                                unsigned how, const tally__remote *rem, tally__step *out)
{
    const uint64_t P = l->spec.period_ns, max = l->spec.max;
    uint64_t idx = now / P;
    sliding v = { 0, 0, 0, idx };

    if (!tally__state_is_empty(cur)) {
        v = sliding_decode(cur);
        uint64_t full = sliding_full_idx(v.idx, idx);
        if (full > idx) {                     /* time ran backwards: use the state's window */
            idx = full;
            now = idx * P;
        }
        uint64_t d = idx - full;
        if (d >= 1) {
            v.prev = d == 1 ? v.cur : 0;
            v.cur = 0;
            v.mark = 0;
        }
        v.idx = idx;
    }

    uint64_t end = (uint64_t)clamp_time((__int128)(idx + 1) * P);
    uint64_t oc = remote_in(rem, idx * P);
    uint64_t prev = v.prev + (idx ? remote_in(rem, (idx - 1) * P) : 0);
    uint64_t weighted = (uint64_t)(((unsigned __int128)prev * (end - now)) / P);
    uint64_t est = v.cur + oc + weighted;
    bool fits = est <= max && cost <= max - est;
    unsigned add = how & 3;
    bool consume = add == TALLY__ADD_ALWAYS || (add == TALLY__ADD_IF_FITS && fits);
    uint64_t old_cur = v.cur;

    if (consume)
        v.cur = sat_add(v.cur, cost, SLIDING_CNT_MASK);
    out->added = v.cur - old_cur;
    out->win = idx * P;
    out->fits = fits;
    out->first = !fits && !v.mark && !(how & TALLY__NO_MARK);
    out->changed = v.cur != old_cur || out->first;
    if (out->first)
        v.mark = TALLY__MARK;
    out->next = out->changed ? sliding_encode(v) : cur;

    uint64_t now_cur = v.cur + oc;            /* this window, every engine */
    out->used = now_cur + weighted;
    out->remaining = sub0(max, now_cur + weighted);
    if (now_cur)
        out->reset_after_ns = (uint64_t)clamp_time((__int128)(idx + 2) * P - now);
    else
        out->reset_after_ns = prev ? end - now : 0;

    if (fits) {
        out->retry_after_ns = 0;
    } else if (cost > max) {
        out->retry_after_ns = TALLY_NEVER;
    } else if (now_cur <= max - cost) {
        /* This window still has room once enough of prev has slid out. */
        uint64_t m = sliding_slack(max - now_cur - cost, prev, P);
        out->retry_after_ns = sub0(end - now, m);
    } else {
        /* Wait for the next window, where cur becomes the weighted previous. */
        uint64_t m = sliding_slack(max - cost, now_cur, P);
        out->retry_after_ns = (end - now) + sub0(P, m);
    }
}

/* ---- GCRA: {mark | last hit, time in use as of the last hit} ---------------- */

/*
 * The theoretical arrival time is kept relative to the last hit: w1 =
 * max(tat - last, 0), the part of the tolerance in use then. A hit at now <= INT64_MAX that fits
 * leaves at most tau <= 2^62 in use, which a TAT stored as a time could not
 * hold near the top of the range (now + tau > INT64_MAX); and every quantity
 * the decision compares is a span, so nothing wraps. Only ADD_ALWAYS can push
 * the span past tau; it saturates at TALLY__TIME_MAX, which is above tau and
 * keeps denying for at least TALLY__TIME_MAX - tau >= 2^62 - 1 ns.
 */
static inline void step_gcra(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                             unsigned how, tally__step *out)
{
    const uint64_t T = l->emission_ns, tau = l->tau_ns;
    uint64_t mark = cur.w0 & TALLY__MARK, last = cur.w0 & ~TALLY__MARK, held = cur.w1;

    if (now < last)
        now = last;
    uint64_t elapsed = now - last;
    if (held && held <= elapsed)
        mark = 0;                             /* drained since the last write: a new episode */
    uint64_t ttl = sub0(held, elapsed);       /* in use at now: max(tat - now, 0) */
    uint64_t inc = sat_mul(cost, T, TALLY__TIME_MAX);
    uint64_t new_ttl = sat_add(ttl, inc, TALLY__TIME_MAX);
    bool fits = new_ttl <= tau;
    unsigned add = how & 3;
    bool consume = inc && (add == TALLY__ADD_ALWAYS || (add == TALLY__ADD_IF_FITS && fits));
    uint64_t after = consume ? new_ttl : ttl;

    out->added = 0;                           /* GCRA stays local to this engine */
    out->win = 0;
    out->fits = fits;
    out->first = !fits && !mark && !(how & TALLY__NO_MARK);
    out->changed = consume || out->first;
    if (out->changed) {
        out->next.w0 = mark | (out->first ? TALLY__MARK : 0) | now;
        out->next.w1 = after;                 /* the same TAT, now counted from now */
    } else {
        out->next = cur;
    }

    out->used = after / T + (after % T != 0);
    out->remaining = after <= tau ? (tau - after) / T : 0;
    out->reset_after_ns = after;
    if (fits)
        out->retry_after_ns = 0;
    else if (inc > tau)
        out->retry_after_ns = TALLY_NEVER;
    else
        out->retry_after_ns = sub0(after, tau - inc);   /* after + inc - tau, without a wrap */
}

/* ---- Concurrency: {mark | last acquire, expiries | holders} ----------------- */

#define CONC_HOLDERS_MASK TALLY_CONCURRENCY_MAX_COUNT
#define CONC_EPOCH_MASK   ((UINT64_C(1) << 31) - 1)

/*
 * Every hold of a key expires together a lease after its latest acquire:
 * one time and one count are exact in two words, where a time per hold would
 * not fit. The expiry count tells a take-back whether the holds it would
 * give back are still the ones its hit added.
 */
static inline void step_concurrency(const tally__limit *l, tally__state cur, uint64_t now,
                                    uint64_t cost, unsigned how, tally__step *out)
{
    const uint64_t max = l->spec.max, lease = l->spec.period_ns;
    uint64_t mark = cur.w0 & TALLY__MARK, last = cur.w0 & ~TALLY__MARK;
    uint64_t holders = cur.w1 & CONC_HOLDERS_MASK, epoch = cur.w1 >> 32;

    if (now < last)
        now = last;
    if (holders && now - last >= lease) {
        holders = 0;
        epoch = (epoch + 1) & CONC_EPOCH_MASK;
    }
    if (!holders)
        mark = 0;                             /* nothing held: a new episode */
    bool fits = holders <= max && cost <= max - holders;
    unsigned add = how & 3;
    bool consume = cost && (add == TALLY__ADD_ALWAYS || (add == TALLY__ADD_IF_FITS && fits));
    uint64_t after = consume ? sat_add(holders, cost, CONC_HOLDERS_MASK) : holders;
    uint64_t at = consume ? now : last;

    out->added = 0;                           /* holds are this engine's own */
    out->win = 0;
    out->fits = fits;
    out->first = !fits && !mark && !(how & TALLY__NO_MARK);
    out->changed = consume || out->first;
    if (out->changed) {
        out->next.w0 = mark | (out->first ? TALLY__MARK : 0) | at;
        out->next.w1 = epoch << 32 | after;
    } else {
        out->next = cur;
    }
    out->used = after;
    out->remaining = sub0(max, after);
    out->reset_after_ns = after ? at + lease - now : 0;   /* now - at < lease: no wrap */
    if (fits)
        out->retry_after_ns = 0;
    else if (cost > max)
        out->retry_after_ns = TALLY_NEVER;
    else
        out->retry_after_ns = out->reset_after_ns;        /* a release may come sooner */
}

/* ---- Dispatch ------------------------------------------------------------- */

static inline __attribute__((always_inline)) void algo_step(const tally__limit *l, tally__state cur,
                                                            uint64_t now, uint64_t cost, unsigned how,
                                                            const tally__remote *rem, tally__step *out)
{
    /* fixed and calendar (0 and 1) on one compare: the common limit of the hot path */
    if (l->spec.algo <= TALLY_CALENDAR_WINDOW) {
        step_window(l, cur, now, cost, how, rem, out);
        return;
    }
    switch (l->spec.algo) {
    case TALLY_SLIDING_WINDOW: step_sliding(l, cur, now, cost, how, rem, out); break;
    case TALLY_GCRA:           step_gcra(l, cur, now, cost, how, out); break;
    default:                   step_concurrency(l, cur, now, cost, how, out); break;
    }
}

#endif /* TALLY_ALGO_STEP_H */
