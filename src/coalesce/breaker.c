/*
 * The circuit breaker (closed, open, half-open): one 64-bit word changed by
 * CAS from the exact word a pure step was computed from, so exactly one
 * caller moves it from open to half-open and becomes the probe. Used alone
 * (tally_breaker_*) and inside the coalescer (coalesce.c).
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "coalesce/coalesce-internal.h"
#include "core/clock.h"

/* ---- Circuit breaker: pure steps ---------------------------------------- */

/* Opening time in ms, rounded up so that the open period never ends early,
   and past the previous one so that each opening names a new period. */
static uint64_t opening_ms(uint64_t now_ns, uint64_t prev_ms)
{
    uint64_t ms = now_ns / TALLY__NS_PER_MS + (now_ns % TALLY__NS_PER_MS != 0);
    if (ms <= prev_ms)
        ms = prev_ms + 1;
    return ms > TALLY__BRK_MS_MASK ? TALLY__BRK_MS_MASK : ms;
}

int tally__breaker_enter_step(const tally__breaker_cfg *cfg, uint64_t w, uint64_t now_ns,
                              uint64_t *next, uint64_t *ticket)
{
    *next = w;
    switch (tally__brk_state(w)) {
    case TALLY_BREAKER_CLOSED:
        *ticket = w;
        return 0;
    case TALLY_BREAKER_OPEN:
        if (now_ns < tally__brk_opened_ms(w) * TALLY__NS_PER_MS + cfg->open_ns)
            return TALLY_EOPEN;
        *next = tally__brk_word(TALLY_BREAKER_HALF_OPEN, tally__brk_failures(w),
                                tally__brk_opened_ms(w));
        *ticket = *next;
        return 0;
    default:
        return TALLY_EOPEN;
    }
}

uint64_t tally__breaker_leave_step(const tally__breaker_cfg *cfg, uint64_t w, uint64_t ticket,
                                   bool success, uint64_t now_ns)
{
    uint64_t f = tally__brk_failures(w);
    uint64_t ms = tally__brk_opened_ms(w);

    switch (tally__brk_state(ticket)) {
    case TALLY_BREAKER_CLOSED:
        /* only a report from the closed period it entered in counts */
        if (tally__brk_state(w) != TALLY_BREAKER_CLOSED || ms != tally__brk_opened_ms(ticket))
            return w;
        if (success)
            return f == 0 ? w : tally__brk_word(TALLY_BREAKER_CLOSED, 0, ms);
        f += f < TALLY__BRK_FAIL_MASK;
        if (f < cfg->failures_to_open)
            return tally__brk_word(TALLY_BREAKER_CLOSED, f, ms);
        return tally__brk_word(TALLY_BREAKER_OPEN, f, opening_ms(now_ns, ms));
    case TALLY_BREAKER_HALF_OPEN:
        /* only the probe holds the half-open word, and nothing else moves it */
        if (w != ticket)
            return w;
        if (success)
            return tally__brk_word(TALLY_BREAKER_CLOSED, 0, ms);
        f += f < TALLY__BRK_FAIL_MASK;
        return tally__brk_word(TALLY_BREAKER_OPEN, f, opening_ms(now_ns, ms));
    default:
        return w;
    }
}

/* ---- Circuit breaker: the word and its CAS loops ------------------------ */

int tally__breaker_check(const tally_breaker_options *o)
{
    if (o->failures_to_open == 0 || o->failures_to_open > TALLY_BREAKER_MAX_FAILURES)
        return TALLY_EINVAL;
    if (o->open_ns == 0 || o->open_ns > TALLY_MAX_PERIOD_NS)
        return TALLY_EINVAL;
    return 0;
}

void tally__breaker_init(tally_breaker *b, const tally_breaker_options *o)
{
    atomic_init(&b->word, tally__brk_word(TALLY_BREAKER_CLOSED, 0, 0));
    b->cfg.failures_to_open = o->failures_to_open;
    b->cfg.open_ns = o->open_ns;
}

int tally__breaker_enter(tally_breaker *b, uint64_t now_ns, tally_breaker_ticket *ticket)
{
    /* acquire: a probe's decision follows the report that opened the
       breaker; paired with the release CAS of tally__breaker_leave() */
    uint64_t w = atomic_load_explicit(&b->word, memory_order_acquire);
    for (;;) {
        uint64_t next;
        int rc = tally__breaker_enter_step(&b->cfg, w, now_ns, &next, ticket);
        if (rc || next == w)
            return rc;
        /* acq_rel: paired with the CAS of tally__breaker_leave(), as above */
        if (atomic_compare_exchange_weak_explicit(&b->word, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return 0;
    }
}

void tally__breaker_leave(tally_breaker *b, tally_breaker_ticket ticket, bool success,
                          uint64_t now_ns)
{
    /* acquire: paired with the release of the last CAS on the word, in
       tally__breaker_enter() or here */
    uint64_t w = atomic_load_explicit(&b->word, memory_order_acquire);
    for (;;) {
        uint64_t next = tally__breaker_leave_step(&b->cfg, w, ticket, success, now_ns);
        if (next == w)
            return;
        /* release: whoever sees the new state sees the reported call's
           effects; paired with the acquires of tally__breaker_enter() */
        if (atomic_compare_exchange_weak_explicit(&b->word, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return;
    }
}

static void breaker_view(uint64_t w, tally_breaker_view *out)
{
    out->state = tally__brk_state(w);
    out->failures = tally__brk_failures(w);
    out->opened_at_ns = tally__brk_opened_ms(w) * TALLY__NS_PER_MS;
}

int tally_breaker_new(const tally_breaker_options *opts, tally_breaker **out)
{
    if (!opts || !out || tally__breaker_check(opts))
        return TALLY_EINVAL;
    tally_breaker *b = malloc(sizeof(*b));
    if (!b)
        return TALLY_ENOMEM;
    tally__breaker_init(b, opts);
    *out = b;
    return 0;
}

void tally_breaker_free(tally_breaker *b)
{
    free(b);
}

int tally_breaker_enter_at(tally_breaker *b, uint64_t now_ns, tally_breaker_ticket *ticket)
{
    if (!b || !ticket || now_ns > TALLY__TIME_MAX)
        return TALLY_EINVAL;
    return tally__breaker_enter(b, now_ns, ticket);
}

int tally_breaker_leave_at(tally_breaker *b, tally_breaker_ticket ticket, bool success,
                           uint64_t now_ns)
{
    if (!b || now_ns > TALLY__TIME_MAX)
        return TALLY_EINVAL;
    tally__breaker_leave(b, ticket, success, now_ns);
    return 0;
}

int tally_breaker_enter(tally_breaker *b, tally_breaker_ticket *ticket)
{
    return tally_breaker_enter_at(b, tally_now_ns(), ticket);
}

int tally_breaker_leave(tally_breaker *b, tally_breaker_ticket ticket, bool success)
{
    return tally_breaker_leave_at(b, ticket, success, tally_now_ns());
}

int tally_breaker_read(const tally_breaker *b, tally_breaker_view *out)
{
    if (!b || !out)
        return TALLY_EINVAL;
    /* acquire: pairs with the release of the CAS that wrote the word */
    breaker_view(atomic_load_explicit(&((tally_breaker *)b)->word, memory_order_acquire), out);
    return 0;
}

