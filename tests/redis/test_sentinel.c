/*
 * Node lists and Redis Sentinel: the parser of "host:port,..." at every
 * edge (no server); discovery against a real master, replica and three
 * sentinels, before and after a SIGKILL of the master; and, end to end, a
 * flusher in SENTINEL mode that loses and doubles nothing across failovers:
 * the master SIGKILLed, the same after its replicas were cut off, and a
 * SENTINEL FAILOVER that demotes a live master; and two engines enforcing one
 * limit within the bound (shared_limit.h) through the master the sentinels
 * name.
 */
#include "../test.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>

#include "sentinel_harness.h"
#include "shared_limit.h"
#include "engine/engine-internal.h"
#include "sync/sentinel.h"

/* ---- The node list parser ------------------------------------------------ */

static int parse(const char *s)
{
    return tally__parse_nodes(s, NULL);
}

Test(nodes, one_node)
{
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes("127.0.0.1:6379", n), 1);
    cr_assert_str_eq(n[0].host, "127.0.0.1");
    cr_assert_eq(n[0].port, 6379);
}

Test(nodes, several_nodes_in_order)
{
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes("a:1,redis-2.example.internal:26379,c:65535", n), 3);
    cr_assert_str_eq(n[0].host, "a");
    cr_assert_eq(n[0].port, 1);
    cr_assert_str_eq(n[1].host, "redis-2.example.internal");
    cr_assert_eq(n[1].port, 26379);
    cr_assert_str_eq(n[2].host, "c");
    cr_assert_eq(n[2].port, 65535);
}

Test(nodes, bracketed_ipv6_host)
{
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes("[::1]:6379,[fe80::1%lo]:7000", n), 2);
    cr_assert_str_eq(n[0].host, "::1");
    cr_assert_eq(n[0].port, 6379);
    cr_assert_str_eq(n[1].host, "fe80::1%lo");
    cr_assert_eq(n[1].port, 7000);
}

Test(nodes, colons_and_brackets_out_of_place)
{
    cr_assert_eq(parse("::1:6379"), TALLY_EINVAL, "an IPv6 host needs brackets");
    cr_assert_eq(parse("a:b:1"), TALLY_EINVAL);
    cr_assert_eq(parse("[::1:6379"), TALLY_EINVAL);
    cr_assert_eq(parse("[::1]6379"), TALLY_EINVAL);
    cr_assert_eq(parse("[]:1"), TALLY_EINVAL);
    cr_assert_eq(parse("[a]b:1"), TALLY_EINVAL);
    cr_assert_eq(parse("a]:1"), TALLY_EINVAL);
    cr_assert_eq(parse("a[:1"), TALLY_EINVAL);
    cr_assert_eq(parse("[[a]]:1"), TALLY_EINVAL);
}

Test(nodes, ports_at_their_edges)
{
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes("h:00080", n), 1, "five digits, leading zeros");
    cr_assert_eq(n[0].port, 80);
    cr_assert_eq(parse("h:0"), TALLY_EINVAL);
    cr_assert_eq(parse("h:00000"), TALLY_EINVAL);
    cr_assert_eq(parse("h:65536"), TALLY_EINVAL);
    cr_assert_eq(parse("h:99999"), TALLY_EINVAL);
    cr_assert_eq(parse("h:000080"), TALLY_EINVAL, "six digits");
    cr_assert_eq(parse("h:18446744073709551617"), TALLY_EINVAL);
    cr_assert_eq(parse("h:"), TALLY_EINVAL);
    cr_assert_eq(parse("h"), TALLY_EINVAL);
    cr_assert_eq(parse("h:-1"), TALLY_EINVAL);
    cr_assert_eq(parse("h:+1"), TALLY_EINVAL);
    cr_assert_eq(parse("h:1x"), TALLY_EINVAL);
    cr_assert_eq(parse("h:0x10"), TALLY_EINVAL);
}

Test(nodes, empty_lists_and_entries)
{
    cr_assert_eq(parse(NULL), TALLY_EINVAL);
    cr_assert_eq(parse(""), TALLY_EINVAL);
    cr_assert_eq(parse(","), TALLY_EINVAL);
    cr_assert_eq(parse("a:1,"), TALLY_EINVAL);
    cr_assert_eq(parse(",a:1"), TALLY_EINVAL);
    cr_assert_eq(parse("a:1,,b:2"), TALLY_EINVAL);
    cr_assert_eq(parse(":1"), TALLY_EINVAL, "an empty host");
    cr_assert_eq(parse("a:1,:2"), TALLY_EINVAL);
}

