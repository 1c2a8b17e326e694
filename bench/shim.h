/*
 * The C side of the benchmarks. The C++ files of bench/ only register
 * benchmarks and call these functions; every workload (tally and each
 * baseline) lives in the C files of bench/.
 */
#ifndef TALLY_BENCH_SHIM_H
#define TALLY_BENCH_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Keys (keys.c) ---------------------------------------------------------- */

/* Longest key bench_keys_new() makes; the baselines store keys inline up to it. */
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

/* Deterministic for a given (n, seed). NULL on allocation failure. */
bench_keys *bench_keys_new(size_t n, uint64_t seed);
void        bench_keys_free(bench_keys *k);

/* A per-thread sequence of uniformly drawn key references, read cyclically. */
typedef struct bench_seq {
    size_t     mask;    /* length - 1 (length is a power of two) */
    bench_ref *ref;
} bench_seq;

bench_seq *bench_seq_new(const bench_keys *k, size_t len_pow2, uint64_t seed);
void       bench_seq_free(bench_seq *s);

/* ---- Workloads (workloads.c, baselines.c) ---------------------------------- */

typedef enum bench_design {
    BENCH_TALLY = 0,       /* tally_hit: reads the clock on every hit */
    BENCH_TALLY_AT,        /* tally_hit_at with a precomputed now */
    BENCH_MUTEX_MAP,       /* pthread mutex + open addressing, fixed window; reads the clock */
    BENCH_FLAT_LOCKFREE,   /* same table, lock-free lookup + 64-bit CAS add, no window */
    BENCH_N_DESIGNS
} bench_design;

const char *bench_design_name(bench_design d);

typedef struct bench_target bench_target;

/*
 * Create the shared state of @d sized for @k (capacity = k->n) and insert
 * every key once (warm). NULL on failure (message on stderr).
 */
bench_target *bench_target_new(bench_design d, const bench_keys *k);
void          bench_target_free(bench_target *t);

/*
 * Run @n hits on @t with the keys of @seq from *@pos on (advanced); any
 * thread may call it concurrently with others. Returns the number of
 * allowed hits; errors (key not found, tally error, denied) are counted
 * in the target, see bench_target_errors().
 */
uint64_t bench_target_run(bench_target *t, const bench_keys *k, const bench_seq *seq,
                          size_t *pos, size_t n);
uint64_t bench_target_errors(const bench_target *t);
/* Bytes of the target's table divided by its key capacity. */
double   bench_target_bytes_per_key(const bench_target *t);

/*
 * Memory report: open an engine (digest_only as given, one fixed-window
 * limit) of @capacity keys and return its table bytes per key, or -1.
 */
double bench_tally_bytes_per_key(size_t capacity, int digest_only);

/* ---- Baselines (baselines.c) ------------------------------------------------ */

/* The one hash both baselines use (multiply-xorshift over 8-byte words). */
uint64_t bench_hash(const void *key, size_t len);

/* Mutex map: pthread mutex around an open-addressing table of {count, window_start}. */
typedef struct bench_mutex_map bench_mutex_map;
bench_mutex_map *bench_mutex_map_new(size_t capacity, uint64_t max, uint64_t period_ns);
void             bench_mutex_map_free(bench_mutex_map *m);
size_t           bench_mutex_map_bytes(const bench_mutex_map *m);
/* Find or insert @key, roll its window at @now_ns, add 1 if under max.
   Return 1 allowed, 0 denied, -1 error (key too long, table full). */
int              bench_mutex_map_hit(bench_mutex_map *m, const void *key, size_t len,
                                     uint64_t now_ns);

/* Flat lock-free: the same table, keys inserted before the run, lock-free lookup + CAS. */
typedef struct bench_flat bench_flat;
bench_flat *bench_flat_new(size_t capacity);
void        bench_flat_free(bench_flat *f);
size_t      bench_flat_bytes(const bench_flat *f);
/* Not thread-safe: call before the run. Return 0, or -1 (too long, table full). */
int         bench_flat_insert(bench_flat *f, const void *key, size_t len);
/* Add 1 to @key's counter. Return 1, or 0 if the key is not in the table. */
int         bench_flat_add(bench_flat *f, const void *key, size_t len);

/* The monotonic clock the mutex map reads (what its user would call). */
uint64_t bench_clock_ns(void);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_BENCH_SHIM_H */
