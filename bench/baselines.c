/*
 * The baselines a user would otherwise write on one flat open-addressing
 * table (linear probing, inline slots of one cache line, key bytes copied
 * inline and compared, load factor at most 2/3: n_slots = capacity * 3/2 + 1,
 * a common choice for such maps), and the limit rule every baseline applies
 * to one 64-bit word per key:
 *   mutex map      one pthread mutex around find-or-insert and the rule;
 *   rwlock map     a pthread rwlock: a known key is found under the read lock
 *                  and its word changed by a CAS loop; a new key takes the
 *                  write lock;
 *   flat lock-free keys inserted before the run, lookup without a lock, then a
 *                  CAS add on the key's counter: no window, no clock, the bare
 *                  "find the key's counter and add to it" (the practical limit).
 * And, for one hot key, the bare CAS add on one counter with no table at all.
 * With reclaim on, an insert into a full table first rebuilds it without the
 * keys whose state expired (what a user of such a map does: sweep when full).
 * With BENCH_MAP_LRU, it removes instead the least recently hit of the
 * BENCH_MAP_LRU_WINDOW occupied slots from the new key's home on (recency: the
 * map's hit count when the slot was last hit), as a sampled LRU does, and
 * closes the hole by backward shifting: no tombstones, so later probes stay
 * as short as in a table that never evicted.
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

/* ---- The rule on one word ------------------------------------------------------ */

#define WIN_SHIFT 40
#define WIN_MASK  UINT64_C(0xFFFFFF)
#define CNT_MASK  ((UINT64_C(1) << WIN_SHIFT) - 1)

bench_rule bench_rule_of(const bench_workload *w)
{
    bench_rule r = { .algo = w->algo, .max = w->max, .period_ns = w->period_ns };
    r.interval_ns = w->algo == BENCH_GCRA ? w->period_ns / w->max : 0;
    return r;
}

static inline uint64_t window_of(const bench_rule *r, uint64_t now)
{
    return (now / r->period_ns) & WIN_MASK;
}

int bench_rule_step(const bench_rule *r, uint64_t word, uint64_t now, uint64_t cost,
                    uint64_t *next)
{
    if (r->algo != BENCH_FIXED) {       /* the fixed window, the common rule, tests once */
        if (r->algo == BENCH_CONCURRENCY) {
            if (word + cost > r->max)
                return 0;
            *next = word + cost;
            return 1;
        }
        uint64_t tat = word > now ? word : now;
        uint64_t new_tat = tat + cost * r->interval_ns;
        if (new_tat - now > r->period_ns)       /* tau = interval * max = period */
            return 0;
        *next = new_tat;
        return 1;
    }
    uint64_t win = window_of(r, now);
    uint64_t count = (word >> WIN_SHIFT) == win ? word & CNT_MASK : 0;
    if (count + cost > r->max)
        return 0;
    *next = win << WIN_SHIFT | (count + cost);
    return 1;
}

int bench_rule_expired(const bench_rule *r, uint64_t word, uint64_t now)
{
    if (r->algo == BENCH_CONCURRENCY)
        return word == 0;
    if (r->algo == BENCH_GCRA)
        return word <= now;
    return (word >> WIN_SHIFT) != window_of(r, now);
}

uint64_t bench_rule_count(uint64_t word)
{
    return word & CNT_MASK;
}

/* ---- The table ---------------------------------------------------------------------- */

/* One cache line: tag, the rule's word, the recency, the key bytes. */
typedef struct map_slot {
    _Alignas(64) uint64_t tag;     /* 0: empty; else (hash & ~0xff) | key length */
    _Atomic uint64_t word;
    uint64_t stamp;                /* BENCH_MAP_LRU: the map's hit count at the last hit */
    char     key[BENCH_KEY_MAX];
} map_slot;

_Static_assert(sizeof(map_slot) == 64, "one cache line per slot");

typedef struct map_table {
    map_slot  *slots;
    size_t     n_slots;
    size_t     capacity;
    size_t     used;
    bench_rule rule;
    map_slot  *spare;              /* reclaim: where the live slots wait during a rebuild */
    int        lru;                /* BENCH_MAP_LRU */
    uint64_t   hits;               /* BENCH_MAP_LRU: the recency clock */
} map_table;

