/* The engine layer's private declarations: state encodings, algorithms, the
   key table, policies, notes and the engine itself. Not installed. */
#ifndef TALLY_INTERNAL_H
#define TALLY_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "tally.h"
#include "core/atomics.h"
#include "core/clock.h"
#include "core/hash.h"

struct tally__epoch;                 /* core/epoch.h */
struct tally__region;                /* core/region.h */

/* ---- Per-limit state: two words swapped together by a 16-byte CAS ------- */

/*
 * Encodings (bit 63 of w0 is always the "exceeded in this window" mark):
 *   fixed, calendar: w0 = mark | used (63 bits)     w1 = window start ns
 *   sliding:         w0 = mark | cur (44) | idx_hi (19)
 *                    w1 = 0 | prev (44) | idx_lo (19)    idx = window number mod 2^38
 *   GCRA:            w0 = mark | last hit ns (63)   w1 = ns in use as of the last hit
 *                    = max(theoretical arrival time - last hit, 0), at most INT64_MAX
 *   concurrency:     w0 = mark | last acquire ns (63)
 *                    w1 = 0 | expiries (31) | holders (32)   expiries mod 2^31
 * {0, 0} is the empty state for every algorithm. Every encoding keeps w1 at
 * most INT64_MAX, so w1 == UINT64_MAX is free to mean "slot being reclaimed".
 */

#define TALLY__MARK      (UINT64_C(1) << 63)
#define TALLY__DEAD_W1   UINT64_MAX

static inline bool tally__state_is_dead(tally__state s) { return s.w1 == TALLY__DEAD_W1; }
static inline bool tally__state_is_empty(tally__state s) { return (s.w0 | s.w1) == 0; }

/* A validated limit with the values its algorithm derives from the spec. */
typedef struct tally__limit {
    tally_limit spec;
    bool        aligned;       /* fixed window: windows start at multiples of period_ns */
    uint64_t    emission_ns;   /* GCRA: period_ns / max */
    uint64_t    tau_ns;        /* GCRA: emission_ns * max */
} tally__limit;

/* What a step may do to the state. */
enum {
    TALLY__ADD_IF_FITS = 0,    /* consume only if the cost fits */
    TALLY__ADD_ALWAYS  = 1,    /* consume even if it does not fit (shadow, count rejected) */
    TALLY__ADD_NEVER   = 2,    /* consume nothing (another limit denied; peek) */
    TALLY__NO_MARK     = 4     /* do not set the exceeded mark (peek) */
};

/* The outcome of one limit's step. */
typedef struct tally__step {
    tally__state next;         /* the state to store */
    bool         changed;      /* next differs from the state given */
    bool         fits;         /* the cost fits: this limit would allow the hit */
    bool         first;        /* this step set the exceeded mark */
    uint64_t     remaining;    /* after the step */
    uint64_t     reset_after_ns;
    uint64_t     retry_after_ns; /* 0 when it fits; TALLY_NEVER if it never will */
    uint64_t     added;        /* cost this step consumed */
    uint64_t     win;          /* start of the window the state is in (GCRA: 0) */
    uint64_t     used;         /* cost counted in that window after the step, others' included */
} tally__step;

/* Other engines' cost in one window, learnt from Redis by the flusher. */
typedef struct tally__remote {
    uint64_t win;              /* window start; meaningful only when count != 0 */
    uint64_t count;
} tally__remote;

/* Validate @l and derive its algorithm constants into @out. Return 0 or TALLY_EINVAL. */
int tally__limit_compile(const tally_limit *l, tally__limit *out);

/* @l with its max replaced by @max (0: kept), derived again into @out.
   Return 0 or TALLY_EINVAL (a max tally__limit_compile() refuses). */
int tally__limit_with_max(const tally__limit *l, uint64_t max, tally__limit *out);

/* True when the states of @from keep their meaning under @to (a policy
   update may replace one by the other). */
