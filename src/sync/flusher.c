/*
 * The flusher: a thread per engine that takes the unflushed cost of every key
 * and pushes it through its sink (Redis, sync/redis.c, or none) to the
 * on_deltas callback, learns the global totals from the sink, and delivers
 * first_exceeded events. It knows no store: sync/sync-internal.h is the sink
 * interface.
 *
 * Ordering and progress guarantees:
 *  1. The hot path never waits for the flusher: it adds cost to a slot's
 *     {window, delta} pair with one 16-byte CAS, and hands a delta of an
 *     older window, or an event, to a lock-free stack (malloc, push).
 *  2. The flusher takes a delta with a CAS {W, d} -> {W, 0} inside an RCU
 *     read-side section and keeps it in its own memory until every sink
 *     acknowledged it: taken is not gone. A slot is reclaimed only when its
 *     delta is 0, and a delta added after that check is spilled to the stack
 *     after the grace period (table.c).
 *  3. A store sink applies each batch once, however often it is sent
 *     (sync/redis.c, guarantee 3): a batch carries the next sequence number
 *     of its bucket, and a bucket forms no batch while its oldest batch of
 *     unknown outcome would fall TALLY__SEQ_WINDOW numbers behind.
 *  4. The other engines' count of a key is written by the flusher alone into
 *     the slot's {rwin, remote} pair, with rwin as a seqlock sequence.
 *  5. No RCU read-side section is held across I/O.
 *  6. A reply the sink cannot match, or an error, never acknowledges cost
 *     that did not reach the store, and what is sent per flush stays bounded
 *     (sync/redis.c, guarantee 6).
 *  7. Every flush also reads the global count in the current window (MGET) of
 *     each live key hit in this window or the one before, whether or not this
 *     engine pushed anything for it, so an idle engine's view of the others is
 *     at most one flush old, also at the start of a window.
 *  8. A LIVE key evicted by TALLY_EVICT_LRU leaves the flusher its count in
 *     each shared window (a TALLY__NOTE_FORGET, engine/table.c guarantee 9),
 *     which no slot holds any more. The entry of (key, window) sums them in
 *     forgot, and every others' count written for the key in that window,
 *     after a batch's reply or a read-back alike, is the store's total less
 *     this engine's acknowledged cost, plus forgot. The evicted slots' cost
 *     is in the total once it is acknowledged and in acked alike, so each
 *     counts once in the key's later slots: a second eviction adds the second
 *     slot's own count, a take of a slot's delta that races the eviction moves
 *     total and acked together, and a reset before the eviction left the slot
 *     only what it counted since. forgot goes with its entry at the window's end.
 *  9. A key that takes a slot while a store is on hands the flusher a
 *     TALLY__NOTE_PREFETCH (engine/notes.c), and the first such note since
 *     the flusher last took the notes posts its semaphore: one post per
 *     batch of prefetches, not per key. Woken before its interval is over,
 *     the flusher takes the notes and reads the totals of those keys' shared
 *     windows in one exchange, with no batch (sink prefetch), into their
 *     slots as a read-back does (guarantee 7: the same others' count, total
 *     less acknowledged cost plus forgot, skipped while a batch of the key is
 *     in flight, so a prefetch and a flush never count anything twice). It
 *     writes nothing to the store, and a key without a slot by then is
 *     skipped. The round of a flush is not moved by a prefetch.
 */
#include <errno.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdio.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>

#include "sync/sync-internal.h"
#include "core/clock.h"
#include "core/rcu.h"

/* ---- The flusher's own bookkeeping --------------------------------------- */

static uint64_t hash_entry(uint32_t policy, unsigned limit, tally__digest d, uint64_t win)
{
    uint64_t h = d.lo ^ (d.hi * UINT64_C(0x9e3779b97f4a7c15)) ^ win * UINT64_C(0xc2b2ae3d27d4eb4f);
    h ^= ((uint64_t)policy << 32 | limit) * UINT64_C(0x165667b19e3779f9);
    return h ^ (h >> 29);
}

static int map_grow(struct tally__flusher *f)
{
    size_t size = f->map_size ? f->map_size * 2 : 1024;
    entry **m = calloc(size, sizeof(*m));
    if (!m)
        return TALLY_ENOMEM;
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry *x = f->map[i], *next; x; x = next) {
            next = x->next;
            size_t b = hash_entry(x->policy, x->limit, x->digest, x->win) & (size - 1);
            x->next = m[b];
            m[b] = x;
        }
    }
    free(f->map);
    f->map = m;
    f->map_size = size;
    return 0;
}