static int table_init(map_table *t, size_t capacity, bench_rule rule, int reclaim)
{
    memset(t, 0, sizeof(*t));
    t->capacity = capacity;
    t->n_slots = capacity + capacity / 2 + 1;
    t->rule = rule;
    t->lru = reclaim == BENCH_MAP_LRU;
    size_t bytes = t->n_slots * sizeof(map_slot);
    if (posix_memalign((void **)&t->slots, 64, bytes) != 0)
        return -1;
    memset(t->slots, 0, bytes);
    if (reclaim && !t->lru && !(t->spare = malloc(capacity * sizeof(map_slot)))) {
        free(t->slots);
        return -1;
    }
    return 0;
}

static void table_destroy(map_table *t)
{
    free(t->slots);
    free(t->spare);
}

static inline uint64_t tag_of(uint64_t h, size_t len)
{
    return (h & ~UINT64_C(0xff)) | (uint64_t)len;      /* len in 1..40: never 0 */
}

static inline size_t home_of(const map_table *t, uint64_t h)
{
    return (size_t)(((unsigned __int128)h * t->n_slots) >> 64);
}

/* The slot holding @key, or the empty slot where it would go (*found false).
   The table always has an empty slot (used <= capacity < n_slots). */
static inline map_slot *table_find(const map_table *t, uint64_t h, const void *key, size_t len,
                                   bool *found)
{
    uint64_t tag = tag_of(h, len);
    size_t i = home_of(t, h);

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

/* Rebuild @t without the keys whose state expired at @now (caller excludes all
   other access). */
static void table_sweep(map_table *t, uint64_t now)
{
    size_t live = 0;
    for (size_t i = 0; i < t->n_slots; i++) {
        map_slot *s = &t->slots[i];
        if (s->tag && !bench_rule_expired(&t->rule, atomic_load_explicit(&s->word,
                                                                         memory_order_relaxed), now))
            memcpy(&t->spare[live++], s, sizeof(*s));
    }
    memset(t->slots, 0, t->n_slots * sizeof(map_slot));
    for (size_t i = 0; i < live; i++) {
        map_slot *from = &t->spare[i];
        size_t j = home_of(t, bench_hash(from->key, from->tag & 0xff));
        while (t->slots[j].tag)
            if (++j == t->n_slots)
                j = 0;
        memcpy(&t->slots[j], from, sizeof(*from));
    }
    t->used = live;
}

/* Empty slot @i, moving back each later key of its run that may take the
   hole (its home is not cyclically after the hole) so every key stays
   reachable from its home without a tombstone. */
static void table_remove(map_table *t, size_t i)
{
    const size_t n = t->n_slots;
    for (size_t j = i;;) {
        if (++j == n)
            j = 0;
        map_slot *s = &t->slots[j];
        if (!s->tag)
            break;
        size_t home = home_of(t, bench_hash(s->key, s->tag & 0xff));
        if ((j + n - home) % n >= (j + n - i) % n) {
            memcpy(&t->slots[i], s, sizeof(*s));
            i = j;
        }
    }
    t->slots[i].tag = 0;
    t->used--;
}

/* BENCH_MAP_LRU: remove the least recently hit of the BENCH_MAP_LRU_WINDOW
   occupied slots from home slot @home on (the table is full: 2/3 of its
   slots are occupied, so the scan ends soon). */
static void table_evict_lru(map_table *t, size_t home)
{
    size_t victim = home, seen = 0;
    uint64_t oldest = UINT64_MAX;
    for (size_t i = home; seen < BENCH_MAP_LRU_WINDOW; i = i + 1 == t->n_slots ? 0 : i + 1) {
        const map_slot *s = &t->slots[i];
        if (!s->tag)
            continue;
        seen++;
        if (s->stamp < oldest) {
            oldest = s->stamp;
            victim = i;
        }
    }
    table_remove(t, victim);
}

/* Insert @key at @s (from table_find); NULL when full. With reclaim, a full
   table is swept first (BENCH_MAP_LRU: loses one key) and the key's empty
   slot found again. */
static map_slot *table_insert_at(map_table *t, map_slot *s, uint64_t h, const void *key,
                                 size_t len, uint64_t now)
{
    if (t->used >= t->capacity) {
        if (t->lru)
            table_evict_lru(t, home_of(t, h));
        else if (t->spare)
            table_sweep(t, now);
        if (t->used >= t->capacity)
            return NULL;
        bool found;
        s = table_find(t, h, key, len, &found);
    }
    memcpy(s->key, key, len);
    atomic_store_explicit(&s->word, 0, memory_order_relaxed);
    s->tag = tag_of(h, len);
    t->used++;
    return s;
}

/* ---- Mutex map ----------------------------------------------------------------- */

struct bench_mutex_map {
    pthread_mutex_t lock;
    map_table       t;
};

bench_mutex_map *bench_mutex_map_new(size_t capacity, bench_rule rule, int reclaim)
{
    bench_mutex_map *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    if (table_init(&m->t, capacity, rule, reclaim) != 0) {
        free(m);
        return NULL;
    }
    pthread_mutex_init(&m->lock, NULL);
    return m;
}

void bench_mutex_map_free(bench_mutex_map *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->lock);
    table_destroy(&m->t);
    free(m);
}

