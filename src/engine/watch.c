/*
 * The rejection watch on the hot path: a denial feeds the key's sliding
 * window of denied cost, and the call that crosses the threshold flags the
 * key. The operator's views of it (flags, episodes, clearing) are ops/ops.c.
 *
 * Ordering and progress guarantees:
 *  1. A denial feeds the watch with one 16-byte CAS loop on a sliding window
 *     of denied cost (the algorithm of algo-step.h) and one fetch_add: no
 *     lock on the hot path.
 *  2. The flag is a word set once by a CAS from 0: of any number of calls that
 *     cross the threshold together, exactly one sets it and hands a note to
 *     the flusher.
 */
#include "engine/algo-step.h"

void tally__watch_feed(tally_engine *e, tally__policy *p, size_t idx, tally__digest d,
                       const void *key, size_t key_len, uint64_t cost, uint64_t now)
{
    /* acquire: paired with the release store in tally_watch_set() (ops/ops.c) */
    tally__watch_slot *w = &atomic_load_explicit(&p->table.watch, memory_order_acquire)[idx];
    tally__step r;

    for (;;) {
        tally__state cur = tally__state_load(&w->denied);
        algo_step(&p->watch_rule, cur, now, cost, TALLY__ADD_ALWAYS | TALLY__NO_MARK, NULL, &r);
        /* an unchanged step too is validated by its CAS (hit.c, guarantee 2) */
        if (tally__state_cas(&w->denied, cur, r.changed ? r.next : cur))
            break;
    }
    atomic_fetch_add_explicit(&w->acc, cost, memory_order_relaxed);
    /* relaxed: a hint; the CAS below decides */
    if (r.used < p->watch_rule.spec.max || atomic_load_explicit(&w->flag_at, memory_order_relaxed))
        return;
    uint64_t expect = 0, at = now ? now : 1;
    /* the one CAS that flags the key (guarantee 2); acq_rel: paired with the
       acquire loads of flag_at in kill_expired() (table.c) and scan_in_rcu()
       (ops/ops.c), and with the CAS of clear_in_rcu() (ops/ops.c) */
    if (!atomic_compare_exchange_strong_explicit(&w->flag_at, &expect, at, memory_order_acq_rel,
                                                 memory_order_relaxed))
        return;
    atomic_store_explicit(&w->flag_amount, r.used, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->flags_set, 1, memory_order_relaxed);
    tally__note *n = tally__note_new(TALLY__NOTE_FLAG, p->table.policy, 0, d,
                                     e->opts.digest_only ? NULL : key, key_len);
    if (n) {
        n->win = at;
        n->delta = r.used;
        tally__note_push(&e->notes, n);
    }
}

