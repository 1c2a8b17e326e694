/*
 * The flusher against Redis faults: error replies, delayed, dropped, split and
 * cut replies (injected by the fault proxy, fault_proxy.h, between the
 * flusher and a real redis-server), and real BUSY and OOM refusals. Whatever
 * the fault, while hits go on from several threads:
 *  - tally_flush returns 0 only when every cost hit before the call is in
 *    Redis, and Redis holds no cost that was not hit (checked key by key after
 *    every flush that returned 0);
 *  - it returns TALLY_EIO while batches are refused;
 *  - once the fault is over, Redis holds exactly the cost hit, key by key, and
 *    nothing is pending or lost;
 *  - error replies are counted and their text is kept;
 *  - a batch refused for ever does not make the traffic grow.
 * The proxy itself is tested first.
 */
#include "../test.h"

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#include "fault_proxy.h"
#include "redis_server.h"
#include "engine/engine-internal.h"

#define SEC       UINT64_C(1000000000)
#define HOUR      (3600 * SEC)
#define NKEYS     1600        /* four batches of at most 500 keys per flush */
#define BATCH     500         /* keys per batch, one EXEC (flusher.c) */
#define NTHREADS  3
#define TIMEOUT_MS 500        /* the flusher's command timeout */

static const uint8_t HASH_KEY[16] = "tally-fault-key!";

static const char BUSY[] = "BUSY Redis is busy running a script. You can only call SCRIPT KILL "
                           "or SHUTDOWN NOSAVE.";
static const char OOM[] = "OOM command not allowed when used memory > 'maxmemory'.";
static const char LOADING[] = "LOADING Redis is loading the dataset in memory";
static const char READONLY[] = "READONLY You can't write against a read only replica.";
static const char MOVED[] = "MOVED 1234 127.0.0.1:7000";
static const char CROSSSLOT[] = "CROSSSLOT Keys in request don't hash to the same slot";

/* ---- The proxy on its own ------------------------------------------------- */

static redisContext *connect_port(int port)
{
    struct timeval tv = { 2, 0 };
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    cr_assert(c && !c->err, "connect to %d", port);
    redisSetTimeout(c, tv);
    return c;
}

static redisReply *get_reply(redisContext *c)
{
    redisReply *r = NULL;
    if (redisGetReply(c, (void **)&r) != REDIS_OK)
        return NULL;
    return r;
}

static void expect_status(redisContext *c, int type, const char *text)
{
    redisReply *r = get_reply(c);
    cr_assert_not_null(r, "no reply where \"%s\" was due: %s", text, c->errstr);
    cr_assert_eq(r->type, type, "reply type %d where \"%s\" was due", r->type, text);
    cr_assert_str_eq(r->str, text);
    freeReplyObject(r);
}

Test(faults, proxy_keeps_pipelined_order_around_errors, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r), "redis-server did not start");
    fault_proxy *p = fault_proxy_start(r.port);
    cr_assert_not_null(p);
    /* the 2nd and 4th GET are answered by the proxy, the others by Redis */
    int a = fault_proxy_add(p, &(fault_rule){ .command = "get", .action = FAULT_ERROR, .skip = 1,
                                              .count = 1, .text = "ERR first" });
    int b = fault_proxy_add(p, &(fault_rule){ .command = "GET", .action = FAULT_ERROR, .skip = 3,
                                              .count = 1, .text = "ERR second" });
    cr_assert(a >= 0 && b >= 0);
    redisContext *c = connect_port(p->port);
    redisAppendCommand(c, "SET k v1");
    for (int i = 0; i < 5; i++)
        redisAppendCommand(c, "GET k");
    redisAppendCommand(c, "ECHO last");
    expect_status(c, REDIS_REPLY_STATUS, "OK");
    expect_status(c, REDIS_REPLY_STRING, "v1");
    expect_status(c, REDIS_REPLY_ERROR, "ERR first");
    expect_status(c, REDIS_REPLY_STRING, "v1");
    expect_status(c, REDIS_REPLY_ERROR, "ERR second");
    expect_status(c, REDIS_REPLY_STRING, "v1");
    expect_status(c, REDIS_REPLY_STRING, "last");
    cr_assert_eq(fault_proxy_fired(p, a), 1);
    cr_assert_eq(fault_proxy_fired(p, b), 1);
    cr_assert_eq(fault_proxy_seen(p, "GET").commands, 5);
    cr_assert_eq(fault_proxy_seen(p, "*").commands, 7);

    /* Redis saw only the three GETs the proxy let through */
    redisContext *d = test_redis_connect(&r);
    redisReply *info = redisCommand(d, "INFO commandstats");
    cr_assert(info && info->type == REDIS_REPLY_STRING);
    cr_assert_not_null(strstr(info->str, "cmdstat_get:calls=3,"), "%s", info->str);
    freeReplyObject(info);

    /* an inline command, Redis's own error, a null and nested arrays pass intact */
    fault_proxy_clear(p);
    cr_assert_eq(fault_proxy_fired(p, a), 0, "ids are void after a clear");
    redisReply *x = redisCommand(c, "EVAL %s 0", "return {1, {2, 'two', {3}}, false, 'end'}");
    cr_assert(x && x->type == REDIS_REPLY_ARRAY && x->elements == 4);
    cr_assert_eq(x->element[0]->integer, 1);
    cr_assert(x->element[1]->type == REDIS_REPLY_ARRAY && x->element[1]->elements == 3);
    cr_assert_str_eq(x->element[1]->element[1]->str, "two");
    cr_assert_eq(x->element[1]->element[2]->element[0]->integer, 3);
    cr_assert_eq(x->element[2]->type, REDIS_REPLY_NIL);
    cr_assert_str_eq(x->element[3]->str, "end");
    freeReplyObject(x);
    x = redisCommand(c, "NOSUCHCOMMAND");
    cr_assert(x && x->type == REDIS_REPLY_ERROR && strncmp(x->str, "ERR unknown command", 19) == 0);
    freeReplyObject(x);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)p->port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(write(fd, "PING\r\n", 6), 6);
    char pong[8] = "";
    size_t got = 0;
    while (got < 7) {
        ssize_t n = read(fd, pong + got, 7 - got);
        cr_assert_gt(n, 0);
        got += (size_t)n;
    }
    cr_assert_str_eq(pong, "+PONG\r\n");
    close(fd);
    cr_assert_eq(fault_proxy_seen(p, "PING").commands, 1);
    redisFree(d);
    redisFree(c);
    fault_proxy_stop(p);
    test_redis_stop(&r);
}

