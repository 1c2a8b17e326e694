/*
 * The baselines a user would otherwise write, both on the same flat
 * open-addressing table (linear probing, inline slots of one cache line,
 * key bytes copied inline and compared, one hash for both, load factor at
 * most 2/3: n_slots = capacity * 3/2 + 1, a common choice for such maps):
 *   mutex map      one pthread mutex around find-or-insert and a fixed-window
 *                  counter {count, window_start} with tally's "max per period" check;
 *   flat lock-free keys inserted before the run, lookup without a lock, then a
 *                  64-bit CAS loop on the key's counter: no window, the bare
 *                  "find the key's counter and add to it" (the practical limit).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shim.h"

/* ---- Hash: multiply-xorshift over 8-byte words ------------------------------ */

#define HASH_M1 UINT64_C(0x9FB21C651E98DF25)
#define HASH_M2 UINT64_C(0xD6E8FEB86659FD93)

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

uint64_t bench_hash(const void *key, size_t len)
{
    const unsigned char *p = key;
    uint64_t h = UINT64_C(0x9E3779B97F4A7C15) ^ ((uint64_t)len * HASH_M2);
    size_t n = len;

    while (n >= 8) {
        h = (h ^ load64(p)) * HASH_M1;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        if (len >= 8) {
            w = load64(p + n - 8) >> (8 * (8 - n));   /* overlapping load of the tail */
        } else {
            for (size_t i = 0; i < n; i++)
                w |= (uint64_t)p[i] << (8 * i);
        }
        h = (h ^ w) * HASH_M1;
        h ^= h >> 29;
    }
    h ^= h >> 32;
    h *= HASH_M2;
    h ^= h >> 29;
    return h;
}

uint64_t bench_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- The table both baselines share ------------------------------------------ */

/* One cache line: tag, two counter words, the key bytes. */
typedef struct map_slot {
    _Alignas(64) uint64_t tag;     /* 0: empty; else (hash & ~0xff) | key length */
    union {
        uint64_t         count;    /* mutex map: hits in the window */
        _Atomic uint64_t acount;   /* flat: the counter the CAS loop adds to */
    };
    uint64_t window_start;         /* mutex map */
    char     key[BENCH_KEY_MAX];
} map_slot;

_Static_assert(sizeof(map_slot) == 64, "one cache line per slot");

typedef struct map_table {
    map_slot *slots;
    size_t    n_slots;
    size_t    capacity;
    size_t    used;
} map_table;

static int table_init(map_table *t, size_t capacity)
{
    t->capacity = capacity;
    t->n_slots = capacity + capacity / 2 + 1;
    t->used = 0;
    if (posix_memalign((void **)&t->slots, 64, t->n_slots * sizeof(map_slot)) != 0)
        return -1;
    memset(t->slots, 0, t->n_slots * sizeof(map_slot));
    return 0;
}

static inline uint64_t tag_of(uint64_t h, size_t len)
{
    return (h & ~UINT64_C(0xff)) | (uint64_t)len;      /* len in 1..40: never 0 */
}

/* The slot holding @key, or the empty slot where it would go (*found false).
   The table always has an empty slot (used <= capacity < n_slots). */
static inline map_slot *table_find(const map_table *t, uint64_t h, const void *key, size_t len,
                                   bool *found)
{
    uint64_t tag = tag_of(h, len);
    size_t i = (size_t)(((unsigned __int128)h * t->n_slots) >> 64);

    for (;;) {
        map_slot *s = &t->slots[i];
        uint64_t st = s->tag;
        if (st == tag && memcmp(s->key, key, len) == 0) {
            *found = true;
            return s;
        }
        if (st == 0) {
            *found = false;
            return s;
        }
        if (++i == t->n_slots)
            i = 0;
    }
}

static inline map_slot *table_insert_at(map_table *t, map_slot *s, uint64_t h, const void *key,
                                        size_t len)
{
    if (t->used >= t->capacity)
        return NULL;
    memcpy(s->key, key, len);
    s->count = 0;
    s->window_start = 0;
    s->tag = tag_of(h, len);
    t->used++;
    return s;
}

/* ---- Mutex map ----------------------------------------------------------------- */

struct bench_mutex_map {
    pthread_mutex_t lock;
    map_table       t;
    uint64_t        max;
    uint64_t        period_ns;
};

bench_mutex_map *bench_mutex_map_new(size_t capacity, uint64_t max, uint64_t period_ns)
{
    bench_mutex_map *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    if (table_init(&m->t, capacity) != 0) {
        free(m);
        return NULL;
    }
    pthread_mutex_init(&m->lock, NULL);
    m->max = max;
    m->period_ns = period_ns;
    return m;
}

void bench_mutex_map_free(bench_mutex_map *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->lock);
    free(m->t.slots);
    free(m);
}

size_t bench_mutex_map_bytes(const bench_mutex_map *m)
{
    return m->t.n_slots * sizeof(map_slot);
}

int bench_mutex_map_hit(bench_mutex_map *m, const void *key, size_t len, uint64_t now)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len);         /* hash outside the lock */
    bool found;
    int allowed;

    pthread_mutex_lock(&m->lock);
    map_slot *s = table_find(&m->t, h, key, len, &found);
    if (!found && !table_insert_at(&m->t, s, h, key, len)) {
        pthread_mutex_unlock(&m->lock);
        return -1;
    }
    /* tally's fixed window: {0, 0} is empty; time never runs backwards in a key;
       the window opens at the first hit after the last one expired */
    uint64_t count = s->count, start = s->window_start;
    bool empty = count == 0 && start == 0;
    if (!empty && now < start)
        now = start;
    if (empty || now - start >= m->period_ns) {
        start = now;
        count = 0;
    }
    allowed = count < m->max;                 /* cost 1 fits: count + 1 <= max */
    if (allowed)
        count++;
    s->count = count;
    s->window_start = start;
    pthread_mutex_unlock(&m->lock);
    return allowed;
}

/* ---- Flat lock-free ------------------------------------------------------------- */

struct bench_flat {
    map_table t;
};

bench_flat *bench_flat_new(size_t capacity)
{
    bench_flat *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    if (table_init(&f->t, capacity) != 0) {
        free(f);
        return NULL;
    }
    return f;
}

void bench_flat_free(bench_flat *f)
{
    if (!f)
        return;
    free(f->t.slots);
    free(f);
}

size_t bench_flat_bytes(const bench_flat *f)
{
    return f->t.n_slots * sizeof(map_slot);
}

int bench_flat_insert(bench_flat *f, const void *key, size_t len)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len);
    bool found;
    map_slot *s = table_find(&f->t, h, key, len, &found);
    if (found)
        return 0;
    return table_insert_at(&f->t, s, h, key, len) ? 0 : -1;
}

int bench_flat_add(bench_flat *f, const void *key, size_t len)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return 0;
    uint64_t h = bench_hash(key, len);
    bool found;
    /* tags and keys were written before the run started: read without a lock */
    map_slot *s = table_find(&f->t, h, key, len, &found);
    if (!found)
        return 0;
    uint64_t v = atomic_load_explicit(&s->acount, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&s->acount, &v, v + 1, memory_order_acq_rel,
                                                  memory_order_relaxed))
        ;
    return 1;
}