bool tally__limit_state_compatible(const tally__limit *from, const tally__limit *to);

/* A reservation's step for GCRA limit @l was taken against a tolerance
   widened by the caller's delay: report it against @l's own (remaining,
   retry_after). Return the wait before the booked hit conforms. */
uint64_t tally__gcra_reserve_report(const tally__limit *l, uint64_t cost, tally__step *r);

/* Release @cost holds of concurrency limit @l from @cur at @now into *@next.
   Return 0, or TALLY_ENOENT when fewer than @cost (or no) holds live at @now. */
int tally__concurrency_release(const tally__limit *l, tally__state cur, uint64_t now,
                               uint64_t cost, tally__state *next);

/* The pure function state x now x cost -> state, and what the caller reports.
   @rem: other engines' cost (NULL: none), counted in the decision. */
void tally__algo_step(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost,
                      unsigned how, const tally__remote *rem, tally__step *out);

/* Take back @cost added by a step that produced @added, from the state @cur
   (which may have moved on since). Returns the state to store. */
tally__state tally__algo_undo(const tally__limit *l, tally__state cur, tally__state added,
                              uint64_t now, uint64_t cost);

/* True when nothing in @s counts any more at @now: the slot may be reclaimed. */
bool tally__algo_expired(const tally__limit *l, tally__state s, uint64_t now);

/* The public view of a stored state (@now places a sliding window number). */
void tally__algo_counter(const tally__limit *l, tally__state s, uint64_t now, tally_counter *out);

/* Calendar arithmetic (exposed for tests). Times are ns since the epoch. */
uint64_t tally__calendar_start(tally_calendar_unit unit, int32_t utc_offset_s, uint64_t now);
uint64_t tally__calendar_next(tally_calendar_unit unit, int32_t utc_offset_s, uint64_t start);

/* ---- The key table ----------------------------------------------------- */


typedef struct tally__table tally__table;
typedef struct tally__notes tally__notes;

/*
 * A slot: a 16-byte digest word, then one 16-byte state per limit.
 * The top two bits of the digest's hi word give the slot's status.
 */
typedef struct tally__slot {
    _Alignas(16) uint64_t d_lo;    /* one declarator: _Alignas applies to each */
    uint64_t d_hi;
    tally__state st[];
} tally__slot;

/* The slot stride is 16 + 16 bytes a limit (tally__table_init()). */
_Static_assert(sizeof(tally__slot) == 16 && _Alignof(tally__slot) == 16, "slot digest pair");

enum { TALLY__EMPTY = 0, TALLY__PENDING = 1, TALLY__LIVE = 2, TALLY__DEAD = 3 };
/* Digest words of the slots that hold no key (status bits 00):
   {0, 0} never used, ends every probe; FREE {1, P} reusable; ZOMBIE {2, P} owned by a
   reclaimer (P: its process in a shared engine, else 0; table.c, guarantee 10). */
#define TALLY__LO_EMPTY  UINT64_C(0)
#define TALLY__LO_FREE   UINT64_C(1)
#define TALLY__LO_ZOMBIE UINT64_C(2)
#define TALLY__STATUS_SHIFT 62
#define TALLY__DIGEST_HI_MASK ((UINT64_C(1) << TALLY__STATUS_SHIFT) - 1)

/*
 * Per slot and limit, when a flusher runs: the cost not yet acknowledged by
 * the sinks ({win, delta}, one 16-byte CAS) and the other engines' count
 * ({rwin, remote}, written by the flusher alone, read seqlock-style with
 * rwin as the sequence: 0 while it is being written).
 */
typedef struct tally__sync {
    _Alignas(16) uint64_t win;     /* {win, delta}: a pair, CASed as a tally__state */
    uint64_t delta;
    _Alignas(16) _Atomic uint64_t rwin;  /* window start + 1; 0: none or being written */
    _Atomic uint64_t remote;
} tally__sync;

