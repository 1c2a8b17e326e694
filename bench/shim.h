/*
 * The C side of the benchmarks. The C++ files of bench/ only register
 * benchmarks and call these functions; every workload runs through the same
 * functions for tally and for each baseline, so rows compare like with like.
 */
#ifndef TALLY_BENCH_SHIM_H
#define TALLY_BENCH_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BENCH_MAX_THREADS 8

/* ---- Keys (keys.c) ---------------------------------------------------------- */

/* Shortest and longest key bench_keys_new() makes; the baselines store keys
   inline up to BENCH_KEY_MAX. */
#define BENCH_KEY_MIN 16
#define BENCH_KEY_MAX 40

/* One key reference: the key is arena + off, len bytes. */
typedef struct bench_ref {
    uint32_t off;
    uint32_t len;
} bench_ref;

/* N distinct keys, 16..40 bytes ("user-", "tok_", ... + hex), in one arena. */
typedef struct bench_keys {
    size_t     n;
    char      *arena;
    bench_ref *ref;     /* ref[i]: key i */
} bench_keys;

/* The seed of every row's keys; thread i's sequence is drawn from BENCH_KEY_SEED + 1 + i. */
#define BENCH_KEY_SEED UINT64_C(0x7a11c0ffee)

/* Deterministic for a given (n, seed). NULL on allocation failure. */
bench_keys *bench_keys_new(size_t n, uint64_t seed);
void        bench_keys_free(bench_keys *k);

typedef enum bench_dist {
    BENCH_UNIFORM,      /* every key equally likely */
    BENCH_ZIPF,         /* Zipf(BENCH_ZIPF_S): key i has weight 1 / (i + 1)^s */
    BENCH_HOT           /* key 0 only */
} bench_dist;

#define BENCH_ZIPF_S   0.99
#define BENCH_COST_MAX 64     /* weighted costs are drawn from 1..BENCH_COST_MAX */

/* A per-thread sequence of key references (and costs), read cyclically. */
typedef struct bench_seq {
    size_t     mask;    /* length - 1 (length is a power of two) */
    bench_ref *ref;
    uint8_t   *cost;    /* NULL: every cost is 1 */
} bench_seq;

bench_seq *bench_seq_new(const bench_keys *k, size_t len_pow2, uint64_t seed, bench_dist dist,
                         int weighted);
void       bench_seq_free(bench_seq *s);

/* ---- Workloads ---------------------------------------------------------------- */

typedef enum bench_algo {
    BENCH_FIXED,        /* fixed window: max per period */
    BENCH_GCRA,         /* GCRA: burst max, refilled in period */
    BENCH_CONCURRENCY   /* at most max holders at once; a hit acquires, a release gives back */
} bench_algo;

typedef enum bench_kind {
    BENCH_W_UNIFORM,    /* steady state: every key present, uniform, cost 1, fixed window */
    BENCH_W_ZIPF,       /* the same with Zipf(0.99) keys */
    BENCH_W_HOT,        /* one key for every thread: the count must come out exact */
    BENCH_W_WEIGHTED,   /* uniform, costs 1..64 */
    BENCH_W_GCRA,       /* uniform, cost 1, a GCRA limit */
    BENCH_W_PEEK,       /* uniform; of every 4 operations 3 are peeks (decide, consume nothing) */
    BENCH_W_INSERT,     /* 1M keys through a 64K-key table with 10 ms windows: most hits
                           meet a new key, and expired keys must be reclaimed */
    BENCH_W_HOT_LIMIT,  /* one key for every thread at its limit: BENCH_HOT_LIMIT_MAX per
                           fixed window, each driven past: time is a window clock that the
                           call told first_exceeded moves on by one period after
                           BENCH_HOT_LIMIT_LINGER more hits of its own, so most hits are
                           denied and every window must admit exactly max and tell exactly
                           one call first_exceeded (tally_hit_at only) */
    BENCH_W_LRU_CHURN,  /* the churn of BENCH_W_INSERT with 1-hour windows: no key expires,
                           so every new key in a full table evicts the least recently hit
                           key of its window (tally: TALLY_EVICT_LRU; the mutex map: see
                           bench_mutex_map_hit_lru) */
    BENCH_W_CONC_PAIR,  /* uniform, a concurrency limit out of reach: each operation is a
                           hit (acquire) and a release of the same key */
    BENCH_W_CONC_PAIR_HOT, /* the same on one key for every thread */
    BENCH_N_KINDS
} bench_kind;