Test(nodes, whitespace_and_control_bytes)
{
    static const char *const bad[] = {
        " a:1", "a:1 ", "a :1", "a: 1", "a:1, b:2", "a:1 ,b:2", "a:1\t", "\ta:1", "a:1\n",
        "a:1\r\n", "a\x01:1", "a:1\x7f",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(parse(bad[i]), TALLY_EINVAL, "entry %zu", i);
}

Test(nodes, at_most_nodes_max)
{
    char list[TALLY__NODES_MAX * 16 + 16] = "";
    size_t used = 0;
    for (int i = 0; i < TALLY__NODES_MAX; i++)
        used += (size_t)snprintf(list + used, sizeof(list) - used, "%sh%d:%d", i ? "," : "", i,
                                 1000 + i);
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes(list, n), TALLY__NODES_MAX);
    cr_assert_str_eq(n[TALLY__NODES_MAX - 1].host, "h15");
    cr_assert_eq(n[TALLY__NODES_MAX - 1].port, 1000 + TALLY__NODES_MAX - 1);
    snprintf(list + used, sizeof(list) - used, ",x:1");
    cr_assert_eq(parse(list), TALLY_EINVAL, "one node more than TALLY__NODES_MAX");
}

Test(nodes, host_length_limit)
{
    char list[TALLY__NODE_HOST_MAX + 16];
    memset(list, 'h', TALLY__NODE_HOST_MAX);
    strcpy(list + TALLY__NODE_HOST_MAX, ":1");
    tally__node n[TALLY__NODES_MAX];
    cr_assert_eq(tally__parse_nodes(list, n), 1);
    cr_assert_eq(strlen(n[0].host), TALLY__NODE_HOST_MAX);
    memset(list, 'h', TALLY__NODE_HOST_MAX + 1);
    strcpy(list + TALLY__NODE_HOST_MAX + 1, ":1");
    cr_assert_eq(parse(list), TALLY_EINVAL);
}

Test(nodes, a_refused_list_leaves_the_output_alone)
{
    tally__node n[TALLY__NODES_MAX];
    memset(n, 0x5a, sizeof(n));
    tally__node before[TALLY__NODES_MAX];
    memcpy(before, n, sizeof(n));
    cr_assert_eq(tally__parse_nodes("a:1,b:2,c:0", n), TALLY_EINVAL);
    cr_assert_eq(memcmp(n, before, sizeof(n)), 0);
}

/* ---- Discovery against real sentinels ------------------------------------ */

static int ask(const char *nodes, const char *name, char *err, size_t err_len, int *port)
{
    char host[64];
    *port = -1;
    int rc = tally__sentinel_master(nodes, name, 500, host, sizeof(host), port, err, err_len);
    if (rc == 0)
        cr_assert_str_eq(host, "127.0.0.1");
    return rc;
}

static int is_master(const test_redis *r)
{
    redisContext *c = test_redis_connect(r);
    cr_assert_not_null(c);
    int rc = tally__redis_is_master(c);
    redisFree(c);
    return rc;
}