static entry *map_get(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                      uint64_t win, const void *key, size_t key_len)
{
    if (f->map_count >= f->map_size && map_grow(f))
        return NULL;
    entry *x = tally__sync_find(f, policy, limit, d, win);
    if (x)
        return x;
    size_t b = hash_entry(policy, limit, d, win) & (f->map_size - 1);
    x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    if (!key) {
        key = &d;
        key_len = sizeof(d);
    }
    x->key = malloc(key_len);
    if (!x->key) {
        free(x);
        return NULL;
    }
    memcpy(x->key, key, key_len);
    x->key_len = key_len;
    x->policy = policy;
    x->limit = limit;
    x->digest = d;
    x->win = win;
    x->next = f->map[b];
    f->map[b] = x;
    f->map_count++;
    return x;
}

/* Keep a taken delta; on failure put it back on the stack (never drop it). */
static void keep(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                 uint64_t win, uint64_t delta, uint64_t local_total, const void *key, size_t key_len)
{
    entry *x = map_get(f, policy, limit, d, win, key, key_len);
    if (!x) {
        tally__spill(&f->e->notes, policy, limit, d, win, delta, key, key_len);
        return;
    }
    tally__policy *p = tally__policy_get(f->e, policy);
    tally__ops_usage_add(p, limit, delta);
    x->fresh += delta;
    if (local_total > x->local_total)
        x->local_total = local_total;
    x->end_ns = tally__sync_window_end(&p->limits[limit], win);
}

/* The count of an evicted slot (TALLY__NOTE_FORGET), which no slot holds any
   more: others' cost to the key's later slots in its window (guarantee 8).
   Without memory for its entry the note waits on the stack for the next
   flush. */
static void forget(struct tally__flusher *f, tally__note *n, uint64_t now)
{
    tally__policy *p = tally__policy_get(f->e, n->policy);
    uint64_t end = tally__sync_window_end(&p->limits[n->limit], n->win);
    if (!f->redis_on || end <= now) {
        free(n);                              /* no others' count to give, or its window is over */
        return;
    }
    entry *x = map_get(f, n->policy, n->limit, n->digest, n->win, n->key, n->key_len);
    if (!x) {
        tally__note_push(&f->e->notes, n);
        return;
    }
    x->forgot += n->delta;
    if (end > x->end_ns)
        x->end_ns = end;
    /* a slot of the key that is already back learns it now, not only when
       Redis next tells its total */
    if (x->told)
        tally__sync_store_remote(f, x, x->others);
    free(n);
}

/* ---- Collecting ----------------------------------------------------------- */

typedef struct collect_arg {
    struct tally__flusher *f;
    tally__policy         *p;
    size_t                 from, to;
    uint64_t               now;
    bool                   refresh;   /* Redis is on: note live keys to read back */
} collect_arg;

/* The window every engine agrees on at @now and the one before it, or false
   when the limit's windows are this engine's own (GCRA, fixed windows not
   TALLY_ALIGNED). */
static bool shared_window(const tally__limit *l, uint64_t now, uint64_t *win, uint64_t *prev)
{
    const tally_limit *s = &l->spec;
    switch (s->algo) {
    case TALLY_CALENDAR_WINDOW:
        *win = tally__calendar_start(s->unit, s->utc_offset_s, now);
        *prev = tally__calendar_start(s->unit, s->utc_offset_s, *win ? *win - 1 : 0);
        return true;
    case TALLY_SLIDING_WINDOW:
    case TALLY_FIXED_WINDOW:
        *win = now - now % s->period_ns;
        *prev = *win >= s->period_ns ? *win - s->period_ns : 0;
        return s->algo == TALLY_SLIDING_WINDOW || l->aligned;
    default:
        return false;
    }
}

static void note_refresh(struct tally__flusher *f, uint32_t policy, unsigned limit,
                         tally__digest d, uint64_t win)
{
    if (f->refresh_n == f->refresh_cap) {
        size_t cap = f->refresh_cap ? 2 * f->refresh_cap : 1024;
        refresh *r = realloc(f->refresh, cap * sizeof(*r));
        if (!r)
            return;                           /* the key's view stays one flush older */
        f->refresh = r;
        f->refresh_cap = cap;
    }
    f->refresh[f->refresh_n++] = (refresh){ policy, limit, d, win };
}

/* A key new to the engine: its count in the current window of every shared
   limit is read (guarantee 9). */
static void note_prefetch(struct tally__flusher *f, const tally__note *n, uint64_t now)
{
    tally__policy *p = tally__policy_get(f->e, n->policy);
    if (!p)
        return;
    /* acquire: paired with the release store of tally_policy_update()
       (engine/engine.c): every limit read from one version of the policy,
       which stays allocated until close */
    const tally__limit *lim = atomic_load_explicit(&p->table.limits, memory_order_acquire);
    for (unsigned l = 0; l < p->table.n_limits; l++) {
        uint64_t win, prev;
        if (shared_window(&lim[l], now, &win, &prev))
            note_refresh(f, n->policy, l, n->digest, win);
    }
}

