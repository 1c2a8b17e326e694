/*
 * The hot path: hit (and its variants with a caller's max, a reservation,
 * a release), peek, read and reset_if, and the one CAS loop that applies
 * the pure algorithm steps of algo.c to the state words of table.c.
 *
 * Ordering and progress guarantees of the hot path:
 *  1. Every call that touches a table runs inside an RCU read-side section;
 *     slots are reused only after a grace period (table.c, guarantee 5).
 *  2. A limit's state changes only by a 16-byte CAS from the exact state the
 *     step was computed from, so every increment is applied exactly once and
 *     the exceeded mark, kept in the same word, is set by exactly one call.
 *     A step that changes nothing is validated the same way (a CAS to the
 *     same words), so every decision comes from a state that really existed:
 *     each single-limit hit is linearizable at its CAS.
 *  3. A single-limit hit is one CAS loop: lock-free, it retries only when
 *     another call changed the same key in between.
 *  4. A multi-limit hit first checks every limit without writing. If all fit,
 *     it consumes from each in order and, should a limit stop fitting in the
 *     meantime, takes back what it consumed and decides again; if one denies,
 *     it only sets the exceeded marks. The end state is all-or-none; a
 *     concurrent call may briefly see a consumption that is then taken back.
 *  5. A hit that meets a DEAD state (its slot was reclaimed because every
 *     window in it expired) helps finish the reclaim and starts over in a
 *     fresh slot: nothing it consumed stays in the dead slot.
 *  6. A call loads its policy's block of limits and flags once
 *     (tally__cfg, replaced whole by tally_policy_update()) and decides every
 *     limit under it: never under half of an update.
 */
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "engine/algo-step.h"
#include "engine/section.h"

/*
 * Common argument checks; on success the caller is inside a read-side
 * section. Nothing of @e is read before the section is entered and the
 * closing flag is checked: tally_close() frees the engine only after a grace
 * period that began after it set the flag, so a call whose section began
 * before that grace period reads live memory and sees the flag if it is set.
 * That is what lets close detect most calls that race with it (the contract
 * forbids them; see tally_close() in tally.h for why it cannot catch all).
 */
static inline __attribute__((always_inline)) int
enter(tally_engine *e, uint32_t policy, const void *key, size_t key_len, const void *out,
      tally__policy **pp)
{
    if (TALLY__UNLIKELY(!e || !key || !out || key_len == 0))
        return TALLY_EINVAL;
    int rc = tally__sec_enter(e);
    if (TALLY__UNLIKELY(rc))
        return rc;
    /* relaxed: close's grace period, not this load, orders it (above) */
    if (TALLY__UNLIKELY(atomic_load_explicit(&e->closing, memory_order_relaxed))) {
        tally__sec_exit(e);
        return TALLY_ESTATE;
    }
    *pp = tally__policy_get(e, policy);
    if (TALLY__UNLIKELY(!*pp || key_len > e->opts.max_key_len)) {
        tally__sec_exit(e);
        return TALLY_EINVAL;
    }
    return 0;
}

#define RECLAIM_TRIES 8     /* reclaims that found nothing before a key is refused */
/* Eviction passes a call makes before only reclaims are left to it: each
   one after the first lost the room it made to other new keys, which got
   in, so a new key is refused only when every candidate is protected or
   others keep winning. */
#define EVICT_TRIES   64

/*
 * Take the slot of a new key. When the key has no free slot, reclaim expired
 * slots: leave the read-side section to wait for a grace period, then retry.
 * A policy with TALLY_EVICT_LRU looks at the key's window first, where it
 * takes the expired keys or else evicts a batch of the least recently hit,
 * and waits for their slots in the same way: a full table of live keys pays
 * one look at a window and one grace period per batch, not a sweep of the
 * table per key. The sweep runs when the window gave nothing: every key in
 * it protected, or its slots taken by another reclaim. Returns inside a
 * read-side section whatever happens.
 */