_Static_assert(sizeof(tally__sync) == 32 && _Alignof(tally__sync) == 16
               && offsetof(tally__sync, delta) == offsetof(tally__state, w1)
               && offsetof(tally__sync, rwin) == 16, "sync entry layout");

/* Per slot, when the policy has a rejection watch. */
typedef struct tally__watch_slot {
    tally__state  denied;          /* sliding window of denied cost */
    _Atomic uint64_t flag_at;      /* 0: not flagged; else when (set once by CAS) */
    _Atomic uint64_t flag_amount;  /* denied cost in the window when flagged */
    _Atomic uint64_t acc;          /* denied cost since the flusher last looked */
    uint64_t      pad;
} tally__watch_slot;

_Static_assert(sizeof(tally__watch_slot) == 48 && _Alignof(tally__watch_slot) == 16,
               "watch slot layout");

struct tally__table {
    size_t          capacity;     /* most LIVE slots */
    size_t          n_slots;
    size_t          stride;       /* bytes per slot */
    unsigned        n_limits;
    const tally__limit *_Atomic limits; /* the policy's current limits (engine.c) */
    unsigned char  *mem;
    _Atomic uint64_t *ctrl;       /* n_slots / 8 words: a control byte per slot (table.c) */
    _Atomic uint64_t res;         /* capacity reservations (table.c): live | holders */
    _Atomic size_t  sweep;        /* cursor of the reclaim sweep */
    size_t          sweep_max;    /* most slots a reclaim sweeps */
    _Atomic size_t  sweep_len;    /* slots the next reclaim sweeps */
    _Atomic uint64_t reclaimed;   /* slots reclaimed so far */
    _Atomic size_t  zombies;      /* slots taken by a reclaim, not yet FREE */
    void *_Atomic  *keys;         /* per slot copy of the key bytes (NULL: digest_only) */
    tally__sync *_Atomic sync;     /* n_slots * n_limits, once a flusher started */
    tally__watch_slot *_Atomic watch; /* n_slots, once the policy has a watch */
    _Atomic uint64_t *gen;        /* n_slots: the state instance of each slot (table.c) */
    _Atomic uint32_t *ovf;        /* n_slots / TALLY__GROUP: keys placed past each group */
    _Atomic uint64_t gen_next;    /* next unused instance number (even, never reused) */
    _Atomic bool    lru;          /* the policy has TALLY_EVICT_LRU (engine.c) */
    _Atomic uint64_t *_Atomic stamp; /* n_slots recency stamps, once the policy had
                                     TALLY_EVICT_LRU (tally__table_touch()) */
    _Atomic uint64_t lru_evicted; /* LIVE slots evicted for a new key */
    struct tally__notes *notes;   /* where deltas of reclaimed slots are spilled */
    uint32_t        policy;       /* id of the owning policy */
    struct tally__region *region; /* where the arrays are, for a shared engine; else NULL */
};

/* The reservation word: reservations taken (LIVE slots and promotions in
   flight) in the low TALLY__RES_LIVE_BITS, and above them the promotions in
   flight, whose reservation may yet be given back. */
#define TALLY__RES_LIVE_BITS 40       /* > log2(TALLY_MAX_CAPACITY) */
#define TALLY__RES_HOLDER    ((uint64_t)1 << TALLY__RES_LIVE_BITS)

static inline size_t tally__res_live(uint64_t r)
{
    return (size_t)(r & (TALLY__RES_HOLDER - 1));
}

static inline uint64_t tally__res_holders(uint64_t r)
{
    return r >> TALLY__RES_LIVE_BITS;
}

static inline size_t tally__slot_index(const tally__table *t, const tally__slot *s)
{
    return (size_t)((const unsigned char *)s - t->mem) / t->stride;
}

/* Where a key lives: the table's layout arithmetic, shared by table.c and
   the inlined first probe of the hot path (tally__table_find_pref()). */
#define TALLY__GROUP  16           /* slots of a group: one vector of control bytes, one overflow count */