size_t bench_mutex_map_bytes(const bench_mutex_map *m)
{
    return m->t.n_slots * sizeof(map_slot);
}

static inline __attribute__((always_inline)) int
mutex_map_hit(bench_mutex_map *m, const void *key, size_t len, uint64_t cost, uint64_t now,
              int peek, const int stamp)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len);         /* hash outside the lock */
    uint64_t next;
    bool found;

    pthread_mutex_lock(&m->lock);
    map_slot *s = table_find(&m->t, h, key, len, &found);
    if (!found) {
        if (peek) {
            pthread_mutex_unlock(&m->lock);
            return bench_rule_step(&m->t.rule, 0, now, 1, &next);
        }
        if (!(s = table_insert_at(&m->t, s, h, key, len, now))) {
            pthread_mutex_unlock(&m->lock);
            return -1;
        }
    }
    if (stamp)
        s->stamp = ++m->t.hits;
    /* under the lock: relaxed atomics are plain loads and stores */
    uint64_t w = atomic_load_explicit(&s->word, memory_order_relaxed);
    int allowed = bench_rule_step(&m->t.rule, w, now, peek ? 1 : cost, &next);
    if (allowed && !peek)
        atomic_store_explicit(&s->word, next, memory_order_relaxed);
    pthread_mutex_unlock(&m->lock);
    return allowed;
}

int bench_mutex_map_hit(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                        uint64_t now, int peek)
{
    return mutex_map_hit(m, key, len, cost, now, peek, 0);
}

int bench_mutex_map_hit_lru(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                            uint64_t now)
{
    return mutex_map_hit(m, key, len, cost, now, 0, 1);
}

/* Its own copy of mutex_map_hit: bench_mutex_map_hit keeps a single caller,
   which the compiler can then inline it into (bench_op_mutex_map). */
