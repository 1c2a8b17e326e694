/*
 * What a failover costs an engine that syncs to Redis (docs/SYNC.md, "What a
 * failover costs"); run by tools/bench-failover, options in usage().
 *
 * Each run starts its own servers on free loopback ports in temp dirs (the
 * test harnesses: a master, one or two replicas and three sentinels with
 * down-after-milliseconds 1000, or three masters and three replicas with
 * cluster-node-timeout 1000), puts one engine under steady load (2 threads,
 * 1000 keys, cost 1 a hit, flush interval 20 ms, the library's default
 * timeouts), and SIGKILLs a master. With a lag, that master's replicas are
 * first stopped (SIGSTOP) and their links closed (CLIENT KILL TYPE replica)
 * for that long, so that what the master acknowledges then is on no replica.
 * The killed node is started again, without its data, once the failover is
 * over for the clients (every sentinel names the new master; every cluster
 * node flags the old one as failed), or with -e as soon as its replica is
 * promoted; it comes back as a replica, and with one replica per master
 * WAIT 1 can only be met again then. Once every hit is acknowledged
 * (tally_flush returns 0), each key's count in Redis is compared with the
 * cost the engine admitted for it.
 *
 * One row per run: the scenario, then promote_s (kill to a replica calling
 * itself master), switch_s (kill to the end of the failover as above),
 * failed_s (kill to the first fully acknowledged flush after a failed one),
 * failures (flushes that failed in that time), acked (increments admitted,
 * all acknowledged at the end), lost (of those, missing from Redis), doubled
 * (counted more than once by Redis).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <tally.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../tests/redis/cluster_harness.h"
#include "../tests/redis/sentinel_harness.h"
#pragma GCC diagnostic pop

#include "engine/engine-internal.h"
#include "sync/redis-internal.h"

#define SEC      UINT64_C(1000000000)
#define HOUR     (3600 * SEC)
#define NKEYS    1000
#define THREADS  2
#define PREFIX   "fo:"
#define POLICY   "failover"

static const uint8_t HASH_KEY[16] = "tally-failover!!";

struct load {
    tally_engine     *e;
    uint32_t          policy;
    int               t;
    _Atomic uint64_t *cost;            /* per key: cost admitted */
    _Atomic bool     *stop;
};

/* A hit, and 1 ms of sleep every 8: about 6.5K hits a second per thread.
   Relaxed atomics throughout: pthread_create and pthread_join order the
   counts and the stop flag with the main thread. */
static void *load_worker(void *arg)
{
    struct load *l = arg;
    uint64_t x = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(l->t + 1);
    for (unsigned i = 0; !atomic_load_explicit(l->stop, memory_order_relaxed); i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int k = (int)(x % NKEYS);
        char key[16];
        int len = snprintf(key, sizeof(key), "k%d", k);
        uint64_t cost = 1;
        tally_result r;
        if (tally_hit(l->e, l->policy, key, (size_t)len, &cost, &r) == 0 && r.allowed)
            atomic_fetch_add_explicit(&l->cost[k], cost, memory_order_relaxed);
        if (i % 8 == 7)
            sleep_ms(1);
    }
    return NULL;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_failover: %s\n", what);
    exit(1);
}

/* The deployment of one run, either kind. */
struct deploy {
    bool           cluster;
    test_sentinels s;
    test_cluster   c;
    int            master;              /* the node killed */
    int            replica[2], n_replicas;
    char           master_id[48];       /* its cluster node id */
};

static test_redis *node(struct deploy *d, int i)
{
    return d->cluster ? &d->c.node[i] : &d->s.node[i];
}

static void deploy_start(struct deploy *d, int replicas)
{
    if (d->cluster) {
        if (!test_cluster_start(&d->c))
            die("the cluster did not form");
        d->master = cluster_master(&d->c, 0);
        d->replica[0] = cluster_replica_of(&d->c, d->master);
        d->n_replicas = 1;
        if (d->master < 0 || d->replica[0] < 0
            || !cluster_node_id(&d->c, d->master, d->master_id, sizeof(d->master_id)))
            die("no master with a replica");
    } else {
        if (!test_sentinels_start(&d->s, replicas))
            die("the sentinel deployment did not start");
        d->master = 0;
        d->n_replicas = replicas;
        for (int i = 0; i < replicas; i++)
            d->replica[i] = 1 + i;
    }
}

