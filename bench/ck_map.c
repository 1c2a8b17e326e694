/*
 * Concurrency Kit's ck_hs as its users write it: an SPMC set of objects (one
 * malloc'd node per key holding the key and the rule's word), sized for its
 * keys; readers find a key with ck_hs_get, lock-free, and CAS its word; a new
 * key takes a writer spinlock (ck_hs allows one writer at a time) and is put.
 *
 * ck_hs asks its allocator to defer freeing a map a grow replaced while
 * readers may still be in it; a user would put ck_epoch behind that. Here the
 * map is sized for its keys so it never grows during a run, and deferred maps
 * are kept until the process ends. Nodes are never removed, so this baseline
 * runs no workload that must reclaim keys (BENCH_W_INSERT).
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <ck_hs.h>
#include <ck_spinlock.h>

#include "shim.h"

typedef struct cnode {
    _Atomic uint64_t word;
    uint32_t         len;
    const char      *kp;       /* the key: key[] below, or the caller's bytes in a lookup */
    char             key[BENCH_KEY_MAX];
} cnode;

struct bench_ck_map {
    ck_hs_t           hs;
    ck_spinlock_fas_t writer;
    bench_rule        rule;
    size_t            capacity;
    size_t            slots;
    _Atomic size_t    count;
};

static unsigned long node_hash(const void *obj, unsigned long seed)
{
    const cnode *n = obj;
    return (unsigned long)bench_hash(n->kp, n->len) ^ seed;
}

static bool node_equal(const void *a, const void *b)
{
    const cnode *x = a, *y = b;
    return x->len == y->len && memcmp(x->kp, y->kp, x->len) == 0;
}

static void *ck_alloc(size_t size)
{
    return malloc(size);
}

static void *ck_realloc(void *p, size_t old_size, size_t new_size, bool defer)
{
    (void)old_size;
    (void)defer;
    return realloc(p, new_size);
}

static void ck_free(void *p, size_t size, bool defer)
{
    (void)size;
    /* a grown-out map may still have readers: see the top of this file */
    if (!defer)
        free(p);
}

static struct ck_malloc allocator = { .malloc = ck_alloc, .realloc = ck_realloc, .free = ck_free };

bench_ck_map *bench_ck_map_new(size_t capacity, bench_rule rule)
{
    bench_ck_map *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->rule = rule;
    m->capacity = capacity;
    ck_spinlock_fas_init(&m->writer);
    /* ck_hs grows once it is half full: room for 2x the keys keeps it still */
    if (!ck_hs_init(&m->hs, CK_HS_MODE_SPMC | CK_HS_MODE_OBJECT, node_hash, node_equal,
                    &allocator, 2 * capacity, 0x7a11)) {
        free(m);
        return NULL;
    }
    m->slots = 1;
    while (m->slots < 2 * capacity)
        m->slots <<= 1;
    return m;
}

void bench_ck_map_free(bench_ck_map *m)
{
    if (!m)
        return;
    ck_hs_iterator_t it = CK_HS_ITERATOR_INITIALIZER;
    void *obj;
    while (ck_hs_next(&m->hs, &it, &obj))
        free(obj);
    ck_hs_destroy(&m->hs);
    free(m);
}

size_t bench_ck_map_bytes(const bench_ck_map *m)
{
    /* nodes as malloc rounds them (64 -> 80 bytes) plus one pointer per map slot */
    return atomic_load((_Atomic size_t *)&m->count) * 80 + m->slots * sizeof(void *);
}

static inline cnode *find(bench_ck_map *m, unsigned long h, const void *key, size_t len)
{
    cnode lk;
    lk.len = (uint32_t)len;
    lk.kp = key;
    return ck_hs_get(&m->hs, h, &lk);
}

int bench_ck_map_hit(bench_ck_map *m, const void *key, size_t len, uint64_t cost, uint64_t now,
                     int peek)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    unsigned long h = (unsigned long)bench_hash(key, len) ^ m->hs.seed;
    uint64_t next;
    cnode *n = find(m, h, key, len);

    if (!n) {
        if (peek)
            return bench_rule_step(&m->rule, 0, now, 1, &next);
        ck_spinlock_fas_lock(&m->writer);
        n = find(m, h, key, len);          /* another writer may have put it */
        if (!n) {
            if (atomic_load_explicit(&m->count, memory_order_relaxed) >= m->capacity
                || !(n = malloc(sizeof(*n)))) {
                ck_spinlock_fas_unlock(&m->writer);
                return -1;
            }
            atomic_init(&n->word, 0);
            n->len = (uint32_t)len;
            memcpy(n->key, key, len);
            n->kp = n->key;
            if (!ck_hs_put(&m->hs, h, n)) {
                ck_spinlock_fas_unlock(&m->writer);
                free(n);
                return -1;
            }
            atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed);
        }
        ck_spinlock_fas_unlock(&m->writer);
    }
    uint64_t w = atomic_load_explicit(&n->word, memory_order_relaxed);
    for (;;) {
        if (!bench_rule_step(&m->rule, w, now, peek ? 1 : cost, &next))
            return 0;
        if (peek)
            return 1;
        if (atomic_compare_exchange_weak_explicit(&n->word, &w, next, memory_order_relaxed,
                                                  memory_order_relaxed))
            return 1;
    }
}

int bench_ck_map_count(bench_ck_map *m, const void *key, size_t len, uint64_t *count)
{
    cnode *n = find(m, (unsigned long)bench_hash(key, len) ^ m->hs.seed, key, len);
    if (!n)
        return -1;
    *count = bench_rule_count(atomic_load(&n->word));
    return 0;
}