/* An EXEC the proxy refuses leaves Redis out of the transaction, which never
   ran; a held command reaches Redis, with all after it, only when the hold
   is over, also when the client has left by then. */
Test(faults, proxy_refuses_an_exec_and_holds_commands, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r), "redis-server did not start");
    fault_proxy *p = fault_proxy_start(r.port);
    cr_assert_not_null(p);
    int a = fault_proxy_add(p, &(fault_rule){ .command = "EXEC", .action = FAULT_ERROR, .count = 1,
                                              .text = "ERR refused" });
    cr_assert_geq(a, 0);
    redisContext *c = connect_port(p->port);
    redisAppendCommand(c, "MULTI");
    redisAppendCommand(c, "INCR t");
    redisAppendCommand(c, "EXEC");
    redisAppendCommand(c, "INCR u");
    expect_status(c, REDIS_REPLY_STATUS, "OK");
    expect_status(c, REDIS_REPLY_STATUS, "QUEUED");
    expect_status(c, REDIS_REPLY_ERROR, "ERR refused");
    redisReply *x = get_reply(c);
    cr_assert(x && x->type == REDIS_REPLY_INTEGER && x->integer == 1, "INCR u ran outside a transaction");
    freeReplyObject(x);
    redisContext *d = test_redis_connect(&r);
    x = redisCommand(d, "EXISTS t");
    cr_assert(x && x->type == REDIS_REPLY_INTEGER && x->integer == 0, "the refused EXEC ran nothing");
    freeReplyObject(x);

    fault_proxy_clear(p);
    int b = fault_proxy_add(p, &(fault_rule){ .command = "INCR", .action = FAULT_HOLD, .count = 1,
                                              .ms = 300 });
    cr_assert_geq(b, 0);
    redisAppendCommand(c, "INCR h");
    redisAppendCommand(c, "INCR h");
    cr_assert_eq(redisBufferWrite(c, &(int){ 0 }), REDIS_OK);
    sleep_ms(100);
    x = redisCommand(d, "EXISTS h");
    cr_assert(x && x->type == REDIS_REPLY_INTEGER && x->integer == 0, "held: nothing reached Redis");
    freeReplyObject(x);
    redisFree(c);                             /* the client leaves during the hold */
    sleep_ms(400);
    x = redisCommand(d, "GET h");
    cr_assert(x && x->type == REDIS_REPLY_STRING && strcmp(x->str, "2") == 0,
              "both INCRs reached Redis after the hold");
    freeReplyObject(x);
    cr_assert_eq(fault_proxy_fired(p, b), 1);
    redisFree(d);
    fault_proxy_stop(p);
    test_redis_stop(&r);
}

static uint64_t elapsed_ms(uint64_t since_ns)
{
    return (tally_now_ns() - since_ns) / 1000000u;
}

Test(faults, proxy_splits_delays_drops_and_cuts_replies, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r), "redis-server did not start");
    fault_proxy *p = fault_proxy_start(r.port);
    cr_assert_not_null(p);
    redisContext *c = connect_port(p->port);
    static char big[20001];
    memset(big, 'x', sizeof(big) - 1);
    big[7777] = 'y';
    redisReply *x = redisCommand(c, "SET big %s", big);
    cr_assert(x && x->type == REDIS_REPLY_STATUS);
    freeReplyObject(x);
    const size_t big_reply = strlen("$20000\r\n") + 20000 + 2;

    /* split: PING, a 20000-byte value and a nested reply, reassembled by hiredis */
    int id = fault_proxy_add(p, &(fault_rule){ .command = "*", .action = FAULT_SPLIT, .count = 3 });
    uint64_t down = fault_proxy_bytes_down(p), pieces = fault_proxy_pieces(p);
    x = redisCommand(c, "PING");
    cr_assert(x && x->type == REDIS_REPLY_STATUS);
    cr_assert_str_eq(x->str, "PONG");
    freeReplyObject(x);
    x = redisCommand(c, "GET big");
    cr_assert(x && x->type == REDIS_REPLY_STRING && x->len == 20000);
    cr_assert_eq(memcmp(x->str, big, 20000), 0);
    freeReplyObject(x);
    x = redisCommand(c, "EVAL %s 0", "return {{1, 'a'}, {}, 'b'}");
    cr_assert(x && x->type == REDIS_REPLY_ARRAY && x->elements == 3);
    cr_assert_eq(x->element[0]->element[0]->integer, 1);
    cr_assert_eq(x->element[1]->elements, 0);
    cr_assert_str_eq(x->element[2]->str, "b");
    freeReplyObject(x);
    cr_assert_eq(fault_proxy_fired(p, id), 3);
    cr_assert_geq(fault_proxy_bytes_down(p) - down, 7 + big_reply);
    cr_assert_geq(fault_proxy_pieces(p) - pieces, (7 + big_reply) / 7, "sent in pieces of 7 bytes at most");
    fault_proxy_clear(p);

    /* delay: the held reply comes first, the one behind it waits */
    id = fault_proxy_add(p, &(fault_rule){ .command = "PING", .action = FAULT_DELAY, .count = 1,
                                           .ms = 300 });
    uint64_t t0 = tally_now_ns();
    redisAppendCommand(c, "PING");
    redisAppendCommand(c, "ECHO behind");
    expect_status(c, REDIS_REPLY_STATUS, "PONG");
    expect_status(c, REDIS_REPLY_STRING, "behind");
    cr_assert_geq(elapsed_ms(t0), 300, "the reply was held");
    cr_assert_eq(fault_proxy_fired(p, id), 1);
    fault_proxy_clear(p);

    /* drop: Redis applies the command, the client gets no reply, the line closes */
    id = fault_proxy_add(p, &(fault_rule){ .command = "SET", .action = FAULT_DROP_REPLY, .count = 1 });
    redisAppendCommand(c, "SET dropped 1");
    redisAppendCommand(c, "ECHO never");
    cr_assert_null(get_reply(c), "a dropped reply ends the connection");
    cr_assert_eq(test_redis_get(&r, "dropped", 7), 1, "Redis applied the dropped command");
    redisFree(c);
    fault_proxy_clear(p);

    /* cut: half the reply, then the connection closes */
    c = connect_port(p->port);
    id = fault_proxy_add(p, &(fault_rule){ .command = "GET", .action = FAULT_CLOSE_MID, .count = 1 });
    down = fault_proxy_bytes_down(p);
    cr_assert_null(redisCommand(c, "GET big"), "a cut reply is no reply");
    cr_assert_eq(fault_proxy_bytes_down(p) - down, big_reply / 2);
    cr_assert_eq(fault_proxy_fired(p, id), 1);
    redisFree(c);
    fault_proxy_clear(p);

    /* and the proxy goes on serving new connections */
    c = connect_port(p->port);
    x = redisCommand(c, "GET dropped");
    cr_assert(x && x->type == REDIS_REPLY_STRING);
    cr_assert_str_eq(x->str, "1");
    freeReplyObject(x);
    cr_assert_eq(fault_proxy_accepted(p), 3);
    cr_assert_gt(fault_proxy_bytes_up(p), 20000);
    redisFree(c);
    fault_proxy_stop(p);
    test_redis_stop(&r);
}

