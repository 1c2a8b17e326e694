/*
 * tally/flusher.h - the flusher thread, its sinks (a callback and Redis),
 * events, and engine statistics. Included by <tally.h>.
 *
 * The same contract sentences as tally.h are used: "Any thread may call it",
 * "It never blocks", "On failure nothing changes".
 */
#ifndef TALLY_FLUSHER_H
#define TALLY_FLUSHER_H

#include "export.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tally_engine tally_engine;
typedef struct tally_usage_report tally_usage_report;   /* tally/ops.h */
typedef struct tally_flag tally_flag;                   /* tally/ops.h */

typedef enum tally_redis_mode {
    TALLY_REDIS_STANDALONE = 0,        /* host:port or unix_path, as before */
    TALLY_REDIS_CLUSTER    = 1,        /* nodes: seed nodes of a Redis Cluster */
    TALLY_REDIS_SENTINEL   = 2         /* nodes: the sentinels; master_name: the monitored master */
} tally_redis_mode;

typedef struct tally_redis_options {
    const char *host; int port;        /* or */ const char *unix_path;
    const char *password; int db;
    const char *key_prefix;            /* default "tally:" */
    uint32_t connect_timeout_ms, command_timeout_ms;   /* defaults 1000, 1000 */
    /* Fields added in 0.3, at the end; zero means the default: */
    tally_redis_mode mode;             /* STANDALONE (default): host:port or unix_path */
    const char *nodes;                 /* "host:port[,host:port]...": CLUSTER seed nodes, or
                                          the SENTINEL sentinels */
    const char *master_name;           /* SENTINEL: the name of the monitored master */
    unsigned    wait_replicas;         /* > 0: a batch is acknowledged only after WAIT
                                          confirmed this many replicas; until then it stays
                                          pending and is sent again */
    uint32_t    wait_timeout_ms;       /* WAIT's timeout; default 100 */
} tally_redis_options;

typedef struct tally_delta {           /* one flushed delta */
    uint32_t policy; unsigned limit;
    const void *key; size_t key_len;   /* the digest when digest_only */
    uint64_t window_start_ns; uint64_t delta; uint64_t total;  /* total: global when Redis is on */
} tally_delta;

typedef struct tally_event {           /* first crossing of a limit in a window */
    uint32_t policy; unsigned limit;
    const void *key; size_t key_len;
    uint64_t window_start_ns, used, max;
} tally_event;

typedef struct tally_flusher_options {
    uint32_t interval_ms;              /* default 1000 */
    int      cpu;                      /* pin the flusher to this CPU; -1: no pinning */
    const tally_redis_options *redis;  /* NULL: no Redis */
    void (*on_deltas)(void *ctx, const tally_delta *d, size_t n);
    void (*on_event)(void *ctx, const tally_event *ev);
    void *ctx;
    /* Fields added since the first version, at the end: */
    uint32_t fail_closed_after_ms;     /* 0 (default): fail open. Else deny every hit of a
                                          synced policy once the last successful flush is
                                          older than this while Redis is configured. */
    /* Each flush interval, per policy and limit: the distribution of per-key usage. */
    void (*on_usage)(void *ctx, const tally_usage_report *r);
    /* A key the rejection watch flagged (tally/ops.h); with Redis, once across engines. */
    void (*on_flag)(void *ctx, uint32_t policy, const tally_flag *f);
} tally_flusher_options;

/*
 * tally_flusher_options_init - fill @o with defaults: interval 1000 ms, no
 * pinning (cpu -1), no Redis, no callbacks, fail open.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT void tally_flusher_options_init(tally_flusher_options *o);

/*
 * tally_flusher_start - start the engine's flusher thread.
 * @o: options, copied (the strings of o->redis too).
 * Every interval the flusher takes each key's unflushed cost, hands it to
 * on_deltas and to Redis (one pipeline per flush and per master of
 * MULTI/EXEC transactions, each applying up to 500 INCRBYs once under a
 * sequence number that a record per engine in Redis remembers), learns the global
 * totals from the replies and, for every live key hit in the current window or
 * the one before, from an MGET, and delivers first_exceeded events to on_event. A delta leaves the
 * engine only when every sink acknowledged it; on a failure it is kept and
 * sent again with a later flush: merged with later cost of the same key and
 * window when Redis refused it unapplied (an error reply such as BUSY, OOM,
 * LOADING, READONLY, MOVED or CROSSSLOT to its first send, or a key's own
 * error inside the transaction), as it was, under its sequence number, when its
 * outcome is unknown (a lost reply, an unexpected error, a refused resend, or
 * fewer replicas than wait_replicas confirmed by WAIT). While 8 or
 * more batches of unknown outcome wait, new cost stays merged in the flusher,
 * so what is sent per flush is bounded by the number of pending keys.
 * Costs hit before the flusher started are not pushed.
 * In TALLY_REDIS_CLUSTER mode the keys of one transaction share a hash tag (one
 * of 1024 buckets) and each master gets its own pipeline; in
 * TALLY_REDIS_SENTINEL mode the master is asked of the sentinels before each
 * connect and confirmed with ROLE.
 * Return 0, TALLY_EINVAL (NULL argument, interval 0, cpu out of range;
 * standalone redis options with neither host nor unix_path, a port outside
 * 1..65535; an unknown mode; CLUSTER without nodes, or with a db other than
 * 0 or braces in the key prefix; SENTINEL without nodes or master_name; a
 * nodes list that is not "host:port[,host:port]..." of at most 16; a db
 * below 0, a key prefix longer than 256 bytes; redis options in a library
 * built without Redis: meson -Dredis=disabled), TALLY_ESTATE (already
 * running, a tally_flusher_stop() still under way, or closing), TALLY_ENOMEM. Redis being unreachable is not an
 * error: the flusher retries with capped backoff and the engine fails open.
 * Any thread may call it. It may block (it allocates and starts a thread).
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_flusher_start(tally_engine *e, const tally_flusher_options *o);

/*
 * tally_flush - push every pending delta now and wait for the result.
 * @timeout_ms: how long to wait for the flusher.
 * Return 0 when every cost hit before the call has been acknowledged by every
 * sink, TALLY_EIO when a sink failed (the deltas stay pending),
 * TALLY_ETIMEDOUT, TALLY_ESTATE (no flusher running), TALLY_EINVAL.
 * Any thread but the flusher's own callbacks may call it. It blocks.
 */