static void deploy_stop(struct deploy *d)
{
    if (d->cluster)
        test_cluster_stop(&d->c);
    else
        test_sentinels_stop(&d->s);
}

/* The replica that calls itself master; -1 while none does. */
static int promoted(struct deploy *d)
{
    for (int i = 0; i < d->n_replicas; i++)
        if (node_is_master(node(d, d->replica[i])))
            return d->replica[i];
    return -1;
}

/* The failover is over for the clients: every sentinel names node @m, or
   every live cluster node flags the killed master as failed (not only
   suspected). */
static bool switched(struct deploy *d, int m)
{
    if (!d->cluster) {
        for (int i = 0; i < TS_SENTINELS; i++)
            if (test_sentinel_master_port(&d->s.sentinel[i]) != d->s.node[m].port)
                return false;
        return true;
    }
    for (int i = 0; i < CLUSTER_NODES; i++) {
        if (i == d->master || d->c.node[i].pid <= 0)
            continue;
        redisReply *r = node_command(&d->c.node[i], "CLUSTER NODES");
        const char *line = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, d->master_id) : NULL;
        const char *eol = line ? strchr(line, '\n') : NULL;
        const char *fail = line ? strstr(line, "fail") : NULL;
        bool failed = fail && (!eol || fail < eol) && fail[4] != '?';
        freeReplyObject(r);
        if (!failed)
            return false;
    }
    return true;
}

/* The killed master, back on its port and dir with no data: the cluster
   makes it a replica of the node that took its slots, the sentinels a
   replica of the promoted one. */
static bool restart_killed(struct deploy *d)
{
    if (d->cluster)
        return cluster_restart_node(&d->c, d->master);
    return test_redis_start(&d->s.node[d->master]);
}

/* What Redis holds for key @k, over the windows from @win0 to now; -1 when it
   cannot be read. */
static long long stored(struct deploy *d, int m, tally_engine *e, int k, uint64_t win0)
{
    char key[16], name[256];
    int len = snprintf(key, sizeof(key), "k%d", k);
    tally__digest dg = tally__key_digest(e, key, (size_t)len);
    const char *tag = e->hasher.kind == TALLY_HASH_AES ? "a1" : "s1";
    uint64_t now = tally_now_ns();
    long long sum = 0;
    for (uint64_t w = win0; w <= now - now % HOUR; w += HOUR) {
        char slot[16] = "";
        if (d->cluster)
            snprintf(slot, sizeof(slot), "{%u}", (unsigned)(dg.lo % TALLY__CLUSTER_BUCKETS));
        int n = snprintf(name, sizeof(name), "%s%s%s:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64,
                         PREFIX, slot, POLICY, tag, dg.hi & TALLY__DIGEST_HI_MASK, dg.lo, w);
        long long v = d->cluster ? cluster_get(&d->c, name, (size_t)n)
                                 : test_redis_get(node(d, m), name, (size_t)n);
        if (v == -2)
            return -1;
        sum += v > 0 ? v : 0;
    }
    return sum;
}

/* The first fully acknowledged flush after the kill, seen from a thread of
   its own so that nothing the main thread waits for delays the reading (the
   stats keep the time of the last acknowledged flush only). A flush under
   way at the kill may still end well: the stretch starts with the first
   flush that failed after it. */
struct watch {
    tally_engine *e;
    tally_stats   before;
    uint64_t      t_kill;
    uint64_t      t_ack;                /* 0: none within 60 s */
    uint64_t      failures;             /* flushes that failed until then */
};

static void *watch_flushes(void *arg)
{
    struct watch *w = arg;
    tally_stats st;
    uint64_t failed_at = 0;
    do {
        sleep_ms(1);
        tally_stats_read(w->e, &st);
        if (!failed_at && st.flush_failures > w->before.flush_failures)
            failed_at = tally_now_ns();
    } while ((!failed_at || st.last_flush_ok_ns <= failed_at)
             && tally_now_ns() - w->t_kill < 60 * SEC);
    if (failed_at && st.last_flush_ok_ns > failed_at)
        w->t_ack = st.last_flush_ok_ns;
    w->failures = st.flush_failures - w->before.flush_failures;
    return NULL;
}