static int acquire_slot(tally_engine *e, tally__table *t, tally__digest d, const void *key,
                        size_t key_len, uint64_t now, const tally__probe *hint, tally__slot **out)
{
    tally__batch *batch = NULL;      /* large: on the heap, made on the first reclaim */
    unsigned idle = 0, evictions = 0;
    bool held = false;               /* the last look saw the window's slots held */
    int rc;

    for (;;) {
        rc = tally__table_acquire(t, d, key, key_len, now, hint, out);
        hint = NULL;                 /* stale after a reclaim */
        if (rc != TALLY_EFULL)
            break;
        if (!batch && !(batch = tally__batch_new(t))) {
            rc = TALLY_ENOMEM;
            break;
        }
        /* relaxed: the flag alone; tally__table_evict() orders its reads */
        bool lru = atomic_load_explicit(&t->lru, memory_order_relaxed) && evictions < EVICT_TRIES;
        /* relaxed: whether an evicted key's counts go to a flusher; one
           that stops meanwhile leaves its few notes to the next start */
        bool syncing = atomic_load_explicit(&e->syncing, memory_order_relaxed);
        if (lru && tally__table_evict(t, d, now, syncing, batch)) {
            /* an eviction, or room another made, counts as a try; a look
               that took only expired keys, or a wait for a window another
               reclaim holds, does not */
            evictions += batch->evicted != 0 || batch->n == 0;
            if (batch->n == 0)
                continue;            /* room made by another: no slot of ours to wait for */
        } else if (tally__table_reclaim_take(t, d, now, batch) == 0) {
            /* Nothing to take. Slots of the window that another reclaim took
               become FREE after its grace period: wait for them, however
               long that reclaim takes (its thread may be preempted), rather
               than refuse a key the table has room for. Elsewhere, slots
               may have been freed since we looked: try a few more times
               before giving up. */
            bool settling = tally__table_window_settling(t, d);
            if (settling) {
                held = true;
                sched_yield();       /* the holder may need this CPU to free them */
            } else if (held) {
                /* the held slots became FREE since the eviction's look, which
                   gave up for them: look again, as for a window never held */
                held = false;
                continue;
            }
            bool full = !settling && ++idle > RECLAIM_TRIES;
            if (!full && !settling && atomic_load_explicit(&t->zombies, memory_order_relaxed) == 0) {
                if (tally__res_live(atomic_load_explicit(&t->res, memory_order_relaxed)) < t->capacity)
                    continue;
                full = true;
            }
            if (full)
                break;
        }
        /* seq_cst, with the load of closing below: paired with the store of
           closing and the load of reclaimers in tally__engine_quiesce()
           (engine.c), so that close waits for us or we see closing */
        atomic_fetch_add(&e->reclaimers, 1);
        tally__sec_exit(e);
        tally__sec_wait(e);
        tally__table_reclaim_free(t, batch);
        tally__sec_resume(e);
        /* seen before close's grace period began, or close waits for us;
           seq_cst: paired with the store in tally__engine_quiesce() */
        bool closing = atomic_load(&e->closing);
        /* seq_cst (a release is what counts): paired with the load of
           reclaimers in tally__engine_quiesce(), which then frees */
        atomic_fetch_sub(&e->reclaimers, 1);
        if (closing) {
            rc = TALLY_ESTATE;
            break;
        }
    }
    tally__batch_free(batch);
    return rc;
}

static inline void fill_result(unsigned n_limits, unsigned flags, const tally__step *r, tally_result *out)
{
    if (TALLY__LIKELY(n_limits == 1)) {
        out->allowed = r->fits || (flags & TALLY_SHADOW);
        out->exceeded = !r->fits;
        out->first_exceeded = r->first;
        out->remaining = r->remaining;
        out->reset_after_ns = r->reset_after_ns;
        out->retry_after_ns = out->allowed ? 0 : r->retry_after_ns;
        return;
    }
    uint32_t exceeded = 0, first = 0;
    uint64_t remaining = UINT64_MAX, reset = 0, retry = 0;

    for (unsigned i = 0; i < n_limits; i++) {
        if (!r[i].fits) {
            exceeded |= 1u << i;
            if (r[i].retry_after_ns > retry)
                retry = r[i].retry_after_ns;
        }
        if (r[i].first)
            first |= 1u << i;
        /* the binding limit has the least room; among equals, the longest wait */
        if (r[i].remaining < remaining || (r[i].remaining == remaining && r[i].reset_after_ns > reset)) {
            remaining = r[i].remaining;
            reset = r[i].reset_after_ns;
        }
    }
    out->allowed = exceeded == 0 || (flags & TALLY_SHADOW);
    out->exceeded = exceeded;
    out->first_exceeded = first;
    out->remaining = remaining;
    out->reset_after_ns = reset;
    out->retry_after_ns = out->allowed ? 0 : retry;
}

enum { STEP_OK = 0, STEP_DEAD = 1 };

/* One hit's view of its slot. */
typedef struct hit_ctx {
    tally__policy *p;
    const tally__limit *lim;  /* the limits this call decides under */
    tally__slot   *s;
    tally__sync   *sync;      /* the slot's entries, one per limit; NULL when not syncing */
} hit_ctx;

