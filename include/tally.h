/*
 * tally: embeddable usage metering and rate limiting.
 *
 * Contract sentences used throughout this header:
 *   "Any thread may call it."   No registration is needed; the engine registers
 *                               the calling thread with RCU on first use and
 *                               unregisters it when the thread exits.
 *   "It never blocks."          No lock, no I/O, no wait on another thread
 *                               (except where noted). It may allocate: a hit
 *                               that hands a delta or an event to the flusher
 *                               allocates a small note.
 *   "On failure nothing changes." An error return leaves every counter as it was.
 */
#ifndef TALLY_H
#define TALLY_H

#include "tally/export.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Errors ------------------------------------------------------------ */

/* X(name, value, message): the one table every error comes from. */
#define TALLY_ERRORS(X)                                                              \
    X(TALLY_EINVAL,    -1, "invalid argument")                                      \
    X(TALLY_ENOMEM,    -2, "out of memory")                                         \
    X(TALLY_EFULL,     -3, "no free slot for a new key: every slot holds live state") \
    X(TALLY_ENOENT,    -4, "key not tracked")                                       \
    X(TALLY_ECONFLICT, -5, "state changed since it was observed")                   \
    X(TALLY_ETIMEDOUT, -6, "timed out")                                             \
    X(TALLY_EIO,       -7, "a sink failed")                                         \
    X(TALLY_ESTATE,    -8, "call not valid in the engine's current state")          \
    X(TALLY_EBUSY,     -9, "too many operations running")                           \
    X(TALLY_ECOOLDOWN, -10, "key cooling down after too many attempts")             \
    X(TALLY_EOPEN,     -11, "circuit breaker open")

enum {
#define TALLY_ERR_ENUM_(name, value, msg) name = value,
    TALLY_ERRORS(TALLY_ERR_ENUM_)
#undef TALLY_ERR_ENUM_
};

/*
 * tally_strerror - describe an error code.
 * @err: a value returned by a tally function.
 * Return a static string; never NULL ("success" for 0, "unknown error" for
 * values not in the table). Any thread may call it. It never blocks.
 */
TALLY_EXPORT const char *tally_strerror(int err);

/* ---- Engine ------------------------------------------------------------ */

typedef struct tally_engine tally_engine;

/*
 * The keyed hash that names keys: a key's 128-bit digest is its identity in
 * the engine and in Redis (key bytes, when kept, are only reported). Both
 * hashes resist hash flooding while hash_key stays secret; the source's
 * src/core/aeshash.c gives the AES hash's design and how far its argument
 * goes.
 *   TALLY_HASH_AUTO     the AES hash where the CPU has AES-NI, else SipHash.
 *                       The choice is made per machine at tally_open.
 *   TALLY_HASH_SIPHASH  SipHash-1-3 with a 128-bit output, on every CPU.
 *   TALLY_HASH_AES      a hash from AES-NI rounds, in about a quarter of
 *                       SipHash's instructions on short keys; tally_open
 *                       fails without AES-NI.
 * Engines that share Redis counters must use the same hash and hash_key:
 * Redis key names carry the hash, so engines with different hashes keep
 * separate counts. With AUTO, machines with and without AES-NI differ, so
 * engines sharing Redis across machines should name the hash.
 */
typedef enum tally_hash {
    TALLY_HASH_AUTO    = 0,
    TALLY_HASH_SIPHASH = 1,
    TALLY_HASH_AES     = 2
} tally_hash;

typedef struct tally_options {
    size_t  capacity;      /* most keys tracked at once per policy; memory is bounded by it */
    size_t  max_key_len;   /* default 256 */
    bool    digest_only;   /* keep only a keyed 128-bit digest of each key, never its bytes */
    uint8_t hash_key[16];  /* secret for the keyed hash; all zero => random at open.
                              Engines that share Redis counters must set the same key. */
    tally_hash hash;       /* the keyed hash; default TALLY_HASH_AUTO */
} tally_options;

/* Largest accepted capacity and key length. */
#define TALLY_MAX_CAPACITY ((size_t)1 << 32)
#define TALLY_MAX_KEY_LEN  ((size_t)1 << 16)