static double secs(uint64_t ns)
{
    return (double)ns / 1e9;
}

struct config {
    bool     cluster;
    unsigned wait_replicas, lag_ms;
    int      replicas;                  /* sentinel: 1 or 2 */
    bool     early;                     /* restart at the promotion, not the switch */
};

static void run_once(const struct config *cf, int run)
{
    static struct deploy d;
    memset(&d, 0, sizeof(d));
    d.cluster = cf->cluster;
    deploy_start(&d, cf->replicas);

    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = 4 * NKEYS;
    memcpy(o.hash_key, HASH_KEY, 16);
    if (tally_open(&o, &e) != 0)
        die("tally_open");
    tally_policy p = { .name = POLICY, .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40,
                                     .period_ns = HOUR } } };
    uint32_t pol;
    if (tally_policy_add(e, &p, &pol) != 0)
        die("tally_policy_add");
    tally_redis_options ro = { .key_prefix = PREFIX, .wait_replicas = cf->wait_replicas };
    if (cf->cluster) {
        ro.mode = TALLY_REDIS_CLUSTER;
        ro.nodes = d.c.seeds;
    } else {
        ro.mode = TALLY_REDIS_SENTINEL;
        ro.nodes = d.s.nodes;
        ro.master_name = TS_MASTER_NAME;
    }
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 20;
    fo.redis = &ro;
    uint64_t now = tally_now_ns(), win0 = now - now % HOUR;
    if (tally_flusher_start(e, &fo) != 0)
        die("tally_flusher_start");

    static _Atomic uint64_t cost[NKEYS];
    static _Atomic bool stop;
    for (int k = 0; k < NKEYS; k++)
        atomic_store_explicit(&cost[k], 0, memory_order_relaxed);
    atomic_store_explicit(&stop, false, memory_order_relaxed);
    pthread_t th[THREADS];
    struct load ls[THREADS];
    for (int t = 0; t < THREADS; t++) {
        ls[t] = (struct load){ e, pol, t, cost, &stop };
        if (pthread_create(&th[t], NULL, load_worker, &ls[t]) != 0)
            die("pthread_create");
    }
    sleep_ms(2000);
    if (tally_flush(e, 5000) != 0)
        die("no acknowledged flush before the failover");

    test_redis *m = node(&d, d.master);
    if (cf->lag_ms) {
        /* a stopped replica's TCP buffer would still take what the master
           sends: closing the links keeps it all on the master */
        for (int i = 0; i < d.n_replicas; i++)
            test_redis_kill(node(&d, d.replica[i]), SIGSTOP);
        redisReply *rep = node_command(m, "CLIENT KILL TYPE replica");
        if (!rep || rep->type != REDIS_REPLY_INTEGER || rep->integer != d.n_replicas)
            die("CLIENT KILL TYPE replica did not close every link");
        freeReplyObject(rep);
        sleep_ms(cf->lag_ms);
    }
    struct watch w = { .e = e };
    tally_stats_read(e, &w.before);
    uint64_t t_kill = tally_now_ns();
    w.t_kill = t_kill;
    pthread_t wt;
    if (pthread_create(&wt, NULL, watch_flushes, &w) != 0)
        die("pthread_create");
    test_redis_kill(m, SIGKILL);
    if (cf->lag_ms)
        for (int i = 0; i < d.n_replicas; i++)
            test_redis_kill(node(&d, d.replica[i]), SIGCONT);
    int nm;
    while ((nm = promoted(&d)) < 0) {
        if (tally_now_ns() - t_kill > 60 * SEC)
            die("no replica promoted within 60 s of the kill");
        sleep_ms(5);
    }
    uint64_t t_promoted = tally_now_ns();
    if (cf->early && !restart_killed(&d))
        die("the killed master did not come back");
    while (!switched(&d, nm)) {
        if (tally_now_ns() - t_kill > 60 * SEC)
            die("the failover did not end within 60 s of the kill");
        sleep_ms(5);
    }
    uint64_t t_switched = tally_now_ns();
    if (!cf->early && !restart_killed(&d))
        die("the killed master did not come back");
    pthread_join(wt, NULL);
    if (!w.t_ack)
        die("no acknowledged flush within 60 s of the kill");
    sleep_ms(1000);
    atomic_store_explicit(&stop, true, memory_order_relaxed);
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    int rc = -1;
    for (int i = 0; i < 100 && rc != 0; i++)
        if ((rc = tally_flush(e, 3000)) != 0)
            sleep_ms(100);
    if (rc != 0)
        die("the engine never caught up after the failover");

    /* the master the sentinels name now, as the engine found it */
    if (!cf->cluster) {
        int port = test_sentinel_master_port(&d.s.sentinel[0]);
        for (int i = 0; i < d.s.n_nodes; i++)
            if (d.s.node[i].port == port)
                nm = i;
    }
    uint64_t acked = 0, lost = 0, doubled = 0;
    for (int k = 0; k < NKEYS; k++) {
        long long got = stored(&d, nm, e, k, win0);
        if (got < 0)
            die("a count could not be read");
        uint64_t want = atomic_load_explicit(&cost[k], memory_order_relaxed);
        acked += want;
        if ((uint64_t)got < want)
            lost += want - (uint64_t)got;
        else
            doubled += (uint64_t)got - want;
    }
    printf("%-8s %5u %5d %6u %-9s %3d %9.2f %9.2f %9.2f %8" PRIu64 " %8" PRIu64 " %8" PRIu64
           " %7" PRIu64 "\n",
           cf->cluster ? "cluster" : "sentinel", cf->wait_replicas, d.n_replicas, cf->lag_ms,
           cf->early ? "promoted" : "switched", run, secs(t_promoted - t_kill),
           secs(t_switched - t_kill), secs(w.t_ack - t_kill), w.failures, acked, lost, doubled);
    fflush(stdout);
    tally_close(e);
    deploy_stop(&d);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_failover [-c] [-w WAIT_REPLICAS] [-r REPLICAS] [-l LAG_MS] "
                    "[-e] [-n RUNS] [-k FIRST] [-H]\n"
                    "  -c  Redis Cluster (default: Sentinel)\n"
                    "  -r  the master's replicas, Sentinel only (1 or 2; default 1)\n"
                    "  -l  the replicas cut off for LAG_MS before the kill (default 0)\n"
                    "  -e  restart the killed master at the promotion, not after the switch\n"
                    "  -n  runs (default 3; 0 with -H: the header alone)\n"
                    "  -k  the number of the first run in the rows (default 1)\n"
                    "  -H  print the header line first\n");
    exit(2);
}