/* Other engines' count for limit @i: seqlock read, rwin is the sequence. */
static inline void load_remote(const hit_ctx *c, unsigned i, tally__remote *out)
{
    out->count = 0;
    if (!c->sync)
        return;
    tally__sync *y = &c->sync[i];
    /* acquire: paired with the release store of rwin in store_remote_rcu()
       (sync/flusher.c): the count of that window is seen */
    uint64_t w1 = atomic_load_explicit(&y->rwin, memory_order_acquire);
    uint64_t n = atomic_load_explicit(&y->remote, memory_order_relaxed);
    /* the count is read before rwin is checked again; paired with the
       release fence of store_remote_rcu() after it zeroed rwin */
    atomic_thread_fence(memory_order_acquire);
    if (w1 && atomic_load_explicit(&y->rwin, memory_order_relaxed) == w1) {
        out->win = w1 - 1;
        out->count = n;
    }
}

/* The CAS loop, written once: apply one step to limit @i. Inlined into each
   caller (36 instructions a hit, callgrind), as the step is into it. */
static inline __attribute__((always_inline)) int apply(const hit_ctx *c, unsigned i, uint64_t now,
                                                       uint64_t cost, unsigned how, tally__step *r)
{
    tally__remote rem;
    const tally__remote *known = NULL;    /* a constant NULL where the caller has no sync */
    if (c->sync) {
        load_remote(c, i, &rem);
        known = &rem;
    }
    for (;;) {
        tally__state cur = tally__state_load(&c->s->st[i]);
        if (TALLY__UNLIKELY(tally__state_is_dead(cur)))
            return STEP_DEAD;
        algo_step(&c->lim[i], cur, now, cost, how, known, r);
        /* The two words were loaded one by one: a step that changes nothing
           is validated by a CAS to the same words, so that no decision comes
           from a pair another hit's CAS tore apart (guarantee 2). */
        if (tally__state_cas(&c->s->st[i], cur, r->changed ? r->next : cur))
            return STEP_OK;
    }
}

/*
 * Take back what a hit added to limit @i, unless the key was reset since the
 * hit read instance @g0: the reset already removed it, and what the state
 * holds now is other hits' cost. The instance is checked after the state is
 * loaded, so a CAS from a state written after a reset began cannot succeed
 * (the reset makes gen odd before its CAS: tally_reset_if()).
 */
static void take_back(const hit_ctx *c, unsigned i, tally__state added, uint64_t now, uint64_t cost,
                      uint64_t g0)
{
    _Atomic uint64_t *gen = &c->p->table.gen[tally__slot_index(&c->p->table, c->s)];
    for (;;) {
        tally__state cur = tally__state_load(&c->s->st[i]);
        if (tally__state_is_dead(cur))
            return;                               /* the slot died with what we added */
        /* The state loads, acquires, keep this load after them: a state the
           reset's CAS wrote brings its odd store of gen along. acquire:
           paired with the release store that ends tally_reset_if() */
        if (atomic_load_explicit(gen, memory_order_acquire) != g0)
            return;
        tally__state next = tally__algo_undo(&c->lim[i], cur, added, now, cost);
        /* also when nothing is taken back: only an untorn pair may say so */
        if (tally__state_cas(&c->s->st[i], cur, next))
            return;
    }
}

/* One attempt of a multi-limit hit on slot @s (guarantee 4). */
static int hit_multi(const hit_ctx *c, uint64_t now, const uint64_t *costs, unsigned how,
                     tally__step *r)
{
    unsigned n = c->p->n_limits;

    if (how == TALLY__ADD_ALWAYS) {
        for (unsigned i = 0; i < n; i++)
            if (apply(c, i, now, costs ? costs[i] : 1, TALLY__ADD_ALWAYS, &r[i]))
                return STEP_DEAD;
        goto check;
    }
    for (;;) {
        bool all_fit = true;
        for (unsigned i = 0; i < n; i++) {
            tally__remote rem;
            load_remote(c, i, &rem);
            tally__state cur = tally__state_load(&c->s->st[i]);
            if (tally__state_is_dead(cur))
                return STEP_DEAD;
            algo_step(&c->lim[i], cur, now, costs ? costs[i] : 1,
                      TALLY__ADD_NEVER | TALLY__NO_MARK, &rem, &r[i]);
            all_fit &= r[i].fits;
        }
        if (!all_fit) {
            all_fit = true;
            for (unsigned i = 0; i < n; i++) {
                if (apply(c, i, now, costs ? costs[i] : 1, TALLY__ADD_NEVER, &r[i]))
                    return STEP_DEAD;
                all_fit &= r[i].fits;
            }
            if (all_fit)
                continue;                         /* room appeared meanwhile: decide again */
            return STEP_OK;
        }
        /* the instance the consumption lands in, for a take-back; acquire:
           paired with the release store that ends tally_reset_if() */
        uint64_t g0 = atomic_load_explicit(&c->p->table.gen[tally__slot_index(&c->p->table, c->s)],
                                           memory_order_acquire);
        unsigned done = 0;
        for (; done < n; done++) {
            uint64_t cost = costs ? costs[done] : 1;
            if (apply(c, done, now, cost, TALLY__ADD_IF_FITS | TALLY__NO_MARK, &r[done]))
                return STEP_DEAD;
            if (!r[done].fits)
                break;
        }
        if (done == n)
            break;
        while (done-- > 0)
            take_back(c, done, r[done].next, now, costs ? costs[done] : 1, g0);
    }
check:
    /* a reclaim that killed limit 0 after we passed it took our hit with it */
    return tally__state_is_dead(tally__state_load(&c->s->st[0])) ? STEP_DEAD : STEP_OK;
}

