/*
 * bench_flush: how fast the flusher empties 100K dirty keys into Redis,
 * side by side with what the same binary gets from a raw pipeline of INCRBY
 * on the same keys and the same server, and with redis-benchmark's
 * pipelined INCR (500 a round trip) against that server: of one key, and of
 * 100K random keys (-r), as many distinct keys as the flush has.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"
#include "flush_work.h"
#include "../tests/redis/redis_server.h"

static test_redis server;
static char host[256] = "127.0.0.1";
static tally_engine *engine;
static uint32_t policy;
static size_t n_keys;
static char (*keys)[32];
static redisContext *raw;

/* The server of $TALLY_BENCH_REDIS ("host:port", tools/bench-redis), where
   redis-benchmark can be pointed at the same process; else one of our own. */
int flush_bench_redis_start(void)
{
    memset(&server, 0, sizeof(server));
    const char *env = getenv("TALLY_BENCH_REDIS");
    const char *colon = env ? strrchr(env, ':') : NULL;
    if (colon && (size_t)(colon - env) < sizeof(host) && atoi(colon + 1) > 0) {
        memcpy(host, env, (size_t)(colon - env));
        host[colon - env] = 0;
        server.port = atoi(colon + 1);
        return server.port;
    }
    return test_redis_start(&server) ? server.port : 0;
}

void flush_bench_redis_stop(void)
{
    test_redis_stop(&server);
}

int flush_bench_setup(size_t n)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = n;
    o.digest_only = true;
    if (tally_open(&o, &engine))
        return -1;
    tally_policy p = { .name = "flush", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 50,
                                     .period_ns = UINT64_C(3600000000000) } } };
    if (tally_policy_add(engine, &p, &policy))
        return -1;
    tally_redis_options ro = { .host = host, .port = server.port, .key_prefix = "bench:",
                               .command_timeout_ms = 10000 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 3600 * 1000;           /* only the explicit tally_flush pushes */
    fo.redis = &ro;
    if (tally_flusher_start(engine, &fo))
        return -1;
    n_keys = n;
    keys = calloc(n, sizeof(*keys));
    for (size_t i = 0; i < n; i++)
        snprintf(keys[i], sizeof(keys[i]), "user-%08zx-key", i * 2654435761u);
    struct timeval tv = { 10, 0 };
    raw = redisConnectWithTimeout(host, server.port, tv);
    return raw && !raw->err ? 0 : -1;
}

void flush_bench_teardown(void)
{
    tally_close(engine);
    if (raw)
        redisFree(raw);
    free(keys);
}

void flush_bench_dirty(void)
{
    tally_result r;
    for (size_t i = 0; i < n_keys; i++)
        tally_hit(engine, policy, keys[i], strlen(keys[i]), NULL, &r);
}

int flush_bench_flush(void)
{
    return tally_flush(engine, 60000);
}

double flush_bench_redis_benchmark(size_t n, size_t keyspace)
{
    char cmd[512], r[32] = "";
    if (keyspace)
        snprintf(r, sizeof(r), " -r %zu", keyspace);
    snprintf(cmd, sizeof(cmd),
             "redis-benchmark -h %s -p %d -c 1 -P 500 -t incr -n %zu%s --csv 2>/dev/null", host,
             server.port, n, r);
    FILE *p = popen(cmd, "r");
    if (!p)
        return 0;
    char line[512];
    double rps = 0;
    /* "test","rps",... then "INCR","<requests per second>",... */
    while (fgets(line, sizeof(line), p))
        if (strncmp(line, "\"INCR\",\"", 8) == 0)
            rps = strtod(line + 8, NULL);
    return pclose(p) == 0 ? rps : 0;
}

int flush_bench_raw_incrby(void)
{
    for (size_t i = 0; i < n_keys; i++)
        redisAppendCommand(raw, "INCRBY raw:%s 1", keys[i]);
    int bad = 0;
    for (size_t i = 0; i < n_keys; i++) {
        redisReply *r = NULL;
        if (redisGetReply(raw, (void **)&r) != REDIS_OK || !r)
            return -1;
        bad |= r->type != REDIS_REPLY_INTEGER;
        freeReplyObject(r);
    }
    return bad ? -1 : 0;
}
