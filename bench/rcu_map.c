/*
 * The "obvious" RCU design: liburcu's lock-free resizable hash table
 * (rculfhash, urcu-memb flavour), one malloc'd node per key holding the key
 * and the rule's word, a lookup inside a read-side section and a CAS loop on
 * the node's word; a new key is added with cds_lfht_add_unique.
 *
 * With reclaim on, the thread whose insert takes the table past its capacity
 * sweeps it (one sweeper at a time, others go on): an expired node's word is
 * CASed to BENCH_WORD_DEAD, so a racing hit cannot land in a node on its way
 * out, then the node is deleted and freed after a grace period (call_rcu). A
 * hit that meets a DEAD node helps delete it and looks the key up again.
 */
#define _LGPL_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <urcu/urcu-memb.h>
#include <urcu/rculfhash.h>

#include "shim.h"
#include "tally.h"

typedef struct rnode {
    struct cds_lfht_node node;
    _Atomic uint64_t     word;
    struct rcu_head      rcu;
    uint32_t             len;
    char                 key[BENCH_KEY_MAX];
} rnode;

struct bench_rcu_map {
    struct cds_lfht *ht;
    bench_rule       rule;
    size_t           capacity;
    int              reclaim;
    _Atomic size_t   count;
    pthread_mutex_t  sweeping;
    /* tally registers each thread with urcu-memb on its first call and
       unregisters it at thread exit; registering a thread a second time
       corrupts liburcu's registry, so threads that tally has not met yet are
       registered by a call into this tiny engine. */
    tally_engine    *registrar;
    uint32_t         registrar_policy;
};

typedef struct lookup_key {
    const void *key;
    size_t      len;
} lookup_key;

static int match(struct cds_lfht_node *node, const void *arg)
{
    const rnode *n = caa_container_of(node, rnode, node);
    const lookup_key *k = arg;
    return n->len == k->len && memcmp(n->key, k->key, k->len) == 0;
}

static void free_node(struct rcu_head *head)
{
    free(caa_container_of(head, rnode, rcu));
}

static void ensure_registered(bench_rcu_map *m)
{
    if (caa_likely(URCU_TLS(urcu_memb_reader).registered))
        return;
    tally_result r;
    tally_peek_at(m->registrar, m->registrar_policy, "r", 1, 0, &r);
}

bench_rcu_map *bench_rcu_map_new(size_t capacity, bench_rule rule, int reclaim)
{
    bench_rcu_map *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->rule = rule;
    m->capacity = capacity;
    m->reclaim = reclaim;
    pthread_mutex_init(&m->sweeping, NULL);

    tally_options o;
    tally_options_init(&o);
    o.capacity = 1;
    tally_policy p = { .name = "registrar", .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = 1 } } };
    if (tally_open(&o, &m->registrar) != 0
        || tally_policy_add(m->registrar, &p, &m->registrar_policy) != 0) {
        tally_close(m->registrar);
        free(m);
        return NULL;
    }
    unsigned long size = 1;
    while (size < capacity)
        size <<= 1;
    m->ht = cds_lfht_new_flavor(size, 1, 0, CDS_LFHT_AUTO_RESIZE | CDS_LFHT_ACCOUNTING,
                                &urcu_memb_flavor, NULL);
    if (!m->ht) {
        tally_close(m->registrar);
        free(m);
        return NULL;
    }
    return m;
}

void bench_rcu_map_free(bench_rcu_map *m)
{
    if (!m)
        return;
    struct cds_lfht_iter iter;
    rnode *n;

    ensure_registered(m);
    urcu_memb_read_lock();
    cds_lfht_for_each_entry(m->ht, &iter, n, node)
        if (cds_lfht_del(m->ht, &n->node) == 0)
            urcu_memb_call_rcu(&n->rcu, free_node);
    urcu_memb_read_unlock();
    urcu_memb_barrier();                 /* every node freed */
    if (cds_lfht_destroy(m->ht, NULL) != 0)
        fprintf(stderr, "bench: cds_lfht_destroy failed\n");
    tally_close(m->registrar);
    pthread_mutex_destroy(&m->sweeping);
    free(m);
}

size_t bench_rcu_map_bytes(const bench_rcu_map *m)
{
    /* the nodes as malloc rounds them (96 -> 112 bytes) plus a bucket node
       (16 bytes) per key: an estimate, rculfhash keeps no byte count */
    return atomic_load((_Atomic size_t *)&m->count) * (112 + 16);
}