/* Add a consumed cost to the slot's unflushed delta of window @win. */
static void delta_add(tally_engine *e, const hit_ctx *c, unsigned i, tally__digest d,
                      uint64_t win, uint64_t cost)
{
    tally__state *pair = (tally__state *)&c->sync[i].win;
    for (;;) {
        tally__state cur = tally__state_load(pair);
        bool other = cur.w1 != 0 && cur.w0 != win;
        tally__state next = { win, other ? cost : cur.w1 + cost };
        if (tally__state_cas(pair, cur, next)) {
            /* a delta of an older window, not yet pushed: hand it to the flusher */
            if (other) {
                tally__table *t = &c->p->table;
                size_t key_len = 0;
                const void *key = tally__table_key(t, tally__slot_index(t, c->s), &key_len);
                tally__spill(&e->notes, t->policy, i, d, cur.w0, cur.w1, key, key_len);
                tally__table_key_done(key);
            }
            return;
        }
    }
}

static void push_event(tally_engine *e, const hit_ctx *c, unsigned i, tally__digest d,
                       const void *key, size_t key_len, const tally__step *r)
{
    tally__note *n = tally__note_new(TALLY__NOTE_EVENT, c->p->table.policy, i, d,
                                     e->opts.digest_only ? NULL : key, key_len);
    if (!n)
        return;                                   /* the event is lost, never a count */
    n->win = r->win;
    n->delta = r->used;
    tally__note_push(&e->notes, n);
}

static inline tally__stat_shard *my_shard(tally_engine *e)
{
    return &e->stats[tally__thread_no % TALLY__STAT_SHARDS];
}

/* One more on a counter of this thread's shard. A thread that owns its shard
   (the first TALLY__STAT_SHARDS threads) is its only writer: a plain atomic
   store, no locked read-modify-write on the hot path. A shared engine's
   shards are also the other processes' threads of the same number. */