/* ---- The flusher under faults: the scene ----------------------------------- */

typedef struct scene scene;

typedef struct worker_arg {
    scene *s;
    int    t;
} worker_arg;

struct scene {
    test_redis        r;
    fault_proxy      *p;             /* NULL: the flusher talks to Redis itself */
    tally_engine     *e;
    uint32_t          pol;
    const char       *prefix;
    uint64_t          win0;          /* the window the scene started in */
    uint64_t          at;            /* hits at this time; 0: at the time of the hit */
    redisContext     *rc;            /* the test's own line to Redis */
    char            (*names)[128];   /* scratch: the keys' Redis names, for MGET */
    _Atomic uint64_t  started[NKEYS];   /* cost of the hits begun */
    _Atomic uint64_t  done[NKEYS];      /* cost of the hits that returned allowed */
    _Atomic uint64_t  failed_hits;
    _Atomic bool      stop;
    pthread_t         th[NTHREADS];
    worker_arg        args[NTHREADS];
    int               nthreads;
    pthread_t         busy_th;       /* real_busy_script's scripts */
    bool              busy_started;
    _Atomic bool      busy_running;
    int               scripts;
};

/* The scene of the test running: what a failed assertion left is closed by
   the suite's fini, so no thread of one test runs into the next. */
static scene *current;

static scene *scene_open(const char *prefix, const char *const *redis_args)
{
    /* the proxy closes lines the flusher may still write to: such a write must
       fail with EPIPE, as an application using hiredis arranges */
    signal(SIGPIPE, SIG_IGN);
    scene *s = calloc(1, sizeof(*s));
    cr_assert_not_null(s);
    current = s;
    for (int i = 0; redis_args && redis_args[i]; i++)
        s->r.extra[i] = redis_args[i];
    cr_assert(test_redis_start(&s->r), "redis-server did not start");
    s->rc = test_redis_connect(&s->r);
    cr_assert_not_null(s->rc);
    s->names = calloc(NKEYS, sizeof(*s->names));
    cr_assert_not_null(s->names);
    s->prefix = prefix;
    tally_options o;
    tally_options_init(&o);
    o.capacity = 4096;
    memcpy(o.hash_key, HASH_KEY, 16);
    cr_assert_eq(tally_open(&o, &s->e), 0);
    tally_policy pol = { .name = "f", .n_limits = 1, .flags = TALLY_ALIGNED,
                         .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40,
                                       .period_ns = HOUR } } };
    cr_assert_eq(tally_policy_add(s->e, &pol, &s->pol), 0);
    uint64_t now = tally_now_ns();
    s->win0 = now - now % HOUR;
    return s;
}

/* Start the flusher, through the proxy or straight to Redis. It flushes only
   when asked (the interval is longer than any test), so that a rule meets the
   flush the test means it for. */
static void scene_flusher(scene *s, bool proxy)
{
    if (proxy) {
        s->p = fault_proxy_start(s->r.port);
        cr_assert_not_null(s->p);
    }
    tally_redis_options ro = { .host = "127.0.0.1", .port = proxy ? s->p->port : s->r.port,
                               .key_prefix = s->prefix, .command_timeout_ms = TIMEOUT_MS,
                               .connect_timeout_ms = TIMEOUT_MS };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 600000;
    fo.redis = &ro;
    cr_assert_eq(tally_flusher_start(s->e, &fo), 0);
}

static void hit(scene *s, int k, uint64_t cost)
{
    char key[16];
    int len = snprintf(key, sizeof(key), "k%d", k);
    tally_result res;
    atomic_fetch_add(&s->started[k], cost);
    int rc = s->at ? tally_hit_at(s->e, s->pol, key, (size_t)len, &cost, s->at, &res)
                   : tally_hit(s->e, s->pol, key, (size_t)len, &cost, &res);
    if (rc == 0 && res.allowed) {
        atomic_fetch_add(&s->done[k], cost);
    } else {
        atomic_fetch_sub(&s->started[k], cost);
        atomic_fetch_add(&s->failed_hits, 1);
    }
}

static void *worker(void *arg)
{
    worker_arg *w = arg;
    uint64_t x = UINT64_C(0x9e3779b97f4a7c15) * (uint64_t)(w->t + 1);
    for (unsigned i = 0; !atomic_load(&w->s->stop); i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        hit(w->s, (int)(x % NKEYS), 1 + (x >> 32) % 5);
        if (i % 64 == 63)
            sleep_ms(1);                      /* a steady load, not a flood */
    }
    return NULL;
}

static void scene_workers(scene *s, int n)
{
    atomic_store(&s->stop, false);
    for (int t = 0; t < n; t++) {
        s->args[t] = (worker_arg){ s, t };
        cr_assert_eq(pthread_create(&s->th[t], NULL, worker, &s->args[t]), 0);
        s->nthreads = t + 1;
    }
}

static void scene_stop_workers(scene *s)
{
    atomic_store(&s->stop, true);
    for (int t = 0; t < s->nthreads; t++)
        pthread_join(s->th[t], NULL);
    s->nthreads = 0;
}

/* Every key once: the next flush has more than three batches. */
static void sweep(scene *s)
{
    for (int k = 0; k < NKEYS; k++)
        hit(s, k, 1 + (uint64_t)(k % 3));
}

