/*
 * The key table: a flat open-addressing array of fixed capacity whose slots
 * hold a 128-bit key digest and the key's per-limit state inline, and beside
 * it a control byte per slot that lets a probe look at 16 slots at once.
 *
 * Layout (n_slots a multiple of TALLY__GROUP = 16, G = n_slots / 16 groups):
 *
 *   struct table {
 *       uint8_t  ctrl[n_slots];     // group g: ctrl[16g .. 16g + 15], 16-byte
 *                                   // aligned, read as one SSE2 vector
 *       struct {                    // mem, stride bytes each
 *           uint64_t d_lo, d_hi;    // the digest word: the truth
 *           tally__state st[n_limits];
 *       } slot[n_slots];
 *       uint64_t gen[n_slots];      // instance numbers (guarantee 6)
 *       uint32_t ovf[G];            // overflow counts (guarantee 1)
 *   };
 *
 *   ctrl byte   the slot's digest word
 *   0x00-0x7f   tag(D): PENDING(D) or LIVE(D); briefly also EMPTY or FREE
 *               reserved by a claimant, or DEAD(D) just killed (guarantee 8)
 *   0x80        EMPTY: never used
 *   0x81        FREE: reusable
 *   0x82        DEAD or ZOMBIE: neither claimable nor a key
 *
 * tag(D) is the low 7 bits of D's hi word, its preferred slot in a group the
 * next 4; the home group comes from the high bits of its lo word. A key
 * lives in the TALLY__WINDOW / TALLY__GROUP groups from its home group on
 * (wrapping); its window position k names slot 16 * home group + k. A claim
 * takes the preferred slot of its group when that byte is claimable, else
 * the group's first claimable byte, so that a lookup of a present key mostly
 * reads one digest, that slot's, before any control byte. A slot's digest moves through these states (status
 * in the top two bits of the hi word):
 *
 *   EMPTY {0,0} --claim--> PENDING(D) --promote--> LIVE(D) --kill--> DEAD(D)
 *   FREE  {1,0} --claim--> PENDING(D) --lose-----> DEAD(D)
 *   DEAD(D) --take--> ZOMBIE {2,P} --grace period--> FREE {1,P}
 *
 * P is 0, or in a shared engine the identity of the reclaim's process
 * (core/proc.h), for guarantee 10.
 *
 * Ordering and progress guarantees:
 *  1. An EMPTY control byte is never re-entered, so a probe that reads a
 *     group holding one, and does not find the key there, proves the key was
 *     in no later group when the byte was read: a key is claimed in the
 *     first group of its window where its claimant read a claimable byte
 *     (a claimant whose byte CAS fails scans again, and the byte it lost is
 *     no longer EMPTY), so a claim past that group read the EMPTY byte gone,
 *     after the probe. Which claimable byte of the group it takes does not
 *     matter (the preferred slot or the first): a probe matches the whole
 *     group. The slots form groups of
 *     TALLY__GROUP, and ovf[g] counts the claims, not yet made FREE again,
 *     that passed group g: a claimant adds one to every group between its
 *     home and its slot before its claim (seq_cst), and the reclaim that
 *     frees the slot takes them back. A probe that has passed a group with
 *     ovf 0 proves, in the same way, that the key was in no later group:
 *     once a table has turned over and FREE slots stand where EMPTY ones
 *     were, a miss still ends in its home group. FREE cannot end a probe as
 *     EMPTY does: a key may lie past a slot freed after its claim.
 *  2. A slot is owned by the one CAS that moved its control byte from EMPTY
 *     or FREE to a tag; its owner then moves the digest out of EMPTY or FREE
 *     (a 16-byte CAS that no other thread contends). Promotions and kills
 *     are 16-byte CASes on the digest word.
 *  3. At most one LIVE slot per digest, and at most capacity LIVE slots (the
 *     promotion takes a reservation, guarantee 7; PENDING holds none). Each
 *     claimant publishes PENDING, then
 *     scans the window (seq_cst, Dekker style): a LIVE twin or a PENDING twin
 *     nearer home wins and the claimant kills its own claim; a PENDING twin
 *     farther from home is killed. Of two claimants at least one sees the
 *     other, so two promotions cannot both succeed. Any thread that meets a
 *     PENDING slot of its key runs the same resolution (helping), so no thread
 *     waits on another (but at the capacity edge, guarantee 7).
 *  4. A LIVE slot dies only by a CAS of its limit-0 state to DEAD from the
 *     value its killer judged: expired (a reclaim), or the one it read when
 *     it chose the slot as the least recently hit of a window (an eviction,
 *     guarantee 9). A hit that changed limit 0 in between makes the kill
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
 *     capacity slots are LIVE at that instant. A key whose window has no
 *     claimable slot is refused only when, after its own reclaim found
 *     nothing to take, the window holds no DEAD or ZOMBIE slot either
 *     (tally__table_window_settling()): slots another reclaim took are
 *     waited for, never a reason to refuse. While a holder is in flight,
 *     a claimant at the capacity edge yields until the outcome is known:
 *     the only wait in the table, on a few instructions of a running
 *     promotion, and only for new keys when the table is at capacity.
 *     (A LIVE slot being killed gives its reservation back just after its
 *     digest CAS to DEAD; a refusal in that gap goes to the reclaim, which
 *     finds the DEAD slot.)
 *  8. Control bytes are hints and the digest is the truth: a probe reads the
 *     digest of a slot only when its byte is the key's tag (but for the test
 *     of the preferred slot that starts tally__table_find_fast(), which needs
 *     no byte), and it decides from the digest. Every write of a byte is a seq_cst read-modify-write
 *     of the 64-bit word that holds it, at one of three points:
 *       claim    the CAS EMPTY or FREE -> tag(D) (guarantee 2), before the
 *                counts of guarantee 1 and before the digest CAS to PENDING(D);
 *       kill     tag -> DEAD, right after the digest CAS to DEAD, by the one
 *                thread whose CAS it was, in the same read-side section;
 *       reclaim  DEAD -> FREE, right after the digest's store of FREE; the
 *                grace period before it waited for the kill's write.
 *     So while a digest is PENDING(D) or LIVE(D) its byte is tag(D): written
 *     before, changed only after the digest left. A scan that reads the byte
 *     (seq_cst) after a claim's digest CAS therefore goes on to read that
 *     digest, and one that read it before the byte was set also read it
 *     before the digest CAS: a scan over bytes is a scan over digests, each
 *     read when its byte was. The resolution of guarantee 3 reads bytes after
 *     its own claim CAS and each claimant's tag is in place before its claim
 *     CAS, so of two claimants one still sees the other: no two LIVE slots of
 *     one digest. A byte is claimable only while its digest is (FREE is
 *     written to the byte after the digest, and the reservation comes before
 *     the digest CAS), and a claimant that finds its byte taken looks again:
 *     the byte it passes is no longer EMPTY, which is what guarantee 1 needs.
 *     A stale tag (the slot just killed) or a tag of another key with the
 *     same 7 bits costs one digest read; a stale DEAD or FREE byte of a slot
 *     that holds a key cannot exist. The byte CAS, not a store of the tag by
 *     the winner of the digest CAS, is what claims: after such a digest CAS
 *     the byte would still read claimable, and every claimant that met it
 *     would retry that slot until its owner stored the tag, a wait on
 *     another thread. A claimant that wins the byte and stalls holds up no
 *     one: others take the next claimable byte. (tests/model/ctrl.pml)
 *  9. Eviction (TALLY_EVICT_LRU) runs only where a look at the new key's
 *     window found nothing a reclaim would take there: its expired keys and
 *     its slots left DEAD are taken first (consider()), and only a window
 *     without them gives up live keys. It kills LIVE slots by guarantee 4's
 *     CAS, so everything after a kill is the reclaim's: the victim's
 *     reservation is given back with its digest CAS to DEAD, its slot is
 *     reused only after a grace period, with zeroed states, and a delta a
 *     hit added after the evictor looked is spilled to the flusher then.
 *     The victims are the slots of the window with the oldest recency
 *     stamps (stamp[i], written by hits of the policy and by the claim
 *     before the promotion, so a key is never older than its claim), a
 *     batch that one grace period frees together (capacity / 256 of them,
 *     at least 1 and at most 16, fewer from a window that holds fewer keys
 *     than a full table's mean), among those with no cost waiting for the
 *     sinks, no watch flag and no concurrency holds when it looked: a hit
 *     since the choice that changed limit 0 fails the kill's CAS, one that
 *     changed nothing shows a newer stamp (read again just before the CAS),
 *     and that victim is passed over; when every one was, the evictor
 *     chooses again. lru_evicted counts the kills the evictor's CAS won,
 *     each once. A denial that raced the kill past both checks counts as one
 *     that came just after the eviction: its watch flag, set on the dying
 *     slot, goes with it (the flag's note is sent all the same).
 *     Once a flusher started, the evictor also sends the flusher the count
 *     of each limit of a shared window as each victim died, one note a limit
 *     (TALLY__NOTE_FORGET), for the flusher to count as others' cost in the
 *     key's next slots until the window ends. Limit 0's is the value its
 *     kill CAS replaced: every hit that counted in the slot is in it, and a
 *     hit since failed the CAS. The evictor then kills the other limits
 *     itself and takes the value each CAS replaced; a hit that met the dead
 *     limit 0 and killed one first leaves it the value read just before the
 *     kill. A hit of several limits that passed limit 0 before the kill finds
 *     the slot dead at its end and starts over in the next slot, counted in
 *     both: the error is on refusing. The notes are allocated before the
 *     kill: without memory the key is not evicted and the new key is refused.
 * 10. A shared engine's table (engine/shared.c) is used by several
 *     processes, and one may die at any instruction. What its steps leave
 *     half done is finished by the others, so that no slot stays out of use
 *     for good and nobody waits on it forever:
 *       - its reclaim's ZOMBIE slots name its process: a reclaim that meets
 *         ZOMBIEs of a dead process takes them over by one CAS of the name
 *         and frees them after its own grace period (their keys' overflow
 *         counts stay, which only lengthens probes: guarantee 1 needs them
 *         never too low);
 *       - a kill that died before its byte's DEAD left the tag of a DEAD
 *         digest: the reclaim that takes the slot makes the byte DEAD again
 *         before the digest is FREE, and sets FREE by a CAS from DEAD;
 *       - a reclaim frees a slot by one CAS of its digest from {ZOMBIE, P}
 *         to {FREE, P}, then sets the byte FREE. One that died between the
 *         two left {FREE, P} under a DEAD byte, which nobody else changes
 *         while P lives: a reclaim that meets it with P dead takes it by a
 *         CAS of the digest to {FREE, itself}, and only the winner sets the
 *         byte (a claimant that wins the FREE byte then CASes the digest
 *         from whichever {FREE, P} it holds);
 *       - a promotion that died holding a reservation (guarantee 7) keeps
 *         it for good: every claimant at the capacity edge then waits for it
 *         HOLDER_PATIENCE_NS before it refuses the key (or evicts for it),
 *         for the life of the region: not yet settled by anyone. A claim that
 *         died before its promotion leaves a PENDING slot that a later claim
 *         of the same key resolves, or one slot out of use. So a process
 *         killed while placing a key costs at most one slot and one unit of
 *         capacity.
 *     The read-side sections of a dead process are the epoch domain's to
 *     give up on (core/epoch.h, guarantee 4).
 */