Test(sentinel, finds_the_master_and_skips_what_cannot_answer, .timeout = 60)
{
    test_sentinels s;
    cr_assert(test_sentinels_start(&s, 1), "the sentinel deployment did not start");
    int port;
    char err[512];
    cr_assert_eq(ask(s.nodes, TS_MASTER_NAME, err, sizeof(err), &port), 0, "%s", err);
    cr_assert_eq(port, s.node[0].port);

    /* ROLE tells the master from the replica, and from a sentinel */
    cr_assert_eq(is_master(&s.node[0]), 1);
    cr_assert_eq(is_master(&s.node[1]), 0);
    cr_assert_eq(is_master(&s.sentinel[0]), 0);
    cr_assert_eq(tally__redis_is_master(NULL), TALLY_EIO);

    /* a closed port, and a server that is no sentinel, are skipped */
    test_redis plain = { .extra = { "--requirepass", "secret", NULL } };
    cr_assert(test_redis_start(&plain));
    cr_assert_eq(is_master(&plain), TALLY_EIO, "an error reply to ROLE is no answer");
    char nodes[256];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d,127.0.0.1:%d,%s", free_port(), plain.port, s.nodes);
    cr_assert_eq(ask(nodes, TS_MASTER_NAME, err, sizeof(err), &port), 0, "%s", err);
    cr_assert_eq(port, s.node[0].port);
    cr_assert(strstr(err, "refused") != NULL, "the closed port is reported: %s", err);

    /* a name no sentinel monitors: each one says so */
    cr_assert_eq(ask(s.nodes, "nosuchmaster", err, sizeof(err), &port), TALLY_EIO);
    cr_assert_eq(port, -1, "nothing is filled in");
    for (int i = 0; i < TS_SENTINELS; i++) {
        char who[32];
        snprintf(who, sizeof(who), "127.0.0.1:%d: ", s.sentinel[i].port);
        cr_assert(strstr(err, who) != NULL, "sentinel %d is in '%s'", i, err);
    }
    /* only closed ports: TALLY_EIO too, and a short error buffer is cut, terminated */
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d,127.0.0.1:%d", free_port(), free_port());
    char small[8];
    cr_assert_eq(ask(nodes, TS_MASTER_NAME, small, sizeof(small), &port), TALLY_EIO);
    cr_assert_eq(strlen(small), sizeof(small) - 1);
    cr_assert_eq(ask(nodes, TS_MASTER_NAME, NULL, 0, &port), TALLY_EIO);

    char host[64];
    cr_assert_eq(tally__sentinel_master("127.0.0.1:0", TS_MASTER_NAME, 500, host, sizeof(host),
                                        &port, err, sizeof(err)), TALLY_EINVAL);
    cr_assert_eq(tally__sentinel_master(s.nodes, "", 500, host, sizeof(host), &port, err,
                                        sizeof(err)), TALLY_EINVAL);
    cr_assert_eq(tally__sentinel_master(s.nodes, TS_MASTER_NAME, 500, host, 0, &port, err,
                                        sizeof(err)), TALLY_EINVAL);
    cr_assert_eq(tally__sentinel_master(s.nodes, TS_MASTER_NAME, 0, host, sizeof(host), &port,
                                        err, sizeof(err)), TALLY_EINVAL);
    /* a host buffer too small for the answer is no answer */
    cr_assert_eq(tally__sentinel_master(s.nodes, TS_MASTER_NAME, 500, host, 9, &port, err,
                                        sizeof(err)), TALLY_EIO);
    test_redis_stop(&plain);
    test_sentinels_stop(&s);
}

Test(sentinel, reports_the_promoted_replica_after_the_master_is_killed, .timeout = 90)
{
    test_sentinels s;
    cr_assert(test_sentinels_start(&s, 1), "the sentinel deployment did not start");
    /* A lone sentinel that monitors a decoy under the same name stands for one
       that has not heard of the failover: its config-epoch stays 0. */
    test_redis decoy = { 0 }, stale = { 0 };
    cr_assert(test_redis_start(&decoy));
    cr_assert(ts_sentinel_start(&stale, decoy.port));
    char stale_first[256], stale_last[256];
    snprintf(stale_first, sizeof(stale_first), "127.0.0.1:%d,%s", stale.port, s.nodes);
    snprintf(stale_last, sizeof(stale_last), "%s,127.0.0.1:%d", s.nodes, stale.port);
    int port;
    char err[512];
    cr_assert_eq(ask(stale_first, TS_MASTER_NAME, err, sizeof(err), &port), 0, "%s", err);
    cr_assert_eq(port, decoy.port, "equal epochs: the sentinel listed first wins");
    cr_assert_eq(ask(stale_last, TS_MASTER_NAME, err, sizeof(err), &port), 0, "%s", err);
    cr_assert_eq(port, s.node[0].port);

    test_sentinels_kill(&s, 0);
    /* down after 1 s, then a vote and the promotion: well within 20 s */
    int found = -1;
    for (int i = 0; i < 400 && found != s.node[1].port; i++) {
        if (ask(stale_first, TS_MASTER_NAME, err, sizeof(err), &port) == 0)
            found = port;
        if (found != s.node[1].port)
            sleep_ms(50);
    }
    cr_assert_eq(found, s.node[1].port,
                 "the promoted replica's higher epoch beats the stale sentinel listed first");
    cr_assert_eq(is_master(&s.node[1]), 1, "the replica was promoted");
    cr_assert_eq(test_sentinels_wait_failover(&s, 0, 20000), 1);
    cr_assert_eq(ask(s.nodes, TS_MASTER_NAME, err, sizeof(err), &port), 0, "%s", err);
    cr_assert_eq(port, s.node[1].port);
    test_redis_stop(&stale);
    test_redis_stop(&decoy);
    test_sentinels_stop(&s);
}

/* ---- End to end: the flusher in SENTINEL mode across a failover ---------- */

#define SEC     UINT64_C(1000000000)
#define HOUR    (3600 * SEC)
#define KEYS    200
#define THREADS 4

static const uint8_t HASH_KEY[16] = "tally-sentinel!!";

struct load {
    tally_engine     *e;
    uint32_t          policy;
    int               t;
    _Atomic uint64_t *cost;          /* per key: cost of its allowed hits */
    _Atomic bool     *stop;
};

