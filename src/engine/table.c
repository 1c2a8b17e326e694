/*
 * The key table: a flat open-addressing array of fixed capacity whose slots
 * hold a 128-bit key digest and the key's per-limit state inline.
 *
 * A key lives within TALLY__WINDOW slots of its home slot. A slot moves
 * through these digest states (status in the top two bits of the hi word):
 *
 *   EMPTY {0,0} --claim--> PENDING(D) --promote--> LIVE(D) --kill--> DEAD(D)
 *   FREE  {1,0} --claim--> PENDING(D) --lose-----> DEAD(D)
 *   DEAD(D) --take--> ZOMBIE {2,0} --grace period--> FREE {1,0}
 *
 * Ordering and progress guarantees:
 *  1. EMPTY is never re-entered, so a probe that meets EMPTY before the key
 *     proves the key was absent when the slot was read (a key is always
 *     claimed at the first EMPTY-or-FREE slot of its window). The slots form
 *     groups of TALLY__GROUP, and ovf[g] counts the claims, not yet made
 *     FREE again, that passed group g: a claimant adds one to every group
 *     between its home and its slot before its claim CAS (seq_cst), and the
 *     reclaim that frees the slot takes them back. A probe that has passed
 *     the end of a group with ovf 0 proves, in the same way, that the key
 *     was in no later slot: once a table has turned over and FREE slots
 *     stand where EMPTY ones were, a miss still ends in its home group.
 *  2. Claims and promotions are 16-byte CASes on the digest word: a slot is
 *     owned by the one CAS that moved it out of EMPTY or FREE.
 *  3. At most one LIVE slot per digest, and at most capacity LIVE slots (the
 *     promotion takes a reservation, guarantee 7; PENDING holds none). Each
 *     claimant publishes PENDING, then
 *     scans the window (seq_cst, Dekker style): a LIVE twin or a PENDING twin
 *     nearer home wins and the claimant kills its own claim; a PENDING twin
 *     farther from home is killed. Of two claimants at least one sees the
 *     other, so two promotions cannot both succeed. Any thread that meets a
 *     PENDING slot of its key runs the same resolution (helping), so no thread
 *     waits on another (but at the capacity edge, guarantee 7).
 *  4. A LIVE slot dies only by a CAS of its limit-0 state from an expired
 *     value to DEAD: a hit that changed limit 0 in between makes the kill
 *     fail, and a hit that comes after sees DEAD and moves to a fresh slot.
 *  5. A slot is reused only after an RCU grace period that began after it
 *     died, so a reader holding a pointer to it never sees it hold another
 *     key (no ABA on state words or digests).
 *  6. Each slot has an instance number, gen[i], even and unique in the table:
 *     every slot starts with its own, a slot made FREE gets a fresh one, and
 *     every reset gives a fresh one (engine.c). A snapshot of (gen, state)
 *     therefore names one instance of one key's state: hits that rebuild the
 *     same state words after a reset, or in a new slot, carry another gen.
 *     gen is written by one writer at a time: the reclaim that owns a ZOMBIE
 *     slot, or a resetter holding the policy's reset lock.
 *  7. Capacity is one word, res: reservations taken, and among them those
 *     of holders, promotions that have not yet learnt whether their CAS to
 *     LIVE won. A holder keeps or gives back its reservation right after that
 *     one CAS. A new key is refused for capacity (TALLY_EFULL) only when a
 *     single read of res shows every reservation kept (no holder): then
 *     capacity slots are LIVE at that instant. While a holder is in flight,
 *     a claimant at the capacity edge yields until the outcome is known:
 *     the only wait in the table, on a few instructions of a running
 *     promotion, and only for new keys when the table is at capacity.
 *     (A LIVE slot being killed gives its reservation back just after its
 *     digest CAS to DEAD; a refusal in that gap goes to the reclaim, which
 *     finds the DEAD slot.)
 */
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine-internal.h"
#include "core/tsan.h"