/* Each key's total in Redis, summed over the windows since the scene began. */
static void redis_totals(scene *s, uint64_t *got)
{
    static const char *argv[NKEYS + 1];
    static size_t argl[NKEYS + 1];
    memset(got, 0, NKEYS * sizeof(*got));
    uint64_t now = tally_now_ns();
    for (uint64_t w = s->win0; w <= now - now % HOUR; w += HOUR) {
        argv[0] = "MGET";
        argl[0] = 4;
        for (int k = 0; k < NKEYS; k++) {
            char key[16];
            int len = snprintf(key, sizeof(key), "k%d", k);
            tally__digest d = tally__key_digest(s->e, key, (size_t)len);
            argl[k + 1] = (size_t)snprintf(s->names[k], sizeof(s->names[k]),
                                           "%s%s:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64, s->prefix,
                                           "f", s->e->hasher.kind == TALLY_HASH_AES ? "a1" : "s1",
                                           d.hi & TALLY__DIGEST_HI_MASK, d.lo, w);
            argv[k + 1] = s->names[k];
        }
        redisReply *rep = NULL;
        /* a script Redis is busy with refuses reads too: wait for it */
        for (int tries = 0; tries < 1000; tries++) {
            rep = redisCommandArgv(s->rc, NKEYS + 1, argv, argl);
            cr_assert_not_null(rep, "MGET: %s", s->rc->errstr);
            if (rep->type != REDIS_REPLY_ERROR || strncmp(rep->str, "BUSY", 4) != 0)
                break;
            freeReplyObject(rep);
            rep = NULL;
            sleep_ms(10);
        }
        cr_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == NKEYS,
                  "MGET: %s", rep && rep->type == REDIS_REPLY_ERROR ? rep->str : "no array");
        for (int k = 0; k < NKEYS; k++)
            if (rep->element[k]->type == REDIS_REPLY_STRING)
                got[k] += strtoull(rep->element[k]->str, NULL, 10);
        freeReplyObject(rep);
    }
}

/* tally_flush, and when it returns 0: every cost hit before the call is in
   Redis, and nothing that was not hit. */
static int flush_checked(scene *s)
{
    static uint64_t before[NKEYS], got[NKEYS];
    for (int k = 0; k < NKEYS; k++)
        before[k] = atomic_load(&s->done[k]);
    int rc = tally_flush(s->e, 10000);
    cr_assert(rc == 0 || rc == TALLY_EIO, "tally_flush: %s", tally_strerror(rc));
    if (rc)
        return rc;
    redis_totals(s, got);
    tally_stats st;
    tally_stats_read(s->e, &st);
    for (int k = 0; k < NKEYS; k++) {
        uint64_t begun = atomic_load(&s->started[k]);
        cr_assert(got[k] >= before[k] && got[k] <= begun,
                  "tally_flush returned 0 but key k%d has %" PRIu64 " in Redis: %" PRIu64
                  " hit before the flush, %" PRIu64 " begun since (pending cost %" PRIu64 ")",
                  k, got[k], before[k], begun, st.pending_cost);
    }
    return 0;
}

static int flush_until_ok(scene *s, int tries)
{
    int rc = -1;
    for (int i = 0; i < tries && rc != 0; i++) {
        rc = flush_checked(s);
        if (rc)
            sleep_ms(50);
    }
    return rc;
}

/* The load is over: Redis holds exactly the cost hit, key by key, and nothing
   is pending or lost. */
static tally_stats scene_finish(scene *s)
{
    static uint64_t got[NKEYS];
    scene_stop_workers(s);
    cr_assert_eq(flush_until_ok(s, 100), 0, "the flusher never caught up after the fault");
    redis_totals(s, got);
    for (int k = 0; k < NKEYS; k++)
        cr_assert_eq(got[k], atomic_load(&s->done[k]), "key k%d: Redis %" PRIu64 ", hit %" PRIu64,
                     k, got[k], atomic_load(&s->done[k]));
    cr_assert_eq(atomic_load(&s->failed_hits), 0, "every hit was counted and allowed");
    tally_stats st;
    cr_assert_eq(tally_stats_read(s->e, &st), 0);
    cr_assert_eq(st.pending_cost, 0);
    cr_assert_eq(st.pending_deltas, 0);
    cr_assert_eq(st.lost_cost, 0);
    return st;
}

/* The text of the sink's last error, and its length. */
static int last_error(scene *s, char *buf, size_t len)
{
    buf[0] = 0;
    return tally_flusher_last_error(s->e, buf, len);
}

/* Error replies: counted, told apart, their text kept as Redis wrote it. */
static void expect_error_reported(scene *s, const tally_stats *st, const char *text, bool permanent)
{
    char buf[512];
    cr_assert_gt(st->redis_errors, 0, "error replies are counted");
    if (permanent)
        cr_assert_gt(st->redis_permanent_errors, 0, "\"%s\" is permanent", text);
    else
        cr_assert_eq(st->redis_permanent_errors, 0, "\"%s\" is not permanent", text);
    int n = last_error(s, buf, sizeof(buf));
    size_t cmp = strlen(text) < 48 ? strlen(text) : 48;
    cr_assert_geq(n, (int)cmp, "last error \"%s\"", buf);
    cr_assert_eq(strncmp(buf, text, cmp), 0, "last error \"%s\", injected \"%s\"", buf, text);
}

static void scene_close(scene *s)
{
    scene_stop_workers(s);
    if (s->busy_started)
        pthread_join(s->busy_th, NULL);
    current = NULL;
    tally_close(s->e);
    fault_proxy_stop(s->p);
    redisFree(s->rc);
    test_redis_stop(&s->r);
    free(s->names);
    free(s);
}

static void close_current(void)
{
    if (current)
        scene_close(current);
}

TestSuite(faults, .fini = close_current);

/* ---- One fault through the proxy ------------------------------------------ */

enum expect { EXPECT_FAIL_ALL, EXPECT_FAIL_FIRST, EXPECT_OK_ALL };

typedef struct fault_case {
    const char  *prefix;
    fault_rule   rules[2];
    int          flushes;       /* flushes while the rules are on */
    enum expect  expect;
    const char  *error_text;    /* an error reply: its text; NULL: a fault of the line */
    bool         permanent;
} fault_case;