/* Keys of slot @s hit in the current shared window or the one before: their
   count in the current window is read back (guarantee 7). */
static void collect_refresh(collect_arg *a, tally__slot *s, tally__digest d)
{
    tally__table *t = &a->p->table;
    /* acquire: paired with the release store of tally_policy_update()
       (engine/engine.c): every limit read from one version of the policy */
    const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
    for (unsigned l = 0; l < t->n_limits; l++) {
        uint64_t win, prev;
        if (!shared_window(&lim[l], a->now, &win, &prev))
            continue;
        tally__state st = tally__state_load_atomic(&s->st[l]);
        if (tally__state_is_empty(st) || tally__state_is_dead(st))
            continue;
        tally_counter c;
        tally__algo_counter(&lim[l], st, a->now, &c);
        if (c.window_start_ns == win || c.window_start_ns == prev)
            note_refresh(a->f, t->policy, l, d, win);
    }
}

/* Take the deltas of slots [from, to) of one table (inside a read-side section). */
static void collect_range(void *arg)
{
    collect_arg *a = arg;
    tally__table *t = &a->p->table;
    /* acquire: paired with the release store in tally__table_sync_alloc() (engine/table.c) */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    if (!y)
        return;
    for (size_t i = a->from; i < a->to; i++) {
        tally__sync *ys = &y[i * t->n_limits];
        bool any = false;
        /* relaxed: a hint; the pair CAS below takes what is really there */
        for (unsigned l = 0; l < t->n_limits; l++)
            any |= tally__word_load_relaxed(&ys[l].delta) != 0;
        if (!any && !a->refresh)
            continue;
        tally__digest d;
        tally__slot *s = tally__table_live(t, i, &d);
        if (!s)
            continue;                         /* being reclaimed: the reclaim spills it */
        if (a->refresh)
            collect_refresh(a, s, d);
        if (!any)
            continue;
        size_t key_len = 0;
        const void *key = tally__table_key(t, i, &key_len);
        /* A helper may promote a claim before its owner stored the key copy:
           leave the delta for the next flush rather than name it by digest. */
        if (!key && t->keys)
            continue;
        /* acquire: paired with the release store of tally_policy_update()
           (engine/engine.c): every limit read from one version of the policy */
        const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
        for (unsigned l = 0; l < t->n_limits; l++) {
            tally__state *pair = (tally__state *)&ys[l].win;
            tally__state cur = tally__state_load(pair);
            if (!cur.w1)
                continue;
            /* the local count first, so that it never includes more than we take */
            tally_counter c;
            tally__algo_counter(&lim[l], tally__state_load_atomic(&s->st[l]), cur.w0, &c);
            while (!tally__state_cas(pair, cur, (tally__state){ cur.w0, 0 })) {
                cur = tally__state_load(pair);
                if (!cur.w1)
                    break;
            }
            if (cur.w1)
                keep(a->f, t->policy, l, d, cur.w0, cur.w1,
                     c.window_start_ns == cur.w0 ? c.used : 0,
                     key, key_len);
        }
        tally__table_key_done(key);
    }
}

/* Take every note: spilled deltas, evictions and events are kept for the
   next push; prefetches are noted for a read-back when @prefetch, and
   dropped by a flush, whose read-back covers every live key (guarantee 7). */
static void take_notes(struct tally__flusher *f, bool prefetch)
{
    tally_engine *e = f->e;

    /* acquire: paired with the acq_rel exchange of tally__prefetch()
       (engine/notes.c): the note of a flag cleared here is taken below, and
       a later note posts again */
    atomic_exchange_explicit(&e->prefetch_due, false, memory_order_acquire);
    uint64_t taken = tally_now_ns();
    for (tally__note *n = tally__notes_take(&e->notes), *next; n; n = next) {
        next = n->next;
        if (n->kind == TALLY__NOTE_PREFETCH) {
            if (prefetch)
                note_prefetch(f, n, taken);
            free(n);
            continue;
        }
        if (n->kind == TALLY__NOTE_FORGET) {
            forget(f, n, taken);
            continue;
        }
        if (n->kind != TALLY__NOTE_DELTA) {
            /* events, flags and flag clearings, delivered or stored in order */
            event *ev = malloc(sizeof(*ev));
            if (ev) {
                ev->note = n;
                ev->next = NULL;
                *f->events_tail = ev;
                f->events_tail = &ev->next;
            } else {
                free(n);
            }
            continue;
        }
        keep(f, n->policy, n->limit, n->digest, n->win, n->delta, 0, n->key, n->key_len);
        free(n);
    }
}