static inline tally__slot *tally__slot_at(const tally__table *t, size_t i)
{
    return (tally__slot *)(t->mem + i * t->stride);
}

/* The first slot of @d's home group: window position 0. */
static inline size_t tally__home_of(const tally__table *t, tally__digest d)
{
    return (size_t)(((unsigned __int128)d.lo * (t->n_slots / TALLY__GROUP)) >> 64) * TALLY__GROUP;
}

/* The key's preferred slot in its group: 4 digest bits above the 7 of its tag. */
static inline unsigned tally__pref_of(tally__digest d)
{
    return (unsigned)(d.hi >> 7) % TALLY__GROUP;
}

/* The digest's hi word with @status in its top bits. */
static inline uint64_t tally__hi_with(tally__digest d, unsigned status)
{
    return (d.hi & TALLY__DIGEST_HI_MASK) | ((uint64_t)status << TALLY__STATUS_SHIFT);
}

/* The LIVE slot of @d if it is the key's preferred slot, where most keys
   sit; else NULL, and tally__table_find_fast() looks further. Caller is
   inside an RCU read-side section. */
static inline tally__slot *tally__table_find_pref(const tally__table *t, tally__digest d)
{
    tally__slot *p = tally__slot_at(t, tally__home_of(t, d) + tally__pref_of(d));
    /* acquire, both: paired with the promotion CAS in resolve() (table.c),
       so that the hit reads the states as the slot's owner left them */
    if (tally__word_load_acquire(&p->d_hi) == tally__hi_with(d, TALLY__LIVE)
        && tally__word_load_acquire(&p->d_lo) == d.lo)
        return p;
    return NULL;
}

/* Zeroed memory of @size bytes aligned to @align (a power of two, at least
   sizeof(void *)): from @r, never given back, for a shared engine; else from
   the heap, for free(). NULL when there is no memory or no room. */
void *tally__zalloc(struct tally__region *r, size_t size, size_t align);

/* Lay out @t, its arrays from @r (tally__zalloc()). */
int  tally__table_init(tally__table *t, size_t capacity, unsigned n_limits,
                       const tally__limit *limits, bool keep_keys, struct tally__region *r);
/* Bytes tally__table_init() and tally__table_stamp_alloc() take from a
   region, alignment included. */
size_t tally__table_region_bytes(size_t capacity, unsigned n_limits, bool stamps);
void tally__table_destroy(tally__table *t);
size_t tally__table_bytes(const tally__table *t);

/* Where a miss of tally__table_find_fast() saw the first slot a new key
   could claim: its window position, or SIZE_MAX. */
typedef struct tally__probe {
    size_t   pos;
} tally__probe;

/* Find the LIVE slot of @d, or NULL. Caller is inside an RCU read-side section.
   The _fast variant may miss a key that is being inserted right now; on a
   miss it leaves in *@hint where the key could be claimed. */
tally__slot *tally__table_find_fast(tally__table *t, tally__digest d, tally__probe *hint);
tally__slot *tally__table_find(tally__table *t, tally__digest d);

#define TALLY__WINDOW 256          /* probe window: a key lives in the 16 groups from its home group */
/* Slots a reclaim examines beyond the key's window: it starts at
   TALLY__SWEEP, doubles while sweeps free at least half of what they
   examine, up to 1/TALLY__SWEEP_SHARE of the table or TALLY__SWEEP_MAX, and
   halves back otherwise, so that a table turning over frees many slots per
   grace period while a full table of live keys refuses a key cheaply. */
#define TALLY__SWEEP       1024
#define TALLY__SWEEP_SHARE 8
#define TALLY__SWEEP_MAX   16384

/* Slots taken out of use by a reclaim, to be made FREE after a grace period:
   one grace period frees many slots, so that a table turning over keeps room
   and its probes stay short. */
