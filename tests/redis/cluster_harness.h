/*
 * A real Redis Cluster for the tests: three masters and three replicas of
 * redis-server on free loopback ports (each with its cluster bus on another
 * free port, not port + 10000), each in its own temp dir (redis_server.h),
 * joined by `redis-cli --cluster create --cluster-replicas 1`, with a node
 * timeout of 1 s and cluster-require-full-coverage off. Every node dies with
 * the test process (PR_SET_PDEATHSIG) and is stopped, its dir removed, by
 * test_cluster_stop. Helpers reshard slots, fail a master over from its
 * replica, kill a master and wait for its replica to take over, and read a
 * key wherever the cluster keeps it.
 */
#ifndef TALLY_TEST_CLUSTER_HARNESS_H
#define TALLY_TEST_CLUSTER_HARNESS_H

#include "redis_server.h"

#define CLUSTER_NODES 6

typedef struct test_cluster {
    test_redis node[CLUSTER_NODES];
    char       bus[CLUSTER_NODES][16];
    char       seeds[128];                 /* "127.0.0.1:p0,127.0.0.1:p1" */
} test_cluster;

/* Run a program to its end, its output thrown away; its exit status. */
static int run_quiet(const char *const *argv)
{
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execvp(argv[0], (char **)argv);
        _exit(127);
    }
    int status = -1;
    if (pid < 0 || waitpid(pid, &status, 0) != pid)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static redisReply *node_command(const test_redis *n, const char *fmt, ...)
{
    redisContext *c = test_redis_connect(n);
    if (!c)
        return NULL;
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return r;
}

/* Whether INFO @section of node @n holds @text. */
static bool node_info_has(const test_redis *n, const char *section, const char *text)
{
    redisReply *r = node_command(n, "INFO %s", section);
    bool has = r && r->type == REDIS_REPLY_STRING && strstr(r->str, text);
    freeReplyObject(r);
    return has;
}

static bool node_is_master(const test_redis *n)
{
    return node_info_has(n, "replication", "role:master");
}

/* Wait up to @ms for @pred on node @n. */
static bool wait_for(const test_redis *n, bool (*pred)(const test_redis *), unsigned ms)
{
    for (unsigned t = 0; t < ms; t += 20) {
        if (pred(n))
            return true;
        sleep_ms(20);
    }
    return false;
}

static bool cluster_ok(const test_redis *n)
{
    redisReply *r = node_command(n, "CLUSTER INFO");
    bool ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok")
              && strstr(r->str, "cluster_known_nodes:6");
    freeReplyObject(r);
    return ok;
}

static bool synced_replica(const test_redis *n)
{
    return node_info_has(n, "replication", "role:slave")
        && node_info_has(n, "replication", "master_link_status:up");
}

static bool test_cluster_start_node(test_cluster *c, int i)
{
    test_redis *n = &c->node[i];
    n->extra[0] = "--cluster-enabled";
    n->extra[1] = "yes";
    n->extra[2] = "--cluster-port";
    n->extra[3] = c->bus[i];
    n->extra[4] = "--cluster-node-timeout";
    n->extra[5] = "1000";
    n->extra[6] = NULL;
    if (!test_redis_start(n))
        return false;
    /* a master down leaves its slots down, the others serving */
    redisReply *r = node_command(n, "CONFIG SET cluster-require-full-coverage no");
    bool ok = r && r->type == REDIS_REPLY_STATUS;
    freeReplyObject(r);
    return ok;
}

static void test_cluster_stop(test_cluster *c)
{
    for (int i = 0; i < CLUSTER_NODES; i++)
        test_redis_stop(&c->node[i]);
}

/* Start six nodes and join them: three masters with a replica each. */
static bool test_cluster_start(test_cluster *c)
{
    memset(c, 0, sizeof(*c));
    char addr[CLUSTER_NODES][32];
    const char *argv[16] = { "redis-cli", "--cluster", "create" };
    int k = 3;
    /* twelve distinct ports: a port free_port() gave back is not taken until
       its node starts, so the next call may give it again */
    int ports[2 * CLUSTER_NODES];
    for (int i = 0; i < 2 * CLUSTER_NODES; i++) {
        bool dup;
        do {
            ports[i] = free_port();
            dup = ports[i] <= 0;
            for (int j = 0; j < i && !dup; j++)
                dup = ports[j] == ports[i];
        } while (dup);
    }
    for (int i = 0; i < CLUSTER_NODES; i++) {
        c->node[i].port = ports[i];
        snprintf(c->bus[i], sizeof(c->bus[i]), "%d", ports[CLUSTER_NODES + i]);
        if (!test_cluster_start_node(c, i))
            return false;
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", c->node[i].port);
        argv[k++] = addr[i];
    }
    argv[k++] = "--cluster-replicas";
    argv[k++] = "1";
    argv[k++] = "--cluster-yes";
    argv[k] = NULL;
    if (run_quiet(argv) != 0)
        return false;
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!wait_for(&c->node[i], cluster_ok, 20000))
            return false;
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!node_is_master(&c->node[i]) && !wait_for(&c->node[i], synced_replica, 20000))
            return false;
    snprintf(c->seeds, sizeof(c->seeds), "127.0.0.1:%d,127.0.0.1:%d", c->node[0].port,
             c->node[1].port);
    return true;
}