#include <emmintrin.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine-internal.h"
#include "core/proc.h"
#include "core/region.h"
#include "core/tsan.h"

static inline size_t wrap(const tally__table *t, size_t i)
{
    return i >= t->n_slots ? i - t->n_slots : i;
}

static inline size_t group_of(size_t i)
{
    return i / TALLY__GROUP;
}

enum { CTRL_EMPTY = 0x80, CTRL_FREE = 0x81, CTRL_DEAD = 0x82 };

_Static_assert(TALLY__WINDOW % TALLY__GROUP == 0 && TALLY__GROUP == 16, "a group is one vector");

/* tag(D): bits of the digest that the home group does not use. */
static inline uint8_t tag_of(tally__digest d)
{
    return (uint8_t)(d.hi & 0x7f);
}

/* The claimable byte of mask @c that a claim takes: the key's preferred
   slot if it is claimable, else the first. */
static inline size_t pick(unsigned c, unsigned pref)
{
    return (size_t)((c >> pref & 1) ? pref : (unsigned)__builtin_ctz(c));
}

static inline bool claimable(unsigned b)
{
    return (b & 0xfe) == CTRL_EMPTY;
}

/* The control bytes of the group of slot @i (a group's first slot), read as
   two 64-bit atomic loads: per byte what a vector load would read, and
   visible as such to the memory model and to ThreadSanitizer. */
static inline __m128i ctrl_group(const tally__table *t, size_t i, memory_order mo)
{
    _Atomic uint64_t *w = &t->ctrl[i / 8];
    uint64_t lo = atomic_load_explicit(&w[0], mo);
    uint64_t hi = atomic_load_explicit(&w[1], mo);
    return _mm_set_epi64x((long long)hi, (long long)lo);
}

/* Bit j set: byte j of @v is @b. */
static inline unsigned ctrl_match(__m128i v, uint8_t b)
{
    return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8((char)b)));
}

/* Bit j set: byte j of @v is EMPTY or FREE. */
static inline unsigned ctrl_claimable(__m128i v)
{
    __m128i c = _mm_and_si128(v, _mm_set1_epi8((char)0xfe));
    return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(c, _mm_set1_epi8((char)CTRL_EMPTY)));
}

static inline unsigned ctrl_byte(const tally__table *t, size_t i, memory_order mo)
{
    return (unsigned)(atomic_load_explicit(&t->ctrl[i / 8], mo) >> (8 * (i % 8))) & 0xff;
}

/*
 * Claim slot @i's control byte for @tag if it is claimable (guarantee 2),
 * and return what it was (CTRL_EMPTY or CTRL_FREE), or 0 when another claim
 * took it first.
 */