typedef struct tally__batch {
    size_t n, cap;
    size_t evicted;               /* of the n, LIVE slots evicted (tally__table_evict()) */
    uint64_t owner;               /* a shared engine's: this process, as its ZOMBIEs name it */
    uint64_t gone;                /* the last owner of ZOMBIEs found dead, or 0 */
    size_t *idx;
    tally__digest *digest;
} tally__batch;

/* A batch for reclaims of @t (free with tally__batch_free()); NULL: no memory. */
tally__batch *tally__batch_new(const tally__table *t);
void          tally__batch_free(tally__batch *b);

/*
 * Find or insert the slot of @d. Caller is inside an RCU read-side section.
 * @hint: NULL, or what a miss of tally__table_find_fast() saw: the first
 * attempt claims there without scanning again (the claim's resolution finds
 * any twin). Return 0 and the LIVE slot in *out, TALLY_ENOMEM, or
 * TALLY_EFULL when the key has no free slot: the caller then runs a reclaim
 * and calls again.
 */
int tally__table_acquire(tally__table *t, tally__digest d, const void *key, size_t key_len,
                         uint64_t now, const tally__probe *hint, tally__slot **out);

/*
 * True when the window of @d holds a slot on its way to FREE: taken by a
 * reclaim that waits for its grace period, or killed since the caller's own
 * reclaim looked. Caller is inside an RCU read-side section. A key whose
 * window is full of such slots is not refused: once that reclaim ends they
 * are claimable (hit.c, acquire_slot()).
 */
bool tally__table_window_settling(tally__table *t, tally__digest d);

/*
 * Reclaim, step 1 (inside a read-side section): take slots whose state expired
 * at @now, and slots left DEAD, out of use into @b. Return how many.
 * Step 2 (after a grace period, outside): make them FREE.
 */
size_t tally__table_reclaim_take(tally__table *t, tally__digest d, uint64_t now, tally__batch *b);
void   tally__table_reclaim_free(tally__table *t, const tally__batch *b);

/*
 * Eviction (TALLY_EVICT_LRU), inside a read-side section, when the key @d
 * found no room: take into @b the slots of its window that a reclaim would
 * take at @now (expired keys, slots left DEAD); when there are none, kill a
 * batch of the LIVE slots of the window hit least recently (capacity / 256,
 * at most 16, fewer from a window holding fewer keys than the mean),
 * passing over slots with cost not yet pushed to the sinks, a watch flag or
 * concurrency holds, and take them into @b as a reclaim takes an expired
 * slot; once a flusher started, the victims' counts in shared windows go to
 * it as TALLY__NOTE_FORGET notes. Return true when a slot was taken or killed (@b then holds it, or
 * another reclaim that took it first frees it) or when another pass made
 * room since (@b empty: the caller claims again at once), false when the
 * window gave nothing: every candidate protected, its only slots on their
 * way to FREE another reclaim's, or no memory for the first victim's notes.
 */
bool tally__table_evict(tally__table *t, tally__digest d, uint64_t now, bool syncing, tally__batch *b);

/* Allocate the recency stamps of a table (under add_lock), from @r as
   tally__zalloc(). Return 0 or TALLY_ENOMEM. */
int tally__table_stamp_alloc(tally__table *t, struct tally__region *r);

/* A recency stamp: tally__table_evict() compares them, units of 2^20 ns
   (about a millisecond), so that a key hit all the time writes its stamp
   about once a millisecond. */
static inline uint64_t tally__stamp_of(uint64_t now)
{
    return now >> 20;
}

/* Stamp slot @i as hit at @now (a policy with TALLY_EVICT_LRU, whose stamps
   exist: tally_policy_update() allocates them before it publishes the flag).
   Stamps only move forward and are written only when that changes them, so
   that the hits of a hot key mostly only read theirs. */