typedef struct bench_workload {
    bench_kind kind;
    bench_dist dist;
    size_t     n_keys;     /* distinct keys drawn from */
    size_t     capacity;   /* keys the table must hold at once */
    bench_algo algo;
    uint64_t   max;        /* never reached (but in BENCH_W_HOT_LIMIT): every hit is allowed */
    uint64_t   period_ns;
    int        weighted;
    int        peek_mix;
    int        prefill;    /* every key is inserted before the run */
    int        evict_lru;  /* a full table evicts its least recently hit key */
} bench_workload;

#define BENCH_HOT_LIMIT_MAX       1000
#define BENCH_HOT_LIMIT_PERIOD_NS 1000000u
#define BENCH_HOT_LIMIT_LINGER    (4 * BENCH_HOT_LIMIT_MAX)

/* The workload @kind over @n_keys keys (BENCH_W_HOT, BENCH_W_HOT_LIMIT and
   BENCH_W_CONC_PAIR_HOT use 1 key, BENCH_W_INSERT and BENCH_W_LRU_CHURN a table of
   @n_keys / 16). */
bench_workload bench_workload_of(bench_kind kind, size_t n_keys);
const char    *bench_kind_name(bench_kind kind);

/* ---- Designs and targets (workloads.c) ----------------------------------------- */

typedef enum bench_design {
    BENCH_TALLY = 0,        /* tally_hit: reads the clock on every hit */
    BENCH_TALLY_AT,         /* tally_hit_at with a time read once per run */
    BENCH_TALLY_SHARED_AT,  /* the same on a shared engine (tally/shared.h), digest_only */
    BENCH_MUTEX_MAP,        /* pthread mutex around an open-addressing map */
    BENCH_RWLOCK_MAP,       /* pthread rwlock: read lock + CAS for known keys, write lock to insert */
    BENCH_RCU_LFHT,         /* liburcu rculfhash (urcu-memb), lookup + CAS on the node's counter */
    BENCH_CK_HS,            /* Concurrency Kit ck_hs (SPMC), lock-free get + CAS; spinlock for writers */
    BENCH_FLAT_LOCKFREE,    /* the practical limit: flat table, keys inserted before, lookup + CAS add */
    BENCH_CAS_ADD,          /* one hot key at the least: a CAS add on one 8-byte counter */
    BENCH_REDIS_INCR,       /* Redis INCRBY, one round trip per hit */
    BENCH_REDIS_PIPELINED,  /* Redis INCRBY, one round trip per batch of BENCH_REDIS_PIPELINE hits */
    BENCH_N_DESIGNS
} bench_design;

#define BENCH_REDIS_PIPELINE 256

const char *bench_design_name(bench_design d);
/* 1 if @d implements workload @w (see docs/BENCHMARKS.md, "Not measured", for the gaps). */
int         bench_design_supports(bench_design d, const bench_workload *w);
/* Hits per benchmark iteration: small for a design that pays a round trip per hit. */
size_t      bench_design_batch(bench_design d);
/* 1 if @d needs the redis-server named by $TALLY_BENCH_REDIS ("host:port"). */
int         bench_design_needs_redis(bench_design d);
/* The host and port of $TALLY_BENCH_REDIS: 0, or -1 when it is not set. */
int         bench_redis_addr(char *host, size_t host_len, int *port);
/* 0 if that server answers PING; else -1 with the reason in @why. */
int         bench_redis_check(char *why, size_t why_len);