/* Caller is inside a read-side section. */
static void sweep(bench_rcu_map *m, uint64_t now)
{
    struct cds_lfht_iter iter;
    rnode *n;

    cds_lfht_for_each_entry(m->ht, &iter, n, node) {
        uint64_t w = atomic_load_explicit(&n->word, memory_order_relaxed);
        if (w == BENCH_WORD_DEAD || !bench_rule_expired(&m->rule, w, now))
            continue;
        /* the hit that would change w makes this fail: no hit is lost */
        if (!atomic_compare_exchange_strong(&n->word, &w, BENCH_WORD_DEAD))
            continue;
        if (cds_lfht_del(m->ht, &n->node) == 0) {
            atomic_fetch_sub_explicit(&m->count, 1, memory_order_relaxed);
            urcu_memb_call_rcu(&n->rcu, free_node);
        }
    }
}

int bench_rcu_map_hit(bench_rcu_map *m, const void *key, size_t len, uint64_t cost, uint64_t now,
                      int peek)
{
    if (len == 0 || len > BENCH_KEY_MAX)
        return -1;
    uint64_t h = bench_hash(key, len), next;
    lookup_key lk = { key, len };
    struct cds_lfht_iter iter;
    rnode *fresh = NULL;
    int allowed;

    ensure_registered(m);
    urcu_memb_read_lock();
    for (;;) {
        cds_lfht_lookup(m->ht, h, match, &lk, &iter);
        struct cds_lfht_node *node = cds_lfht_iter_get_node(&iter);
        if (!node) {
            if (peek) {
                allowed = bench_rule_step(&m->rule, 0, now, 1, &next);
                break;
            }
            if (!fresh) {
                fresh = malloc(sizeof(*fresh));
                if (!fresh) {
                    allowed = -1;
                    break;
                }
                cds_lfht_node_init(&fresh->node);
                fresh->len = (uint32_t)len;
                memcpy(fresh->key, key, len);
            }
            atomic_store_explicit(&fresh->word, 0, memory_order_relaxed);
            /* a twin added by another thread since the lookup wins; hit it instead */
            node = cds_lfht_add_unique(m->ht, h, match, &lk, &fresh->node);
            if (node == &fresh->node) {
                fresh = NULL;
                size_t c = atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed) + 1;
                if (m->reclaim && c > m->capacity && pthread_mutex_trylock(&m->sweeping) == 0) {
                    sweep(m, now);
                    pthread_mutex_unlock(&m->sweeping);
                }
            }
        }
        rnode *n = caa_container_of(node, rnode, node);
        uint64_t w = atomic_load_explicit(&n->word, memory_order_relaxed);
        for (;;) {
            if (w == BENCH_WORD_DEAD)
                break;
            if (!bench_rule_step(&m->rule, w, now, peek ? 1 : cost, &next)) {
                allowed = 0;
                goto out;
            }
            if (peek) {
                allowed = 1;
                goto out;
            }
            if (atomic_compare_exchange_weak_explicit(&n->word, &w, next, memory_order_relaxed,
                                                      memory_order_relaxed)) {
                allowed = 1;
                goto out;
            }
        }
        /* the node is on its way out: finish removing it, then look again */
        if (cds_lfht_del(m->ht, &n->node) == 0) {
            atomic_fetch_sub_explicit(&m->count, 1, memory_order_relaxed);
            urcu_memb_call_rcu(&n->rcu, free_node);
        }
    }
out:
    urcu_memb_read_unlock();
    free(fresh);                 /* never published */
    return allowed;
}

int bench_rcu_map_count(bench_rcu_map *m, const void *key, size_t len, uint64_t *count)
{
    lookup_key lk = { key, len };
    struct cds_lfht_iter iter;
    int rc = -1;

    ensure_registered(m);
    urcu_memb_read_lock();
    cds_lfht_lookup(m->ht, bench_hash(key, len), match, &lk, &iter);
    struct cds_lfht_node *node = cds_lfht_iter_get_node(&iter);
    if (node) {
        *count = bench_rule_count(atomic_load(&caa_container_of(node, rnode, node)->word));
        rc = 0;
    }
    urcu_memb_read_unlock();
    return rc;
}