static inline void tally__table_touch(tally__table *t, size_t i, uint64_t now)
{
    /* relaxed: the acquire load of the policy block that carried the flag
       orders the array's allocation before us */
    _Atomic uint64_t *at = atomic_load_explicit(&t->stamp, memory_order_relaxed) + i;
    uint64_t v = tally__stamp_of(now);
    /* relaxed: a heuristic; a race of two hits may keep the older of two
       close stamps */
    if (atomic_load_explicit(at, memory_order_relaxed) < v)
        atomic_store_explicit(at, v, memory_order_relaxed);
}

/* Slot @i when it holds a LIVE key, with the key's digest in *d; else NULL.
   Caller is inside an RCU read-side section. */
tally__slot *tally__table_live(tally__table *t, size_t i, tally__digest *d);

/* The key bytes kept for slot @i (length in *len), or NULL when the table
   keeps none (digest_only). Caller is inside an RCU read-side section: the
   bytes stay until the slot is reclaimed after a grace period. After the last
   read of them, tally__table_key_done() with the same pointer. */
const void *tally__table_key(tally__table *t, size_t i, size_t *len);
void tally__table_key_done(const void *key);

/* A reader met a DEAD state in a LIVE slot: finish the reclaim it belongs to. */
void tally__table_help_kill(tally__table *t, tally__slot *s);

/* A fresh instance number, never handed out before in this table (even). */
static inline uint64_t tally__table_gen_fresh(tally__table *t)
{
    return atomic_fetch_add_explicit(&t->gen_next, 2, memory_order_relaxed);
}

/* ---- Engine ------------------------------------------------------------- */

/* A policy's limits and flags as one immutable block: tally_policy_update()
   publishes a new one whole, so that a call that loaded the block once
   decides every limit under one version of the policy. */
typedef struct tally__cfg {
    unsigned     flags;
    unsigned     how;             /* TALLY__ADD_* of a hit under these flags */
    int          conc;            /* index of the TALLY_CONCURRENCY limit, or -1 */
    bool         all_gcra;        /* every limit is GCRA: reservations are possible */
    tally__limit limits[TALLY_MAX_LIMITS];
    struct tally__cfg *older;     /* the block this one replaced, freed at close: the
                                     flusher reads limits outside RCU */
} tally__cfg;

typedef struct tally__policy {
    char         name[TALLY_MAX_POLICY_NAME + 1];
    unsigned     n_limits;        /* never changes */
    tally__cfg *_Atomic cfg;      /* the current block (engine.c) */
    const tally__limit *_Atomic limits;  /* cfg->limits, for the readers outside hit.c */
    tally__table table;
    pthread_mutex_t reset_lock;   /* serialises tally_reset_if on this policy */
    /* Under reset_lock: the slot a reset is changing, and the instance it
       saw, or SIZE_MAX. A shared engine's next resetter, told that the
       holder died (a robust lock), gives that slot a fresh instance. */
    size_t       reset_slot;
    uint64_t     reset_gen;
    tally__limit watch_rule;      /* sliding window of denied cost, max = threshold */
    size_t       episodes_cap;
    struct tally__episodes *episodes;   /* under the engine's ops_lock */
    /* usage of the current flush interval, per limit (flusher thread only) */
    uint64_t     usage_keys[TALLY_MAX_LIMITS], usage_sum[TALLY_MAX_LIMITS];
    uint64_t     usage_buckets[TALLY_MAX_LIMITS][65];
} tally__policy;

/* A delta or an event handed from the hot path to the flusher (MPSC stack). */
typedef struct tally__note {
    struct tally__note *next;
    uint32_t policy;
    unsigned limit;
    uint8_t  kind;                /* TALLY__NOTE_* */
    tally__digest digest;
    uint64_t win, delta;          /* delta: a spilled cost; events: used; flags: when, denied;
                                     forgets: the evicted slot's count in window win */
    size_t   key_len;             /* the key (or digest) bytes follow */
    unsigned char key[];
} tally__note;