static void *load_worker(void *arg)
{
    struct load *l = arg;
    char key[32];
    for (int i = 0; !atomic_load(l->stop); i++) {
        int k = (i * 7 + l->t * 13) % KEYS;
        uint64_t cost = 1 + (uint64_t)(i % 4);
        tally_result r;
        snprintf(key, sizeof(key), "user-%d", k);
        if (tally_hit(l->e, l->policy, key, strlen(key), &cost, &r) == 0 && r.allowed)
            atomic_fetch_add(&l->cost[k], cost);
        sleep_ms(1);
    }
    return NULL;
}

/* The count of @key in @r: the sum of the counters named by its digest under
   @prefix, in any window (a run may straddle the top of an hour) and whatever
   else the key name carries. */
static long long redis_count(const test_redis *r, const char *prefix, const char *key)
{
    tally__hasher h;
    cr_assert_eq(tally__hasher_init(&h, TALLY_HASH_AUTO, HASH_KEY), 0);
    tally__digest d = tally__hasher_digest(&h, key, strlen(key));
    char hex[40];
    snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, d.hi & TALLY__DIGEST_HI_MASK, d.lo);
    redisContext *c = test_redis_connect(r);
    cr_assert_not_null(c);
    redisReply *keys = redisCommand(c, "KEYS %s*%s*", prefix, hex);
    cr_assert(keys && keys->type == REDIS_REPLY_ARRAY);
    long long sum = 0;
    for (size_t i = 0; i < keys->elements; i++) {
        const redisReply *k = keys->element[i];
        if (strstr(k->str, ":notified"))
            continue;
        redisReply *v = redisCommand(c, "GET %b", k->str, k->len);
        cr_assert(v && v->type == REDIS_REPLY_STRING, "%s holds a count", k->str);
        sum += atoll(v->str);
        freeReplyObject(v);
    }
    freeReplyObject(keys);
    redisFree(c);
    return sum;
}

enum fault {
    KILL,                /* SIGKILL of the master */
    CUT_AND_KILL,        /* the same after its replicas were cut off */
    DEMOTE               /* SENTINEL FAILOVER: the master lives on, then as a replica */
};

/* Hits from THREADS threads across @fault, then: once tally_flush returns 0,
   the promoted replica holds exactly the cost hit, key by key. */