static void run_case(const fault_case *c)
{
    scene *s = scene_open(c->prefix, NULL);
    scene_flusher(s, true);
    scene_workers(s, NTHREADS);
    sleep_ms(20);
    cr_assert_eq(flush_checked(s), 0, "a flush before the fault");

    int ids[2] = { -1, -1 }, n_rules = 0;
    for (; n_rules < 2 && c->rules[n_rules].command; n_rules++) {
        ids[n_rules] = fault_proxy_add(s->p, &c->rules[n_rules]);
        cr_assert_geq(ids[n_rules], 0);
    }
    for (int i = 0; i < c->flushes; i++) {
        sweep(s);
        uint64_t evals = fault_proxy_seen(s->p, "EXEC").commands;
        int rc = flush_checked(s);
        evals = fault_proxy_seen(s->p, "EXEC").commands - evals;
        if (c->expect == EXPECT_FAIL_ALL || (c->expect == EXPECT_FAIL_FIRST && i == 0))
            cr_assert_eq(rc, TALLY_EIO, "flush %d under the fault returned %d", i, rc);
        if (c->expect == EXPECT_OK_ALL)
            cr_assert_eq(rc, 0, "flush %d under the fault failed", i);
        if (c->expect == EXPECT_FAIL_FIRST && i == 0)
            cr_assert_geq(evals, 3, "the refused batch was one of a pipeline of several");
    }
    for (int i = 0; i < n_rules; i++)
        cr_assert_gt(fault_proxy_fired(s->p, ids[i]), 0, "rule %d never met a command", i);
    fault_proxy_clear(s->p);

    sweep(s);
    cr_assert_eq(flush_until_ok(s, 100), 0, "the flusher never recovered");
    sleep_ms(20);                             /* and some load after it */
    tally_stats st = scene_finish(s);
    char buf[512];
    if (c->error_text) {
        expect_error_reported(s, &st, c->error_text, c->permanent);
    } else if (c->expect == EXPECT_OK_ALL) {
        cr_assert_eq(st.redis_errors, 0);
        cr_assert_eq(st.flush_failures, 0);
        cr_assert_eq(last_error(s, buf, sizeof(buf)), 0, "no error, yet \"%s\"", buf);
    } else {
        cr_assert_eq(st.redis_errors, 0, "a lost line is no error reply");
        cr_assert_gt(last_error(s, buf, sizeof(buf)), 0, "the connection error is kept");
    }
    scene_close(s);
}

#define ERROR_CASE(prefix_, command_, text_, permanent_)                                      \
    run_case(&(fault_case){ .prefix = prefix_, .flushes = 3, .expect = EXPECT_FAIL_ALL,     \
                            .error_text = text_, .permanent = permanent_,                  \
                            .rules = { { .command = command_, .action = FAULT_ERROR,        \
                                         .count = -1, .text = text_ } } })

Test(faults, busy_replies, .timeout = 120)
{
    ERROR_CASE("busy:", "EXEC", BUSY, false);
}

Test(faults, oom_replies, .timeout = 120)
{
    ERROR_CASE("oom:", "EXEC", OOM, false);
}

Test(faults, loading_replies_to_every_command, .timeout = 120)
{
    ERROR_CASE("loading:", "*", LOADING, false);
}

Test(faults, readonly_replies, .timeout = 120)
{
    ERROR_CASE("readonly:", "EXEC", READONLY, false);
}

Test(faults, moved_replies, .timeout = 120)
{
    ERROR_CASE("moved:", "EXEC", MOVED, true);
}

Test(faults, crossslot_replies, .timeout = 120)
{
    ERROR_CASE("crossslot:", "EXEC", CROSSSLOT, true);
}

Test(faults, second_batch_of_a_pipeline_refused, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "second:", .flushes = 3, .expect = EXPECT_FAIL_FIRST,
                            .error_text = BUSY,
                            .rules = { { .command = "EXEC", .action = FAULT_ERROR, .skip = 1,
                                         .count = 1, .text = BUSY } } });
}

Test(faults, second_and_fourth_batches_of_a_pipeline_refused, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "two:", .flushes = 3, .expect = EXPECT_FAIL_FIRST,
                            .error_text = OOM,
                            .rules = { { .command = "EXEC", .action = FAULT_ERROR, .skip = 1,
                                         .count = 1, .text = LOADING },
                                       { .command = "EXEC", .action = FAULT_ERROR, .skip = 3,
                                         .count = 1, .text = OOM } } });
}

Test(faults, replies_delayed_within_the_timeout, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "slow:", .flushes = 3, .expect = EXPECT_OK_ALL,
                            .rules = { { .command = "EXEC", .action = FAULT_DELAY, .count = -1,
                                         .ms = TIMEOUT_MS / 5 } } });
}

Test(faults, replies_delayed_past_the_timeout, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "late:", .flushes = 3, .expect = EXPECT_FAIL_ALL,
                            .rules = { { .command = "EXEC", .action = FAULT_DELAY, .count = -1,
                                         .ms = TIMEOUT_MS * 2 } } });
}

Test(faults, replies_lost_after_redis_applied_the_batch, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "drop:", .flushes = 3, .expect = EXPECT_FAIL_ALL,
                            .rules = { { .command = "EXEC", .action = FAULT_DROP_REPLY,
                                         .count = -1 } } });
}

/* A batch whose reply was lost may have run: when its resend is refused
   (LOADING: Redis restarting), it must keep its token, not go out again
   under a new one and be applied twice. */
Test(faults, refused_resend_of_a_batch_whose_reply_was_lost, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "resend:", .flushes = 3, .expect = EXPECT_FAIL_ALL,
                            .error_text = LOADING, .permanent = false,
                            .rules = { { .command = "EXEC", .action = FAULT_DROP_REPLY, .count = 1 },
                                       { .command = "EXEC", .action = FAULT_ERROR, .count = -1,
                                         .text = LOADING } } });
}

/* Each batch carries a sequence number that the engine's record in Redis
   checks (sync/redis.c, guarantee 3). A batch whose reply was lost (the 4th
   of the first flush: Redis ran it) and whose resend was then refused
   (LOADING), sent again after the later batches 5..8 ran: the record must
   tell that it ran, below its highest number, or it is applied twice. */
Test(faults, reply_lost_then_resent_after_later_batches_ran, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "below:", .flushes = 3, .expect = EXPECT_FAIL_FIRST,
                            .error_text = LOADING, .permanent = false,
                            .rules = { { .command = "EXEC", .action = FAULT_DROP_REPLY, .skip = 3,
                                         .count = 1 },
                                       { .command = "EXEC", .action = FAULT_ERROR, .skip = 4,
                                         .count = 1, .text = LOADING } } });
}

/* The other way round: the 2nd batch of the first flush never ran (an
   unexpected error, so its outcome is unknown to the flusher) while the 3rd
   and 4th did. Its resend is below the record's highest number and must
   still be applied, or its cost is lost. */