static inline tally__slot *slot_at(const tally__table *t, size_t i)
{
    return (tally__slot *)(t->mem + i * t->stride);
}

static inline size_t home_of(const tally__table *t, tally__digest d)
{
    return (size_t)(((unsigned __int128)d.lo * t->n_slots) >> 64);
}

static inline size_t wrap(const tally__table *t, size_t i)
{
    return i >= t->n_slots ? i - t->n_slots : i;
}

static inline size_t group_of(size_t i)
{
    return i / TALLY__GROUP;
}

/* Slot @i ends a group whose overflow count is 0: nothing probed past it. */
static inline bool ends_probe(tally__table *t, size_t i)
{
    /* acquire: paired with the increments of pass_groups(), as a digest
       load is with the claim CAS */
    return (i + 1) % TALLY__GROUP == 0
        && atomic_load_explicit(&t->ovf[group_of(i)], memory_order_acquire) == 0;
}

/* The same, in a resolution scan (Dekker style: see digest_load()). */
static inline bool ends_probe_seq_cst(tally__table *t, size_t i)
{
    /* seq_cst: paired with the seq_cst increments of pass_groups() by a twin
       claimant, as digest_load() is with its claim CAS */
    return (i + 1) % TALLY__GROUP == 0 && atomic_load(&t->ovf[group_of(i)]) == 0;
}

/* Add @delta to the overflow count of every group from @home's to the one
   before slot @i's. */
static void pass_groups(tally__table *t, size_t home, size_t i, int delta)
{
    size_t n_groups = t->n_slots / TALLY__GROUP;
    for (size_t g = group_of(home); g != group_of(i); g = g + 1 == n_groups ? 0 : g + 1) {
        if (delta > 0)
            /* seq_cst: paired with the loads of ends_probe_seq_cst() by a twin's resolve() */
            atomic_fetch_add(&t->ovf[g], 1);
        else
            atomic_fetch_sub_explicit(&t->ovf[g], 1, memory_order_relaxed);   /* no claim remains */
    }
}

static inline uint64_t hi_with(tally__digest d, unsigned status)
{
    return (d.hi & TALLY__DIGEST_HI_MASK) | ((uint64_t)status << TALLY__STATUS_SHIFT);
}

static inline unsigned status_of(uint64_t hi)
{
    return (unsigned)(hi >> TALLY__STATUS_SHIFT);
}

static inline bool is_key(uint64_t hi, uint64_t lo, tally__digest d)
{
    return status_of(hi) != TALLY__EMPTY && lo == d.lo
        && (hi & TALLY__DIGEST_HI_MASK) == (d.hi & TALLY__DIGEST_HI_MASK);
}

/*
 * Every change of a digest but the last, to FREE (tally__table_reclaim_free()),
 * is this CAS, a full barrier (seq_cst). A claim is ordered before the scan
 * that resolves it: paired with the seq_cst loads of digest_load() in a twin
 * claimant's resolve() (guarantee 3). It also releases what the slot's owner
 * wrote before it (a promotion: paired with the acquire loads of
 * tally__table_find_fast() and tally__table_live()) and acquires what the
 * previous owner released (a claim of a FREE slot: paired with the release
 * store in tally__table_reclaim_free()).
 */
static inline bool digest_cas(tally__slot *s, uint64_t lo, uint64_t hi, uint64_t nlo, uint64_t nhi)
{
    return tally__pair_cas(&s->d_lo, lo, hi, nlo, nhi);
}

static inline void digest_load(tally__slot *s, uint64_t *lo, uint64_t *hi)
{
    /* seq_cst: paired with the claim CAS (digest_cas()) of a twin claimant,
       so that of two claims of one key, one scan sees the other */
    *hi = tally__word_load_seq_cst(&s->d_hi);
    *lo = tally__word_load_seq_cst(&s->d_lo);
}