/* TALLY__NOTE_FORGET: a LIVE key was evicted (TALLY_EVICT_LRU) while a
   flusher may run; its count in a shared window, which no slot holds any
   more, is the flusher's to count as others' for the key's next slot.
   TALLY__NOTE_PREFETCH: a key just took its slot while a flusher syncs to a
   store; the flusher reads its global count in each shared window at once
   (limit is 0: it stands for every limit of the policy). */
enum { TALLY__NOTE_DELTA, TALLY__NOTE_EVENT, TALLY__NOTE_FLAG, TALLY__NOTE_UNFLAG,
       TALLY__NOTE_FORGET, TALLY__NOTE_PREFETCH };

/* The hand-off stack (notes.c). */
struct tally__notes {
    tally__note *_Atomic head;
    _Atomic uint64_t lost;         /* cost that could not be handed over (out of memory) */
};

#define TALLY__STAT_SHARDS 64     /* the first 64 threads each own one; later ones share */
typedef struct tally__stat_shard {
    _Alignas(TALLY__CACHE_LINE) _Atomic uint64_t hits;
    _Atomic uint64_t denials, shadow_denials, full_refusals;
} tally__stat_shard;

_Static_assert(sizeof(tally__stat_shard) == TALLY__CACHE_LINE, "one shard a cache line");

struct tally__flusher;

struct tally_engine {
    tally_options    opts;
    tally__hasher    hasher;         /* the digest function tally_open chose */
    _Atomic bool     closing;
    /* A shared engine (shared.c) lives in its region with all it points to,
       at one address in every process; its sections are the region's epochs
       (section.h). Both NULL: an engine in one process's memory. Fixed from
       creation on. */
    struct tally__epoch  *epoch;
    struct tally__region *region;
    _Atomic size_t   reclaimers;     /* calls waiting for a grace period outside RCU */
    pthread_mutex_t  add_lock;       /* serialises tally_policy_add and flusher start/stop */
    _Atomic uint32_t n_policies;
    tally__policy *_Atomic policies[TALLY_MAX_POLICIES];
    tally__notes     notes;          /* spilled deltas and events for the flusher */
    _Atomic bool     syncing;        /* a flusher runs: hot path records deltas */
    _Atomic bool     events_on;      /* ... and wants first_exceeded events */
    /* Prefetches: set by the hit that pushes the first prefetch note since
       the flusher last took the notes, which alone posts wake; cleared by
       the flusher before it takes them. */
    _Atomic bool     prefetch_due;
    sem_t *_Atomic   wake;           /* the running flusher's, while it syncs to a store */
    _Atomic uint64_t fail_closed_ns; /* 0: fail open; else deny when the last flush is older */
    _Atomic uint64_t last_flush_ok_ns;
    struct tally__flusher *flusher;  /* under add_lock */
    bool             flusher_stopping; /* under add_lock: a stop is tearing one down */
    _Atomic uint64_t pending_deltas, pending_cost;   /* as of the last flush */
    _Atomic uint64_t flush_batches, flush_failures, redis_reconnects, events_delivered;
    _Atomic uint64_t redis_errors, redis_permanent_errors;
    pthread_mutex_t  ops_lock;       /* episodes and the last usage reports */
    _Atomic uint64_t flags_set;
    struct tally__usage_last *usage_last;  /* under ops_lock */
    size_t           usage_last_n;
    tally__stat_shard stats[TALLY__STAT_SHARDS];
};

/* A key's identity: its keyed digest without the two bits a slot uses for status.
   Every place that names a key (slots, notes, Redis keys) uses this form.
   The engine holds the hash tally_open chose, so choosing costs one
   predictable branch and no CPU query. */
static inline tally__digest tally__key_digest(const tally_engine *e, const void *key, size_t len)
{
    tally__digest d = tally__hasher_digest(&e->hasher, key, len);
    d.hi &= TALLY__DIGEST_HI_MASK;
    return d;
}

/* tally_options_init() and tally_open() of the current struct (src/abi.c
   exports them under each symbol version). */