/*
 * tally_options_init - fill @opts with defaults: capacity 65536, max_key_len
 * 256, digest_only false, hash_key all zero (random at open).
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT void tally_options_init(tally_options *opts);

/*
 * tally_open - create an engine.
 * @opts: options; NULL means the defaults of tally_options_init().
 * @out:  receives the engine.
 * Return 0, TALLY_EINVAL (NULL @out, capacity 0 or above TALLY_MAX_CAPACITY,
 * max_key_len 0 or above TALLY_MAX_KEY_LEN, hash not a tally_hash, or
 * TALLY_HASH_AES on a CPU without AES-NI) or TALLY_ENOMEM.
 * Any thread may call it. It may block (it allocates).
 * On failure nothing is allocated and *@out is untouched.
 */
TALLY_EXPORT int tally_open(const tally_options *opts, tally_engine **out);

/*
 * tally_close - stop the flusher, then destroy an engine and free all its
 * memory. NULL is a no-op.
 * What the caller must ensure, as with free(): when close is called, no other
 * call on @e is running and none will start. Join (or otherwise stop) the
 * threads that use @e first. The engine cannot make a racing call safe: a
 * call that has been entered but has not yet reached its RCU read-side
 * section (for a thread's first call, registering with RCU waits for a grace
 * period in progress) may resume after @e was freed. Such a call is often
 * told TALLY_ESTATE, but that is a diagnostic, not a guarantee.
 * What close guarantees: the engine's own threads are done before anything
 * is freed: the flusher is stopped (with a final flush), and hits parked
 * outside RCU while a full table is reclaimed are waited for.
 * Calling close twice on the same handle is a use after free.
 * Any thread but the flusher's own callbacks may call it. It blocks: for the
 * final flush (bounded by the Redis command timeout) and an RCU grace period.
 */
TALLY_EXPORT void tally_close(tally_engine *e);

/*
 * tally_now_ns - nanoseconds since the Unix epoch: the wall clock read once
 * at load, advanced by CLOCK_MONOTONIC (later steps of the wall clock are not
 * followed). The value never goes back, in one thread or from one thread to
 * a call ordered after it in another. Where the kernel vouches for the
 * time-stamp counter (constant_tsc, nonstop_tsc, rdtscp, clocksource tsc) it
 * is read with rdtscp on continuous lines of up to ~268 ms calibrated against
 * CLOCK_MONOTONIC, and stays within tens of ns, plus what CLOCK_MONOTONIC's
 * rate changes (NTP slew) over about 1.5 lines, of that time; elsewhere, or
 * with TALLY_CLOCK=gettime in the environment at load, it is that time
 * exactly, from clock_gettime().
 * Any thread may call it. It takes no lock and never sleeps; a call that
 * finds the counter past the last calibrated line may spin up to 20 us for
 * the thread fixing the next one.
 */
TALLY_EXPORT uint64_t tally_now_ns(void);

/* ---- Policies ---------------------------------------------------------- */

typedef enum tally_algo {
    TALLY_FIXED_WINDOW,    /* window opens at the first hit after the last one expired */
    TALLY_CALENDAR_WINDOW, /* window = calendar minute/hour/day/week(Monday)/month at utc_offset_s */
    TALLY_SLIDING_WINDOW,  /* weighted previous + current window, as HAProxy/Cloudflare estimate */
    TALLY_GCRA,            /* generic cell rate: max = burst, period_ns = time to refill max */
    TALLY_CONCURRENCY      /* at most max holders at once per key; period_ns = the lease after
                              which an unreleased hold expires */
} tally_algo;

typedef enum tally_calendar_unit {
    TALLY_MINUTE, TALLY_HOUR, TALLY_DAY, TALLY_WEEK, TALLY_MONTH
} tally_calendar_unit;

typedef struct tally_limit {
    tally_algo          algo;
    uint64_t            max;          /* cost allowed per window (GCRA: burst) ; > 0 */
    uint64_t            period_ns;    /* window length (GCRA: refill time); unused for calendar */
    tally_calendar_unit unit;         /* calendar windows */
    int32_t             utc_offset_s; /* calendar windows */
} tally_limit;

#define TALLY_MAX_LIMITS 4
enum { TALLY_SHADOW = 1u << 0,        /* count and report, never deny */
       TALLY_COUNT_REJECTED = 1u << 1, /* denied hits consume too (default: they do not) */
       TALLY_ALIGNED = 1u << 2         /* fixed windows start at multiples of period_ns since
                                          the epoch, so that engines sharing Redis agree */ };