int main(int argc, char **argv)
{
    struct config cf = { .replicas = 1 };
    int runs = 3, first = 1, opt;
    bool header = false;
    while ((opt = getopt(argc, argv, "cw:r:l:en:k:H")) != -1) {
        switch (opt) {
        case 'c': cf.cluster = true; break;
        case 'w': cf.wait_replicas = (unsigned)atoi(optarg); break;
        case 'r': cf.replicas = atoi(optarg); break;
        case 'l': cf.lag_ms = (unsigned)atoi(optarg); break;
        case 'e': cf.early = true; break;
        case 'n': runs = atoi(optarg); break;
        case 'k': first = atoi(optarg); break;
        case 'H': header = true; break;
        default: usage();
        }
    }
    if (optind != argc || runs < 0 || cf.replicas < 1 || cf.replicas > 2
        || (cf.cluster && cf.replicas != 1))
        usage();
    if (header)
        printf("%-8s %5s %5s %6s %-9s %3s %9s %9s %9s %8s %8s %8s %7s\n", "mode", "wait", "repl",
               "lag_ms", "restart", "run", "promote_s", "switch_s", "failed_s", "failures",
               "acked", "lost", "doubled");
    for (int i = first; i < first + runs; i++)
        run_once(&cf, i);
    return 0;
}