int tally__table_init(tally__table *t, size_t capacity, unsigned n_limits,
                      const tally__limit *limits, bool keep_keys)
{
    memset(t, 0, sizeof(*t));
    t->capacity = capacity;
    t->n_limits = n_limits;
    t->limits = limits;
    t->stride = sizeof(tally__slot) + n_limits * sizeof(tally__state);
    /* Load factor at most 1/2: the longest run of linear probing then stays
       far below the probe window (about 75 slots for a million keys), and a
       miss mostly ends in its home group (guarantee 1). */
    t->n_slots = 2 * capacity;
    /* whole groups, and a window that cannot wrap onto its home group */
    if (t->n_slots < 2 * TALLY__WINDOW)
        t->n_slots = 2 * TALLY__WINDOW;
    t->n_slots = (t->n_slots + TALLY__GROUP - 1) / TALLY__GROUP * TALLY__GROUP;
    t->sweep_max = t->n_slots / TALLY__SWEEP_SHARE;
    if (t->sweep_max > TALLY__SWEEP_MAX)
        t->sweep_max = TALLY__SWEEP_MAX;
    if (t->sweep_max < TALLY__SWEEP)
        t->sweep_max = t->n_slots < TALLY__SWEEP ? t->n_slots : TALLY__SWEEP;
    atomic_init(&t->sweep_len, t->sweep_max < TALLY__SWEEP ? t->sweep_max : TALLY__SWEEP);
    if (t->n_slots > SIZE_MAX / t->stride)
        return TALLY_ENOMEM;
    if (posix_memalign((void **)&t->mem, TALLY__CACHE_LINE, t->n_slots * t->stride) != 0)
        return TALLY_ENOMEM;
    memset(t->mem, 0, t->n_slots * t->stride);
    t->gen = malloc(t->n_slots * sizeof(*t->gen));
    t->ovf = calloc(t->n_slots / TALLY__GROUP, sizeof(*t->ovf));
    if (keep_keys)
        t->keys = calloc(t->n_slots, sizeof(*t->keys));
    if (!t->gen || !t->ovf || (keep_keys && !t->keys)) {
        tally__table_destroy(t);      /* frees what was allocated, NULL the rest */
        return TALLY_ENOMEM;
    }
    for (size_t i = 0; i < t->n_slots; i++)
        atomic_init(&t->gen[i], 2 * (uint64_t)(i + 1));
    atomic_init(&t->gen_next, 2 * (uint64_t)(t->n_slots + 1));
    return 0;
}

int tally__table_sync_alloc(tally__table *t)
{
    /* relaxed: under add_lock, as is the only store */
    if (atomic_load_explicit(&t->sync, memory_order_relaxed))
        return 0;
    tally__sync *y;
    if (posix_memalign((void **)&y, TALLY__CACHE_LINE, t->n_slots * t->n_limits * sizeof(*y)) != 0)
        return TALLY_ENOMEM;
    memset(y, 0, t->n_slots * t->n_limits * sizeof(*y));
    /* release: the zeroed array before hits may use it; paired with the
       acquire loads of t->sync in hit.c, in the reclaim here, in
       sync/flusher.c and in ops/ops.c */
    atomic_store_explicit(&t->sync, y, memory_order_release);
    return 0;
}

/* Close, or a policy that was never published: no other thread is here. */
void tally__table_destroy(tally__table *t)
{
    free(atomic_load_explicit(&t->sync, memory_order_relaxed));
    atomic_store_explicit(&t->sync, NULL, memory_order_relaxed);
    free(atomic_load_explicit(&t->watch, memory_order_relaxed));
    atomic_store_explicit(&t->watch, NULL, memory_order_relaxed);
    if (t->keys) {
        for (size_t i = 0; i < t->n_slots; i++)
            free(atomic_load_explicit(&t->keys[i], memory_order_relaxed));
        free(t->keys);
    }
    free(t->ovf);
    free(t->gen);
    free(t->mem);
    t->ovf = NULL;
    t->gen = NULL;
    t->mem = NULL;
    t->keys = NULL;
}

