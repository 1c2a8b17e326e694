/*
 * The hand-off stack: deltas that can no longer stay in their slot, events
 * and flags, pushed by any thread (lock-free, MPSC) and taken all at once by
 * the flusher; and the prefetch of a key's global count, which wakes the
 * flusher once per batch of prefetches it takes. Push allocates; a note that
 * cannot be allocated is an event or a prefetch lost, or a cost counted in
 * lost (never silently dropped).
 */
#include <stdlib.h>
#include <string.h>

#include "core/tsan.h"
#include "engine/engine-internal.h"

void tally__note_push(tally__notes *s, tally__note *n)
{
    tally__note *head = atomic_load_explicit(&s->head, memory_order_relaxed);
    tally__tsan_release(n);
    do {
        n->next = head;
        /* release: the note's contents before it is reachable; paired with
           the acquire exchange in tally__notes_take() */
    } while (!atomic_compare_exchange_weak_explicit(&s->head, &head, n, memory_order_release,
                                                    memory_order_relaxed));
}

tally__note *tally__notes_take(tally__notes *s)
{
    /* acquire: paired with the release CAS of tally__note_push() */
    tally__note *list = atomic_exchange_explicit(&s->head, NULL, memory_order_acquire);
    for (tally__note *n = list; n; n = n->next)
        tally__tsan_acquire(n);
    return list;
}

void tally__notes_drain(tally__notes *s)
{
    for (tally__note *n = tally__notes_take(s), *next; n; n = next) {
        next = n->next;
        free(n);
    }
}

tally__note *tally__note_new(uint8_t kind, uint32_t policy, unsigned limit, tally__digest d,
                             const void *key, size_t key_len)
{
    if (!key) {
        key = &d;
        key_len = sizeof(d);
    }
    tally__note *n = malloc(sizeof(*n) + key_len);
    if (!n)
        return NULL;
    memset(n, 0, sizeof(*n));
    n->kind = kind;
    n->policy = policy;
    n->limit = limit;
    n->digest = d;
    n->key_len = key_len;
    memcpy(n->key, key, key_len);
    return n;
}

void tally__spill(tally__notes *s, uint32_t policy, unsigned limit, tally__digest d,
                  uint64_t win, uint64_t delta, const void *key, size_t key_len)
{
    tally__note *n = tally__note_new(TALLY__NOTE_DELTA, policy, limit, d, key, key_len);
    if (!n) {
        /* Nowhere to keep it: count it as lost. Memory exhaustion is the one
           case where a delta can leave unpushed. */
        atomic_fetch_add_explicit(&s->lost, delta, memory_order_relaxed);
        return;
    }
    n->win = win;
    n->delta = delta;
    tally__note_push(s, n);
}

void tally__prefetch(tally_engine *e, uint32_t policy, tally__digest d)
{
    /* acquire: paired with the release store in tally__flusher_start(): the
       semaphore is initialised; the read-side section keeps it alive
       (tally_flusher_stop() clears it and waits for a grace period) */
    sem_t *wake = atomic_load_explicit(&e->wake, memory_order_acquire);
    if (!wake)
        return;                               /* no store: nothing to learn */
    /* the digest names the key's counts in the store: no key bytes */
    tally__note *n = tally__note_new(TALLY__NOTE_PREFETCH, policy, 0, d, NULL, 0);
    if (!n)
        return;                               /* the key learns its count at the next flush */
    tally__note_push(&e->notes, n);
    /* acq_rel: the push before the flag, so that a flusher that clears a
       flag we found set takes our note; paired with the acquire exchange in
       the flusher (sync/flusher.c, take_notes) */
    if (!atomic_exchange_explicit(&e->prefetch_due, true, memory_order_acq_rel))
        sem_post(wake);
}
