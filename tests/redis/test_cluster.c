/*
 * The flusher against a real Redis Cluster (cluster_harness.h: three masters,
 * three replicas): the key slots of the specification, and exact totals,
 * key by key, from two engines under load across a reshard of 1500 slots, a
 * CLUSTER FAILOVER, and a master killed with wait_replicas 1; and two engines
 * enforcing one limit within the bound (shared_limit.h) on a key of a master
 * that is not a seed.
 */
#include "../test.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>

#include "cluster_harness.h"
#include "shared_limit.h"
#include "engine/engine-internal.h"
#include "sync/redis-internal.h"

#define SEC     UINT64_C(1000000000)
#define HOUR    (3600 * SEC)
#define NKEYS   2000
#define ENGINES 2
#define THREADS 2                          /* per engine */

static const uint8_t HASH_KEY[16] = "tally-clust-key!";

/* ---- Slots ---------------------------------------------------------------- */

Test(cluster, key_slots_follow_the_specification)
{
    /* the specification's check value of CRC16 (XMODEM) */
    cr_assert_eq(tally__crc16("123456789", 9), 0x31C3);
    cr_assert_eq(tally__crc16("", 0), 0);
    cr_assert_eq(tally__key_slot("123456789", 9), 0x31C3 & 16383);
    /* CLUSTER KEYSLOT's documented answers */
    cr_assert_eq(tally__key_slot("somekey", 7), 11058);
    cr_assert_eq(tally__key_slot("foo{hash_tag}", 13), 2515);
    /* hash tags: the first "{" and the first "}" after it, if not empty */
    cr_assert_eq(tally__key_slot("{user1000}.following", 20), tally__key_slot("user1000", 8));
    cr_assert_eq(tally__key_slot("{user1000}.followers", 20), tally__key_slot("user1000", 8));
    cr_assert_eq(tally__key_slot("foo{}{bar}", 10), tally__crc16("foo{}{bar}", 10) & 16383);
    cr_assert_eq(tally__key_slot("foo{{bar}}zap", 13), tally__crc16("{bar", 4) & 16383);
    cr_assert_eq(tally__key_slot("foo{bar}{zap}", 13), tally__key_slot("bar", 3));
    cr_assert_eq(tally__key_slot("foo{bar", 7), tally__crc16("foo{bar", 7) & 16383);
}

/* ---- Load ----------------------------------------------------------------- */

typedef struct load {
    tally_engine     *e[ENGINES];
    uint32_t          pol[ENGINES];
    _Atomic uint64_t  done[NKEYS];
    _Atomic bool      stop;
    uint64_t          win0;
} load;

typedef struct worker_arg {
    load *l;
    int   engine, t;
} worker_arg;

static void *worker(void *arg)
{
    worker_arg *w = arg;
    load *l = w->l;
    uint64_t x = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(w->engine * THREADS + w->t + 1);
    for (unsigned i = 0; !atomic_load(&l->stop); i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int k = (int)(x % NKEYS);
        uint64_t cost = 1 + (x >> 32) % 5;
        char key[16];
        int len = snprintf(key, sizeof(key), "k%d", k);
        tally_result res;
        if (tally_hit(l->e[w->engine], l->pol[w->engine], key, (size_t)len, &cost, &res) == 0
            && res.allowed)
            atomic_fetch_add(&l->done[k], cost);
        if (i % 64 == 63)
            sleep_ms(1);
    }
    return NULL;
}

static void open_engines(load *l, const test_cluster *c, const char *prefix, unsigned wait_replicas)
{
    uint64_t now = tally_now_ns();
    l->win0 = now - now % HOUR;
    for (int i = 0; i < ENGINES; i++) {
        tally_options o;
        tally_options_init(&o);
        o.capacity = 4 * NKEYS;
        memcpy(o.hash_key, HASH_KEY, 16);
        cr_assert_eq(tally_open(&o, &l->e[i]), 0);
        tally_policy p = { .name = "c", .n_limits = 1, .flags = TALLY_ALIGNED,
                           .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40,
                                         .period_ns = HOUR } } };
        cr_assert_eq(tally_policy_add(l->e[i], &p, &l->pol[i]), 0);
        tally_redis_options ro = { .mode = TALLY_REDIS_CLUSTER, .nodes = c->seeds, .key_prefix = prefix,
                                   .connect_timeout_ms = 300, .command_timeout_ms = 1000,
                                   .wait_replicas = wait_replicas, .wait_timeout_ms = 200 };
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = 20;
        fo.redis = &ro;
        cr_assert_eq(tally_flusher_start(l->e[i], &fo), 0);
    }
}