size_t tally__table_bytes(const tally__table *t)
{
    return t->n_slots * (t->stride + sizeof(*t->gen)) + t->n_slots / TALLY__GROUP * sizeof(*t->ovf)
        + (t->keys ? t->n_slots * sizeof(*t->keys) : 0);
}

tally__slot *tally__table_find_fast(tally__table *t, tally__digest d, tally__probe *hint)
{
    size_t i = home_of(t, d);

    hint->pos = SIZE_MAX;
    for (size_t k = 0; k < TALLY__WINDOW; k++, i = wrap(t, i + 1)) {
        tally__slot *s = slot_at(t, i);
        /* acquire: paired with the promotion CAS in resolve(), so that the
           hit reads the states as the slot's owner left them */
        uint64_t hi = tally__word_load_acquire(&s->d_hi);
        if (hi == hi_with(d, TALLY__LIVE)) {
            /* acquire: paired with the promotion CAS, as the hi load */
            if (tally__word_load_acquire(&s->d_lo) == d.lo)
                return s;
        } else if (hi == 0) {
            /* acquire: paired with the release in tally__table_reclaim_free() */
            uint64_t lo = tally__word_load_acquire(&s->d_lo);
            if ((lo == TALLY__LO_EMPTY || lo == TALLY__LO_FREE) && hint->pos == SIZE_MAX)
                *hint = (tally__probe){ k, lo };
            if (lo == TALLY__LO_EMPTY)
                return NULL;
        }
        if (ends_probe(t, i))
            return NULL;
    }
    return NULL;
}

tally__slot *tally__table_find(tally__table *t, tally__digest d)
{
    size_t i = home_of(t, d);

    for (size_t k = 0; k < TALLY__WINDOW; k++, i = wrap(t, i + 1)) {
        tally__slot *s = slot_at(t, i);
        uint64_t lo, hi;
        digest_load(s, &lo, &hi);
        if (hi == 0 && lo == TALLY__LO_EMPTY)
            return NULL;
        if (hi == hi_with(d, TALLY__LIVE) && lo == d.lo)
            return s;
        if (ends_probe(t, i))
            return NULL;
    }
    return NULL;
}

/* Kill a PENDING claim of @d. A PENDING slot holds no reservation. */
static bool kill_pending(tally__slot *s, tally__digest d)
{
    return digest_cas(s, d.lo, hi_with(d, TALLY__PENDING), d.lo, hi_with(d, TALLY__DEAD));
}

_Static_assert(TALLY_MAX_CAPACITY < TALLY__RES_HOLDER, "the live count fits its bits");

/*
 * Take a capacity reservation for a promotion, as a holder (guarantee 7).
 * Return true, or false with the word that refused in *seen.
 */
static bool reserve(tally__table *t, uint64_t *seen)
{
    /* relaxed: guarantee 7 is about res alone, one word in one modification order */
    uint64_t r = atomic_load_explicit(&t->res, memory_order_relaxed);
    do {
        if (tally__res_live(r) >= t->capacity) {
            *seen = r;
            return false;
        }
    } while (!atomic_compare_exchange_weak_explicit(&t->res, &r, r + TALLY__RES_HOLDER + 1,
                                                    memory_order_relaxed, memory_order_relaxed));
    return true;
}

/* A holder learnt its promotion's outcome: keep the reservation, or give it back. */
static void settle(tally__table *t, bool promoted)
{
    atomic_fetch_sub_explicit(&t->res, TALLY__RES_HOLDER + (promoted ? 0 : 1), memory_order_relaxed);
}

/* A table is full when every reservation is kept by a LIVE slot. */
static bool full_now(uint64_t r, const tally__table *t)
{
    return tally__res_live(r) >= t->capacity && tally__res_holders(r) == 0;
}

/*
 * Resolve the PENDING claim at window position @me (guarantee 3). Return the
 * LIVE slot of @d, or NULL if the claim lost, or the table was full, and the
 * caller must look again (its scan finds a twin that went LIVE, or finds the
 * table full). Promotion takes the capacity reservation, so that racing
 * duplicate claims of one key never count against the capacity.
 */