static void collect(struct tally__flusher *f)
{
    tally_engine *e = f->e;

    /* spilled deltas, evictions and events first */
    take_notes(f, false);
    /* acquire: paired with the release store in tally_policy_add() (engine/engine.c) */
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    uint64_t now = tally_now_ns();
    f->refresh_n = 0;
    for (uint32_t id = 0; id < np; id++) {
        collect_arg a = { .f = f, .p = tally__policy_get(e, id), .now = now, .refresh = f->redis_on };
        /* short read-side sections: a reclaim waiting for a grace period is not held up long */
        for (a.from = 0; a.from < a.p->table.n_slots; a.from = a.to) {
            a.to = a.from + 4096 < a.p->table.n_slots ? a.from + 4096 : a.p->table.n_slots;
            tally__rcu_read(collect_range, &a);
        }
    }
}

/* ---- Helpers for the sinks ------------------------------------------------ */

entry *tally__sync_find(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                       uint64_t win)
{
    if (!f->map_size)
        return NULL;
    size_t b = hash_entry(policy, limit, d, win) & (f->map_size - 1);
    for (entry *x = f->map[b]; x; x = x->next)
        if (x->policy == policy && x->limit == limit && x->win == win
            && x->digest.lo == d.lo && x->digest.hi == d.hi)
            return x;
    return NULL;
}

uint64_t tally__sync_window_end(const tally__limit *l, uint64_t win)
{
    switch (l->spec.algo) {
    case TALLY_CALENDAR_WINDOW:
        return tally__calendar_next(l->spec.unit, l->spec.utc_offset_s, win);
    case TALLY_SLIDING_WINDOW:       /* it still counts, weighted, as the previous window */
        return win + 2 * l->spec.period_ns;
    default:
        return win + l->spec.period_ns;
    }
}

/* Keep @text as the sink's last error (tally_flusher_last_error()). */
void tally__sync_set_error(struct tally__flusher *f, const char *text, size_t len)
{
    if (len >= ERRSTR_LEN)
        len = ERRSTR_LEN - 1;
    pthread_mutex_lock(&f->err_lock);
    memcpy(f->errstr, text, len);
    f->errstr[len] = 0;
    f->errlen = len;
    pthread_mutex_unlock(&f->err_lock);
}

/* Write the other engines' count of an entry's key into its slot. */
typedef struct remote_arg {
    struct tally__flusher *f;
    const entry           *x;
    uint64_t               others;
} remote_arg;

static void store_remote_rcu(void *arg)
{
    remote_arg *a = arg;
    tally__policy *p = tally__policy_get(a->f->e, a->x->policy);
    tally__table *t = &p->table;
    /* acquire: paired with the release store in tally__table_sync_alloc() (engine/table.c) */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__slot *s = y ? tally__table_find(t, a->x->digest) : NULL;
    if (!s)
        return;
    tally__sync *ys = &y[tally__slot_index(t, s) * t->n_limits + a->x->limit];
    /* relaxed: the flusher is the only writer of rwin but for the reclaim,
       which a grace period keeps apart from us */
    uint64_t rwin = atomic_load_explicit(&ys->rwin, memory_order_relaxed);
    if (rwin > a->x->win + 1)
        return;                               /* it already knows a later window */
    /* seqlock write: invalidate, write the count, publish the window */
    atomic_store_explicit(&ys->rwin, 0, memory_order_relaxed);
    /* release: the zero before the count; paired with the acquire fence of
       load_remote() (engine/hit.c) */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&ys->remote, a->others, memory_order_relaxed);
    /* release: the count before its window; paired with the acquire load of
       rwin in load_remote() */
    atomic_store_explicit(&ys->rwin, a->x->win + 1, memory_order_release);
}

void tally__sync_deliver_deltas(struct tally__flusher *f, const item *items, const uint64_t *totals,
                           size_t n)
{
    if (!f->o.on_deltas || n == 0)
        return;
    if (f->cb_cap < n) {
        tally_delta *cb = realloc(f->cb, n * sizeof(*cb));
        if (!cb)
            return;
        f->cb = cb;
        f->cb_cap = n;
    }
    for (size_t i = 0; i < n; i++) {
        const entry *x = items[i].e;
        f->cb[i] = (tally_delta){ .policy = x->policy, .limit = x->limit, .key = x->key,
                                  .key_len = x->key_len, .window_start_ns = x->win,
                                  .delta = items[i].delta, .total = totals[i] };
    }
    f->o.on_deltas(f->o.ctx, f->cb, n);
}

/* A batch Redis refused unapplied: its deltas go back to their entries, to
   be merged with what comes next and sent under a new sequence number. */
void tally__sync_dissolve(batch *b)
{
    for (size_t i = 0; i < b->n; i++) {
        b->items[i].e->fresh += b->items[i].delta;
        b->items[i].e->inflight--;
    }
}