static inline void stat_inc(const tally_engine *e, _Atomic uint64_t *c)
{
    if (TALLY__LIKELY(tally__thread_no < TALLY__STAT_SHARDS && !e->epoch))
        atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    else
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* Fail closed: deny without consuming once the global view is too old. */
static bool too_stale(tally_engine *e, uint64_t now)
{
    /* acquire: paired with the release store of fail_closed_ns in
       tally_flusher_start() (sync/flusher.c): a bound is never read with
       the last flush time of an older flusher */
    uint64_t bound = atomic_load_explicit(&e->fail_closed_ns, memory_order_acquire);
    if (TALLY__LIKELY(bound == 0))
        return false;
    uint64_t last = atomic_load_explicit(&e->last_flush_ok_ns, memory_order_relaxed);
    return now > last && now - last > bound;
}

/* What a call of the hit family adds to a plain hit; a constant in each
   caller, so that tally_hit_at() compiles without the others' code. */
enum { HIT_PLAIN, HIT_MAX, HIT_RESERVE };

/* @known: the key's digest when the caller computed it already, else NULL.
   @entered: the policy when the caller already entered (enter() succeeded,
   the call is inside its read-side section), else NULL. @missed: what the
   caller's tally__table_find_fast() of @known saw when it found no slot, in
   this section, else NULL: the first lookup is not made again. */
static inline __attribute__((always_inline)) int
hit_core(tally_engine *e, uint32_t policy, const void *key, size_t key_len, const uint64_t *costs,
         uint64_t now_ns, tally_result *out, int kind, const uint64_t *max, uint64_t max_delay,
         uint64_t *delay, const tally__digest *known, tally__policy *entered,
         const tally__probe *missed)
{
    tally__policy *p;
    tally__step r[TALLY_MAX_LIMITS];
    tally__limit own[TALLY_MAX_LIMITS];
    int rc;

    if (entered) {
        p = entered;
        rc = 0;
    } else {
        if (TALLY__UNLIKELY(now_ns > TALLY__TIME_MAX))
            return TALLY_EINVAL;
        rc = enter(e, policy, key, key_len, out, &p);
        if (TALLY__UNLIKELY(rc))
            return rc;
    }

    /* acquire: paired with the release store of tally_policy_update()
       (engine.c): the block is seen whole, as it was built */
    const tally__cfg *cfg = atomic_load_explicit(&p->cfg, memory_order_acquire);
    unsigned how = cfg->how;
    hit_ctx c = { .p = p, .lim = cfg->limits };
    if (kind == HIT_MAX && max) {
        for (unsigned i = 0; i < p->n_limits; i++)
            if (tally__limit_with_max(&cfg->limits[i], max[i], &own[i])) {
                tally__sec_exit(e);
                return TALLY_EINVAL;
            }
        c.lim = own;
    }
    if (kind == HIT_RESERVE) {
        if (!cfg->all_gcra) {
            tally__sec_exit(e);
            return TALLY_EINVAL;
        }
        /* The tolerance widened by the delay accepted: a hit that fits it
           is booked now, and conforms once the bucket has drained that
           far. A cost above max never conforms: such a call is a plain
           hit, which denies it. */
        bool never = false;
        for (unsigned i = 0; i < p->n_limits; i++)
            never |= (costs ? costs[i] : 1) > cfg->limits[i].spec.max;
        for (unsigned i = 0; i < p->n_limits; i++) {
            own[i] = cfg->limits[i];
            if (!never)
                own[i].tau_ns = sat_add(own[i].tau_ns, max_delay, TALLY__TIME_MAX);
        }
        c.lim = own;
    }

    tally__stat_shard *st = my_shard(e);
    if (TALLY__UNLIKELY(too_stale(e, now_ns))) {
        tally__sec_exit(e);
        memset(out, 0, sizeof(*out));
        out->retry_after_ns = atomic_load_explicit(&e->fail_closed_ns, memory_order_relaxed);
        stat_inc(e, &st->hits);
        stat_inc(e, &st->denials);
        return 0;
    }

    tally__digest d = known ? *known : tally__key_digest(e, key, key_len);
    tally__table *t = &p->table;
    bool syncing = atomic_load_explicit(&e->syncing, memory_order_relaxed);
    /* acquire: paired with the release store in tally__table_sync_alloc()
       (table.c); NULL, while a flusher starts, is a hit before it started */
    tally__sync *sync = syncing ? atomic_load_explicit(&t->sync, memory_order_acquire) : NULL;
    for (;;) {
        tally__probe hint;
        if (missed) {
            hint = *missed;
            c.s = NULL;
            missed = NULL;
        } else {
            c.s = tally__table_find_fast(t, d, &hint);
        }
        if (TALLY__UNLIKELY(!c.s)) {
            rc = acquire_slot(e, t, d, key, key_len, now_ns, &hint, &c.s);
            if (rc) {
                if (rc == TALLY_EFULL)
                    stat_inc(e, &st->full_refusals);
                break;
            }
            /* a key new to this engine asks the store for its global count;
               this hit decides without it */
            if (sync)
                tally__prefetch(e, t->policy, d);
        }
        c.sync = sync ? sync + tally__slot_index(t, c.s) * p->n_limits : NULL;
        int step = p->n_limits == 1
            ? apply(&c, 0, now_ns, costs ? costs[0] : 1, how, &r[0])
            : hit_multi(&c, now_ns, costs, how, r);
        if (TALLY__LIKELY(step == STEP_OK)) {
            if (kind == HIT_RESERVE) {
                uint64_t wait = 0;
                for (unsigned i = 0; i < p->n_limits; i++) {
                    uint64_t w = tally__gcra_reserve_report(&cfg->limits[i], costs ? costs[i] : 1, &r[i]);
                    wait = w > wait ? w : wait;
                }
                fill_result(p->n_limits, cfg->flags, r, out);
                *delay = out->allowed ? wait : 0;
            } else {
                fill_result(p->n_limits, cfg->flags, r, out);
            }
            /* the recency an eviction judges by; a denial stamps too */
            if (cfg->flags & TALLY_EVICT_LRU)
                tally__table_touch(t, tally__slot_index(t, c.s), now_ns);
            if (c.sync) {
                for (unsigned i = 0; i < p->n_limits; i++) {
                    if (r[i].added)
                        delta_add(e, &c, i, d, r[i].win, r[i].added);
                    if (r[i].first && atomic_load_explicit(&e->events_on, memory_order_relaxed))
                        push_event(e, &c, i, d, key, key_len, &r[i]);
                }
            }
            stat_inc(e, &st->hits);
            if (TALLY__UNLIKELY(out->exceeded)) {
                stat_inc(e, out->allowed ? &st->shadow_denials : &st->denials);
                if (atomic_load_explicit(&t->watch, memory_order_relaxed)) {
                    uint64_t cost = 0;
                    for (unsigned i = 0; i < p->n_limits; i++)
                        if ((costs ? costs[i] : 1) > cost)
                            cost = costs ? costs[i] : 1;
                    tally__watch_feed(e, p, tally__slot_index(t, c.s), d, key, key_len, cost, now_ns);
                }
            }
            break;
        }
        tally__table_help_kill(t, c.s);
    }
    tally__sec_exit(e);
    return rc;
}

/* Out of line, so that the fast path of tally_hit_at() keeps its registers.
   Called inside the read-side section tally_hit_at() entered, which it ends. */
static __attribute__((noinline)) int hit_plain(tally_engine *e, tally__policy *p, const void *key,
                                               size_t key_len, const uint64_t *costs, uint64_t now_ns,
                                               tally_result *out, const tally__digest *known,
                                               const tally__probe *missed)
{
    return hit_core(e, 0, key, key_len, costs, now_ns, out, HIT_PLAIN, NULL, 0, NULL, known, p,
                    missed);
}

/*
 * The hit most calls make: a policy of one limit without a rejection watch,
 * hit by a key it holds, in an engine without a flusher (nothing to record
 * for the sinks, no remote count, no staleness bound). It decides exactly as
 * hit_core() does, through the same apply(), with none of the code for what
 * it leaves out; everything else (a new key, a DEAD state, the other cases)
 * goes on in hit_core(), in the same read-side section, with the digest
 * already computed.
 */
int tally_hit_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                 const uint64_t *costs, uint64_t now_ns, tally_result *out)
{
    tally__policy *p;
    tally__digest d;
    const tally__digest *known = NULL;
    tally__probe miss;
    const tally__probe *missed = NULL;

    if (TALLY__UNLIKELY(now_ns > TALLY__TIME_MAX))
        return TALLY_EINVAL;
    int rc = enter(e, policy, key, key_len, out, &p);
    if (TALLY__UNLIKELY(rc))
        return rc;
    /* acquire: paired with the release store of tally_policy_update()
       (engine.c): the block is seen whole, as it was built */
    const tally__cfg *cfg = atomic_load_explicit(&p->cfg, memory_order_acquire);
    /* relaxed, both: a flusher that starts meanwhile did not see this hit
       begin; the acquires of hit_core() are for hits that sync */
    tally__table *t = &p->table;
    if (TALLY__UNLIKELY(p->n_limits != 1 || (cfg->flags & TALLY_EVICT_LRU)
                        || atomic_load_explicit(&e->syncing, memory_order_relaxed)
                        || atomic_load_explicit(&e->fail_closed_ns, memory_order_relaxed)
                        || atomic_load_explicit(&t->watch, memory_order_relaxed)))
        goto slow;
    d = tally__key_digest(e, key, key_len);
    known = &d;

    tally__slot *s = tally__table_find_pref(t, d);
    if (TALLY__UNLIKELY(!s)) {
        if (!(s = tally__table_find_fast(t, d, &miss))) {
            missed = &miss;
            goto slow;
        }
    }
    uint64_t cost = costs ? costs[0] : 1;
    tally__step r;
    /* the policy's usual flags as a constant: the step without their code */
    hit_ctx c = { .p = p, .lim = cfg->limits, .s = s, .sync = NULL };
    int step = cfg->how == TALLY__ADD_IF_FITS ? apply(&c, 0, now_ns, cost, TALLY__ADD_IF_FITS, &r)
                                              : apply(&c, 0, now_ns, cost, cfg->how, &r);
    if (TALLY__UNLIKELY(step == STEP_DEAD)) {
        tally__table_help_kill(t, s);
        goto slow;
    }
    fill_result(1, cfg->flags, &r, out);
    tally__stat_shard *st = my_shard(e);
    stat_inc(e, &st->hits);
    if (TALLY__UNLIKELY(out->exceeded))
        stat_inc(e, out->allowed ? &st->shadow_denials : &st->denials);
    tally__sec_exit(e);
    return 0;

slow:
    return hit_plain(e, p, key, key_len, costs, now_ns, out, known, missed);
}