int bench_mutex_map_pair(bench_mutex_map *m, const void *key, size_t len, uint64_t cost,
                         uint64_t now)
{
    int a = mutex_map_hit(m, key, len, cost, now, 0, 0);
    if (a <= 0)
        return a;
    /* the release is a call of its own, as tally_release is: hash, lock, find again */
    uint64_t h = bench_hash(key, len);
    bool found;
    int rc = -1;

    pthread_mutex_lock(&m->lock);
    map_slot *s = table_find(&m->t, h, key, len, &found);
    if (found) {
        /* under the lock: relaxed atomics are plain loads and stores */
        uint64_t w = atomic_load_explicit(&s->word, memory_order_relaxed);
        if (w >= cost) {
            atomic_store_explicit(&s->word, w - cost, memory_order_relaxed);
            rc = 1;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int bench_mutex_map_count(bench_mutex_map *m, const void *key, size_t len, uint64_t *count)
{
    bool found;
    pthread_mutex_lock(&m->lock);
    map_slot *s = table_find(&m->t, bench_hash(key, len), key, len, &found);
    if (found)
        *count = bench_rule_count(atomic_load(&s->word));
    pthread_mutex_unlock(&m->lock);
    return found ? 0 : -1;
}

/* ---- Rwlock map ------------------------------------------------------------------ */

struct bench_rwlock_map {
    pthread_rwlock_t lock;
    map_table        t;
};

bench_rwlock_map *bench_rwlock_map_new(size_t capacity, bench_rule rule, int reclaim)
{
    bench_rwlock_map *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    if (table_init(&m->t, capacity, rule, reclaim) != 0) {
        free(m);
        return NULL;
    }
    pthread_rwlock_init(&m->lock, NULL);
    return m;
}

void bench_rwlock_map_free(bench_rwlock_map *m)
{
    if (!m)
        return;
    pthread_rwlock_destroy(&m->lock);
    table_destroy(&m->t);
    free(m);
}

size_t bench_rwlock_map_bytes(const bench_rwlock_map *m)
{
    return m->t.n_slots * sizeof(map_slot);
}

/* The rule as a CAS loop on the slot's word: readers change words concurrently. */
static inline int word_cas_step(const bench_rule *r, _Atomic uint64_t *word, uint64_t now,
                                uint64_t cost, int peek)
{
    uint64_t w = atomic_load_explicit(word, memory_order_relaxed), next;
    for (;;) {
        if (!bench_rule_step(r, w, now, peek ? 1 : cost, &next))
            return 0;
        if (peek)
            return 1;
        if (atomic_compare_exchange_weak_explicit(word, &w, next, memory_order_relaxed,
                                                  memory_order_relaxed))
            return 1;
    }
}

int bench_rwlock_map_hit(bench_rwlock_map *m, const void *key, size_t len, uint64_t cost,
                         uint64_t now, int peek)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len), next;
    bool found;
    int allowed;

    pthread_rwlock_rdlock(&m->lock);
    map_slot *s = table_find(&m->t, h, key, len, &found);
    if (found) {
        allowed = word_cas_step(&m->t.rule, &s->word, now, cost, peek);
        pthread_rwlock_unlock(&m->lock);
        return allowed;
    }
    pthread_rwlock_unlock(&m->lock);
    if (peek)
        return bench_rule_step(&m->t.rule, 0, now, 1, &next);

    pthread_rwlock_wrlock(&m->lock);
    s = table_find(&m->t, h, key, len, &found);     /* another writer may have inserted it */
    if (!found && !(s = table_insert_at(&m->t, s, h, key, len, now))) {
        pthread_rwlock_unlock(&m->lock);
        return -1;
    }
    allowed = word_cas_step(&m->t.rule, &s->word, now, cost, 0);
    pthread_rwlock_unlock(&m->lock);
    return allowed;
}

int bench_rwlock_map_count(bench_rwlock_map *m, const void *key, size_t len, uint64_t *count)
{
    bool found;
    pthread_rwlock_rdlock(&m->lock);
    map_slot *s = table_find(&m->t, bench_hash(key, len), key, len, &found);
    if (found)
        *count = bench_rule_count(atomic_load(&s->word));
    pthread_rwlock_unlock(&m->lock);
    return found ? 0 : -1;
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
    bench_rule none = { .algo = BENCH_FIXED, .max = UINT64_MAX, .period_ns = 1 };
    if (table_init(&f->t, capacity, none, 0) != 0) {
        free(f);
        return NULL;
    }
    return f;
}

void bench_flat_free(bench_flat *f)
{
    if (!f)
        return;
    table_destroy(&f->t);
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
    return table_insert_at(&f->t, s, h, key, len, 0) ? 0 : -1;
}

int bench_flat_add(bench_flat *f, const void *key, size_t len, uint64_t cost, int peek)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len);
    bool found;
    /* tags and keys were written before the run started: read without a lock */
    map_slot *s = table_find(&f->t, h, key, len, &found);
    if (!found)
        return -1;
    uint64_t v = atomic_load_explicit(&s->word, memory_order_relaxed);
    if (peek)
        return v != UINT64_MAX;
    while (!atomic_compare_exchange_weak_explicit(&s->word, &v, v + cost, memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
    return 1;
}

int bench_flat_count(bench_flat *f, const void *key, size_t len, uint64_t *count)
{
    bool found;
    map_slot *s = table_find(&f->t, bench_hash(key, len), key, len, &found);
    if (found)
        *count = atomic_load(&s->word);
    return found ? 0 : -1;
}

/* ---- Bare CAS add ------------------------------------------------------------- */

struct bench_cas {
    _Alignas(64) _Atomic uint64_t count;      /* a line of its own, as a hot key's state */
};

bench_cas *bench_cas_new(void)
{
    bench_cas *c;
    if (posix_memalign((void **)&c, 64, sizeof(*c)) != 0)
        return NULL;
    atomic_init(&c->count, 0);
    return c;
}

void bench_cas_free(bench_cas *c)
{
    free(c);
}

int bench_cas_add(bench_cas *c, uint64_t cost, int peek)
{
    uint64_t v = atomic_load_explicit(&c->count, memory_order_relaxed);
    if (peek)
        return 1;
    /* a load and a compare-exchange, as a limit's step would need; relaxed: the
       count publishes nothing */
    while (!atomic_compare_exchange_weak_explicit(&c->count, &v, v + cost, memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
    return 1;
}

uint64_t bench_cas_count(bench_cas *c)
{
    return atomic_load_explicit(&c->count, memory_order_relaxed);
}