static tally__slot *resolve(tally__table *t, tally__digest d, size_t home, size_t me)
{
again:;
    tally__slot *mine = slot_at(t, wrap(t, home + me));
    for (size_t k = 0; k < TALLY__WINDOW; k++) {
        size_t i = wrap(t, home + k);
        tally__slot *s = slot_at(t, i);
        uint64_t lo, hi;
        if (k != me) {
            digest_load(s, &lo, &hi);
            if (hi == 0 && lo == TALLY__LO_EMPTY)
                break;                /* guarantee 1: a later twin will see our claim */
            if (is_key(hi, lo, d)) {
                switch (status_of(hi)) {
                case TALLY__LIVE:
                    kill_pending(mine, d);
                    return s;
                case TALLY__PENDING:
                    if (k < me) {
                        kill_pending(mine, d);
                        me = k;
                        goto again;
                    }
                    if (!kill_pending(s, d))
                        goto again;   /* it moved on: promoted or killed; look again */
                    break;
                default:
                    break;
                }
            }
        }
        if (ends_probe_seq_cst(t, i))
            break;                    /* guarantee 1: a later twin will see our claim */
    }
    uint64_t seen, lo, hi;
    for (;;) {
        if (reserve(t, &seen)) {
            bool promoted = digest_cas(mine, d.lo, hi_with(d, TALLY__PENDING), d.lo, hi_with(d, TALLY__LIVE));
            settle(t, promoted);
            if (promoted)
                return mine;
            break;                    /* another thread promoted or killed it */
        }
        if (full_now(seen, t)) {
            if (kill_pending(mine, d))
                return NULL;          /* the caller's next scan reports the table full */
            break;
        }
        /* The last reservations are held by promotions in flight, perhaps a
           twin's, perhaps about to be given back: learn their outcome (a few
           instructions of their holders) rather than refuse the key. */
        digest_load(mine, &lo, &hi);
        if (lo != d.lo || hi != hi_with(d, TALLY__PENDING))
            break;
        sched_yield();
    }
    digest_load(mine, &lo, &hi);
    return (lo == d.lo && hi == hi_with(d, TALLY__LIVE)) ? mine : NULL;
}

tally__slot *tally__table_live(tally__table *t, size_t i, tally__digest *d)
{
    tally__slot *s = slot_at(t, i);
    /* acquire: paired with the promotion CAS in resolve() that made the
       slot LIVE: the caller reads its states after it */
    uint64_t hi = tally__word_load_acquire(&s->d_hi);
    if (status_of(hi) != TALLY__LIVE)
        return NULL;
    /* acquire: paired with the same CAS, which wrote lo with hi */
    d->lo = tally__word_load_acquire(&s->d_lo);
    d->hi = hi & TALLY__DIGEST_HI_MASK;
    return s;
}

/* A key copy is its length, then its bytes. */
const void *tally__table_key(tally__table *t, size_t i, size_t *len)
{
    /* acquire: paired with the release store of the copy in tally__table_acquire() */
    const size_t *kp = t->keys ? atomic_load_explicit(&t->keys[i], memory_order_acquire) : NULL;
    tally__tsan_acquire(kp);
    if (!kp)
        return NULL;
    *len = *kp;
    return kp + 1;
}

void tally__table_key_done(const void *key)
{
    /* the reads are ordered before the reclaim that frees the copy */
    if (key)
        tally__tsan_release((const size_t *)key - 1);
}

static void *key_copy(const void *key, size_t len)
{
    size_t *p = malloc(sizeof(size_t) + len);
    if (p) {
        *p = len;
        memcpy(p + 1, key, len);
    }
    return p;
}