/* Form batches, one bucket each, from the fresh cost of every entry. A
   bucket with MAX_KEPT_BATCHES or more batches of unknown outcome waiting
   (guarantee 6), or whose oldest such batch a new sequence number would
   leave TALLY__SEQ_WINDOW behind (the store could no longer tell whether it
   ran: sync/redis.c, guarantee 3), keeps its cost merged in the entries, and
   *held_back says whether any did. Every batch still listed was sent before. */
int tally__sync_form_batches(struct tally__flusher *f, bool *held_back)
{
    unsigned nb = f->sink->buckets;
    uint32_t *kept = calloc(nb, sizeof(*kept));
    uint64_t *oldest = calloc(nb, sizeof(*oldest));
    batch **open = calloc(nb, sizeof(*open));
    int rc = kept && oldest && open ? 0 : TALLY_ENOMEM;
    *held_back = false;
    for (const batch *k = f->inflight_head; k && !rc; k = k->next) {
        kept[k->bucket]++;
        if (!oldest[k->bucket] || k->seq < oldest[k->bucket])
            oldest[k->bucket] = k->seq;
    }
    for (size_t i = 0; i < f->map_size && !rc; i++) {
        for (entry *x = f->map[i]; x && !rc; x = x->next) {
            if (!x->fresh)
                continue;
            unsigned bk = tally__sync_bucket(f->sink, x->digest);
            batch *b = open[bk];
            if (!b) {
                if (kept[bk] >= MAX_KEPT_BATCHES
                    || (oldest[bk] && f->bucket_seq[bk] + 1 - oldest[bk] >= TALLY__SEQ_WINDOW)) {
                    *held_back = true;
                    continue;
                }
                b = calloc(1, sizeof(*b));
                if (!b) {
                    rc = TALLY_ENOMEM;
                    break;
                }
                b->seq = ++f->bucket_seq[bk];
                b->bucket = bk;
                b->ask = -1;
                *f->inflight_tail = b;
                f->inflight_tail = &b->next;
                open[bk] = b;
            }
            b->items[b->n++] = (item){ x, x->fresh };
            x->fresh = 0;
            x->inflight++;
            if (b->n == CHUNK_KEYS)
                open[bk] = NULL;
        }
    }
    free(kept);
    free(oldest);
    free(open);
    return rc;
}

void tally__sync_deliver_note(struct tally__flusher *f, const tally__note *n)
{
    tally__policy *p = tally__policy_get(f->e, n->policy);
    if (!p)
        return;
    if (n->kind == TALLY__NOTE_FLAG && f->o.on_flag) {
        tally_flag fl = { .key = n->key, .key_len = n->key_len, .flagged_at_ns = n->win,
                          .denied = n->delta };
        f->o.on_flag(f->o.ctx, n->policy, &fl);
    } else if (n->kind == TALLY__NOTE_EVENT && f->o.on_event) {
        tally_event ev = { .policy = n->policy, .limit = n->limit, .key = n->key,
                           .key_len = n->key_len, .window_start_ns = n->win, .used = n->delta,
                           .max = p->limits[n->limit].spec.max };
        f->o.on_event(f->o.ctx, &ev);
        atomic_fetch_add_explicit(&f->e->events_delivered, 1, memory_order_relaxed);
    }
}

void tally__sync_store_remote(struct tally__flusher *f, entry *x, uint64_t others)
{
    entry *k = x->key ? x : tally__sync_find(f, x->policy, x->limit, x->digest, x->win);
    if (k) {
        k->others = others;
        k->told = true;
        others += k->forgot;
    }
    remote_arg a = { f, x, others };
    tally__rcu_read(store_remote_rcu, &a);
}

/* No store: the callback is the only consumer, and what is taken is
   acknowledged at once; a total is the local count. */
static int local_push(tally__sink *s, struct tally__flusher *f)
{
    (void)s;
    item *items = NULL;
    uint64_t *totals = NULL;
    size_t n = 0, cap = 0;
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry *x = f->map[i]; x; x = x->next) {
            if (!x->fresh)
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 256;
                item *ni = realloc(items, cap * sizeof(*ni));
                uint64_t *nt = realloc(totals, cap * sizeof(*nt));
                if (ni)
                    items = ni;
                if (nt)
                    totals = nt;
                if (!ni || !nt)
                    goto out;                 /* the rest stays fresh for the next flush */
            }
            x->acked += x->fresh;
            items[n] = (item){ x, x->fresh };
            totals[n++] = x->local_total > x->acked ? x->local_total : x->acked;
            x->fresh = 0;
        }
    }
out:
    tally__sync_deliver_deltas(f, items, totals, n);
    free(items);
    free(totals);
    for (event *ev = f->events, *next; ev; ev = next) {
        next = ev->next;
        tally__sync_deliver_note(f, ev->note);
        free(ev->note);
        free(ev);
    }
    f->events = NULL;
    f->events_tail = &f->events;
    return 0;
}