int tally_hit(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
              const uint64_t *costs, tally_result *out)
{
    return tally_hit_at(e, policy, key, key_len, costs, tally_now_ns(), out);
}

int tally_hit_ex(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                 const tally_hit_opts *opts, tally_result *out)
{
    static const tally_hit_opts none = { 0 };
    if (!opts)
        opts = &none;
    uint64_t now = opts->now_ns ? opts->now_ns : tally_now_ns();
    return hit_core(e, policy, key, key_len, opts->costs, now, out, HIT_MAX, opts->max, 0, NULL,
                    NULL, NULL, NULL);
}

int tally_reserve_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                     const uint64_t *costs, uint64_t now_ns, uint64_t max_delay_ns,
                     uint64_t *delay_ns, tally_result *out)
{
    if (!delay_ns)
        return TALLY_EINVAL;
    uint64_t wait = 0;
    int rc = hit_core(e, policy, key, key_len, costs, now_ns, out, HIT_RESERVE, NULL,
                      max_delay_ns, &wait, NULL, NULL, NULL);
    if (!rc)
        *delay_ns = wait;
    return rc;
}

int tally_release_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                     const uint64_t *costs, uint64_t now_ns)
{
    tally__policy *p;
    int rc;

    if (now_ns > TALLY__TIME_MAX)
        return TALLY_EINVAL;
    rc = enter(e, policy, key, key_len, e /* no output: any non-NULL */, &p);
    if (rc)
        return rc;
    /* acquire: paired with the release store of tally_policy_update() (engine.c) */
    const tally__cfg *cfg = atomic_load_explicit(&p->cfg, memory_order_acquire);
    if (cfg->conc < 0) {
        tally__sec_exit(e);
        return TALLY_EINVAL;
    }
    unsigned i = (unsigned)cfg->conc;
    uint64_t cost = costs ? costs[i] : 1;
    tally__slot *s = tally__table_find(&p->table, tally__key_digest(e, key, key_len));
    rc = TALLY_ENOENT;
    while (s) {
        tally__state cur = tally__state_load(&s->st[i]), next;
        if (tally__state_is_dead(cur))
            break;                                /* reclaimed: its holds had expired */
        rc = tally__concurrency_release(&cfg->limits[i], cur, now_ns, cost, &next);
        /* a refusal too comes from an untorn pair (guarantee 2) */
        if (tally__state_cas(&s->st[i], cur, rc ? cur : next))
            break;
    }
    tally__sec_exit(e);
    return rc;
}