void tally__options_init(tally_options *opts);
int  tally__open(const tally_options *opts, tally_engine **out);
/* @opts (NULL: the defaults) checked into *@o, with a random hash key where
   it is all zero, and the hash it names set up in *@h. Return 0,
   TALLY_EINVAL or TALLY_ENOMEM, as tally_open(). */
int  tally__options_resolve(const tally_options *opts, tally_options *o, tally__hasher *h);
/* Set up the zeroed engine @e with @o and @h; @r: the region of a shared
   engine (its locks then work across processes), or NULL. */
void tally__engine_init(tally_engine *e, const tally_options *o, const tally__hasher *h,
                        struct tally__region *r);
/* tally_policy_add() without the refusal of shared engines: their creator
   adds their policies, from their region, before they are published. */
int  tally__policy_add(tally_engine *e, const tally_policy *p, uint32_t *id_out);
/* The checks of tally_policy_add() on @p alone: 0, TALLY_EINVAL or TALLY_ENOMEM. */
int  tally__policy_check(const tally_policy *p);
/* A mutex of an engine; @shared: of a shared engine, robust across processes. */
void tally__mutex_init(pthread_mutex_t *m, bool shared);

/* Lock a mutex of an engine. Return true when its last holder died holding
   it (a shared engine's robust lock), which the caller then repairs what it
   guards from; the lock is taken either way. */
static inline bool tally__lock(pthread_mutex_t *m)
{
    if (TALLY__LIKELY(pthread_mutex_lock(m) != EOWNERDEAD))
        return false;
    pthread_mutex_consistent(m);
    return true;
}
/* Close, in the engine's part: mark it closing and wait until no call of
   its own runs (a grace period, and reclaims parked outside RCU); then free. */
void tally__engine_quiesce(tally_engine *e);
/* tally_stats_read() of the current struct (src/abi.c exports it under each
   symbol version; src/sync/stats.c fills it). */
int  tally__stats_read(tally_engine *e, tally_stats *out);
void tally__engine_free(tally_engine *e);

/* The policy behind @id, or NULL for an unknown id. Any thread. */
static inline tally__policy *tally__policy_get(tally_engine *e, uint32_t id)
{
    /* acquire: a policy is initialised before the count that makes its id
       valid; paired with the release stores in tally_policy_add() (engine.c) */
    return id < atomic_load_explicit(&e->n_policies, memory_order_acquire)
        ? atomic_load_explicit(&e->policies[id], memory_order_acquire) : NULL;
}

void tally__note_push(tally__notes *s, tally__note *n);
/* Take every note pushed so far, newest first. */
tally__note *tally__notes_take(tally__notes *s);
/* Free every note left (close). */
void tally__notes_drain(tally__notes *s);
/* Spill an unflushed delta that can no longer stay in its slot, with the key
   bytes the sinks are given (NULL: the digest, as with digest_only). */
void tally__spill(tally__notes *s, uint32_t policy, unsigned limit, tally__digest d,
                  uint64_t win, uint64_t delta, const void *key, size_t key_len);
/* Make a note for the flusher carrying @key (or the digest). NULL when out of memory. */
tally__note *tally__note_new(uint8_t kind, uint32_t policy, unsigned limit, tally__digest d,
                             const void *key, size_t key_len);
/* A key of @policy just took its slot: when a flusher syncs to a store, hand
   it a TALLY__NOTE_PREFETCH and wake it, unless an earlier prefetch already
   did and the flusher has not taken the notes since. Caller is inside an RCU
   read-side section. */
void tally__prefetch(tally_engine *e, uint32_t policy, tally__digest d);
/* The rejection watch, on the hot path: feed a denial of @cost to slot @idx. */
void tally__watch_feed(tally_engine *e, tally__policy *p, size_t idx, tally__digest d,
                       const void *key, size_t key_len, uint64_t cost, uint64_t now);
/* Allocate the sync array of a policy's table (flusher start, policy add). */
int tally__table_sync_alloc(tally__table *t);


#endif /* TALLY_INTERNAL_H */