enum { TALLY_EVICT_LRU = 1u << 3 };  /* a full table evicts its least recently hit key
                                        instead of refusing the new one with TALLY_EFULL:
                                        the oldest of the new key's probe window, never
                                        one with cost not yet flushed or a watch flag
                                        (TALLY_EFULL when every candidate is such a key);
                                        tally_stats.lru_evictions counts them */

/* Bounds of a valid limit (see tally_policy_add). */
#define TALLY_MAX_COUNT          ((UINT64_C(1) << 63) - 1) /* fixed, calendar, GCRA max */
#define TALLY_SLIDING_MAX_COUNT  ((UINT64_C(1) << 44) - 1) /* sliding window max */
#define TALLY_CONCURRENCY_MAX_COUNT ((UINT64_C(1) << 32) - 1) /* concurrency max */
#define TALLY_MAX_PERIOD_NS      ((UINT64_C(1) << 62))     /* about 146 years */
#define TALLY_MAX_UTC_OFFSET_S   (18 * 3600)
#define TALLY_MAX_POLICIES       1024
#define TALLY_MAX_POLICY_NAME    128

typedef struct tally_policy {
    const char *name;                 /* used in Redis keys and reports */
    tally_limit limits[TALLY_MAX_LIMITS];
    unsigned    n_limits;             /* 1..TALLY_MAX_LIMITS */
    unsigned    flags;
} tally_policy;

/*
 * tally_policy_add - register a policy and allocate its key table.
 * @e:      the engine.
 * @p:      the policy; copied, so it may be freed on return.
 * @id_out: receives the policy id used by the hot path.
 * Each policy tracks at most opts.capacity keys; its table is allocated here.
 * Return 0, TALLY_EINVAL (NULL argument; name NULL, empty, longer than
 * TALLY_MAX_POLICY_NAME or already used; n_limits 0 or above TALLY_MAX_LIMITS;
 * unknown algo or flags; max 0 or above the algorithm's bound; period_ns 0 or
 * above TALLY_MAX_PERIOD_NS; GCRA period_ns below max (the emission interval
 * period_ns / max must be at least 1 ns); calendar unit out of range or
 * |utc_offset_s| above TALLY_MAX_UTC_OFFSET_S; more than one TALLY_CONCURRENCY
 * limit), TALLY_ENOMEM (allocation failed or TALLY_MAX_POLICIES reached),
 * TALLY_ESTATE (engine closing).
 * Any thread may call it, also while others run the hot path. It may block
 * (it allocates). On failure nothing changes.
 */
TALLY_EXPORT int tally_policy_add(tally_engine *e, const tally_policy *p, uint32_t *id_out);

/*
 * tally_policy_update - replace policy @id's limits and flags, keeping every
 * key's usage.
 * @p: the new policy; copied. Same name and n_limits as the policy's.
 * Limit i of @p replaces limit i, and each key keeps what its state means
 * under the new limit (docs/ALGORITHMS.md, "Changing a policy"): a window's
 * count (remaining = new max - used, or 0), a GCRA key's theoretical arrival
 * time, a concurrency limit's holds. Flags apply from the next hit. A call
 * running meanwhile decides wholly under the old policy or wholly under the
 * new one.
 * Return 0, TALLY_EINVAL (NULL @e or @p; unknown @id; another name or limit
 * count; a limit or flags tally_policy_add() would refuse; a limit whose
 * algorithm changes other than between TALLY_FIXED_WINDOW and
 * TALLY_CALENDAR_WINDOW; a sliding window whose period_ns changes),
 * TALLY_ENOMEM, TALLY_ESTATE (engine closing).
 * Any thread may call it, also while others run the hot path. It may block
 * (it allocates, and takes the lock of tally_policy_add()). The replaced
 * limits are kept until tally_close (a few hundred bytes an update).
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_policy_update(tally_engine *e, uint32_t id, const tally_policy *p);

/* ---- The hot path ------------------------------------------------------ */