static void run_during(load *l, void (*fault)(test_cluster *, void *), test_cluster *c, void *arg)
{
    pthread_t th[ENGINES * THREADS];
    worker_arg wa[ENGINES * THREADS];
    atomic_store(&l->stop, false);
    for (int i = 0; i < ENGINES * THREADS; i++) {
        wa[i] = (worker_arg){ l, i / THREADS, i % THREADS };
        cr_assert_eq(pthread_create(&th[i], NULL, worker, &wa[i]), 0);
    }
    sleep_ms(300);
    fault(c, arg);
    sleep_ms(300);                              /* and some load after it */
    atomic_store(&l->stop, true);
    for (int i = 0; i < ENGINES * THREADS; i++)
        pthread_join(th[i], NULL);
}

/* After the load: each engine's flush returns 0, then every key's total in
   the cluster, over the windows since the start, is the cost its hits
   consumed on both engines, and nothing is pending. */
static void assert_exact(load *l, const test_cluster *c, const char *prefix)
{
    for (int i = 0; i < ENGINES; i++) {
        int rc = -1;
        for (int t = 0; t < 100 && rc != 0; t++) {
            rc = tally_flush(l->e[i], 5000);
            if (rc)
                sleep_ms(100);
        }
        char text[256] = "";
        tally_flusher_last_error(l->e[i], text, sizeof(text));
        cr_assert_eq(rc, 0, "engine %d never caught up: %s", i, text);
    }
    uint64_t now = tally_now_ns();
    for (int k = 0; k < NKEYS; k++) {
        char key[16], name[256];
        int len = snprintf(key, sizeof(key), "k%d", k);
        tally__digest d = tally__key_digest(l->e[0], key, (size_t)len);
        uint64_t got = 0;
        for (uint64_t w = l->win0; w <= now - now % HOUR; w += HOUR) {
            int n = snprintf(name, sizeof(name), "%s{%u}c:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64,
                             prefix, (unsigned)(d.lo % TALLY__CLUSTER_BUCKETS),
                             l->e[0]->hasher.kind == TALLY_HASH_AES ? "a1" : "s1",
                             d.hi & TALLY__DIGEST_HI_MASK, d.lo, w);
            long long v = cluster_get(c, name, (size_t)n);
            cr_assert_neq(v, -2, "reading %s", name);
            got += v > 0 ? (uint64_t)v : 0;
        }
        cr_assert_eq(got, atomic_load(&l->done[k]), "key %s: cluster %" PRIu64 ", hit %" PRIu64, key,
                     got, atomic_load(&l->done[k]));
    }
    for (int i = 0; i < ENGINES; i++) {
        tally_stats st;
        cr_assert_eq(tally_stats_read(l->e[i], &st), 0);
        cr_assert_eq(st.pending_cost, 0);
        cr_assert_eq(st.lost_cost, 0);
        tally_close(l->e[i]);
    }
}

static load *new_load(void)
{
    load *l = calloc(1, sizeof(*l));
    cr_assert_not_null(l);
    return l;
}

/* ---- Scenarios ------------------------------------------------------------ */

static void reshard(test_cluster *c, void *arg)
{
    (void)arg;
    int from = cluster_master(c, 0), to = cluster_master(c, 1);
    cr_assert(from >= 0 && to >= 0);
    cr_assert(cluster_reshard(c, from, to, 1500), "redis-cli --cluster reshard failed");
}

Test(cluster, two_engines_exact_across_a_reshard_of_1500_slots, .timeout = 120)
{
    static test_cluster c;
    cr_assert(test_cluster_start(&c), "the cluster did not form");
    /* every bucket's tag hashes where the cluster says it does */
    redisContext *ctx = test_redis_connect(&c.node[0]);
    for (unsigned b = 0; b < TALLY__CLUSTER_BUCKETS; b += 37) {
        char tag[16];
        snprintf(tag, sizeof(tag), "{%u}x", b);
        redisReply *r = redisCommand(ctx, "CLUSTER KEYSLOT %s", tag);
        cr_assert(r && r->type == REDIS_REPLY_INTEGER);
        cr_assert_eq((unsigned)r->integer, tally__key_slot(tag, strlen(tag)), "%s", tag);
        freeReplyObject(r);
    }
    redisFree(ctx);
    load *l = new_load();
    open_engines(l, &c, "rs:", 0);
    run_during(l, reshard, &c, NULL);
    tally_stats st;
    tally_stats_read(l->e[0], &st);
    fprintf(stderr, "reshard: %" PRIu64 " redis errors, %" PRIu64 " flush failures\n",
            st.redis_errors, st.flush_failures);
    assert_exact(l, &c, "rs:");
    free(l);
    test_cluster_stop(&c);
}

static void failover(test_cluster *c, void *arg)
{
    (void)arg;
    int m = cluster_master(c, 0), r = cluster_replica_of(c, m);
    cr_assert(m >= 0 && r >= 0);
    cr_assert(cluster_failover(c, r), "CLUSTER FAILOVER did not promote the replica");
}