typedef struct bench_target bench_target;

/*
 * Create the shared state of @d for workload @w and insert every key of @k
 * once when the workload says so. NULL on failure (message on stderr).
 */
bench_target *bench_target_new(bench_design d, const bench_workload *w, const bench_keys *k);
void          bench_target_free(bench_target *t);

/*
 * Run @n operations on @t as thread @tid (0..BENCH_MAX_THREADS-1; one caller
 * per tid at a time) with the keys of @seq from *@pos on (advanced). Returns
 * the number of operations allowed; errors (tally error, key not found,
 * server error) are counted in the target, see bench_target_errors().
 *
 * Each operation is one call of a function per design, bench_op_<design name>
 * (bench_op_tally, bench_op_mutex_map, ...), that the compiler may not inline
 * or specialise: every design pays the same call, and tools/bench-callgrind
 * reads the inclusive cost of that function as the cost of one operation.
 */
uint64_t bench_target_run(bench_target *t, int tid, const bench_keys *k, const bench_seq *seq,
                          size_t *pos, size_t n);
uint64_t bench_target_errors(const bench_target *t);

/*
 * From now on, operation p of a thread's sequence (its *@pos in
 * bench_target_run) runs at time @start_ns + p * @step_ns for every design
 * that is given a time (tally_hit_at and the maps), instead of the clock, or
 * tally_hit_at's one time: the same windows expire after the same operations
 * in every run. tally_hit keeps its own clock. For one thread: two threads'
 * times are not ordered with each other.
 */
void     bench_target_set_clock(bench_target *t, uint64_t start_ns, uint64_t step_ns);

/*
 * Window counts of tally's designs in BENCH_W_HOT_LIMIT, summed over the
 * threads since the target was made: windows opened (allowed hits that found
 * their window empty, remaining = max - cost) and calls told first_exceeded.
 */
void     bench_target_windows(const bench_target *t, uint64_t *opened, uint64_t *first_exceeded);
/*
 * Hit @key as thread @tid at the start of the window it is in until a hit is
 * denied, counted like the run's hits, then set BENCH_W_HOT_LIMIT's window
 * clock to the next window: a row that fills the window before and after its
 * run owns exactly the windows it opened, each full. Call it while no other
 * thread runs @t. 0, or -1 (not a tally design, not a fixed window, key not
 * tracked, a tally error).
 */
int      bench_target_fill_window(bench_target *t, int tid, const void *key, size_t len);
/* Sum of the costs of allowed hits over every thread since the target was made. */
uint64_t bench_target_allowed_cost(const bench_target *t);
/* The count stored for @key (fixed-window workloads): 0 and *count set, or -1. */
int      bench_target_count(bench_target *t, const void *key, size_t len, uint64_t *count);
/* Bytes of the target's table divided by its key capacity (0 if unknown). */
double   bench_target_bytes_per_key(const bench_target *t);

/*
 * Memory report: open an engine (digest_only as given, one fixed-window
 * limit) of @capacity keys and return its table bytes per key, or -1.
 */
double bench_tally_bytes_per_key(size_t capacity, int digest_only);

/* ---- Latency (workloads.c) ------------------------------------------------------- */

/* Log-linear histogram of per-operation times in TSC ticks, 1/64 precision. */
#define BENCH_HIST_BUCKETS (128 + 58 * 64)
typedef struct bench_hist {
    uint64_t n;
    uint64_t b[BENCH_HIST_BUCKETS];
} bench_hist;

/* bench_target_run() timing each operation alone into @h. */
uint64_t bench_target_run_timed(bench_target *t, int tid, const bench_keys *k,
                                const bench_seq *seq, size_t *pos, size_t n, bench_hist *h);
void     bench_hist_merge(bench_hist *into, const bench_hist *from);
/* The @q quantile (0..1) in nanoseconds. */
double   bench_hist_quantile_ns(const bench_hist *h, double q);