TALLY_EXPORT int tally_flush(tally_engine *e, uint32_t timeout_ms);

/*
 * tally_flusher_stop - do a final flush (bounded by the Redis command
 * timeout) and stop the flusher thread. Idempotent: a second call, or a call
 * with no flusher, returns 0. tally_close() calls it.
 * Return 0, TALLY_EIO when the final flush failed (the deltas it could not
 * push are reported by tally_stats as pending; they are lost when the engine
 * closes), or TALLY_EINVAL for a NULL @e.
 * Any thread but the flusher's own callbacks may call it. It blocks.
 */
TALLY_EXPORT int tally_flusher_stop(tally_engine *e);

/* ---- Statistics -------------------------------------------------------- */

typedef struct tally_stats {
    uint64_t hits;               /* calls of tally_hit/tally_hit_at that returned 0 */
    uint64_t denials;            /* of those, not allowed */
    uint64_t shadow_denials;     /* allowed only because the policy is in shadow mode */
    uint64_t evictions;          /* slots reclaimed from expired keys */
    uint64_t full_refusals;      /* calls that returned TALLY_EFULL */
    uint64_t pending_deltas;     /* (key, limit, window) deltas not yet acknowledged */
    uint64_t pending_cost;       /* their total cost */
    uint64_t flush_batches;      /* flushes that pushed at least one delta */
    uint64_t flush_failures;     /* flushes a sink failed */
    uint64_t redis_reconnects;   /* successful connects after the first */
    uint64_t last_flush_ok_ns;   /* tally_now_ns() of the last fully acknowledged flush; 0: none */
    uint64_t events;             /* events delivered to on_event */
    uint64_t lost_cost;          /* cost that could not be kept for the sinks: out of memory */
    uint64_t redis_errors;       /* error replies from Redis (a batch, event or PING refused) */
    uint64_t redis_permanent_errors; /* of those, errors a retry cannot cure by itself:
                                    MOVED and ASK (but in cluster mode, which
                                    follows them), CROSSSLOT, WRONGTYPE, NOAUTH,
                                    NOPERM, WRONGPASS and unknown ERR replies */
    uint64_t lru_evictions;      /* live keys evicted to admit a new key (TALLY_EVICT_LRU);
                                    not in evictions. New in 0.3 */
} tally_stats;

/*
 * tally_stats_read - the engine's counters.
 * Return 0 or TALLY_EINVAL. Any thread may call it. It never blocks.
 * A program built against 0.1 or 0.2 binds tally_stats_read@TALLY_0.1, which
 * writes the struct as it was then (up to redis_permanent_errors).
 */
TALLY_EXPORT int tally_stats_read(tally_engine *e, tally_stats *out);

/*
 * tally_stats_prometheus - write the counters in the Prometheus text
 * exposition format into @buf (NUL-terminated, truncated to @len).
 * Return the length the full text needs (excluding the NUL), as snprintf, or
 * TALLY_EINVAL. Any thread may call it. It may block briefly: it takes the
 * engine's operator-view lock to read the throttle episodes and usage.
 */
TALLY_EXPORT int tally_stats_prometheus(tally_engine *e, char *buf, size_t len);

/*
 * tally_flusher_last_error - the text of the last error the Redis sink met:
 * the server's error reply as Redis wrote it ("BUSY Redis is busy running a
 * script..."), or hiredis's connection error, as hiredis keeps errstr.
 * @buf: receives the text, NUL-terminated, truncated to @len (may be NULL
 *       when @len is 0).
 * Return the length of the full text (excluding the NUL), as snprintf; 0 when
 * the sink has met no error since the flusher started, or no flusher runs;
 * TALLY_EINVAL (NULL @e, or NULL @buf with @len > 0).
 * Any thread may call it. It never blocks for I/O (it takes the flusher's
 * error lock for the copy).
 */
TALLY_EXPORT int tally_flusher_last_error(tally_engine *e, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_FLUSHER_H */