Test(faults, unknown_batch_that_never_ran_applied_after_later_batches, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "gap:", .flushes = 3, .expect = EXPECT_FAIL_FIRST,
                            .error_text = "ERR injected", .permanent = true,
                            .rules = { { .command = "EXEC", .action = FAULT_ERROR, .skip = 1,
                                         .count = 1, .text = "ERR injected" } } });
}

Test(faults, replies_in_pieces, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "split:", .flushes = 2, .expect = EXPECT_OK_ALL,
                            .rules = { { .command = "*", .action = FAULT_SPLIT, .count = -1 } } });
}

Test(faults, replies_cut_in_the_middle, .timeout = 120)
{
    run_case(&(fault_case){ .prefix = "cut:", .flushes = 3, .expect = EXPECT_FAIL_ALL,
                            .rules = { { .command = "EXEC", .action = FAULT_CLOSE_MID,
                                         .count = -1 } } });
}

/* ---- A batch refused for ever --------------------------------------------- */

#define ROUNDS      10
#define ROUND_KEYS  1000

Test(faults, refused_batches_do_not_make_traffic_grow, .timeout = 120)
{
    scene *s = scene_open("bounded:", NULL);
    s->at = tally_now_ns();                   /* one window, even across an hour's end */
    scene_flusher(s, true);
    int id = fault_proxy_add(s->p, &(fault_rule){ .command = "EXEC", .action = FAULT_ERROR,
                                                  .count = -1, .text = CROSSSLOT });
    cr_assert_geq(id, 0);
    uint64_t evals[ROUNDS], bytes[ROUNDS];
    /* the same keys every round, one window: what is pending never exceeds
       ROUND_KEYS (key, window) pairs, however often it was refused */
    const uint64_t bound = (ROUND_KEYS + BATCH - 1) / BATCH + 2;
    for (int r = 0; r < ROUNDS; r++) {
        for (int k = 0; k < ROUND_KEYS; k++)
            hit(s, k, 1);
        fault_proxy_count e0 = fault_proxy_seen(s->p, "EXEC"), a0 = fault_proxy_seen(s->p, "*");
        cr_assert_eq(tally_flush(s->e, 10000), TALLY_EIO, "round %d: every batch is refused", r);
        evals[r] = fault_proxy_seen(s->p, "EXEC").commands - e0.commands;
        bytes[r] = fault_proxy_seen(s->p, "*").bytes - a0.bytes;
        fprintf(stderr, "round %d: %" PRIu64 " scripts, %" PRIu64 " bytes\n", r, evals[r], bytes[r]);
        cr_assert_leq(evals[r], bound, "round %d: %" PRIu64 " scripts for %d pending keys", r,
                      evals[r], ROUND_KEYS);
        if (r > 0)
            cr_assert_leq(bytes[r], bytes[0] + bytes[0] / 4 + 1024,
                          "round %d sent %" PRIu64 " bytes, the first %" PRIu64, r, bytes[r], bytes[0]);
        tally_stats st;
        tally_stats_read(s->e, &st);
        cr_assert_eq(st.pending_cost, (uint64_t)(r + 1) * ROUND_KEYS, "round %d", r);
        cr_assert_eq(st.pending_deltas, ROUND_KEYS, "round %d: pending deltas merged per key", r);
    }
    cr_assert_gt(evals[0], 0, "the first flush tried");
    cr_assert_gt(fault_proxy_fired(s->p, id), 0);
    fault_proxy_clear(s->p);
    tally_stats st = scene_finish(s);
    for (int k = 0; k < ROUND_KEYS; k++)
        cr_assert_eq(atomic_load(&s->done[k]), ROUNDS);
    expect_error_reported(s, &st, CROSSSLOT, true);
    scene_close(s);
}

/* ---- Real refusals, no proxy ---------------------------------------------- */

/* Busy for about 300 ms (TIME, not a loop count: the same on any machine). */
static const char SLOW_SCRIPT[] =
    "local t = redis.call('TIME') local t0 = t[1] * 1000000 + t[2] "
    "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - t0 >= 300000 return 1";

static void *run_slow_scripts(void *arg)
{
    scene *s = arg;
    redisContext *c = test_redis_connect(&s->r);
    struct timeval tv = { 5, 0 };
    if (c) {
        redisSetTimeout(c, tv);
        uint64_t end = tally_now_ns() + 2 * SEC;
        while (tally_now_ns() < end) {
            redisReply *r = redisCommand(c, "EVAL %s 0", SLOW_SCRIPT);
            if (r && r->type == REDIS_REPLY_INTEGER)
                s->scripts++;
            if (r)
                freeReplyObject(r);
            else
                break;
        }
        redisFree(c);
    }
    atomic_store(&s->busy_running, false);
    return NULL;
}

Test(faults, real_busy_script, .timeout = 120)
{
    static const char *const args[] = { "--busy-reply-threshold", "1", NULL };
    scene *s = scene_open("realbusy:", args);
    scene_flusher(s, false);
    scene_workers(s, NTHREADS);
    sleep_ms(20);
    cr_assert_eq(flush_checked(s), 0, "a flush before the scripts");
    atomic_store(&s->busy_running, true);
    cr_assert_eq(pthread_create(&s->busy_th, NULL, run_slow_scripts, s), 0);
    s->busy_started = true;
    int refused = 0, flushes = 0;
    sleep_ms(50);
    while (atomic_load(&s->busy_running)) {
        refused += flush_checked(s) != 0;
        flushes++;
        sleep_ms(30);
    }
    pthread_join(s->busy_th, NULL);
    s->busy_started = false;
    fprintf(stderr, "busy: %d scripts, %d of %d flushes refused\n", s->scripts, refused, flushes);
    cr_assert_geq(s->scripts, 3, "the scripts ran");
    cr_assert_gt(refused, 0, "a busy Redis refused flushes");
    tally_stats st = scene_finish(s);
    expect_error_reported(s, &st, BUSY, false);
    scene_close(s);
}

static void config_set(scene *s, const char *name, const char *value)
{
    redisReply *r = redisCommand(s->rc, "CONFIG SET %s %s", name, value);
    cr_assert(r && r->type == REDIS_REPLY_STATUS, "CONFIG SET %s %s", name, value);
    freeReplyObject(r);
}

