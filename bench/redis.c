/*
 * Redis as a rate limiter's store, the way its users call it: INCRBY of the
 * key for each hit (one round trip each), or the hits of a batch pipelined
 * into one round trip. One hiredis connection per benchmark thread to the
 * server named by $TALLY_BENCH_REDIS ("host:port"), which the harness
 * (tools/bench-redis) starts on a free loopback port and stops afterwards.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis.h>

#include "shim.h"

struct bench_redis {
    redisContext *c[BENCH_MAX_THREADS];
    uint64_t      max;
};

int bench_redis_addr(char *host, size_t host_len, int *port)
{
    const char *env = getenv("TALLY_BENCH_REDIS");
    const char *colon = env ? strrchr(env, ':') : NULL;
    if (!colon || (size_t)(colon - env) >= host_len)
        return -1;
    memcpy(host, env, (size_t)(colon - env));
    host[colon - env] = 0;
    *port = atoi(colon + 1);
    return *port > 0 ? 0 : -1;
}

static redisContext *connect_to_server(char *why, size_t why_len)
{
    char host[256];
    int port;
    if (bench_redis_addr(host, sizeof(host), &port) != 0) {
        snprintf(why, why_len, "no redis-server: TALLY_BENCH_REDIS (host:port) is not set; "
                               "run under tools/bench-redis");
        return NULL;
    }
    struct timeval tv = { 2, 0 };
    redisContext *c = redisConnectWithTimeout(host, port, tv);
    if (!c || c->err) {
        snprintf(why, why_len, "redis-server at %s:%d: %s", host, port,
                 c ? c->errstr : "out of memory");
        redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    return c;
}

int bench_redis_check(char *why, size_t why_len)
{
    redisContext *c = connect_to_server(why, why_len);
    if (!c)
        return -1;
    redisReply *r = redisCommand(c, "PING");
    int ok = r && r->type == REDIS_REPLY_STATUS;
    if (!ok)
        snprintf(why, why_len, "redis-server does not answer PING");
    freeReplyObject(r);
    redisFree(c);
    return ok ? 0 : -1;
}

bench_redis *bench_redis_new(uint64_t max)
{
    char why[256];
    bench_redis *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->max = max;
    for (int i = 0; i < BENCH_MAX_THREADS; i++) {
        if (!(r->c[i] = connect_to_server(why, sizeof(why)))) {
            fprintf(stderr, "bench: %s\n", why);
            bench_redis_free(r);
            return NULL;
        }
    }
    /* a server of our own: start every design from an empty database */
    freeReplyObject(redisCommand(r->c[0], "FLUSHDB"));
    return r;
}

void bench_redis_free(bench_redis *r)
{
    if (!r)
        return;
    for (int i = 0; i < BENCH_MAX_THREADS; i++)
        redisFree(r->c[i]);
    free(r);
}

static int decide(const bench_redis *r, const redisReply *rep)
{
    if (!rep || rep->type != REDIS_REPLY_INTEGER)
        return -1;
    return (uint64_t)rep->integer <= r->max;
}

int bench_redis_incr(bench_redis *r, int tid, const void *key, size_t len, uint64_t cost)
{
    redisReply *rep = redisCommand(r->c[tid], "INCRBY %b %llu", key, len,
                                   (unsigned long long)cost);
    int a = decide(r, rep);
    freeReplyObject(rep);
    return a;
}

uint64_t bench_redis_pipeline(bench_redis *r, int tid, const bench_keys *k, const bench_seq *seq,
                              size_t *pos, size_t n, uint64_t *allowed_cost, uint64_t *errors)
{
    redisContext *c = r->c[tid];
    size_t p = *pos, sent = 0;
    uint64_t allowed = 0;

    for (size_t i = 0; i < n; i++, p++) {
        bench_ref ref = seq->ref[p & seq->mask];
        uint64_t cost = seq->cost ? seq->cost[p & seq->mask] : 1;
        if (redisAppendCommand(c, "INCRBY %b %llu", k->arena + ref.off, (size_t)ref.len,
                               (unsigned long long)cost) != REDIS_OK)
            break;
        sent++;
    }
    p = *pos;
    for (size_t i = 0; i < sent; i++, p++) {
        redisReply *rep = NULL;
        if (redisGetReply(c, (void **)&rep) != REDIS_OK) {
            *errors += sent - i;
            break;
        }
        int a = decide(r, rep);
        freeReplyObject(rep);
        if (a < 0) {
            (*errors)++;
        } else if (a) {
            allowed++;
            *allowed_cost += seq->cost ? seq->cost[p & seq->mask] : 1;
        }
    }
    *errors += n - sent;
    *pos += n;
    return allowed;
}

int bench_redis_count(bench_redis *r, const void *key, size_t len, uint64_t *count)
{
    redisReply *rep = redisCommand(r->c[0], "GET %b", key, len);
    int rc = -1;
    if (rep && rep->type == REDIS_REPLY_STRING) {
        *count = strtoull(rep->str, NULL, 10);
        rc = 0;
    }
    freeReplyObject(rep);
    return rc;
}