int tally_release(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                  const uint64_t *costs)
{
    return tally_release_at(e, policy, key, key_len, costs, tally_now_ns());
}

int tally_peek_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                  uint64_t now_ns, tally_result *out)
{
    tally__policy *p;
    tally__step r[TALLY_MAX_LIMITS];
    int rc;

    if (now_ns > TALLY__TIME_MAX)
        return TALLY_EINVAL;
    rc = enter(e, policy, key, key_len, out, &p);
    if (rc)
        return rc;
    tally__table *t = &p->table;
    /* acquire: paired with the release store of tally_policy_update() (engine.c) */
    const tally__cfg *cfg = atomic_load_explicit(&p->cfg, memory_order_acquire);
    /* acquire: paired with the release store in tally__table_sync_alloc() */
    tally__sync *sync = atomic_load_explicit(&e->syncing, memory_order_relaxed)
        ? atomic_load_explicit(&t->sync, memory_order_acquire) : NULL;
    hit_ctx c = { .p = p, .s = tally__table_find(t, tally__key_digest(e, key, key_len)) };
    c.sync = c.s && sync ? sync + tally__slot_index(t, c.s) * p->n_limits : NULL;
    for (unsigned i = 0; i < p->n_limits; i++) {
        tally__state cur = { 0, 0 };
        tally__remote rem;
        load_remote(&c, i, &rem);
        if (c.s)
            cur = tally__state_load_atomic(&c.s->st[i]);
        if (tally__state_is_dead(cur))
            cur = (tally__state){ 0, 0 };         /* being reclaimed: it had expired */
        algo_step(&cfg->limits[i], cur, now_ns, 1, TALLY__ADD_NEVER | TALLY__NO_MARK, &rem, &r[i]);
    }
    fill_result(p->n_limits, cfg->flags, r, out);
    tally__sec_exit(e);
    return 0;
}

/* ---- Reading and resetting ----------------------------------------------- */

#define READ_TRIES 16          /* seqlock retries before a snapshot is marked in flux */

/*
 * The snapshot of slot @s: its instance number and states, read as a seqlock
 * (table.c guarantee 6). A reset running all the while leaves the instance
 * odd: resetting from that snapshot conflicts, and reading never waits.
 */