Test(faults, real_out_of_memory, .timeout = 120)
{
    scene *s = scene_open("realoom:", NULL);
    scene_flusher(s, false);
    scene_workers(s, NTHREADS);
    sleep_ms(20);
    cr_assert_eq(flush_checked(s), 0, "a flush before the limit");
    config_set(s, "maxmemory-policy", "noeviction");
    config_set(s, "maxmemory", "1");
    for (int i = 0; i < 3; i++) {
        sweep(s);
        cr_assert_eq(flush_checked(s), TALLY_EIO, "flush %d: Redis refuses every write", i);
    }
    config_set(s, "maxmemory", "0");
    sweep(s);
    cr_assert_eq(flush_until_ok(s, 100), 0, "the flusher never recovered");
    tally_stats st = scene_finish(s);
    expect_error_reported(s, &st, OOM, false);
    scene_close(s);
}

/* ---- What a batch refused before it ran still tells ------------------------ */

static tally_engine *open_shared(uint32_t *pol)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 64;
    memcpy(o.hash_key, HASH_KEY, 16);
    tally_engine *e;
    cr_assert_eq(tally_open(&o, &e), 0);
    tally_policy p = { .name = "shared", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = HOUR } } };
    cr_assert_eq(tally_policy_add(e, &p, pol), 0);
    return e;
}

static void start_direct(tally_engine *e, const test_redis *r)
{
    tally_redis_options ro = { .host = "127.0.0.1", .port = r->port, .key_prefix = "refusedview:",
                               .command_timeout_ms = TIMEOUT_MS, .connect_timeout_ms = TIMEOUT_MS };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 600000;
    fo.redis = &ro;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
}

/* A redis-server, and two engines of one hash key pushing to it directly. */
static void two_direct_engines(test_redis *r, tally_engine **a, uint32_t *pa, tally_engine **b,
                               uint32_t *pb)
{
    cr_assert(test_redis_start(r), "redis-server did not start");
    *a = open_shared(pa);
    *b = open_shared(pb);
    start_direct(*a, r);
    start_direct(*b, r);
}

/* A key whose batch Redis refuses (out of memory: writes refused, reads
   served) gets no total from the batch's reply; the flush reads its global
   count back all the same, so the engine decides under the other engine's
   cost, as for a key it did not push. */
Test(faults, a_refused_batch_still_reads_the_others_count_back, .timeout = 60)
{
    test_redis r = { 0 };
    uint32_t pa, pb;
    tally_engine *a, *b;
    two_direct_engines(&r, &a, &pa, &b, &pb);
    tally_result res;
    for (int i = 0; i < 90; i++) {
        cr_assert_eq(tally_hit(b, pb, "k", 1, NULL, &res), 0);
        cr_assert(res.allowed);
    }
    cr_assert_eq(tally_flush(b, 3000), 0);

    redisContext *c = test_redis_connect(&r);
    cr_assert_not_null(c);
    redisReply *x = redisCommand(c, "CONFIG SET maxmemory-policy noeviction");
    freeReplyObject(x);
    x = redisCommand(c, "CONFIG SET maxmemory 1");
    freeReplyObject(x);
    cr_assert_eq(tally_hit(a, pa, "k", 1, NULL, &res), 0);
    cr_assert(res.allowed, "A has not heard of B's count yet");
    cr_assert_eq(tally_flush(a, 3000), TALLY_EIO, "A's batch is refused");
    int allowed = 0;
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(tally_hit(a, pa, "k", 1, NULL, &res), 0);
        allowed += res.allowed;
    }
    fprintf(stderr, "after a refused flush: %d of 20 allowed (90 by B, 1 by A, max 100)\n", allowed);
    cr_assert_eq(allowed, 9, "the refused flush did not read B's 90 back");

    x = redisCommand(c, "CONFIG SET maxmemory 0");
    freeReplyObject(x);
    cr_assert_eq(tally_flush(a, 3000), 0);
    uint64_t now = tally_now_ns();
    x = redisCommand(c, "KEYS refusedview:shared:0:*:%" PRIu64, now - now % HOUR);
    cr_assert(x && x->type == REDIS_REPLY_ARRAY && x->elements == 1);
    redisReply *v = redisCommand(c, "GET %s", x->element[0]->str);
    cr_assert(v && v->type == REDIS_REPLY_STRING);
    cr_assert_eq(strtoull(v->str, NULL, 10), 100, "90 by B and 10 by A, each once");
    freeReplyObject(v);
    freeReplyObject(x);
    redisFree(c);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* The PTTL of @key's count in the current window: between the window's
   remaining time and that plus the flusher's 60 s of slack. */
static void expect_count_ttl(redisContext *c, const char *key)
{
    uint64_t now = tally_now_ns(), win = now - now % HOUR;
    redisReply *names = redisCommand(c, "KEYS refusedview:shared:0:*:%" PRIu64, win);
    cr_assert(names && names->type == REDIS_REPLY_ARRAY);
    tally__hasher h;
    cr_assert_eq(tally__hasher_init(&h, TALLY_HASH_AUTO, HASH_KEY), 0);
    tally__digest d = tally__hasher_digest(&h, key, strlen(key));
    char hex[40];
    snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, d.hi & TALLY__DIGEST_HI_MASK, d.lo);
    const char *name = NULL;
    for (size_t i = 0; i < names->elements; i++)
        if (strstr(names->element[i]->str, hex))
            name = names->element[i]->str;
    cr_assert_not_null(name, "no count of %s in Redis", key);
    redisReply *t = redisCommand(c, "PTTL %s", name);
    cr_assert(t && t->type == REDIS_REPLY_INTEGER);
    long long left_ms = (long long)((win + HOUR - tally_now_ns()) / 1000000);
    cr_assert(t->integer >= left_ms && t->integer <= left_ms + 61000,
              "%s: PTTL %lld, the window has %lld ms to run", key, t->integer, left_ms);
    freeReplyObject(t);
    freeReplyObject(names);
}

/* A count gets its TTL from the INCRBY that creates it, whichever engine and
   delta that is; increments of a count that exists keep it; a count that
   went away (expired, deleted) gets one again when it is created again. */
