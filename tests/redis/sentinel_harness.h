/*
 * A Redis Sentinel deployment for the tests: a master, one or two replicas
 * (--replicaof) and three sentinels (redis-server <conf> --sentinel, quorum
 * 2), each on a free loopback port in its own temp dir, killed with the test
 * process (PR_SET_PDEATHSIG) if it dies first. The sentinels declare a
 * master down after 1 s, so a failover takes a few seconds.
 */
#ifndef TALLY_TEST_SENTINEL_HARNESS_H
#define TALLY_TEST_SENTINEL_HARNESS_H

#include "redis_server.h"

#define TS_MASTER_NAME "tmaster"
#define TS_SENTINELS   3
#define TS_NODES_MAX   3              /* the master and up to two replicas */

typedef struct test_sentinels {
    test_redis node[TS_NODES_MAX];    /* [0] the first master, then its replicas */
    int        n_nodes;
    char       master_port[16];       /* the replicas' --replicaof argument */
    test_redis sentinel[TS_SENTINELS];
    char       nodes[128];            /* the sentinels, "127.0.0.1:port,..." */
} test_sentinels;

static bool ts_wait(bool (*cond)(void *), void *arg, unsigned timeout_ms)
{
    for (unsigned t = 0; t < timeout_ms; t += 50) {
        if (cond(arg))
            return true;
        sleep_ms(50);
    }
    return cond(arg);
}

/* The field @name of an INFO reply, as an integer; -1 when absent. */
static long long ts_info_field(const char *info, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = info; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, name, n) == 0 && p[n] == ':')
            return atoll(p + n + 1);
    return -1;
}

static bool ts_replicas_linked(void *arg)
{
    test_sentinels *s = arg;
    redisContext *c = test_redis_connect(&s->node[0]);
    if (!c)
        return false;
    redisReply *r = redisCommand(c, "INFO replication");
    bool ok = r && r->type == REDIS_REPLY_STRING &&
              ts_info_field(r->str, "connected_slaves") == s->n_nodes - 1;
    /* a replica counts once its first sync is over */
    for (int i = 1; ok && i < s->n_nodes; i++) {
        char want[48];
        snprintf(want, sizeof(want), "port=%d,state=online", s->node[i].port);
        ok = strstr(r->str, want) != NULL;
    }
    freeReplyObject(r);
    redisFree(c);
    return ok;
}

/* A sentinel's view of the master as SENTINEL MASTER reports it. */
static long long ts_sentinel_field(const test_redis *sentinel, const char *field)
{
    redisContext *c = test_redis_connect(sentinel);
    if (!c)
        return -1;
    redisReply *r = redisCommand(c, "SENTINEL MASTER %s", TS_MASTER_NAME);
    long long v = -1;
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2)
        if (strcmp(r->element[i]->str, field) == 0)
            v = atoll(r->element[i + 1]->str);
    freeReplyObject(r);
    redisFree(c);
    return v;
}

/* Every sentinel knows the replicas and the other sentinels: a failover can run. */
static bool ts_sentinels_ready(void *arg)
{
    test_sentinels *s = arg;
    for (int i = 0; i < TS_SENTINELS; i++)
        if (ts_sentinel_field(&s->sentinel[i], "num-slaves") != s->n_nodes - 1 ||
            ts_sentinel_field(&s->sentinel[i], "num-other-sentinels") != TS_SENTINELS - 1)
            return false;
    return true;
}

/* Start a sentinel monitoring @master_port on its own port and dir. */
static bool ts_sentinel_start(test_redis *r, int master_port)
{
    snprintf(r->dir, sizeof(r->dir), "/tmp/tally-sentinel-XXXXXX");
    if (!mkdtemp(r->dir))
        return false;
    r->port = free_port();
    char conf[96];
    snprintf(conf, sizeof(conf), "%s/sentinel.conf", r->dir);
    FILE *f = fopen(conf, "w");
    if (!f)
        return false;
    /* the sentinel rewrites this file with what it learns: it lives in the temp dir */
    fprintf(f, "port %d\nbind 127.0.0.1\ndir %s\ndaemonize no\nloglevel warning\n"
               "sentinel monitor %s 127.0.0.1 %d 2\n"
               "sentinel down-after-milliseconds %s 1000\n"
               "sentinel failover-timeout %s 3000\n"
               "sentinel parallel-syncs %s 2\n",
            r->port, r->dir, TS_MASTER_NAME, master_port, TS_MASTER_NAME, TS_MASTER_NAME,
            TS_MASTER_NAME);
    if (fclose(f) != 0)
        return false;
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execlp("redis-server", "redis-server", conf, "--sentinel", (char *)NULL);
        _exit(127);
    }
    if (pid < 0)
        return false;
    r->pid = pid;
    for (int i = 0; i < 500; i++) {
        redisContext *c = test_redis_connect(r);
        if (c) {
            redisReply *rep = redisCommand(c, "PING");
            bool ok = rep && rep->type == REDIS_REPLY_STATUS;
            freeReplyObject(rep);
            redisFree(c);
            if (ok)
                return true;
        }
        sleep_ms(10);
    }
    return false;
}