static int read_instance(tally__table *t, const tally__limit *lim, tally__slot *s, uint64_t now,
                         tally_snapshot *snap)
{
    _Atomic uint64_t *gen = &t->gen[tally__slot_index(t, s)];
    for (unsigned tries = 0;; tries++) {
        /* acquire: paired with the store release that ends a reset in tally_reset_if() */
        uint64_t g1 = atomic_load_explicit(gen, memory_order_acquire);
        for (unsigned i = 0; i < t->n_limits; i++) {
            tally__state cur = tally__state_load_atomic(&s->st[i]);
            if (tally__state_is_dead(cur))
                return TALLY_ENOENT;
            tally__algo_counter(&lim[i], cur, now, &snap->c[i]);
        }
        /* the states are read before the instance is checked again; paired
           with the full barrier of the state CAS by which tally_reset_if()
           follows its odd store of gen */
        atomic_thread_fence(memory_order_acquire);
        uint64_t g2 = atomic_load_explicit(gen, memory_order_relaxed);
        if ((g1 == g2 && !(g1 & 1)) || tries == READ_TRIES) {
            snap->generation = g1 == g2 ? g1 : g2 | 1;
            return 0;
        }
    }
}

int tally_read(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
               tally_snapshot *out)
{
    tally__policy *p;
    int rc = enter(e, policy, key, key_len, out, &p);
    if (rc)
        return rc;

    tally_snapshot snap = { .policy = policy, .n_limits = p->n_limits };
    tally__table *t = &p->table;
    tally__slot *s = tally__table_find(t, tally__key_digest(e, key, key_len));
    uint64_t now = tally_now_ns();
    rc = s ? 0 : TALLY_ENOENT;
    /* acquire: paired with the release store of tally_policy_update() (engine.c) */
    const tally__cfg *cfg = atomic_load_explicit(&p->cfg, memory_order_acquire);
    if (s)
        rc = read_instance(t, cfg->limits, s, now, &snap);
    tally__sec_exit(e);
    if (!rc)
        *out = snap;
    return rc;
}

int tally_reset_if(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                   const tally_snapshot *observed, uint32_t *reset_mask)
{
    tally__policy *p;
    uint32_t mask = 0;
    int rc;

    if (!observed)
        return TALLY_EINVAL;
    rc = enter(e, policy, key, key_len, observed, &p);
    if (rc)
        return rc;
    if (observed->policy != policy || observed->n_limits != p->n_limits) {
        tally__sec_exit(e);
        return TALLY_EINVAL;
    }
    tally__slot *s = tally__table_find(&p->table, tally__key_digest(e, key, key_len));
    if (!s) {
        tally__sec_exit(e);
        return TALLY_ENOENT;
    }
    /* Resetters of one policy take turns, so that of several resetters of
       the same observed instance exactly one resets anything: the others then
       find a new instance. Hits do not take the lock and never change gen. */
    tally__table *t = &p->table;
    _Atomic uint64_t *gen = &t->gen[tally__slot_index(t, s)];
    if (tally__lock(&p->reset_lock) && p->reset_slot != SIZE_MAX) {
        /* a process of a shared engine died resetting that slot, its
           instance odd and some of its states perhaps reset: a new one,
           unless the slot was reclaimed since (its writer then).
           release: paired with the acquire loads of gen in read_instance(),
           hit_multi() and take_back(), as the reset's own store below */
        uint64_t odd = p->reset_gen | 1;
        atomic_compare_exchange_strong_explicit(&t->gen[p->reset_slot], &odd, tally__table_gen_fresh(t),
                                                memory_order_release, memory_order_relaxed);
        p->reset_slot = SIZE_MAX;
    }
    uint64_t g = atomic_load_explicit(gen, memory_order_relaxed);
    if (g == observed->generation) {
        p->reset_slot = tally__slot_index(t, s);
        p->reset_gen = g;
        /* odd: readers that see any state this reset writes retry or report
           the instance in flux. The state CAS below is a full barrier after
           it: paired with the acquire fence of read_instance() and the
           acquire state loads of take_back() */
        atomic_store_explicit(gen, g | 1, memory_order_relaxed);
        for (unsigned i = 0; i < p->n_limits; i++) {
            tally__state seen = { observed->c[i].raw[0], observed->c[i].raw[1] };
            static const tally__state empty = { 0, 0 };
            /* an empty state has nothing to reset; a DEAD one must not come back */
            if (tally__state_is_empty(seen) || tally__state_is_dead(seen))
                continue;
            if (tally__state_cas(&s->st[i], seen, empty))
                mask |= 1u << i;
        }
        /* release: the states are reset before the new instance is seen;
           paired with the acquire loads of gen in read_instance(),
           hit_multi() and take_back() */
        atomic_store_explicit(gen, mask ? tally__table_gen_fresh(t) : g, memory_order_release);
        p->reset_slot = SIZE_MAX;
    }
    pthread_mutex_unlock(&p->reset_lock);
    tally__sec_exit(e);
    if (reset_mask)
        *reset_mask = mask;
    return mask ? 0 : TALLY_ECONFLICT;
}

