/* Private declarations of src/coalesce.c, exposed for its unit tests. Not installed. */
#ifndef TALLY_COALESCE_INTERNAL_H
#define TALLY_COALESCE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include <stdatomic.h>

#include "tally.h"

/*
 * The breaker word:
 *   bits 63..62  state (tally_breaker_state)
 *   bits 61..42  consecutive failures (saturating at TALLY_BREAKER_MAX_FAILURES)
 *   bits 41..0   when it last opened, in ms since the epoch, rounded up (to 2109)
 * The opening time strictly grows with each opening, so it also names the
 * closed period a call entered in: a ticket is the word the call saw (or, for
 * the probe, the half-open word it installed).
 */
#define TALLY__BRK_STATE_SHIFT 62
#define TALLY__BRK_FAIL_SHIFT  42
#define TALLY__BRK_FAIL_MASK   ((uint64_t)TALLY_BREAKER_MAX_FAILURES)
#define TALLY__BRK_MS_MASK     ((UINT64_C(1) << TALLY__BRK_FAIL_SHIFT) - 1)

_Static_assert(TALLY__BRK_FAIL_MASK << TALLY__BRK_FAIL_SHIFT >> TALLY__BRK_FAIL_SHIFT ==
                   TALLY__BRK_FAIL_MASK &&
               TALLY__BRK_FAIL_SHIFT + 20 == TALLY__BRK_STATE_SHIFT,
               "breaker word fields tile 64 bits");

static inline uint64_t tally__brk_word(tally_breaker_state st, uint64_t failures, uint64_t opened_ms)
{
    return (uint64_t)st << TALLY__BRK_STATE_SHIFT | failures << TALLY__BRK_FAIL_SHIFT | opened_ms;
}
static inline tally_breaker_state tally__brk_state(uint64_t w)
{
    return (tally_breaker_state)(w >> TALLY__BRK_STATE_SHIFT);
}
static inline uint32_t tally__brk_failures(uint64_t w)
{
    return (uint32_t)(w >> TALLY__BRK_FAIL_SHIFT & TALLY__BRK_FAIL_MASK);
}
static inline uint64_t tally__brk_opened_ms(uint64_t w) { return w & TALLY__BRK_MS_MASK; }

typedef struct tally__breaker_cfg {
    uint32_t failures_to_open;
    uint64_t open_ns;
} tally__breaker_cfg;

/*
 * The pure transitions, word x now -> word; the CAS loop around them is in
 * coalesce.c. enter: return 0 (go ahead; *ticket is the ticket, *next the
 * word to store, equal to @w when nothing changes) or TALLY_EOPEN.
 */
int tally__breaker_enter_step(const tally__breaker_cfg *cfg, uint64_t w, uint64_t now_ns,
                              uint64_t *next, uint64_t *ticket);
/* leave: the word after the report of @ticket's call (@w when it changes nothing). */
uint64_t tally__breaker_leave_step(const tally__breaker_cfg *cfg, uint64_t w, uint64_t ticket,
                                   bool success, uint64_t now_ns);

/* The breaker itself, embedded in a coalescer (breaker.c). */
struct tally_breaker {
    _Atomic uint64_t   word;
    tally__breaker_cfg cfg;
};

int  tally__breaker_check(const tally_breaker_options *o);
void tally__breaker_init(tally_breaker *b, const tally_breaker_options *o);
int  tally__breaker_enter(tally_breaker *b, uint64_t now_ns, tally_breaker_ticket *ticket);
void tally__breaker_leave(tally_breaker *b, tally_breaker_ticket ticket, bool success, uint64_t now_ns);

#endif /* TALLY_COALESCE_INTERNAL_H */