/* The node of @port, or -1. */
static int cluster_node_of_port(const test_cluster *c, int port)
{
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (c->node[i].port == port)
            return i;
    return -1;
}

/* The replica of master @m (by INFO replication's master_port), or -1. */
static int cluster_replica_of(const test_cluster *c, int m)
{
    char want[32];
    snprintf(want, sizeof(want), "master_port:%d\r", c->node[m].port);
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (i != m && c->node[i].pid > 0 && node_info_has(&c->node[i], "replication", want))
            return i;
    return -1;
}

static int cluster_master(const test_cluster *c, int nth)
{
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (c->node[i].pid > 0 && node_is_master(&c->node[i]) && nth-- == 0)
            return i;
    return -1;
}

static bool cluster_node_id(const test_cluster *c, int i, char *id, size_t len)
{
    redisReply *r = node_command(&c->node[i], "CLUSTER MYID");
    bool ok = r && r->type == REDIS_REPLY_STRING;
    if (ok)
        snprintf(id, len, "%s", r->str);
    freeReplyObject(r);
    return ok;
}

/* Move @slots slots from master @from to master @to with redis-cli. */
static bool cluster_reshard(const test_cluster *c, int from, int to, int slots)
{
    char a[32], f[48], t[48], n[16];
    if (!cluster_node_id(c, from, f, sizeof(f)) || !cluster_node_id(c, to, t, sizeof(t)))
        return false;
    snprintf(a, sizeof(a), "127.0.0.1:%d", c->node[from].port);
    snprintf(n, sizeof(n), "%d", slots);
    const char *argv[] = { "redis-cli", "--cluster", "reshard", a, "--cluster-from", f,
                           "--cluster-to", t, "--cluster-slots", n, "--cluster-yes", NULL };
    return run_quiet(argv) == 0;
}

/* CLUSTER FAILOVER on replica @r: it and its master swap roles, no write lost. */
static bool cluster_failover(const test_cluster *c, int r)
{
    redisReply *rep = node_command(&c->node[r], "CLUSTER FAILOVER");
    bool ok = rep && rep->type == REDIS_REPLY_STATUS;
    freeReplyObject(rep);
    return ok && wait_for(&c->node[r], node_is_master, 10000);
}

/* SIGKILL master @m and wait for replica @r to take its slots over. */
static bool cluster_kill_master(test_cluster *c, int m, int r)
{
    test_redis_kill(&c->node[m], SIGKILL);
    return wait_for(&c->node[r], node_is_master, 15000);
}

/* Restart node @i on its port and dir: it rejoins, as a replica of the
   master that took its slots over, and syncs. */
static bool cluster_restart_node(test_cluster *c, int i)
{
    return test_cluster_start_node(c, i) && wait_for(&c->node[i], synced_replica, 15000);
}

/* GET @key as an integer wherever the cluster keeps it (following MOVED);
   -1 when missing, -2 on failure. */
static long long cluster_get(const test_cluster *c, const char *key, size_t len)
{
    int at = cluster_master(c, 0);
    for (int hop = 0; hop < 5 && at >= 0; hop++) {
        redisContext *ctx = test_redis_connect(&c->node[at]);
        if (!ctx)
            return -2;
        const char *argv[] = { "GET", key };
        size_t argl[] = { 3, len };
        redisReply *rep = redisCommandArgv(ctx, 2, argv, argl);
        redisFree(ctx);
        long long v = -2;
        int port = 0;
        if (rep && rep->type == REDIS_REPLY_STRING)
            v = atoll(rep->str);
        else if (rep && rep->type == REDIS_REPLY_NIL)
            v = -1;
        else if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "MOVED ", 6) == 0)
            port = atoi(strrchr(rep->str, ':') + 1);
        freeReplyObject(rep);
        if (!port)
            return v;
        at = cluster_node_of_port(c, port);
    }
    return -2;
}

#endif