static void local_destroy(tally__sink *s)
{
    (void)s;
}

static const tally__sink_ops local_ops = { .push = local_push, .destroy = local_destroy };
tally__sink tally__sink_local = { .ops = &local_ops, .buckets = 1 };

/* Forget entries whose window ended and that hold nothing. */
static void prune(struct tally__flusher *f)
{
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry **pp = &f->map[i]; *pp;) {
            entry *x = *pp;
            if (!x->fresh && !x->inflight && x->end_ns <= now) {
                *pp = x->next;
                free(x->key);
                free(x);
                f->map_count--;
            } else {
                pp = &x->next;
            }
        }
    }
}

static void count_pending(struct tally__flusher *f)
{
    uint64_t d = 0, c = 0;
    for (size_t i = 0; i < f->map_size; i++)
        for (entry *x = f->map[i]; x; x = x->next)
            if (x->fresh) {
                d++;
                c += x->fresh;
            }
    for (batch *b = f->inflight_head; b; b = b->next)
        for (size_t i = 0; i < b->n; i++) {
            d++;
            c += b->items[i].delta;
        }
    atomic_store_explicit(&f->e->pending_deltas, d, memory_order_relaxed);
    atomic_store_explicit(&f->e->pending_cost, c, memory_order_relaxed);
}

/* One flush. Return 0 when nothing taken is left unacknowledged. */
static int flush_once(struct tally__flusher *f)
{
    uint64_t start = f->last_flush_ns ? f->last_flush_ns : tally_now_ns();
    f->seq++;
    collect(f);
    uint64_t now = tally_now_ns();
    tally__ops_flush(f->e, now);
    tally__ops_usage_emit(f->e, start, now, f->o.on_usage, f->o.ctx);
    f->last_flush_ns = now;
    int rc = 0;
    bool had = f->inflight_head != NULL || f->events != NULL;
    for (size_t i = 0; i < f->map_size && !had; i++)
        for (entry *x = f->map[i]; x && !had; x = x->next)
            had = x->fresh != 0;
    rc = f->sink->ops->push(f->sink, f);
    prune(f);
    count_pending(f);
    tally_engine *e = f->e;
    if (had) {
        atomic_fetch_add_explicit(&e->flush_batches, 1, memory_order_relaxed);
        if (rc)
            atomic_fetch_add_explicit(&e->flush_failures, 1, memory_order_relaxed);
    }
    if (!rc)
        atomic_store_explicit(&e->last_flush_ok_ns, tally_now_ns(), memory_order_relaxed);
    return rc;
}

/* Between flushes: the totals of the keys that took a slot since the notes
   were last taken, in one exchange (guarantee 9). */
static void prefetch_once(struct tally__flusher *f)
{
    f->refresh_n = 0;
    take_notes(f, true);
    if (f->refresh_n && f->sink->ops->prefetch)
        f->sink->ops->prefetch(f->sink, f);
    f->refresh_n = 0;
}

/* ---- The thread ----------------------------------------------------------- */