static void failover_run(enum fault fault)
{
    test_sentinels s;
    cr_assert(test_sentinels_start(&s, 2), "the sentinel deployment did not start");
    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = 4096;
    memcpy(o.hash_key, HASH_KEY, 16);
    cr_assert_eq(tally_open(&o, &e), 0);
    tally_policy p = { .name = "failover", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40,
                                     .period_ns = HOUR } } };
    uint32_t pol;
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    tally_redis_options ro = { .mode = TALLY_REDIS_SENTINEL, .nodes = s.nodes,
                               .master_name = TS_MASTER_NAME, .key_prefix = "ts:",
                               .wait_replicas = fault == DEMOTE ? 2 : 1, .wait_timeout_ms = 200,
                               .connect_timeout_ms = 500, .command_timeout_ms = 500 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 20;
    fo.redis = &ro;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);

    static _Atomic uint64_t cost[KEYS];
    static _Atomic bool stop;
    for (int k = 0; k < KEYS; k++)
        atomic_store(&cost[k], 0);
    atomic_store(&stop, false);
    pthread_t th[THREADS];
    struct load ls[THREADS];
    for (int t = 0; t < THREADS; t++) {
        ls[t] = (struct load){ .e = e, .policy = pol, .t = t, .cost = cost, .stop = &stop };
        pthread_create(&th[t], NULL, load_worker, &ls[t]);
    }
    sleep_ms(500);
    cr_assert_eq(tally_flush(e, 5000), 0, "the master takes writes before the failover");
    if (fault == CUT_AND_KILL) {
        /* Stopped, and their links closed by the master: what the master
           takes meanwhile is on no replica, and only WAIT keeps the flusher
           from counting it as delivered. Half a second is below
           down-after-milliseconds: the sentinels still count on the replicas. */
        test_redis_kill(&s.node[1], SIGSTOP);
        test_redis_kill(&s.node[2], SIGSTOP);
        redisContext *c = test_redis_connect(&s.node[0]);
        cr_assert_not_null(c);
        redisReply *r = redisCommand(c, "CLIENT KILL TYPE replica");
        cr_assert(r && r->type == REDIS_REPLY_INTEGER && r->integer == 2, "both links closed");
        freeReplyObject(r);
        redisFree(c);
        sleep_ms(500);
    }
    if (fault == DEMOTE) {
        /* The old master takes writes until the sentinels reconfigure it (and
           close its clients), well after the promotion: a write that only the
           other replica confirmed then is lost when that replica resyncs from
           the new master. Waiting for both replicas closes that window, as
           the promoted one stops confirming when it is promoted. */
        redisContext *c = test_redis_connect(&s.sentinel[0]);
        cr_assert_not_null(c);
        redisReply *r = redisCommand(c, "SENTINEL FAILOVER %s", TS_MASTER_NAME);
        cr_assert(r && r->type == REDIS_REPLY_STATUS, "the sentinel starts a failover");
        freeReplyObject(r);
        redisFree(c);
    } else {
        test_sentinels_kill(&s, 0);
    }
    if (fault == CUT_AND_KILL) {
        test_redis_kill(&s.node[1], SIGCONT);
        test_redis_kill(&s.node[2], SIGCONT);
    }
    int m = test_sentinels_wait_failover(&s, 0, 30000);
    if (m > 0)
        sleep_ms(500);               /* hits after the failover too */
    atomic_store(&stop, true);
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    /* after the join: the load threads use this frame until then */
    cr_assert_gt(m, 0, "a replica was promoted");

    int rc = -1;
    for (int i = 0; i < 100 && rc != 0; i++)
        if ((rc = tally_flush(e, 3000)) != 0)
            sleep_ms(100);
    char last[256];
    tally_flusher_last_error(e, last, sizeof(last));
    cr_assert_eq(rc, 0, "the flusher writes to the new master (last error: %s)", last);
    uint64_t total = 0;
    for (int k = 0; k < KEYS; k++) {
        char key[32];
        snprintf(key, sizeof(key), "user-%d", k);
        long long got = redis_count(&s.node[m], "ts:", key);
        uint64_t want = atomic_load(&cost[k]);
        cr_assert_eq((uint64_t)got, want, "key %s: new master %lld, hit %" PRIu64, key, got, want);
        total += want;
    }
    cr_assert_gt(total, 0);
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    cr_assert_eq(st.pending_deltas, 0);
    cr_assert_gt(st.redis_reconnects, 0, "the flusher moved to the new master");
    tally_close(e);
    test_sentinels_stop(&s);
}

Test(sentinel_e2e, a_failover_loses_and_doubles_nothing, .timeout = 120)
{
    failover_run(KILL);
}

Test(sentinel_e2e, a_failover_after_the_replicas_were_cut_off_loses_nothing, .timeout = 120)
{
    failover_run(CUT_AND_KILL);
}

Test(sentinel_e2e, a_demoted_master_is_left_for_the_new_one, .timeout = 120)
{
    failover_run(DEMOTE);
}

/* ---- One limit, two engines ----------------------------------------------- */

static long long stored_sentinel(void *arg, const char *key, uint64_t window)
{
    tally__hasher h;
    cr_assert_eq(tally__hasher_init(&h, TALLY_HASH_AUTO, HASH_KEY), 0);
    tally__digest d = tally__hasher_digest(&h, key, strlen(key));
    char name[256];
    int n = snprintf(name, sizeof(name), "lim:shared:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64,
                     h.kind == TALLY_HASH_AES ? "a1" : "s1", d.hi & TALLY__DIGEST_HI_MASK, d.lo,
                     window);
    return test_redis_get(arg, name, (size_t)n);
}

/* L is the round trip to the master, as in STANDALONE mode: the same bound. */
Test(sentinel_e2e, two_engines_enforce_one_limit_within_the_bound, .timeout = 120)
{
    test_sentinels s;
    cr_assert(test_sentinels_start(&s, 1), "the sentinel deployment did not start");
    tally_engine *e[2];
    uint32_t pol[2];
    for (int i = 0; i < 2; i++) {
        e[i] = shared_limit_engine(HASH_KEY, &pol[i]);
        tally_redis_options ro = { .mode = TALLY_REDIS_SENTINEL, .nodes = s.nodes,
                                   .master_name = TS_MASTER_NAME, .key_prefix = "lim:",
                                   .connect_timeout_ms = 500, .command_timeout_ms = 500 };
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = SHARED_INTERVAL;
        fo.redis = &ro;
        cr_assert_eq(tally_flusher_start(e[i], &fo), 0);
    }
    shared_limit_run("sentinel", e[0], pol[0], e[1], pol[1], "shared", stored_sentinel, &s.node[0]);
    for (int i = 0; i < 2; i++)
        tally_close(e[i]);
    test_sentinels_stop(&s);
}