/* Start the master, @replicas (1 or 2) replicas and the sentinels, and wait
   until the sentinels could fail the master over. */
static bool test_sentinels_start(test_sentinels *s, int replicas)
{
    memset(s, 0, sizeof(*s));
    s->n_nodes = 1 + replicas;
    /* an immediate diskless first sync: replicas are online at once */
    static const char *const sync_fast[] = { "--repl-diskless-sync", "yes",
                                             "--repl-diskless-sync-delay", "0" };
    for (int i = 0; i < s->n_nodes; i++) {
        memcpy(s->node[i].extra, sync_fast, sizeof(sync_fast));
        if (i > 0) {
            s->node[i].extra[4] = "--replicaof";
            s->node[i].extra[5] = "127.0.0.1";
            s->node[i].extra[6] = s->master_port;
        }
        if (!test_redis_start(&s->node[i]))
            return false;
        if (i == 0)
            snprintf(s->master_port, sizeof(s->master_port), "%d", s->node[0].port);
    }
    /* sentinels learn the replicas from the master's first INFO: link them first */
    if (!ts_wait(ts_replicas_linked, s, 10000))
        return false;
    size_t used = 0;
    for (int i = 0; i < TS_SENTINELS; i++) {
        if (!ts_sentinel_start(&s->sentinel[i], s->node[0].port))
            return false;
        used += (size_t)snprintf(s->nodes + used, sizeof(s->nodes) - used, "%s127.0.0.1:%d",
                                 i ? "," : "", s->sentinel[i].port);
    }
    /* sentinels find each other by hello messages, every 2 s */
    return ts_wait(ts_sentinels_ready, s, 15000);
}

static void test_sentinels_stop(test_sentinels *s)
{
    for (int i = 0; i < TS_SENTINELS; i++)
        test_redis_stop(&s->sentinel[i]);
    for (int i = 0; i < s->n_nodes; i++)
        test_redis_stop(&s->node[i]);
}

/* The master's port as @sentinel reports it; -1 when it does not answer. */
static int test_sentinel_master_port(const test_redis *sentinel)
{
    redisContext *c = test_redis_connect(sentinel);
    if (!c)
        return -1;
    redisReply *r = redisCommand(c, "SENTINEL GET-MASTER-ADDR-BY-NAME %s", TS_MASTER_NAME);
    int port = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2)
        port = atoi(r->element[1]->str);
    freeReplyObject(r);
    redisFree(c);
    return port;
}

/* The node that ROLE says is the master, other than @not; -1 when none is. */
static int ts_master_node(const test_sentinels *s, int not)
{
    for (int i = 0; i < s->n_nodes; i++) {
        if (i == not || s->node[i].pid <= 0)
            continue;
        redisContext *c = test_redis_connect(&s->node[i]);
        if (!c)
            continue;
        redisReply *r = redisCommand(c, "ROLE");
        bool master = r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                      strcmp(r->element[0]->str, "master") == 0;
        freeReplyObject(r);
        redisFree(c);
        if (master)
            return i;
    }
    return -1;
}

struct ts_failover {
    test_sentinels *s;
    int old;                          /* the node that was master */
    int now;                          /* the promoted node, once every sentinel reports it */
};

static bool ts_failed_over(void *arg)
{
    struct ts_failover *f = arg;
    int m = ts_master_node(f->s, f->old);
    if (m < 0)
        return false;
    for (int i = 0; i < TS_SENTINELS; i++)
        if (test_sentinel_master_port(&f->s->sentinel[i]) != f->s->node[m].port)
            return false;
    f->now = m;
    return true;
}

/* SIGKILL node @i (the master). */
static void test_sentinels_kill(test_sentinels *s, int i)
{
    test_redis_kill(&s->node[i], SIGKILL);
}

/* Wait until a node other than @old is master and every sentinel reports it;
   return that node, or -1 after @timeout_ms. */
static int test_sentinels_wait_failover(test_sentinels *s, int old, unsigned timeout_ms)
{
    struct ts_failover f = { s, old, -1 };
    return ts_wait(ts_failed_over, &f, timeout_ms) ? f.now : -1;
}

#endif