Test(cluster, two_engines_exact_across_a_cluster_failover, .timeout = 120)
{
    static test_cluster c;
    cr_assert(test_cluster_start(&c), "the cluster did not form");
    load *l = new_load();
    open_engines(l, &c, "fo:", 0);
    run_during(l, failover, &c, NULL);
    assert_exact(l, &c, "fo:");
    free(l);
    test_cluster_stop(&c);
}

/* SIGKILL a master: its replica takes over after the node timeout. With
   wait_replicas 1 every acknowledged batch is on that replica; batches of
   unknown outcome are resent to it and applied once. The killed node comes
   back as a replica so that WAIT can be satisfied again. */
static void kill_master(test_cluster *c, void *arg)
{
    (void)arg;
    int m = cluster_master(c, 0), r = cluster_replica_of(c, m);
    cr_assert(m >= 0 && r >= 0);
    cr_assert(cluster_kill_master(c, m, r), "the replica never took over");
    sleep_ms(300);
    cr_assert(cluster_restart_node(c, m), "the killed master did not rejoin as a replica");
}

Test(cluster, killed_master_with_wait_replicas_loses_and_doubles_nothing, .timeout = 120)
{
    static test_cluster c;
    cr_assert(test_cluster_start(&c), "the cluster did not form");
    load *l = new_load();
    open_engines(l, &c, "kill:", 1);
    run_during(l, kill_master, &c, NULL);
    assert_exact(l, &c, "kill:");
    free(l);
    test_cluster_stop(&c);
}

/* ---- One limit, two engines ----------------------------------------------- */

/* The port of the master that serves @slot, as CLUSTER SLOTS of node @at
   says; -1 when none does. */
static int slot_owner(const test_cluster *c, int at, unsigned slot)
{
    redisReply *r = node_command(&c->node[at], "CLUSTER SLOTS");
    int port = -1;
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        const redisReply *range = r->element[i];
        if (range->type == REDIS_REPLY_ARRAY && range->elements >= 3
            && (long long)slot >= range->element[0]->integer
            && (long long)slot <= range->element[1]->integer)
            port = (int)range->element[2]->element[1]->integer;
    }
    freeReplyObject(r);
    return port;
}

struct cluster_key {
    const test_cluster *c;
    tally_engine       *e;
};

static long long stored_cluster(void *arg, const char *key, uint64_t window)
{
    struct cluster_key *ck = arg;
    tally__digest d = tally__key_digest(ck->e, key, strlen(key));
    char name[256];
    int n = snprintf(name, sizeof(name), "lim:{%u}shared:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64,
                     (unsigned)(d.lo % TALLY__CLUSTER_BUCKETS),
                     ck->e->hasher.kind == TALLY_HASH_AES ? "a1" : "s1",
                     d.hi & TALLY__DIGEST_HI_MASK, d.lo, window);
    return cluster_get(ck->c, name, (size_t)n);
}

/* The key lives on a master that neither seed is, so the engines reach it
   only through the slot map they read. L is the slowest master's round trip:
   on loopback the bound is the standalone one. */
Test(cluster, two_engines_enforce_one_limit_within_the_bound, .timeout = 120)
{
    static test_cluster c;
    cr_assert(test_cluster_start(&c), "the cluster did not form");
    tally_engine *e[ENGINES];
    uint32_t pol[ENGINES];
    for (int i = 0; i < ENGINES; i++)
        e[i] = shared_limit_engine(HASH_KEY, &pol[i]);
    char key[32];
    int owner = -1;
    for (int k = 0; k < 1000; k++) {
        snprintf(key, sizeof(key), "shared-%d", k);
        tally__digest d = tally__key_digest(e[0], key, strlen(key));
        char tag[16];
        int n = snprintf(tag, sizeof(tag), "{%u}", (unsigned)(d.lo % TALLY__CLUSTER_BUCKETS));
        owner = slot_owner(&c, 0, tally__key_slot(tag, (size_t)n));
        if (owner > 0 && owner != c.node[0].port && owner != c.node[1].port)
            break;
    }
    cr_assert(owner != c.node[0].port && owner != c.node[1].port && owner > 0,
              "a key on a master that is not a seed");
    int m = cluster_node_of_port(&c, owner);
    cr_assert(m >= 0 && node_is_master(&c.node[m]));
    for (int i = 0; i < ENGINES; i++) {
        tally_redis_options ro = { .mode = TALLY_REDIS_CLUSTER, .nodes = c.seeds, .key_prefix = "lim:",
                                   .connect_timeout_ms = 300, .command_timeout_ms = 1000 };
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = SHARED_INTERVAL;
        fo.redis = &ro;
        cr_assert_eq(tally_flusher_start(e[i], &fo), 0);
    }
    struct cluster_key ck = { &c, e[0] };
    shared_limit_run("cluster", e[0], pol[0], e[1], pol[1], key, stored_cluster, &ck);
    for (int i = 0; i < ENGINES; i++)
        tally_close(e[i]);
    test_cluster_stop(&c);
}
