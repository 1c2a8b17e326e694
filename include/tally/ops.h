/*
 * tally/ops.h - operator views: the rejection watch with its set-once flag,
 * throttle episodes, a table scan like HAProxy's `show table`, and per-interval
 * usage histograms. Included by <tally.h>.
 *
 * The same contract sentences as tally.h are used: "Any thread may call it",
 * "It never blocks", "On failure nothing changes".
 */
#ifndef TALLY_OPS_H
#define TALLY_OPS_H

#include "export.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tally_engine tally_engine;

/* ---- The rejection watch ------------------------------------------------ */

typedef struct tally_watch {
    uint64_t threshold;   /* denied cost within the window that flags a key; > 0 */
    uint64_t window_ns;   /* rolling (sliding) window, e.g. 10 minutes; > 0 */
    size_t   episodes;    /* throttle episodes kept (least recently throttled go first);
                             0 means 200 */
} tally_watch;

/*
 * tally_watch_set - attach a watch rule to a policy. Every denial of a hit on
 * the policy (shadow denials too) adds the hit's largest cost to the key's
 * rolling denied count; the call that makes it reach the threshold sets the
 * key's flag, exactly once until an operator clears it.
 * Return 0, TALLY_EINVAL (NULL argument, unknown policy, threshold or window
 * 0, window above TALLY_MAX_PERIOD_NS, threshold above
 * TALLY_SLIDING_MAX_COUNT), TALLY_ESTATE (the policy already has a watch, or
 * the engine is closing), TALLY_ENOMEM.
 * Any thread may call it, also while others run the hot path. It may block
 * (it allocates). On failure nothing changes.
 */
TALLY_EXPORT int tally_watch_set(tally_engine *e, uint32_t policy, const tally_watch *w);

typedef struct tally_flag {
    const void *key; size_t key_len;  /* the digest when digest_only */
    uint64_t flagged_at_ns;           /* the hit that crossed the threshold */
    uint64_t denied;                  /* denied cost in the window at that moment */
} tally_flag;

/*
 * tally_watch_clear - clear @key's flag on @policy (and, with a flusher on
 * Redis, the flag stored in Redis at the next flush).
 * Return 0, TALLY_ENOENT (key not tracked or not flagged), TALLY_EINVAL
 * (NULL argument, bad key length, unknown policy, no watch), TALLY_ESTATE.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT int tally_watch_clear(tally_engine *e, uint32_t policy, const void *key,
                                   size_t key_len);

/*
 * tally_watch_flagged - call @cb for every flagged key of @policy that is in
 * the table, at most @limit of them (0: all). @cb returns nonzero to stop.
 * Return the number of flags reported, or TALLY_EINVAL (NULL argument,
 * unknown policy, no watch), TALLY_ESTATE.
 * Any thread may call it. It may block: @cb runs outside RCU, on the caller's
 * thread, and may take as long as it likes.
 */
TALLY_EXPORT int tally_watch_flagged(tally_engine *e, uint32_t policy, size_t limit,
                                     int (*cb)(void *ctx, const tally_flag *f), void *ctx);

typedef struct tally_episode {
    const void *key; size_t key_len;  /* the digest when digest_only, or when the key is
                                         longer than 64 bytes (episodes keep at most 64) */
    uint64_t denied;                  /* denied cost since the episode began */
    uint64_t first_ns, last_ns;       /* flush intervals that saw the first and last denial */
} tally_episode;

/*
 * tally_watch_episodes - the recent throttle episodes of @policy, most
 * recently throttled first, at most @limit (0: all kept). Episodes are
 * gathered by the flusher once a flush interval; without a flusher there are
 * none. @cb returns nonzero to stop.
 * Return the number reported, or TALLY_EINVAL (NULL argument, unknown policy,
 * no watch), TALLY_ESTATE.
 * Any thread may call it. It may block (a mutex shared with the flusher; @cb
 * runs outside it).
 */
TALLY_EXPORT int tally_watch_episodes(tally_engine *e, uint32_t policy, size_t limit,
                                      int (*cb)(void *ctx, const tally_episode *ep), void *ctx);

/* ---- The table scan ----------------------------------------------------- */

typedef struct tally_scan_filter {
    uint64_t min_used;      /* only keys with used >= min_used on some limit (0: all) */
    bool     flagged_only;  /* only keys the watch flagged */
    size_t   limit;         /* at most this many keys (0: all) */
} tally_scan_filter;

typedef struct tally_scan_entry {
    const void   *key; size_t key_len;  /* the digest when digest_only */
    unsigned      n_limits;
    tally_counter c[TALLY_MAX_LIMITS];   /* as tally_read reports them */
    uint64_t      pending[TALLY_MAX_LIMITS]; /* cost not yet acknowledged by the sinks */
    bool          flagged;
    uint64_t      flagged_at_ns;
} tally_scan_entry;

/*
 * tally_scan - iterate the live keys of @policy, each once, while the hot
 * path runs. Slots are read in chunks inside RCU read-side sections; @cb runs
 * outside them. A key inserted or reclaimed during the scan may or may not be
 * seen; a key live for the whole scan is seen exactly once.
 * @filter: may be NULL (every key). @cb returns nonzero to stop.
 * Return the number of keys reported, or TALLY_EINVAL (NULL @e or @cb,
 * unknown policy), TALLY_ESTATE, TALLY_ENOMEM.
 * Any thread may call it. It may block (in @cb).
 */
TALLY_EXPORT int tally_scan(tally_engine *e, uint32_t policy, const tally_scan_filter *filter,
                            int (*cb)(void *ctx, const tally_scan_entry *entry), void *ctx);

/* ---- Usage reports ------------------------------------------------------ */

#define TALLY_USAGE_BUCKETS 65   /* bucket i counts deltas d with 2^(i-1) < d <= 2^i
                                    (bucket 0: d == 1, bucket 64: d > 2^63) */

typedef struct tally_usage_report {
    uint32_t policy; unsigned limit;
    uint64_t interval_start_ns, interval_end_ns;
    uint64_t keys;                          /* keys (per window) with usage in the interval */
    uint64_t sum;                           /* their total cost */
    uint64_t buckets[TALLY_USAGE_BUCKETS];  /* not cumulative */
} tally_usage_report;

#ifdef __cplusplus
}
#endif

#endif /* TALLY_OPS_H */