int tally__table_acquire(tally__table *t, tally__digest d, const void *key, size_t key_len,
                         const tally__probe *hint, tally__slot **out)
{
    size_t home = home_of(t, d);
    void *copy = NULL;                /* a key copy not yet stored in a slot */

    for (;; hint = NULL) {
        size_t free_k = SIZE_MAX;
        uint64_t free_lo = 0;
        tally__slot *found = NULL;
        bool rescan = false;

        if (hint && hint->pos != SIZE_MAX) {
            free_k = hint->pos;
            free_lo = hint->lo;
            goto claim;
        }

        /* Look for the key until it is proven absent (guarantee 1), and
           for the first slot to claim until one is found. */
        bool absent = false;
        for (size_t k = 0; k < TALLY__WINDOW && !found && !rescan; k++) {
            size_t i = wrap(t, home + k);
            tally__slot *s = slot_at(t, i);
            uint64_t lo, hi;
            digest_load(s, &lo, &hi);
            if (hi == 0) {
                if ((lo == TALLY__LO_EMPTY || lo == TALLY__LO_FREE) && free_k == SIZE_MAX) {
                    free_k = k;
                    free_lo = lo;
                }
                if (lo == TALLY__LO_EMPTY)
                    break;                    /* guarantee 1: nothing of ours past here */
            } else if (!absent && is_key(hi, lo, d)) {
                if (status_of(hi) == TALLY__LIVE) {
                    found = s;
                } else if (status_of(hi) == TALLY__PENDING) {
                    found = resolve(t, d, home, k);
                    rescan = !found;          /* lost a race: scan again */
                }
            }
            absent = absent || ends_probe(t, i);
            if (absent && free_k != SIZE_MAX)
                break;
        }
        if (found) {
            free(copy);
            *out = found;
            return 0;
        }
        if (rescan)
            continue;
claim:;
        uint64_t r = atomic_load_explicit(&t->res, memory_order_relaxed);
        if (free_k == SIZE_MAX || tally__res_live(r) >= t->capacity) {
            /* a twin may have gone LIVE since our scan passed it */
            *out = tally__table_find(t, d);
            if (*out) {
                free(copy);
                return 0;
            }
            if (free_k != SIZE_MAX && !full_now(r, t)) {
                sched_yield();        /* promotions in flight: see resolve() */
                continue;
            }
            free(copy);
            return TALLY_EFULL;
        }

        size_t idx = wrap(t, home + free_k);
        tally__slot *mine = slot_at(t, idx);
        /* the copy is made before the claim, so that it is stored right
           after it: a helper that promotes the claim meanwhile is rare */
        if (t->keys && !copy && !(copy = key_copy(key, key_len)))
            return TALLY_ENOMEM;
        /* the groups passed count the claim before it can be seen (guarantee 1) */
        pass_groups(t, home, idx, 1);
        if (!digest_cas(mine, free_lo, 0, d.lo, hi_with(d, TALLY__PENDING))) {
            pass_groups(t, home, idx, -1);
            continue;
        }
        if (copy) {
            /* the claim CAS made us the only writer of this slot's key;
               release: paired with the acquire load in tally__table_key() */
            tally__tsan_release(copy);
            atomic_store_explicit(&t->keys[idx], copy, memory_order_release);
            copy = NULL;
        }
        found = resolve(t, d, home, free_k);
        if (found) {
            *out = found;
            return 0;
        }
    }
}

/* Finish the death of a slot whose limit 0 is DEAD (guarantee 4). */
void tally__table_help_kill(tally__table *t, tally__slot *s)
{
    static const tally__state dead = { 0, TALLY__DEAD_W1 };

    for (unsigned i = 1; i < t->n_limits; i++) {
        for (;;) {
            tally__state cur = tally__state_load(&s->st[i]);
            if (tally__state_is_dead(cur) || tally__state_cas(&s->st[i], cur, dead))
                break;
        }
    }
    uint64_t lo, hi;
    digest_load(s, &lo, &hi);
    if (status_of(hi) == TALLY__LIVE
        && digest_cas(s, lo, hi, lo, (hi & TALLY__DIGEST_HI_MASK) | ((uint64_t)TALLY__DEAD << TALLY__STATUS_SHIFT)))
        atomic_fetch_sub_explicit(&t->res, 1, memory_order_relaxed);   /* its reservation */
}