/* What runs beside the hitting threads in a latency row. */
typedef enum bench_lat_env {
    BENCH_LAT_ALONE,          /* nothing: the engine only */
    BENCH_LAT_FLUSHER,        /* the engine's flusher, every BENCH_FLUSH_INTERVAL_MS, syncing
                                 to the live redis-server of $TALLY_BENCH_REDIS */
    BENCH_LAT_REDIS_STOPPED,  /* the same flusher with no server at its address: every
                                 connect is refused and the flusher backs off and retries */
    BENCH_N_LAT_ENVS
} bench_lat_env;

#define BENCH_FLUSH_INTERVAL_MS 100

const char *bench_lat_env_name(bench_lat_env env);
/* Set up @env on @t: 0, or -1 with the reason in @why (row skipped). */
int         bench_lat_env_start(bench_target *t, bench_lat_env env, char *why, size_t why_len);
void        bench_lat_env_stop(bench_target *t, bench_lat_env env);

/* ---- Baselines (baselines.c, rcu_map.c, ck_map.c, redis.c) ----------------------- */

/* The one hash every baseline uses (multiply-xorshift over 8-byte words). */
uint64_t bench_hash(const void *key, size_t len);
/* The monotonic clock the baselines read on every hit (what their users would call). */
uint64_t bench_clock_ns(void);

/*
 * The limit a baseline checks, on one 64-bit word per key, as its users would
 * write it: fixed windows aligned to the period, word = window number (24
 * bits) << 40 | count; GCRA, word = theoretical arrival time; concurrency,
 * word = holders (no lease: a hold lasts until its release).
 */
typedef struct bench_rule {
    bench_algo algo;
    uint64_t   max;
    uint64_t   period_ns;
    uint64_t   interval_ns;   /* GCRA: period_ns / max */
} bench_rule;

#define BENCH_WORD_DEAD UINT64_MAX    /* a node being removed (rculfhash) */

bench_rule bench_rule_of(const bench_workload *w);
/* The word after a hit of @cost at @now: 1 and *@next set if allowed, else 0. */
int bench_rule_step(const bench_rule *r, uint64_t word, uint64_t now, uint64_t cost,
                    uint64_t *next);
/* 1 if the word holds nothing that is still in force at @now. */
int bench_rule_expired(const bench_rule *r, uint64_t word, uint64_t now);
/* The count a fixed-window word holds. */
uint64_t bench_rule_count(uint64_t word);

/* Mutex map and rwlock map: the same open-addressing table (see baselines.c).
   @reclaim: when full, an insert first drops the keys whose state expired;
   BENCH_MAP_LRU (mutex map only): it evicts instead the least recently hit of
   the BENCH_MAP_LRU_WINDOW keys from the new key's home slot on. */
#define BENCH_MAP_LRU        2
#define BENCH_MAP_LRU_WINDOW 16
typedef struct bench_mutex_map bench_mutex_map;
bench_mutex_map *bench_mutex_map_new(size_t capacity, bench_rule rule, int reclaim);
void             bench_mutex_map_free(bench_mutex_map *m);
size_t           bench_mutex_map_bytes(const bench_mutex_map *m);
/* Find or insert @key and apply a hit of @cost at @now (@peek: decide only,
   insert nothing). Return 1 allowed, 0 denied, -1 error (key too long, full). */
int bench_mutex_map_hit(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                        uint64_t now, int peek);
/* bench_mutex_map_hit() that also stamps the key's slot with the map's hit
   count, the recency a BENCH_MAP_LRU eviction judges by. */
int bench_mutex_map_hit_lru(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                            uint64_t now);
/* A concurrency pair (BENCH_CONCURRENCY): bench_mutex_map_hit() of @cost, then,
   when allowed, the lock taken again to give @cost of the key's holds back.
   1 allowed (and given back), 0 denied, -1 error. */
int bench_mutex_map_pair(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                         uint64_t now);
int bench_mutex_map_count(bench_mutex_map *m, const void *key, size_t len, uint64_t *count);