typedef struct tally_result {
    bool     allowed;        /* false only if a limit denied and the policy is not SHADOW */
    uint32_t exceeded;       /* bit i: limit i is over (or would deny, in shadow mode) */
    uint32_t first_exceeded; /* bit i: this very call first crossed limit i in this window;
                                exactly one call per key, limit and window gets the bit */
    uint64_t remaining;      /* smallest remaining cost across the limits */
    uint64_t reset_after_ns; /* until the binding limit is fully available again */
    uint64_t retry_after_ns; /* 0 when allowed; else until this hit would be allowed */
} tally_result;

/* retry_after_ns when the hit can never be allowed (its cost exceeds max). */
#define TALLY_NEVER UINT64_MAX

/*
 * tally_hit_at - count one hit of @key against @policy at time @now_ns.
 * @costs:  one cost per limit; NULL means 1 for each. Costs saturate.
 * @now_ns: ns since the Unix epoch, at most INT64_MAX. A time older than the
 *          key's state is taken as the state's own time.
 * @out:    receives the decision.
 * The hit consumes from every limit or from none (see README.md for the exact
 * guarantee under contention). A key seen for the first time takes a slot;
 * when every slot holds live state, slots whose windows have all expired are
 * reclaimed, and failing that the call returns TALLY_EFULL.
 * Return 0, TALLY_EINVAL (NULL @e, @key or @out; key_len 0 or above
 * max_key_len; unknown policy; @now_ns above INT64_MAX), TALLY_EFULL,
 * TALLY_ENOMEM (a new key's copy, or the list of a reclaim, could not be
 * allocated), TALLY_ESTATE (engine closing).
 * Any thread may call it. It never blocks, except that reclaiming a slot for a
 * new key in a full table waits for an RCU grace period.
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_hit_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                              const uint64_t *costs, uint64_t now_ns, tally_result *out);

/* tally_hit - tally_hit_at() at tally_now_ns(). Same contract. */
TALLY_EXPORT int tally_hit(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                           const uint64_t *costs, tally_result *out);

/* What tally_hit_ex() is given besides the key. */
typedef struct tally_hit_opts {
    const uint64_t *costs;   /* one per limit; NULL: 1 each */
    const uint64_t *max;     /* one per limit: this call's max (a per-key plan);
                                NULL, or a 0 entry: the policy's max */
    uint64_t        now_ns;  /* 0: tally_now_ns() */
} tally_hit_opts;

/*
 * tally_hit_ex - tally_hit_at() with a max of the caller's for each limit.
 * @opts: costs, maxes and time; NULL means tally_hit()'s defaults.
 * The usage is the key's whichever max a call passes, as with redis-cell's
 * CL.THROTTLE or Gubernator: a window's count, a GCRA key's theoretical
 * arrival time (the emission interval is period_ns / this call's max), a
 * concurrency limit's holders; each call decides that usage against its own
 * max. Maxes are checked as tally_policy_add() checks a limit's.
 * Return as tally_hit_at(), and TALLY_EINVAL for a max above the algorithm's
 * bound (or, for GCRA, above period_ns).
 * Any thread may call it. It never blocks, but as tally_hit_at().
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_hit_ex(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                              const tally_hit_opts *opts, tally_result *out);

/*
 * tally_reserve_at - book a hit of a GCRA policy at the first time it
 * conforms, as nginx's limit_req without nodelay or x/time/rate's Reserve.
 * @costs:        one per limit; NULL means 1 each.
 * @max_delay_ns: the longest wait the caller accepts.
 * @delay_ns:     receives how long to wait before acting (0: act now).
 * When the hit conforms within @max_delay_ns it is booked at once: every
 * later call sees it, out->allowed is true and *@delay_ns is the wait.
 * Otherwise nothing is consumed, *@delay_ns is 0 and @out is as for a hit
 * denied at @now_ns (a cost above a limit's max is never booked). The flags
 * act as on a hit: TALLY_SHADOW books and allows every call, and
 * TALLY_COUNT_REJECTED books a call that does not conform too (it counts,
 * and is denied), as a counted rejected hit does.
 * Return 0, TALLY_EINVAL (as tally_hit_at(); NULL @delay_ns; a limit of the
 * policy that is not TALLY_GCRA), TALLY_EFULL, TALLY_ENOMEM, TALLY_ESTATE.
 * Any thread may call it. It never blocks, but as tally_hit_at().
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_reserve_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                                  const uint64_t *costs, uint64_t now_ns, uint64_t max_delay_ns,
                                  uint64_t *delay_ns, tally_result *out);

/*
 * tally_release_at - give back what a hit acquired on the policy's
 * TALLY_CONCURRENCY limit.
 * @costs: one per limit (only the concurrency limit's entry is read); NULL
 *         means 1.
 * A hit of the policy acquires its cost on the concurrency limit; this gives
 * it back. Holds not given back expire together a lease (period_ns) after
 * the key's latest acquire.
 * Return 0, TALLY_EINVAL (as tally_hit_at(); a policy without a
 * TALLY_CONCURRENCY limit), TALLY_ENOENT (the key is not tracked, or holds
 * less than the cost at @now_ns: it holds nothing, or its holds expired),
 * TALLY_ESTATE.
 * Any thread may call it. It never blocks. On failure nothing changes.
 */