Test(faults, every_count_gets_its_ttl_from_the_increment_that_creates_it, .timeout = 60)
{
    test_redis r = { 0 };
    uint32_t pa, pb;
    tally_engine *a, *b;
    two_direct_engines(&r, &a, &pa, &b, &pb);
    tally_result res;
    cr_assert_eq(tally_hit(a, pa, "k1", 2, NULL, &res), 0);
    cr_assert_eq(tally_flush(a, 3000), 0);
    cr_assert_eq(tally_hit(b, pb, "k1", 2, NULL, &res), 0);
    uint64_t three = 3;
    cr_assert_eq(tally_hit(b, pb, "k2", 2, &three, &res), 0);
    cr_assert_eq(tally_flush(b, 3000), 0);
    redisContext *c = test_redis_connect(&r);
    cr_assert_not_null(c);
    expect_count_ttl(c, "k1");
    expect_count_ttl(c, "k2");

    redisReply *x = redisCommand(c, "KEYS refusedview:shared:0:*");
    cr_assert(x && x->type == REDIS_REPLY_ARRAY && x->elements == 2);
    for (size_t i = 0; i < x->elements; i++) {
        redisReply *y = redisCommand(c, "DEL %s", x->element[i]->str);
        freeReplyObject(y);
    }
    freeReplyObject(x);
    cr_assert_eq(tally_hit(a, pa, "k1", 2, &three, &res), 0);
    cr_assert_eq(tally_hit(a, pa, "k2", 2, NULL, &res), 0);
    cr_assert_eq(tally_flush(a, 3000), 0);
    expect_count_ttl(c, "k1");
    expect_count_ttl(c, "k2");
    redisFree(c);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* ---- A first send that reaches Redis late --------------------------------- */

/* Every count of the scene's current window that Redis holds has a TTL. */
static void expect_scene_ttls(scene *s)
{
    uint64_t now = tally_now_ns(), w = now - now % HOUR;
    int with = 0;
    for (int k = 0; k < NKEYS; k++) {
        char key[16];
        int len = snprintf(key, sizeof(key), "k%d", k);
        tally__digest d = tally__key_digest(s->e, key, (size_t)len);
        redisAppendCommand(s->rc, "PTTL %s%s:0:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64, s->prefix, "f",
                           s->e->hasher.kind == TALLY_HASH_AES ? "a1" : "s1", d.hi & TALLY__DIGEST_HI_MASK,
                           d.lo, w);
    }
    for (int k = 0; k < NKEYS; k++) {
        redisReply *t = get_reply(s->rc);
        cr_assert(t && t->type == REDIS_REPLY_INTEGER, "PTTL of k%d", k);
        cr_assert_neq(t->integer, -1, "k%d: a count without a TTL", k);
        with += t->integer > 0;
        freeReplyObject(t);
    }
    cr_assert_gt(with, 0, "no count in the window at all");
}

/* The first send of a batch (its EXEC and all after it) reaches Redis only
   after the flusher's command timeout: the flusher cannot know whether it
   ran. Once it arrives before the resend (the resend must find that it ran,
   from the record, and not apply it again); once it is still held when the
   resend goes out on a new connection, and arrives after it (the resend must
   make sure it never runs). Either way Redis holds each cost once, key by
   key, and every count has its TTL. */
Test(faults, a_first_send_held_past_the_timeout_is_applied_once, .timeout = 120)
{
    scene *s = scene_open("held:", NULL);
    scene_flusher(s, true);
    scene_workers(s, NTHREADS);
    sleep_ms(20);
    cr_assert_eq(flush_checked(s), 0, "a flush before the fault");

    /* held 800 ms, let go before the resend */
    sweep(s);
    int id = fault_proxy_add(s->p, &(fault_rule){ .command = "EXEC", .action = FAULT_HOLD, .count = 1,
                                                  .ms = TIMEOUT_MS + 300 });
    cr_assert_geq(id, 0);
    cr_assert_eq(flush_checked(s), TALLY_EIO, "the held batch timed out");
    cr_assert_eq(fault_proxy_fired(s->p, id), 1);
    sleep_ms(600);
    cr_assert_eq(flush_until_ok(s, 100), 0, "the resend after the held send arrived");

    /* held 4 s: the resend goes out while it is still held */
    fault_proxy_clear(s->p);
    sweep(s);
    uint64_t accepted = fault_proxy_accepted(s->p);
    id = fault_proxy_add(s->p, &(fault_rule){ .command = "EXEC", .action = FAULT_HOLD, .count = 1,
                                              .ms = 4000 });
    cr_assert_geq(id, 0);
    uint64_t t0 = tally_now_ns();
    cr_assert_eq(flush_checked(s), TALLY_EIO, "the held batch timed out");
    cr_assert_eq(fault_proxy_fired(s->p, id), 1);
    cr_assert_eq(flush_until_ok(s, 100), 0, "the resend while the first send is held");
    cr_assert_gt(fault_proxy_accepted(s->p), accepted, "the resend went on a new connection");
    uint64_t resent_ms = (tally_now_ns() - t0) / 1000000;
    cr_assert_lt(resent_ms, 4000, "the resend came before the hold ended");
    sleep_ms((unsigned)(4300 - resent_ms));   /* the hold is over, what it held had its chance */
    fault_proxy_clear(s->p);
    scene_finish(s);
    expect_scene_ttls(s);
    scene_close(s);
}

/* A count gets a TTL from the flush that creates it, whenever that is: keys
   deleted from Redis between flushes of one window are created again by an
   engine that had counted them already, while hits go on. After every flush
   that returned 0, no count of the window is without a TTL. */
Test(faults, a_count_deleted_and_created_again_always_gets_a_ttl, .timeout = 120)
{
    scene *s = scene_open("ttl:", NULL);
    s->at = tally_now_ns();                   /* one window, even across an hour's end */
    scene_flusher(s, false);
    sweep(s);
    cr_assert_eq(flush_checked(s), 0);
    expect_scene_ttls(s);
    for (int round = 0; round < 4; round++) {
        redisReply *x = redisCommand(s->rc, "KEYS ttl:f:*");
        cr_assert(x && x->type == REDIS_REPLY_ARRAY && x->elements > 0);
        /* half of them, a different half each round */
        for (size_t i = (size_t)round % 2; i < x->elements; i += 2)
            redisAppendCommand(s->rc, "DEL %s", x->element[i]->str);
        for (size_t i = (size_t)round % 2; i < x->elements; i += 2) {
            redisReply *y = get_reply(s->rc);
            cr_assert(y && y->type == REDIS_REPLY_INTEGER && y->integer == 1);
            freeReplyObject(y);
        }
        freeReplyObject(x);
        sweep(s);
        cr_assert_eq(tally_flush(s->e, 10000), 0, "round %d", round);
        expect_scene_ttls(s);
    }
    scene_close(s);
}