typedef struct bench_rwlock_map bench_rwlock_map;
bench_rwlock_map *bench_rwlock_map_new(size_t capacity, bench_rule rule, int reclaim);
void              bench_rwlock_map_free(bench_rwlock_map *m);
size_t            bench_rwlock_map_bytes(const bench_rwlock_map *m);
int bench_rwlock_map_hit(bench_rwlock_map *m, const void *key, size_t len, uint64_t cost,
                         uint64_t now, int peek);
int bench_rwlock_map_count(bench_rwlock_map *m, const void *key, size_t len, uint64_t *count);

/* Bare CAS add: one 8-byte counter whatever the key, a compare-exchange add loop;
   no lookup, no clock, no window (the least one hot key can cost). */
typedef struct bench_cas bench_cas;
bench_cas *bench_cas_new(void);
void       bench_cas_free(bench_cas *c);
/* Add @cost (@peek: add nothing). Return 1. */
int        bench_cas_add(bench_cas *c, uint64_t cost, int peek);
uint64_t   bench_cas_count(bench_cas *c);

/* Flat lock-free: keys inserted before the run, lock-free lookup + CAS add. */
typedef struct bench_flat bench_flat;
bench_flat *bench_flat_new(size_t capacity);
void        bench_flat_free(bench_flat *f);
size_t      bench_flat_bytes(const bench_flat *f);
/* Not thread-safe: call before the run. Return 0, or -1 (too long, table full). */
int         bench_flat_insert(bench_flat *f, const void *key, size_t len);
/* Add @cost to @key's counter (@peek: read it). Return 1, or -1 if the key is absent. */
int         bench_flat_add(bench_flat *f, const void *key, size_t len, uint64_t cost, int peek);
int         bench_flat_count(bench_flat *f, const void *key, size_t len, uint64_t *count);

/* rculfhash: one malloc'd node per key, CAS on the node's word. */
typedef struct bench_rcu_map bench_rcu_map;
bench_rcu_map *bench_rcu_map_new(size_t capacity, bench_rule rule, int reclaim);
void           bench_rcu_map_free(bench_rcu_map *m);
size_t         bench_rcu_map_bytes(const bench_rcu_map *m);
int bench_rcu_map_hit(bench_rcu_map *m, const void *key, size_t len, uint64_t cost, uint64_t now,
                      int peek);
int bench_rcu_map_count(bench_rcu_map *m, const void *key, size_t len, uint64_t *count);

/* ck_hs: one malloc'd node per key, CAS on the node's word. */
typedef struct bench_ck_map bench_ck_map;
bench_ck_map *bench_ck_map_new(size_t capacity, bench_rule rule);
void          bench_ck_map_free(bench_ck_map *m);
size_t        bench_ck_map_bytes(const bench_ck_map *m);
int bench_ck_map_hit(bench_ck_map *m, const void *key, size_t len, uint64_t cost, uint64_t now,
                     int peek);
int bench_ck_map_count(bench_ck_map *m, const void *key, size_t len, uint64_t *count);

/* Redis: one connection per thread to $TALLY_BENCH_REDIS; INCRBY of the key. */
typedef struct bench_redis bench_redis;
bench_redis *bench_redis_new(uint64_t max);
void         bench_redis_free(bench_redis *r);
/* One INCRBY round trip. Return 1 allowed (count <= max), 0 denied, -1 error. */
int          bench_redis_incr(bench_redis *r, int tid, const void *key, size_t len, uint64_t cost);
/* @n INCRBYs in one pipeline; return the number allowed, *@errors the failures. */
uint64_t     bench_redis_pipeline(bench_redis *r, int tid, const bench_keys *k,
                                  const bench_seq *seq, size_t *pos, size_t n,
                                  uint64_t *allowed_cost, uint64_t *errors);
int          bench_redis_count(bench_redis *r, const void *key, size_t len, uint64_t *count);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_BENCH_SHIM_H */