static void *flusher_main(void *arg)
{
    struct tally__flusher *f = arg;
    uint64_t interval = (uint64_t)f->o.interval_ms * TALLY__NS_PER_MS;
    uint64_t next = tally__mono_ns() + interval;     /* the next round, CLOCK_MONOTONIC */

    if (f->o.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(f->o.cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    pthread_mutex_lock(&f->lock);
    for (;;) {
        if (!f->stop && f->requested == f->done) {
            pthread_mutex_unlock(&f->lock);
            struct timespec until = { .tv_sec = (time_t)(next / 1000000000u),
                                      .tv_nsec = (long)(next % 1000000000u) };
            /* a post is a request, a stop or a prefetch; the count a post
               left after its request was served costs one empty turn */
            sem_clockwait(&f->wake, CLOCK_MONOTONIC, &until);
            bool early = tally__mono_ns() < next;
            /* relaxed: a hint; take_notes() orders what it takes */
            if (early && atomic_load_explicit(&f->e->prefetch_due, memory_order_relaxed))
                prefetch_once(f);
            pthread_mutex_lock(&f->lock);
            if (early && !f->stop && f->requested == f->done)
                continue;
        }
        bool stop = f->stop;
        uint64_t gen = f->requested;
        pthread_mutex_unlock(&f->lock);
        int rc = flush_once(f);
        next = tally__mono_ns() + interval;
        pthread_mutex_lock(&f->lock);
        if (gen > f->done) {
            f->done = gen;
            f->done_rc = rc;
            pthread_cond_broadcast(&f->cond);
        }
        if (stop)
            break;
    }
    /* The last word, what stop returns: no I/O under the lock a caller of
       tally_flush() may be waiting on (it sees stop and leaves). */
    pthread_mutex_unlock(&f->lock);
    int last = flush_once(f) ? TALLY_EIO : 0;
    pthread_mutex_lock(&f->lock);
    f->done_rc = last;
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

void tally_flusher_options_init(tally_flusher_options *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->interval_ms = 1000;
    o->cpu = -1;
}

static void flusher_free(struct tally__flusher *f)
{
    if (f->sink)
        f->sink->ops->destroy(f->sink);
    for (size_t i = 0; i < f->map_size; i++)
        for (entry *x = f->map[i], *next; x; x = next) {
            next = x->next;
            free(x->key);
            free(x);
        }
    free(f->map);
    for (batch *b = f->inflight_head, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    for (event *ev = f->events, *next; ev; ev = next) {
        next = ev->next;
        free(ev->note);
        free(ev);
    }
    free(f->cb);
    free(f->refresh);
    free(f->bucket_seq);
    sem_destroy(&f->wake);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->err_lock);
    free(f);
}

/* The Redis options a library with or without Redis refuses alike; the
   sink parses the node list (sync/redis.c), also before anything starts. */
static int check_options(const tally_flusher_options *o)
{
    if (o->interval_ms == 0 || o->cpu < -1 || o->cpu >= CPU_SETSIZE)
        return TALLY_EINVAL;
    const tally_redis_options *r = o->redis;
    if (!r)
        return 0;
    switch (r->mode) {
    case TALLY_REDIS_STANDALONE:
        if (!r->unix_path && (!r->host || !r->host[0] || r->port <= 0 || r->port > 65535))
            return TALLY_EINVAL;
        if (r->unix_path && !r->unix_path[0])
            return TALLY_EINVAL;
        break;
    case TALLY_REDIS_CLUSTER:
        /* a cluster has database 0 only, and the slot tag must be the first
           braces of every key name */
        if (!r->nodes || !r->nodes[0] || r->db != 0
            || (r->key_prefix && strpbrk(r->key_prefix, "{}")))
            return TALLY_EINVAL;
        break;
    case TALLY_REDIS_SENTINEL:
        if (!r->nodes || !r->nodes[0] || !r->master_name || !r->master_name[0])
            return TALLY_EINVAL;
        break;
    default:
        return TALLY_EINVAL;
    }
    if (r->db < 0 || (r->key_prefix && strlen(r->key_prefix) > 256))
        return TALLY_EINVAL;
    return 0;
}

int tally__flusher_start(tally_engine *e, const tally_flusher_options *o)
{
    if (!e || !o)
        return TALLY_EINVAL;
    if (e->region)
        return TALLY_ESTATE;        /* a shared engine has no flusher (tally/shared.h) */
    int rc = check_options(o);
    if (rc)
        return rc;
    struct tally__flusher *f = calloc(1, sizeof(*f));
    if (!f)
        return TALLY_ENOMEM;
    f->e = e;
    f->o = *o;
    f->inflight_tail = &f->inflight_head;
    f->events_tail = &f->events;
    pthread_mutex_init(&f->lock, NULL);
    if (tally__cond_init_mono(&f->cond)) {
        pthread_mutex_destroy(&f->lock);
        free(f);
        return TALLY_ENOMEM;
    }
    sem_init(&f->wake, 0, 0);
    pthread_mutex_init(&f->err_lock, NULL);
    f->sink = &tally__sink_local;
    if (o->redis) {
        f->redis_on = true;
        rc = tally__sink_redis_new(o->redis, &f->sink);
        f->o.redis = NULL;    /* the sink keeps its own copy; the caller's may go */
        if (rc) {
            f->sink = NULL;
            flusher_free(f);
            return rc;
        }
    }
    f->bucket_seq = calloc(f->sink->buckets, sizeof(*f->bucket_seq));
    if (!f->bucket_seq) {
        flusher_free(f);
        return TALLY_ENOMEM;
    }
    uint8_t rnd[8];
    if (getrandom(rnd, sizeof(rnd), 0) == (ssize_t)sizeof(rnd))
        memcpy(&f->instance, rnd, sizeof(rnd));
    f->instance ^= tally_now_ns();

    tally__lock(&e->add_lock);
    /* relaxed: the policies change only under add_lock; closing is only a
       diagnostic (tally_close() in tally.h) */
    rc = e->flusher || e->flusher_stopping || atomic_load_explicit(&e->closing, memory_order_relaxed)
        ? TALLY_ESTATE : 0;
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_relaxed);
    for (uint32_t i = 0; i < np && !rc; i++)
        rc = tally__table_sync_alloc(&atomic_load_explicit(&e->policies[i], memory_order_relaxed)->table);
    if (!rc) {
        /* Hits read each of these words alone (relaxed), but for the bound,
           which must not come with the last flush time of an older flusher */
        atomic_store_explicit(&e->last_flush_ok_ns, tally_now_ns(), memory_order_relaxed);
        /* release: the flush time before the bound; paired with the acquire
           load of fail_closed_ns in too_stale() (engine/hit.c) */
        atomic_store_explicit(&e->fail_closed_ns,
                              f->redis_on ? (uint64_t)o->fail_closed_after_ms * TALLY__NS_PER_MS : 0,
                              memory_order_release);
        atomic_store_explicit(&e->events_on, o->on_event != NULL, memory_order_relaxed);
        /* a flag an earlier flusher left set would keep this one asleep;
           no hit runs tally__prefetch() while wake is NULL */
        atomic_store_explicit(&e->prefetch_due, false, memory_order_relaxed);
        /* release: the semaphore initialised, and the flag cleared, before a
           hit posts; paired with the acquire load in tally__prefetch()
           (engine/notes.c) */
        if (f->redis_on)
            atomic_store_explicit(&e->wake, &f->wake, memory_order_release);
        atomic_store_explicit(&e->syncing, true, memory_order_relaxed);
        /* The thread starts with every asynchronous signal blocked: they
           are the program's (nginx's workers, for one, wake their event loop
           from a handler, which must run on that loop's thread), and a write
           to a connection Redis closed must fail with EPIPE here, not kill
           the process with SIGPIPE (hiredis 0.14 writes with write(2), which
           cannot be told MSG_NOSIGNAL). */
        sigset_t all, old;
        sigfillset(&all);
        sigdelset(&all, SIGSEGV);
        sigdelset(&all, SIGBUS);
        sigdelset(&all, SIGFPE);
        sigdelset(&all, SIGILL);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        int created = pthread_create(&f->thread, NULL, flusher_main, f);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (created != 0) {
            atomic_store_explicit(&e->wake, NULL, memory_order_relaxed);
            atomic_store_explicit(&e->syncing, false, memory_order_relaxed);
            atomic_store_explicit(&e->events_on, false, memory_order_relaxed);
            atomic_store_explicit(&e->fail_closed_ns, 0, memory_order_relaxed);
            rc = TALLY_ENOMEM;
        } else {
            e->flusher = f;
        }
    }
    pthread_mutex_unlock(&e->add_lock);
    if (rc)
        flusher_free(f);
    return rc;
}

int tally_flush(tally_engine *e, uint32_t timeout_ms)
{
    if (!e)
        return TALLY_EINVAL;
    tally__lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    if (!f) {
        pthread_mutex_unlock(&e->add_lock);
        return TALLY_ESTATE;
    }
    pthread_mutex_lock(&f->lock);
    pthread_mutex_unlock(&e->add_lock);
    uint64_t gen = ++f->requested;
    sem_post(&f->wake);
    struct timespec until = tally__deadline((uint64_t)timeout_ms * TALLY__NS_PER_MS);
    int rc = 0;
    while (f->done < gen && !f->stop && rc == 0)
        rc = pthread_cond_timedwait(&f->cond, &f->lock, &until);
    rc = f->done >= gen ? (f->done_rc ? TALLY_EIO : 0) : rc == ETIMEDOUT ? TALLY_ETIMEDOUT : TALLY_ESTATE;
    pthread_mutex_unlock(&f->lock);
    return rc;
}

int tally_flusher_stop(tally_engine *e)
{
    if (!e)
        return TALLY_EINVAL;
    tally__lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    e->flusher = NULL;
    /* a start waits for the end of this stop, or it would run with
       syncing cleared below; a second stop meanwhile leaves the mark alone */
    if (f)
        e->flusher_stopping = true;
    pthread_mutex_unlock(&e->add_lock);
    if (!f)
        return 0;
    pthread_mutex_lock(&f->lock);
    f->stop = true;
    sem_post(&f->wake);
    pthread_mutex_unlock(&f->lock);
    pthread_join(f->thread, NULL);
    int rc = f->done_rc;
    /* relaxed: the grace period below orders them before what follows */
    atomic_store_explicit(&e->syncing, false, memory_order_relaxed);
    atomic_store_explicit(&e->events_on, false, memory_order_relaxed);
    atomic_store_explicit(&e->fail_closed_ns, 0, memory_order_relaxed);
    atomic_store_explicit(&e->wake, NULL, memory_order_relaxed);
    /* hits that saw syncing set finish before the last notes are freed, and
       those that loaded wake before the semaphore is destroyed */
    tally__rcu_wait();
    flusher_free(f);
    tally__lock(&e->add_lock);
    e->flusher_stopping = false;
    pthread_mutex_unlock(&e->add_lock);
    return rc;
}