static unsigned ctrl_claim(tally__table *t, size_t i, uint8_t tag)
{
    _Atomic uint64_t *w = &t->ctrl[i / 8];
    unsigned shift = 8 * (i % 8);
    /* relaxed: the CAS below reads the word again */
    uint64_t cur = atomic_load_explicit(w, memory_order_relaxed);
    for (;;) {
        unsigned b = (unsigned)(cur >> shift) & 0xff;
        if (!claimable(b))
            return 0;
        uint64_t next = (cur & ~((uint64_t)0xff << shift)) | (uint64_t)tag << shift;
        /* seq_cst: the tag is in place before the claim's digest CAS, for the
           resolution scans of twin claimants (guarantee 8), paired with their
           seq_cst ctrl_group() loads; and the acquire of the byte's FREE
           store in tally__table_reclaim_free() */
        if (atomic_compare_exchange_weak(w, &cur, next))
            return b;
    }
}

#define CTRL_ANY 0x100        /* ctrl_cas(): whatever the byte holds */

/* Move slot @i's control byte to @to if it holds @from (or anything, for
   CTRL_ANY). Return whether it did. For a shared engine's reclaims, whose
   steps another process may have to finish (guarantee 10). */
static bool ctrl_cas(tally__table *t, size_t i, unsigned from, unsigned to)
{
    _Atomic uint64_t *w = &t->ctrl[i / 8];
    unsigned shift = 8 * (i % 8);
    /* relaxed: the CAS below reads the word again */
    uint64_t cur = atomic_load_explicit(w, memory_order_relaxed);
    for (;;) {
        unsigned b = (unsigned)(cur >> shift) & 0xff;
        if (from != CTRL_ANY && b != from)
            return false;
        uint64_t next = (cur & ~((uint64_t)0xff << shift)) | (uint64_t)to << shift;
        /* seq_cst: as ctrl_set(), paired with the seq_cst ctrl_group()
           loads of the scans (guarantee 8) */
        if (atomic_compare_exchange_weak(w, &cur, next))
            return true;
    }
}

/* Move slot @i's control byte from @from, which it holds, to @to (guarantee 8). */
static inline void ctrl_set(tally__table *t, size_t i, unsigned from, unsigned to)
{
    /* seq_cst: one total order with the byte loads of the scans (guarantee 8);
       paired with the seq_cst ctrl_group() loads of tally__table_find() and
       the acquire and resolution scans */
    atomic_fetch_xor(&t->ctrl[i / 8], (uint64_t)(from ^ to) << (8 * (i % 8)));
}

/* The group starting at slot @i has overflow count 0: nothing probed past it. */
static inline bool ends_probe(tally__table *t, size_t i)
{
    /* acquire: paired with the increments of pass_groups(), as a digest
       load is with the claim CAS */
    return atomic_load_explicit(&t->ovf[group_of(i)], memory_order_acquire) == 0;
}