TALLY_EXPORT int tally_release_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                                  const uint64_t *costs, uint64_t now_ns);

/* tally_release - tally_release_at() at tally_now_ns(). Same contract. */
TALLY_EXPORT int tally_release(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                               const uint64_t *costs);

/*
 * tally_peek_at - the decision a hit of cost 1 per limit would get at @now_ns,
 * consuming nothing. An untracked key is evaluated as empty and is not added.
 * first_exceeded is always 0.
 * Return 0, TALLY_EINVAL, TALLY_ESTATE as tally_hit_at().
 * Any thread may call it. It never blocks. It changes nothing.
 */
TALLY_EXPORT int tally_peek_at(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                               uint64_t now_ns, tally_result *out);

/* ---- Reading and resetting --------------------------------------------- */

typedef struct tally_counter {
    uint64_t used;             /* cost used in the current window (GCRA: burst in use;
                                  concurrency: holders) */
    uint64_t window_start_ns;  /* start of the current window (GCRA: 0) */
    uint64_t raw[2];           /* the exact state words, for reset_if */
} tally_counter;

typedef struct tally_snapshot {
    uint32_t      policy;
    unsigned      n_limits;
    tally_counter c[TALLY_MAX_LIMITS];
    uint64_t      generation;  /* the key's state instance: every reset, and every new slot
                                  for the key, gives it a new one (see tally_reset_if) */
} tally_snapshot;

/*
 * tally_read - the stored state of @key under @policy.
 * The state is reported as stored: a window is not rolled by reading, so
 * window_start_ns tells which window `used` belongs to. For GCRA, `used` is
 * the burst in use as of the key's last hit. out->generation names the state
 * instance read: it changes with every successful reset of the key and when
 * the key moves to a new slot, never with a hit. A snapshot read while a
 * reset of the same key was running carries an odd generation: resetting
 * from it returns TALLY_ECONFLICT.
 * Return 0, TALLY_EINVAL, TALLY_ENOENT (key not tracked), TALLY_ESTATE.
 * Any thread may call it. It never blocks. It changes nothing.
 */
TALLY_EXPORT int tally_read(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                            tally_snapshot *out);

/*
 * tally_reset_if - reset to empty each limit whose state is still the very
 * state @observed saw: the same instance (observed->generation: no reset of
 * the key since, and the key still in the same slot) and the same state words
 * (observed->c[i].raw, bit for bit). Hits that rebuild the same words after a
 * reset do not make an old snapshot match again.
 * @observed:   a snapshot from tally_read() of the same policy and key.
 * @reset_mask: receives bit i for each limit really reset (may be NULL).
 * Concurrent resetters of the same observed instance collapse into one winner.
 * Return 0 (at least one limit reset), TALLY_ECONFLICT (none was: the state
 * changed since it was observed), TALLY_EINVAL (NULL argument, or @observed is
 * of another policy or limit count), TALLY_ENOENT, TALLY_ESTATE.
 * Any thread may call it. It may block briefly: resets of one policy take
 * turns under a lock (hits never take it).
 */
TALLY_EXPORT int tally_reset_if(tally_engine *e, uint32_t policy, const void *key, size_t key_len,
                                const tally_snapshot *observed, uint32_t *reset_mask);

#ifdef __cplusplus
}
#endif

#include "tally/flusher.h"
#include "tally/spec.h"
#include "tally/ops.h"
#include "tally/coalesce.h"
#include "tally/shared.h"

#endif /* TALLY_H */