/* Kill a LIVE slot if every limit expired at @now. */
static bool kill_expired(tally__table *t, tally__slot *s, uint64_t now)
{
    static const tally__state dead = { 0, TALLY__DEAD_W1 };
    tally__state first = tally__state_load_atomic(&s->st[0]);

    if (tally__state_is_dead(first))
        goto help;
    /* acquire: paired with the release stores in tally__table_sync_alloc()
       and tally_watch_set() (ops/ops.c): the arrays are seen zeroed */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    /* acquire: paired with the flag CAS in tally__watch_feed() (watch.c) */
    if (w && atomic_load_explicit(&w[tally__slot_index(t, s)].flag_at, memory_order_acquire))
        return false;                         /* a flag stays until an operator clears it */
    for (unsigned i = 0; i < t->n_limits; i++) {
        tally__state cur = i ? tally__state_load_atomic(&s->st[i]) : first;
        if (tally__state_is_dead(cur))
            goto help;
        if (!tally__algo_expired(&t->limits[i], cur, now))
            return false;
        /* a key with cost not yet pushed to the sinks stays; acquire: paired
           with the pair CAS of delta_add() (hit.c) or of the flusher's take
           in collect_range() (sync/flusher.c) */
        if (y && tally__word_load_acquire(&y[tally__slot_index(t, s) * t->n_limits + i].delta))
            return false;
    }
    if (!tally__state_cas(&s->st[0], first, dead))
        return false;
help:
    tally__table_help_kill(t, s);
    return true;
}

tally__batch *tally__batch_new(const tally__table *t)
{
    size_t cap = TALLY__WINDOW + t->sweep_max;
    tally__batch *b = malloc(sizeof(*b));
    if (!b)
        return NULL;
    b->n = 0;
    b->cap = cap;
    b->idx = malloc(cap * sizeof(*b->idx));
    b->digest = malloc(cap * sizeof(*b->digest));
    if (!b->idx || !b->digest) {
        tally__batch_free(b);
        return NULL;
    }
    return b;
}

void tally__batch_free(tally__batch *b)
{
    if (b) {
        free(b->idx);
        free(b->digest);
        free(b);
    }
}

/* Move a DEAD slot to ZOMBIE, owned by this reclaim. */
static bool take_dead(tally__table *t, tally__slot *s, tally__digest *d)
{
    uint64_t lo, hi;
    digest_load(s, &lo, &hi);
    if (status_of(hi) != TALLY__DEAD || !digest_cas(s, lo, hi, TALLY__LO_ZOMBIE, 0))
        return false;
    d->lo = lo;
    d->hi = hi & TALLY__DIGEST_HI_MASK;
    atomic_fetch_add_explicit(&t->zombies, 1, memory_order_relaxed);
    return true;
}

static void consider(tally__table *t, size_t idx, uint64_t now, tally__batch *b)
{
    tally__slot *s = slot_at(t, idx);
    uint64_t lo, hi;

    if (b->n == b->cap)
        return;
    digest_load(s, &lo, &hi);
    if (status_of(hi) == TALLY__LIVE && !kill_expired(t, s, now))
        return;
    if (status_of(hi) == TALLY__LIVE || status_of(hi) == TALLY__DEAD) {
        if (take_dead(t, s, &b->digest[b->n]))
            b->idx[b->n++] = idx;
    }
}