/* The same, in a resolution scan (Dekker style: see digest_load()). */
static inline bool ends_probe_seq_cst(tally__table *t, size_t i)
{
    /* seq_cst: paired with the seq_cst increments of pass_groups() by a twin
       claimant, as digest_load() is with its claim CAS */
    return atomic_load(&t->ovf[group_of(i)]) == 0;
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

/*
 * A key copy is its length, then its bytes, in an allocation rounded up to
 * KEY_ROUND bytes. A slot made FREE keeps its last copy as a spare, tagged
 * in bit 0 of its pointer and no key to any reader: the next claimant near
 * it takes it (key_copy_at()) and writes its own key into it when it fits,
 * so that a table turning over reuses buffers instead of freeing and
 * allocating one per key.
 */
#define KEY_ROUND 16

static inline bool is_spare(const void *kp)
{
    return ((uintptr_t)kp & 1) != 0;
}

static inline size_t *spare_buffer(void *kp)
{
    return (size_t *)(void *)((uintptr_t)kp & ~(uintptr_t)1);
}

/* Bytes of an allocation for a copy of a @len-byte key. */
static inline size_t key_alloc_size(size_t len)
{
    return (sizeof(size_t) + len + KEY_ROUND - 1) / KEY_ROUND * KEY_ROUND;
}

/* The geometry of a table of @capacity keys of @n_limits limits. */
static void table_geometry(tally__table *t, size_t capacity, unsigned n_limits)
{
    t->capacity = capacity;
    t->n_limits = n_limits;
    t->stride = sizeof(tally__slot) + n_limits * sizeof(tally__state);
    /* Load factor at most 2/3 (1.5 slots per unit of capacity): a key
       mostly lives in its home group, the longest run of full groups stays
       far below the probe window, a miss mostly ends in its home group
       (guarantee 1), and a table turning over keeps expired slots within
       reach of the reclaims' sweeps; a one-limit key costs under 64 bytes.
       A window with no slot that is or will be claimable refuses a new
       key (guarantee 7): at this load, for keys spread by the hash, that
       is the table at its capacity (stress: capacity_edge_refuses_no_key_that_fits,
       full_table_under_churn_loses_no_live_state). */
    t->n_slots = capacity + capacity / 2;
    /* whole groups, and a window that cannot wrap onto its home group */
    if (t->n_slots < 2 * TALLY__WINDOW)
        t->n_slots = 2 * TALLY__WINDOW;
    t->n_slots = (t->n_slots + TALLY__GROUP - 1) / TALLY__GROUP * TALLY__GROUP;
}

/* The arrays of a table, in the order tally__table_init() takes them, each
   aligned to a cache line: what a region must hold for it. */
#define TABLE_ARRAYS(t, keep_keys)                                                  \
    ARRAY(mem, (t)->n_slots * (t)->stride)                                         \
    ARRAY(ctrl, (t)->n_slots)                                                      \
    ARRAY(gen, (t)->n_slots * sizeof(*(t)->gen))                                   \
    ARRAY(ovf, (t)->n_slots / TALLY__GROUP * sizeof(*(t)->ovf))                    \
    ARRAY(keys, (keep_keys) ? (t)->n_slots * sizeof(*(t)->keys) : 0)

size_t tally__table_region_bytes(size_t capacity, unsigned n_limits, bool stamps)
{
    tally__table t;
    table_geometry(&t, capacity, n_limits);
    size_t bytes = 0;
#define ARRAY(name, size) bytes += ((size) + TALLY__CACHE_LINE - 1) / TALLY__CACHE_LINE * TALLY__CACHE_LINE;
    TABLE_ARRAYS(&t, false)
#undef ARRAY
    if (stamps)
        bytes += t.n_slots * sizeof(*t.stamp) + TALLY__CACHE_LINE;
    return bytes + TALLY__CACHE_LINE;     /* the first array's alignment */
}

int tally__table_init(tally__table *t, size_t capacity, unsigned n_limits,
                      const tally__limit *limits, bool keep_keys, tally__region *r)
{
    memset(t, 0, sizeof(*t));
    table_geometry(t, capacity, n_limits);
    t->limits = limits;
    t->region = r;
    t->sweep_max = t->n_slots / TALLY__SWEEP_SHARE;
    if (t->sweep_max > TALLY__SWEEP_MAX)
        t->sweep_max = TALLY__SWEEP_MAX;
    if (t->sweep_max < TALLY__SWEEP)
        t->sweep_max = t->n_slots < TALLY__SWEEP ? t->n_slots : TALLY__SWEEP;
    atomic_init(&t->sweep_len, t->sweep_max < TALLY__SWEEP ? t->sweep_max : TALLY__SWEEP);
    if (t->n_slots > SIZE_MAX / t->stride)
        return TALLY_ENOMEM;
    bool ok = true;
#define ARRAY(name, size) \
    if (ok && (size) != 0) \
        ok = (t->name = tally__zalloc(r, (size), TALLY__CACHE_LINE)) != NULL;
    TABLE_ARRAYS(t, keep_keys)
#undef ARRAY
    if (!ok) {
        tally__table_destroy(t);      /* frees what was allocated, NULL the rest */
        return TALLY_ENOMEM;
    }
    memset(t->ctrl, CTRL_EMPTY, t->n_slots);
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

/* Close, or a policy that was never published: no other thread is here.
   A region's memory is the region's: nothing to give back. */
void tally__table_destroy(tally__table *t)
{
    if (t->region)
        return;
    free(atomic_load_explicit(&t->sync, memory_order_relaxed));
    atomic_store_explicit(&t->sync, NULL, memory_order_relaxed);
    free(atomic_load_explicit(&t->watch, memory_order_relaxed));
    atomic_store_explicit(&t->watch, NULL, memory_order_relaxed);
    free(atomic_load_explicit(&t->stamp, memory_order_relaxed));
    atomic_store_explicit(&t->stamp, NULL, memory_order_relaxed);
    if (t->keys) {
        for (size_t i = 0; i < t->n_slots; i++)
            free(spare_buffer(atomic_load_explicit(&t->keys[i], memory_order_relaxed)));
        free(t->keys);
    }
    free(t->ovf);
    free(t->gen);
    free(t->ctrl);
    free(t->mem);
    t->ovf = NULL;
    t->ctrl = NULL;
    t->gen = NULL;
    t->mem = NULL;
    t->keys = NULL;
}

size_t tally__table_bytes(const tally__table *t)
{
    /* relaxed: a size, read by tests and benchmarks at rest */
    bool stamps = atomic_load_explicit(&t->stamp, memory_order_relaxed) != NULL;
    return t->n_slots * (t->stride + sizeof(*t->gen) + 1) + t->n_slots / TALLY__GROUP * sizeof(*t->ovf)
        + (t->keys ? t->n_slots * sizeof(*t->keys) : 0)
        + (stamps ? t->n_slots * sizeof(*t->stamp) : 0);
}

int tally__table_stamp_alloc(tally__table *t, tally__region *r)
{
    /* relaxed: under add_lock, as is the only store */
    if (atomic_load_explicit(&t->stamp, memory_order_relaxed))
        return 0;
    _Atomic uint64_t *a = tally__zalloc(r, t->n_slots * sizeof(*a), TALLY__CACHE_LINE);
    if (!a)
        return TALLY_ENOMEM;
    /* release: the zeroed array before a claim or an eviction uses it;
       paired with the acquire loads in tally__table_acquire() and
       tally__table_evict(), and before the policy block that carries the
       flag, for tally__table_touch() */
    atomic_store_explicit(&t->stamp, a, memory_order_release);
    return 0;
}

tally__slot *tally__table_find_fast(tally__table *t, tally__digest d, tally__probe *hint)
{
    size_t home = tally__home_of(t, d);
    uint8_t tag = tag_of(d);
    unsigned pref = tally__pref_of(d);

    /* Most keys sit in their preferred slot: its digest first, before any
       control byte */
    tally__slot *p = tally__table_find_pref(t, d);
    if (p)
        return p;
    hint->pos = SIZE_MAX;
    for (size_t k = 0; k < TALLY__WINDOW; k += TALLY__GROUP) {
        size_t g = wrap(t, home + k);
        /* acquire: paired with the claim CAS of the byte (ctrl_claim()), as
           the digest loads below are with the promotion */
        __m128i v = ctrl_group(t, g, memory_order_acquire);
        for (unsigned m = ctrl_match(v, tag); m; m &= m - 1) {
            tally__slot *s = tally__slot_at(t, g + (size_t)__builtin_ctz(m));
            /* acquire: paired with the promotion CAS in resolve(), so that the
               hit reads the states as the slot's owner left them */
            if (tally__word_load_acquire(&s->d_hi) == tally__hi_with(d, TALLY__LIVE)
                /* acquire: paired with the promotion CAS, as the hi load */
                && tally__word_load_acquire(&s->d_lo) == d.lo)
                return s;
        }
        unsigned c = ctrl_claimable(v);
        if (c && hint->pos == SIZE_MAX)
            hint->pos = k + pick(c, pref);
        if (ctrl_match(v, CTRL_EMPTY) || ends_probe(t, g))
            return NULL;
    }
    return NULL;
}

tally__slot *tally__table_find(tally__table *t, tally__digest d)
{
    size_t home = tally__home_of(t, d);
    uint8_t tag = tag_of(d);

    for (size_t k = 0; k < TALLY__WINDOW; k += TALLY__GROUP) {
        size_t g = wrap(t, home + k);
        /* seq_cst: one total order with the byte writes (guarantee 8);
           paired with the byte CAS of ctrl_claim() and the writes of ctrl_set() */
        __m128i v = ctrl_group(t, g, memory_order_seq_cst);
        for (unsigned m = ctrl_match(v, tag); m; m &= m - 1) {
            tally__slot *s = tally__slot_at(t, g + (size_t)__builtin_ctz(m));
            uint64_t lo, hi;
            digest_load(s, &lo, &hi);
            if (hi == tally__hi_with(d, TALLY__LIVE) && lo == d.lo)
                return s;
        }
        if (ctrl_match(v, CTRL_EMPTY) || ends_probe(t, g))
            return NULL;
    }
    return NULL;
}

/* Kill the PENDING claim of @d in slot @i. A PENDING slot holds no reservation. */
static bool kill_pending(tally__table *t, size_t i, tally__digest d)
{
    if (!digest_cas(tally__slot_at(t, i), d.lo, tally__hi_with(d, TALLY__PENDING), d.lo, tally__hi_with(d, TALLY__DEAD)))
        return false;
    ctrl_set(t, i, tag_of(d), CTRL_DEAD);
    return true;
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

/* How long a claimant of a shared engine waits for promotions in flight at
   the capacity edge: a holder whose process died between its reservation
   and its outcome leaves the count of holders high for good, and the table
   then refuses new keys at its capacity after this wait instead of
   waiting forever. A live holder needs a few instructions. */
#define HOLDER_PATIENCE_NS UINT64_C(1000000000)

/* Yield to the holders of reservations (guarantee 7). False when a shared
   engine's claimant has waited out HOLDER_PATIENCE_NS since *@since (0: the
   first wait, which sets it). */
static bool wait_for_holders(const tally__table *t, uint64_t *since)
{
    if (t->region) {
        uint64_t now = tally__mono_ns();
        if (*since == 0)
            *since = now;
        else if (now - *since > HOLDER_PATIENCE_NS)
            return false;
    }
    sched_yield();
    return true;
}

/*
 * Resolve the PENDING claim at window position @me (guarantee 3). Return the
 * LIVE slot of @d, or NULL if the claim lost, or the table was full, and the
 * caller must look again (its scan finds a twin that went LIVE, or finds the
 * table full). Promotion takes the capacity reservation, so that racing
 * duplicate claims of one key never count against the capacity.
 */
static tally__slot *resolve(tally__table *t, tally__digest d, size_t home, size_t me, uint64_t *since)
{
    uint8_t tag = tag_of(d);
again:;
    size_t mine_i = wrap(t, home + me);
    tally__slot *mine = tally__slot_at(t, mine_i);
    for (size_t k = 0; k < TALLY__WINDOW; k += TALLY__GROUP) {
        size_t g = wrap(t, home + k);
        /* seq_cst: paired with the byte's claim CAS (ctrl_claim()) of a twin
           claimant, as digest_load() is with its digest CAS (guarantee 8) */
        __m128i v = ctrl_group(t, g, memory_order_seq_cst);
        for (unsigned m = ctrl_match(v, tag); m; m &= m - 1) {
            size_t j = k + (size_t)__builtin_ctz(m);
            if (j == me)
                continue;
            uint64_t lo, hi;
            digest_load(tally__slot_at(t, g + (j - k)), &lo, &hi);
            if (!is_key(hi, lo, d))
                continue;
            switch (status_of(hi)) {
            case TALLY__LIVE:
                kill_pending(t, mine_i, d);
                return tally__slot_at(t, g + (j - k));
            case TALLY__PENDING:
                if (j < me) {
                    kill_pending(t, mine_i, d);
                    me = j;
                    goto again;
                }
                if (!kill_pending(t, g + (j - k), d))
                    goto again;       /* it moved on: promoted or killed; look again */
                break;
            default:
                break;
            }
        }
        if (ctrl_match(v, CTRL_EMPTY) || ends_probe_seq_cst(t, g))
            break;                    /* guarantee 1: a later twin will see our claim */
    }
    uint64_t seen, lo, hi;
    for (;;) {
        if (reserve(t, &seen)) {
            bool promoted = digest_cas(mine, d.lo, tally__hi_with(d, TALLY__PENDING), d.lo, tally__hi_with(d, TALLY__LIVE));
            settle(t, promoted);
            if (promoted)
                return mine;
            break;                    /* another thread promoted or killed it */
        }
        if (full_now(seen, t)) {
            if (kill_pending(t, mine_i, d))
                return NULL;          /* the caller's next scan reports the table full */
            break;
        }
        /* The last reservations are held by promotions in flight, perhaps a
           twin's, perhaps about to be given back: learn their outcome (a few
           instructions of their holders) rather than refuse the key. */
        digest_load(mine, &lo, &hi);
        if (lo != d.lo || hi != tally__hi_with(d, TALLY__PENDING))
            break;
        if (!wait_for_holders(t, since)) {
            if (kill_pending(t, mine_i, d))
                return NULL;          /* the caller's next look refuses the key */
            break;
        }
    }
    digest_load(mine, &lo, &hi);
    return (lo == d.lo && hi == tally__hi_with(d, TALLY__LIVE)) ? mine : NULL;
}

tally__slot *tally__table_live(tally__table *t, size_t i, tally__digest *d)
{
    tally__slot *s = tally__slot_at(t, i);
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

const void *tally__table_key(tally__table *t, size_t i, size_t *len)
{
    /* acquire: paired with the release store of the copy in tally__table_acquire() */
    const size_t *kp = t->keys ? atomic_load_explicit(&t->keys[i], memory_order_acquire) : NULL;
    if (is_spare(kp))
        kp = NULL;                    /* a FREE slot's spare buffer: no key */
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

static void *key_fill(size_t *p, const void *key, size_t len)
{
    *p = len;
    memcpy(p + 1, key, len);
    return p;
}

/*
 * A copy of @key for a claim of slot @idx: in the slot's spare buffer when
 * it has one that fits, which this CAS makes ours alone (whether or not the
 * claim then wins the slot: the buffer is ours as any allocation), else a
 * new allocation; NULL without memory.
 */
static void *key_copy_at(tally__table *t, size_t idx, const void *key, size_t len)
{
    /* relaxed: the CAS below decides */
    void *kp = atomic_load_explicit(&t->keys[idx], memory_order_relaxed);
    /* acquire: the buffer's last writes and reads, by the claimant that
       filled it and the readers the reclaim waited for, come first; paired
       with the release store of the spare in tally__table_reclaim_free().
       No ABA: this call's read-side section began before its scan saw the
       slot claimable, so the slot cannot be freed again, and its spare
       replaced, before the CAS */
    if (is_spare(kp) && atomic_compare_exchange_strong_explicit(&t->keys[idx], &kp, NULL,
                                                                memory_order_acquire,
                                                                memory_order_relaxed)) {
        size_t *p = spare_buffer(kp);
        tally__tsan_acquire(p);
        if (key_alloc_size(*p) >= key_alloc_size(len))
            return key_fill(p, key, len);
        free(p);
    }
    size_t *p = malloc(key_alloc_size(len));
    return p ? key_fill(p, key, len) : NULL;
}

/* Publish the copy of the key that claimed slot @idx, freeing a spare
   buffer still there (the claimant took another). */
static void key_publish(tally__table *t, size_t idx, void *copy)
{
    tally__tsan_release(copy);
    /* release: paired with the acquire load in tally__table_key(); the
       exchange, not a store, so that a spare left in the slot is not lost
       to a racing key_copy_at(), whose CAS then fails */
    void *old = atomic_exchange_explicit(&t->keys[idx], copy, memory_order_acq_rel);
    if (is_spare(old)) {
        /* taken from the reclaim's release, as key_copy_at() takes one */
        tally__tsan_acquire(spare_buffer(old));
        free(spare_buffer(old));
    }
}

int tally__table_acquire(tally__table *t, tally__digest d, const void *key, size_t key_len,
                         uint64_t now, const tally__probe *hint, tally__slot **out)
{
    size_t home = tally__home_of(t, d);
    uint8_t tag = tag_of(d);
    void *copy = NULL;                /* a key copy not yet stored in a slot */
    uint64_t since = 0;               /* of the first wait for holders */

    for (;; hint = NULL) {
        size_t free_k = SIZE_MAX;
        tally__slot *found = NULL;
        bool rescan = false;

        if (hint && hint->pos != SIZE_MAX) {
            free_k = hint->pos;
            goto claim;
        }

        /* Look for the key until it is proven absent (guarantee 1), and
           for the first slot to claim until one is found. */
        bool absent = false;
        for (size_t k = 0; k < TALLY__WINDOW && !found && !rescan; k += TALLY__GROUP) {
            size_t g = wrap(t, home + k);
            /* seq_cst: one total order with the byte writes (guarantee 8);
               paired with the byte CAS of ctrl_claim() and the writes of ctrl_set() */
            __m128i v = ctrl_group(t, g, memory_order_seq_cst);
            for (unsigned m = absent ? 0 : ctrl_match(v, tag); m && !found && !rescan; m &= m - 1) {
                size_t j = k + (size_t)__builtin_ctz(m);
                tally__slot *s = tally__slot_at(t, g + (j - k));
                uint64_t lo, hi;
                digest_load(s, &lo, &hi);
                if (!is_key(hi, lo, d))
                    continue;
                if (status_of(hi) == TALLY__LIVE) {
                    found = s;
                } else if (status_of(hi) == TALLY__PENDING) {
                    found = resolve(t, d, home, j, &since);
                    rescan = !found;          /* lost a race: scan again */
                }
            }
            unsigned c = ctrl_claimable(v);
            if (c && free_k == SIZE_MAX)
                free_k = k + pick(c, tally__pref_of(d));
            if (ctrl_match(v, CTRL_EMPTY))
                break;                        /* guarantee 1: nothing of ours past here */
            absent = absent || ends_probe(t, g);
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
            /* promotions in flight: see resolve() */
            if (free_k != SIZE_MAX && !full_now(r, t) && wait_for_holders(t, &since))
                continue;
            free(copy);
            return TALLY_EFULL;
        }

        size_t idx = wrap(t, home + free_k);
        tally__slot *mine = tally__slot_at(t, idx);
        /* the copy is made before the claim, so that it is stored right
           after it: a helper that promotes the claim meanwhile is rare */
        if (t->keys && !copy && !(copy = key_copy_at(t, idx, key, key_len)))
            return TALLY_ENOMEM;
        /* the groups passed count the claim before it can be seen (guarantee 1) */
        pass_groups(t, home, idx, 1);
        unsigned was = ctrl_claim(t, idx, tag);
        if (!was) {
            pass_groups(t, home, idx, -1);
            continue;                 /* another claim took it: the byte is no longer EMPTY */
        }
        /* the claim is the key's first use: stamped before the digest names
           the key, so that no evictor sees it LIVE with the stamp of the
           slot's last key, whoever promotes it (a twin's resolve() may)
           (guarantee 9); acquire: paired with the release store of
           tally__table_stamp_alloc() */
        _Atomic uint64_t *stamp = atomic_load_explicit(&t->stamp, memory_order_acquire);
        if (stamp)
            /* relaxed: the digest CAS below, a full barrier, orders it first */
            atomic_store_explicit(&stamp[idx], tally__stamp_of(now), memory_order_relaxed);
        /* The byte made us the slot's one claimant (guarantee 2): the CAS
           cannot fail. FREE is written to the byte after the digest; a
           shared engine's FREE names the process that freed it (guarantee
           10), and only while the byte is DEAD does anyone change it.
           acquire: paired with the digest CAS that made it FREE */
        uint64_t free_hi = was == CTRL_FREE && t->region ? tally__word_load_acquire(&mine->d_hi) : 0;
        digest_cas(mine, was == CTRL_EMPTY ? TALLY__LO_EMPTY : TALLY__LO_FREE, free_hi,
                   d.lo, tally__hi_with(d, TALLY__PENDING));
        if (copy) {
            /* the claim made us the only writer of this slot's key */
            key_publish(t, idx, copy);
            copy = NULL;
        }
        found = resolve(t, d, home, free_k, &since);
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
        && digest_cas(s, lo, hi, lo, (hi & TALLY__DIGEST_HI_MASK) | ((uint64_t)TALLY__DEAD << TALLY__STATUS_SHIFT))) {
        atomic_fetch_sub_explicit(&t->res, 1, memory_order_relaxed);   /* its reservation */
        ctrl_set(t, tally__slot_index(t, s), (unsigned)(hi & 0x7f), CTRL_DEAD);
    }
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
    /* acquire: paired with the release store of tally_policy_update()
       (engine.c): every limit judged under one version of the policy */
    const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
    for (unsigned i = 0; i < t->n_limits; i++) {
        tally__state cur = i ? tally__state_load_atomic(&s->st[i]) : first;
        if (tally__state_is_dead(cur))
            goto help;
        if (!tally__algo_expired(&lim[i], cur, now))
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
    b->evicted = 0;
    b->cap = cap;
    /* a shared engine's ZOMBIE slots name their reclaim's process */
    b->owner = t->region ? tally__proc_self() & TALLY__DIGEST_HI_MASK : 0;
    b->gone = 0;
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

/* Move a DEAD slot to ZOMBIE, owned by this reclaim (of process @owner in
   a shared engine, else 0). */
static bool take_dead(tally__table *t, tally__slot *s, uint64_t owner, tally__digest *d)
{
    uint64_t lo, hi;
    digest_load(s, &lo, &hi);
    if (status_of(hi) != TALLY__DEAD || !digest_cas(s, lo, hi, TALLY__LO_ZOMBIE, owner))
        return false;
    d->lo = lo;
    d->hi = hi & TALLY__DIGEST_HI_MASK;
    atomic_fetch_add_explicit(&t->zombies, 1, memory_order_relaxed);
    return true;
}

/* The digest a batch holds for a slot whose key is not known: a ZOMBIE
   taken over from a dead process. No key's digest has these top bits. */
#define UNKNOWN_HI UINT64_MAX

/* Whether the process of @owner, which holds ZOMBIE slots, is gone; the
   last answer is kept in @b, as a sweep meets a dead reclaim's slots in a
   row. */
static bool owner_gone(tally__batch *b, uint64_t owner)
{
    if (b->gone != owner && tally__proc_dead(owner))
        b->gone = owner;
    return b->gone == owner;
}

/* A ZOMBIE slot of a shared engine whose reclaim's process died before it
   made the slot FREE (SIGKILL in its grace period): this reclaim takes it
   over, by one CAS of the owner, and frees it after its own grace period.
   Its key is not known, so the overflow counts of its claim stay (longer
   probes past its groups, never a missed key: guarantee 1 needs only that
   they are not too low). */
static bool take_orphan(tally__slot *s, uint64_t lo, uint64_t hi, tally__batch *b)
{
    if (lo != TALLY__LO_ZOMBIE || hi == 0 || hi == b->owner || !owner_gone(b, hi)
        || !digest_cas(s, lo, hi, TALLY__LO_ZOMBIE, b->owner))
        return false;
    /* it stays counted in zombies: the dead reclaim counted it, ours frees it */
    b->digest[b->n] = (tally__digest){ 0, UNKNOWN_HI };
    return true;
}

static void consider(tally__table *t, size_t idx, uint64_t now, tally__batch *b)
{
    tally__slot *s = tally__slot_at(t, idx);
    uint64_t lo, hi;

    if (b->n == b->cap)
        return;
    /* relaxed: a claimable byte shows nothing to take (guarantee 8); the
       digest load below decides for every other slot */
    if (claimable(ctrl_byte(t, idx, memory_order_relaxed)))
        return;
    digest_load(s, &lo, &hi);
    if (status_of(hi) == TALLY__LIVE && !kill_expired(t, s, now))
        return;
    if (status_of(hi) == TALLY__LIVE || status_of(hi) == TALLY__DEAD) {
        if (take_dead(t, s, b->owner, &b->digest[b->n]))
            b->idx[b->n++] = idx;
    } else if (b->owner && take_orphan(s, lo, hi, b)) {
        b->idx[b->n++] = idx;
    } else if (b->owner && lo == TALLY__LO_FREE && hi != 0 && hi != b->owner && owner_gone(b, hi)
               /* seq_cst: paired with the byte CASes of the dead reclaim,
                  all visible once the kernel says it died */
               && ctrl_byte(t, idx, memory_order_seq_cst) == CTRL_DEAD
               && digest_cas(s, lo, hi, TALLY__LO_FREE, b->owner)) {
        /* A reclaim that died between the digest's FREE and the byte's
           (guarantee 10): its slot would be neither claimable nor taken.
           The digest CAS made this reclaim the one that sets the byte: the
           byte stays DEAD until then, as the dead one set it last. */
        ctrl_cas(t, idx, CTRL_DEAD, CTRL_FREE);
    }
}

size_t tally__table_reclaim_take(tally__table *t, tally__digest d, uint64_t now, tally__batch *b)
{
    size_t home = tally__home_of(t, d);
    /* relaxed: a heuristic; any length up to sweep_max fits the batch */
    size_t len = atomic_load_explicit(&t->sweep_len, memory_order_relaxed);
    size_t sweep = atomic_fetch_add_explicit(&t->sweep, len, memory_order_relaxed) % t->n_slots;

    b->n = 0;
    b->evicted = 0;
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

bool tally__table_window_settling(tally__table *t, tally__digest d)
{
    size_t home = tally__home_of(t, d);
    for (size_t k = 0; k < TALLY__WINDOW; k += TALLY__GROUP)
        /* relaxed: whether to wait for another grace period or refuse; the
           claim that follows reads the bytes again (seq_cst) */
        if (ctrl_match(ctrl_group(t, wrap(t, home + k), memory_order_relaxed), CTRL_DEAD))
            return true;
    return false;
}

/* Slot @i keeps its key whatever its age: cost not yet pushed to the sinks
   (the sync arrays @y, NULL when no flusher started), or a watch flag (@w). */
static bool evict_protected(const tally__table *t, size_t i, tally__sync *y, tally__watch_slot *w)
{
    /* acquire: paired with the flag CAS in tally__watch_feed() (watch.c) */
    if (w && atomic_load_explicit(&w[i].flag_at, memory_order_acquire))
        return true;
    /* Holds of a concurrency limit: forgotten, their releases would find
       nothing and as many more holders would get in. They leave the slot by
       release or by the expiry reclaim. acquire: paired with the release
       store of tally_policy_update() (engine.c) */
    const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
    for (unsigned l = 0; l < t->n_limits; l++)
        if (lim[l].spec.algo == TALLY_CONCURRENCY
            && (tally__state_load_atomic(&tally__slot_at(t, i)->st[l]).w1 & TALLY_CONCURRENCY_MAX_COUNT))
            return true;
    for (unsigned l = 0; y && l < t->n_limits; l++)
        /* acquire: paired with the pair CAS of delta_add() (hit.c) or of
           the flusher's take in collect_range() (sync/flusher.c) */
        if (tally__word_load_acquire(&y[i * t->n_limits + l].delta))
            return true;
    return false;
}

#define CHOOSE_TRIES 4    /* choices whose kills all lost to hits before an eviction gives up */
/* Keys one eviction pass takes at most, all freed after one grace period, so
   that the next new keys find room without a pass or a wait of their own:
   capacity / EVICT_SHARE (HAProxy's stick tables purge as large a share of
   their oldest entries at once), at least one, at most EVICT_BATCH, under a
   tenth of the about 170 keys a full window holds. A table of fewer than
   2 * EVICT_SHARE keys evicts exactly its window's least recently hit key. */
#define EVICT_BATCH 16
#define EVICT_SHARE 256

/* A window every engine sharing the limit agrees on: the flusher learns the
   others' count of these alone (sync/flusher.c). */
static bool forget_shared(const tally__limit *l)
{
    return l->spec.algo == TALLY_SLIDING_WINDOW || l->spec.algo == TALLY_CALENDAR_WINDOW
        || (l->spec.algo == TALLY_FIXED_WINDOW && l->aligned);
}

static void forget_drop(const tally__table *t, tally__note **n)
{
    for (unsigned l = 0; l < t->n_limits; l++)
        free(n[l]);
}

/* The notes that will carry the count of victim @i (digest @d) in each limit
   of a shared window, made before the kill: without memory for them the key
   is not evicted, so a count is never forgotten for want of a note. */
static bool forget_make(tally__table *t, const tally__limit *lim, size_t i, tally__digest d,
                        tally__note **n)
{
    size_t key_len = 0;
    const void *key = tally__table_key(t, i, &key_len);
    bool ok = true;
    for (unsigned l = 0; l < t->n_limits; l++) {
        n[l] = NULL;
        if (ok && forget_shared(&lim[l]))
            ok = (n[l] = tally__note_new(TALLY__NOTE_FORGET, t->policy, l, d, key, key_len)) != NULL;
    }
    tally__table_key_done(key);
    if (!ok)
        forget_drop(t, n);
    return ok;
}

/* Send each limit's count as the victim died (@st) in the window it was in. */
static void forget_send(tally__table *t, const tally__limit *lim, tally__note **n,
                        const tally__state *st, uint64_t now)
{
    /* @now, the evicting call's time, places a sliding window's number only */
    for (unsigned l = 0; l < t->n_limits; l++) {
        if (!n[l])
            continue;
        tally_counter c;
        tally__algo_counter(&lim[l], st[l], now, &c);
        if (!c.used) {
            free(n[l]);
            continue;
        }
        n[l]->win = c.window_start_ns;
        n[l]->delta = c.used;
        tally__note_push(t->notes, n[l]);
    }
}

/* After the kill of limit 0, the evictor kills the other limits itself, so
   that it knows each one's state as it died, in *@st. A hit that met the
   DEAD limit 0 may kill one first (tally__table_help_kill()): that limit
   keeps in *@st the state the evictor read just before its kill. */
static void kill_rest(tally__table *t, tally__slot *s, tally__state *st)
{
    static const tally__state dead = { 0, TALLY__DEAD_W1 };

    for (unsigned i = 1; i < t->n_limits; i++) {
        for (;;) {
            tally__state cur = tally__state_load(&s->st[i]);
            if (tally__state_is_dead(cur))
                break;
            if (tally__state_cas(&s->st[i], cur, dead)) {
                st[i] = cur;
                break;
            }
        }
    }
}

bool tally__table_evict(tally__table *t, tally__digest d, uint64_t now, bool syncing, tally__batch *b)
{
    static const tally__state dead = { 0, TALLY__DEAD_W1 };
    /* acquire: paired with the release store of tally__table_stamp_alloc() */
    _Atomic uint64_t *stamp = atomic_load_explicit(&t->stamp, memory_order_acquire);
    /* acquire: paired with the release stores in tally__table_sync_alloc()
       and tally_watch_set() (ops/ops.c): the arrays are seen zeroed */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    /* the victims' counts go to a flusher that runs (guarantee 9): none is
       left on the stack for one that stopped */
    bool notes = y && syncing;
    size_t home = tally__home_of(t, d);
    size_t want = t->capacity / EVICT_SHARE;
    want = want < 1 ? 1 : want > EVICT_BATCH ? EVICT_BATCH : want;
    /* the keys a window holds in a full table, on average */
    size_t mean = t->capacity * TALLY__WINDOW / t->n_slots;
    mean = mean < 1 ? 1 : mean;

    b->n = 0;
    b->evicted = 0;
    if (!stamp)
        return false;
    for (unsigned tries = 0; tries < CHOOSE_TRIES; tries++) {
        /* One look at the window: its expired keys and its slots left DEAD
           are taken as a reclaim takes them (consider()), and the oldest
           unprotected keys of the rest, sorted by stamp, are the
           candidates. The window is where the new key must live, and at a
           load factor of 2/3 it holds about 170 keys, a sample of the
           table's ages. */
        size_t victim[EVICT_BATCH];
        uint64_t age[EVICT_BATCH];
        size_t n_cand = 0, n_live = 0;
        bool room = false, settling = false;
        for (size_t k = 0; k < TALLY__WINDOW; k += TALLY__GROUP) {
            size_t g = wrap(t, home + k);
            /* relaxed: a byte only names a slot whose digest is read below,
               which decides (guarantee 8) */
            __m128i v = ctrl_group(t, g, memory_order_relaxed);
            unsigned c = ctrl_claimable(v);
            room = room || c;
            for (unsigned m = ~c & 0xffff; m; m &= m - 1) {
                size_t i = g + (size_t)__builtin_ctz(m);
                size_t taken = b->n;
                consider(t, i, now, b);
                if (b->n != taken)
                    continue;
                uint64_t lo, hi;
                digest_load(tally__slot_at(t, i), &lo, &hi);
                if (status_of(hi) != TALLY__LIVE) {
                    settling = settling || status_of(hi) != TALLY__PENDING;
                    continue;
                }
                n_live++;
                /* relaxed: an age, a heuristic; read again before the kill */
                uint64_t at = atomic_load_explicit(&stamp[i], memory_order_relaxed);
                if ((n_cand == want && at >= age[n_cand - 1]) || evict_protected(t, i, y, w))
                    continue;
                size_t j = n_cand < want ? n_cand++ : n_cand - 1;
                for (; j > 0 && age[j - 1] > at; j--) {
                    age[j] = age[j - 1];
                    victim[j] = victim[j - 1];
                }
                age[j] = at;
                victim[j] = i;
            }
        }
        /* Expired keys go before any live one, and slots left DEAD are
           taken: the caller waits for them and tries again. */
        if (b->n)
            return true;
        /* No free slot in the window, and slots another reclaim took: they
           are FREE after its grace period, which the caller waits for
           (tally__table_window_settling()) rather than evict. */
        if (n_cand == 0 || (!room && settling))
            return false;             /* or every key of the window is protected */
        /* Another pass made room since the caller was refused: claim it
           rather than evict ahead of need. relaxed: a heuristic; the claim
           decides */
        if (room && tally__res_live(atomic_load_explicit(&t->res, memory_order_relaxed)) < t->capacity)
            return true;
        /* The room goes to new keys anywhere in the table, the evictions
           come out of this window: a window holding fewer keys than a full
           table's mean gives up fewer, so that no region drains (a window
           with no key left could evict nothing). */
        size_t batch = want * n_live / mean;
        batch = batch < 1 ? 1 : batch;
        size_t killed = 0;
        /* acquire: paired with the release store of tally_policy_update()
           (engine.c): the notes name windows of one version of the policy */
        const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
        for (size_t j = 0; j < n_cand && killed < batch; j++) {
            tally__slot *s = tally__slot_at(t, victim[j]);
            tally__state first = tally__state_load_atomic(&s->st[0]);
            if (tally__state_is_dead(first))
                continue;             /* another reclaim is killing it */
            /* judged after the state was read, as the reclaim does: a cost
               added after this goes to the flusher when the slot is freed
               (guarantee 9); and a newer stamp is a hit since the choice,
               also one that changed no state (a denial), which the CAS
               cannot see. relaxed: a heuristic */
            if (evict_protected(t, victim[j], y, w)
                || atomic_load_explicit(&stamp[victim[j]], memory_order_relaxed) != age[j])
                continue;
            /* With a flusher, the victim's counts go to it (guarantee 9). */
            tally__note *forget[TALLY_MAX_LIMITS];
            tally__state st[TALLY_MAX_LIMITS];
            uint64_t lo, hi;
            digest_load(s, &lo, &hi);
            if (notes && !forget_make(t, lim, victim[j], (tally__digest){ lo, hi & TALLY__DIGEST_HI_MASK },
                                  forget))
                break;                /* refused rather than forgotten */
            st[0] = first;
            for (unsigned l = 1; l < t->n_limits; l++)
                st[l] = tally__state_load_atomic(&s->st[l]);
            if (!tally__state_cas(&s->st[0], first, dead)) {
                if (notes)
                    forget_drop(t, forget);
                continue;             /* hit since it was chosen: no longer among the oldest */
            }
            atomic_fetch_add_explicit(&t->lru_evicted, 1, memory_order_relaxed);
            killed++;
            kill_rest(t, s, st);
            tally__table_help_kill(t, s);
            if (notes)
                forget_send(t, lim, forget, st, now);
            if (take_dead(t, s, b->owner, &b->digest[b->n])) {
                b->idx[b->n++] = victim[j];
                b->evicted++;
            }
        }
        if (killed)
            return true;
    }
    return false;
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
        tally__slot *s = tally__slot_at(t, b->idx[j]);
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
        if (is_spare(kp))
            kp = NULL;                /* no claimant published a copy: none to spill */
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
        if (kp) {
            /* the copy stays as the slot's spare (tally__table_key() sees
               none); release: the buffer and the last reads of it come
               first, paired with the acquire CAS of key_copy_at() */
            tally__tsan_release(kp);
            atomic_store_explicit(&t->keys[b->idx[j]], (void *)((uintptr_t)kp | 1), memory_order_release);
        }
        /* the key no longer lies past the groups before its slot (guarantee 1) */
        if (b->digest[j].hi != UNKNOWN_HI)
            pass_groups(t, tally__home_of(t, b->digest[j]), b->idx[j], -1);
        /* the next key here is a new instance (guarantee 6) */
        atomic_store_explicit(&t->gen[b->idx[j]], tally__table_gen_fresh(t), memory_order_relaxed);
        if (b->owner) {
            /* A shared engine's (guarantee 10). A killer that died before
               its byte's DEAD left its tag: the byte is DEAD before the
               digest is FREE. The digest becomes {FREE, us} in one CAS (a
               full barrier: the zeroed state and the fresh instance come
               first, paired as the release store below), and the byte
               after it: a reclaim that finds {FREE, us} under a DEAD byte
               once we are dead finishes for us. */
            ctrl_cas(t, b->idx[j], CTRL_ANY, CTRL_DEAD);
            if (digest_cas(s, TALLY__LO_ZOMBIE, b->owner, TALLY__LO_FREE, b->owner))
                ctrl_cas(t, b->idx[j], CTRL_DEAD, CTRL_FREE);
        } else {
            /* release: the zeroed state and the fresh instance before the
               slot can be claimed; paired with the claim CAS in
               tally__table_acquire() and the acquire loads of
               tally__table_find_fast() */
            tally__word_store_release(&s->d_lo, TALLY__LO_FREE);
            /* after the digest: a claimable byte means a claimable digest (guarantee 8) */
            ctrl_set(t, b->idx[j], CTRL_DEAD, CTRL_FREE);
        }
        atomic_fetch_sub_explicit(&t->zombies, 1, memory_order_relaxed);
    }
    /* evicted slots are counted apart, when killed (lru_evicted) */
    atomic_fetch_add_explicit(&t->reclaimed, b->n - b->evicted, memory_order_relaxed);
}