size_t tally__table_reclaim_take(tally__table *t, tally__digest d, uint64_t now, tally__batch *b)
{
    size_t home = home_of(t, d);
    /* relaxed: a heuristic; any length up to sweep_max fits the batch */
    size_t len = atomic_load_explicit(&t->sweep_len, memory_order_relaxed);
    size_t sweep = atomic_fetch_add_explicit(&t->sweep, len, memory_order_relaxed) % t->n_slots;

    b->n = 0;
    for (size_t k = 0; k < TALLY__WINDOW; k++)
        consider(t, wrap(t, home + k), now, b);
    size_t in_window = b->n;
    for (size_t k = 0; k < len; k++)
        consider(t, wrap(t, sweep + k), now, b);
    size_t min = t->sweep_max < TALLY__SWEEP ? t->sweep_max : TALLY__SWEEP;
    size_t next = 2 * (b->n - in_window) >= len ? 2 * len : len / 2;
    atomic_store_explicit(&t->sweep_len, next > t->sweep_max ? t->sweep_max : next < min ? min : next,
                          memory_order_relaxed);
    return b->n;
}

/*
 * The slots of @b are ZOMBIE, owned by this reclaim, and a grace period has
 * passed since they left use: no call still holds them, and scans that read
 * their words find no LIVE key. So the stores that clear them are relaxed,
 * and the one release below publishes them all to the slot's next key.
 */
void tally__table_reclaim_free(tally__table *t, const tally__batch *b)
{
    /* acquire: paired with the release stores in tally__table_sync_alloc()
       and tally_watch_set() (ops/ops.c) */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    for (size_t j = 0; j < b->n; j++) {
        tally__slot *s = slot_at(t, b->idx[j]);
        if (w) {
            tally__watch_slot *ws = &w[b->idx[j]];
            tally__word_store_relaxed(&ws->denied.w0, 0);
            tally__word_store_relaxed(&ws->denied.w1, 0);
            atomic_store_explicit(&ws->flag_at, 0, memory_order_relaxed);
            atomic_store_explicit(&ws->flag_amount, 0, memory_order_relaxed);
            atomic_store_explicit(&ws->acc, 0, memory_order_relaxed);
        }
        /* the key copy, for spilled deltas and then to free; relaxed: the
           grace period orders its store and the writes into it before here */
        size_t *kp = t->keys ? atomic_load_explicit(&t->keys[b->idx[j]], memory_order_relaxed) : NULL;
        tally__tsan_acquire(kp);
        for (unsigned i = 0; i < t->n_limits; i++) {
            tally__word_store_relaxed(&s->st[i].w0, 0);
            tally__word_store_relaxed(&s->st[i].w1, 0);
            if (!y)
                continue;
            tally__sync *e = &y[b->idx[j] * t->n_limits + i];
            /* After the grace period no hit can still add here: a delta that
               landed after the reclaim looked goes to the flusher, never lost.
               acquire: paired with the pair CAS of delta_add() (hit.c) */
            uint64_t delta = tally__word_load_acquire(&e->delta);
            if (delta)
                tally__spill(t->notes, t->policy, i, b->digest[j],
                             tally__word_load_relaxed(&e->win), delta,
                             kp ? (const void *)(kp + 1) : NULL, kp ? *kp : 0);
            tally__word_store_relaxed(&e->win, 0);
            tally__word_store_relaxed(&e->delta, 0);
            atomic_store_explicit(&e->rwin, 0, memory_order_relaxed);
            atomic_store_explicit(&e->remote, 0, memory_order_relaxed);
        }
        if (t->keys) {
            free(kp);
            atomic_store_explicit(&t->keys[b->idx[j]], NULL, memory_order_relaxed);
        }
        /* the key no longer lies past the groups before its slot (guarantee 1) */
        pass_groups(t, home_of(t, b->digest[j]), b->idx[j], -1);
        /* the next key here is a new instance (guarantee 6) */
        atomic_store_explicit(&t->gen[b->idx[j]], tally__table_gen_fresh(t), memory_order_relaxed);
        /* release: the zeroed state and the fresh instance before the slot can
           be claimed; paired with the claim CAS in tally__table_acquire() and
           the acquire loads of tally__table_find_fast() */
        tally__word_store_release(&s->d_lo, TALLY__LO_FREE);
        atomic_fetch_add_explicit(&t->reclaimed, 1, memory_order_relaxed);
        atomic_fetch_sub_explicit(&t->zombies, 1, memory_order_relaxed);
    }
}
