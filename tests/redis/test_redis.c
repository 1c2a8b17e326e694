/*
 * The flusher against a real redis-server: exact totals key by key, faults
 * (paused, killed and restarted, refusing writes), two engines sharing one
 * limit, events once per window across engines, prefetches of keys new to
 * an engine, and bad options.
 */
#include "../test.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>

#include "redis_server.h"
#include "shared_limit.h"
#include "engine/engine-internal.h"

#define SEC  UINT64_C(1000000000)
#define HOUR (3600 * SEC)

static const uint8_t HASH_KEY[16] = "tally-test-key!!";

static tally_engine *open_engine(size_t capacity)
{
    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = capacity;
    memcpy(o.hash_key, HASH_KEY, 16);
    cr_assert_eq(tally_open(&o, &e), 0);
    return e;
}

static uint32_t add_fixed(tally_engine *e, const char *name, uint64_t max)
{
    tally_policy p = { .name = name, .n_limits = 2, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = max, .period_ns = HOUR },
                                   { .algo = TALLY_CALENDAR_WINDOW, .max = UINT64_C(1) << 60,
                                     .unit = TALLY_DAY } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

static int start_flusher(tally_engine *e, const test_redis *r, const char *prefix,
                         const char *password, uint32_t interval_ms)
{
    tally_redis_options ro = { .host = "127.0.0.1", .port = r->port, .key_prefix = prefix,
                               .password = password, .command_timeout_ms = 500,
                               .connect_timeout_ms = 500 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = interval_ms;
    fo.redis = &ro;
    return tally_flusher_start(e, &fo);
}

/* The tag of a hash in Redis key names. */
static const char *hash_tag(tally_hash h)
{
    return h == TALLY_HASH_AES ? "a1" : h == TALLY_HASH_SIPHASH ? "s1" : "?";
}

/* The Redis key of (policy, limit, key, window), as the flusher of an engine
   opened with HASH_KEY and @hash names it. */
static int key_name_with(char *buf, size_t len, tally_hash hash, const char *prefix,
                         const char *policy, unsigned limit, const char *key, uint64_t win)
{
    tally__hasher h;
    cr_assert_eq(tally__hasher_init(&h, hash, HASH_KEY), 0);
    tally__digest d = tally__hasher_digest(&h, key, strlen(key));
    return snprintf(buf, len, "%s%s:%u:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64, prefix, policy,
                    limit, hash_tag(h.kind), d.hi & TALLY__DIGEST_HI_MASK, d.lo, win);
}

/* The same for open_engine(): the default hash. */
static int key_name(char *buf, size_t len, const char *prefix, const char *policy, unsigned limit,
                    const char *key, uint64_t win)
{
    return key_name_with(buf, len, TALLY_HASH_AUTO, prefix, policy, limit, key, win);
}

static int flush_until_ok(tally_engine *e, int tries)
{
    int rc = -1;
    for (int i = 0; i < tries && rc != 0; i++) {
        rc = tally_flush(e, 3000);
        if (rc)
            sleep_ms(100);
    }
    return rc;
}

/* ---- Exact totals under load --------------------------------------------- */

#define KEYS    300
#define THREADS 4
#define HITS    30000

struct load {
    tally_engine      *e;
    uint32_t           policy;
    int                t;
    _Atomic uint64_t  *cost;        /* per key: cost consumed (allowed hits) */
    _Atomic uint64_t   worst_ns;
};

static _Atomic bool load_stop;     /* set by a fault scenario when it is over */
static _Atomic bool load_forever;  /* run until load_stop rather than HITS */

static void *load_worker(void *arg)
{
    struct load *l = arg;
    char key[32];
    for (int i = 0; (i < HITS || atomic_load(&load_forever)) && !atomic_load(&load_stop); i++) {
        int k = (i * 7 + l->t * 13) % KEYS;
        uint64_t costs[2] = { 1 + (uint64_t)(i % 4), 10 };
        tally_result r;
        snprintf(key, sizeof(key), "user-%d", k);
        uint64_t t0 = tally_now_ns();
        int rc = tally_hit(l->e, l->policy, key, strlen(key), costs, &r);
        uint64_t dt = tally_now_ns() - t0;
        uint64_t w = atomic_load(&l->worst_ns);
        while (dt > w && !atomic_compare_exchange_weak(&l->worst_ns, &w, dt))
            ;
        if (rc == 0 && r.allowed)
            atomic_fetch_add(&l->cost[k], costs[0]);
        if (atomic_load(&load_forever))
            sleep_ms(1);                      /* a steady load across the fault */
    }
    return NULL;
}

static uint64_t run_load(struct load *base, void (*during)(void *), void *arg)
{
    pthread_t th[THREADS];
    struct load ls[THREADS];
    atomic_store(&load_stop, false);
    atomic_store(&load_forever, during != NULL);
    for (int t = 0; t < THREADS; t++) {
        ls[t] = *base;
        ls[t].t = t;
        atomic_init(&ls[t].worst_ns, 0);
        pthread_create(&th[t], NULL, load_worker, &ls[t]);
    }
    if (during) {
        during(arg);
        sleep_ms(300);                        /* and some load after it */
        atomic_store(&load_stop, true);
    }
    uint64_t worst = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        if (atomic_load(&ls[t].worst_ns) > worst)
            worst = atomic_load(&ls[t].worst_ns);
    }
    return worst;
}

/* The start of the hour window the clock is in. */
static uint64_t this_hour(void)
{
    uint64_t now = tally_now_ns();
    return now - now % HOUR;
}

/* Every key's Redis total, summed over the hour windows from @win0 to the
   current one, equals the cost its allowed hits consumed: a load that runs
   across the top of an hour counts in two windows' keys. */
static void assert_totals(const test_redis *r, const char *prefix, const char *policy, uint64_t win0,
                          _Atomic uint64_t *cost)
{
    uint64_t last = this_hour();
    for (int k = 0; k < KEYS; k++) {
        char key[32], name[256];
        snprintf(key, sizeof(key), "user-%d", k);
        uint64_t got = 0;
        for (uint64_t w = win0; w <= last; w += HOUR) {
            int len = key_name(name, sizeof(name), prefix, policy, 0, key, w);
            long long v = test_redis_get(r, name, (size_t)len);
            got += v < 0 ? 0 : (uint64_t)v;
        }
        uint64_t want = atomic_load(&cost[k]);
        cr_assert_eq(got, want, "key %s: redis %" PRIu64 ", hit %" PRIu64, key, got, want);
    }
}

Test(redis, exact_totals_key_by_key_under_load, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r), "redis-server did not start");
    tally_engine *e = open_engine(4096);
    uint32_t pol = add_fixed(e, "exact", UINT64_C(1) << 40);
    cr_assert_eq(start_flusher(e, &r, "t1:", NULL, 20), 0);
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    struct load l = { .e = e, .policy = pol, .cost = cost };
    uint64_t win0 = this_hour();
    run_load(&l, NULL, NULL);
    cr_assert_eq(tally_flush(e, 5000), 0);
    assert_totals(&r, "t1:", "exact", win0, cost);
    tally_stats s;
    cr_assert_eq(tally_stats_read(e, &s), 0);
    cr_assert_eq(s.hits, (uint64_t)THREADS * HITS);
    cr_assert_eq(s.pending_deltas, 0);
    cr_assert_gt(s.flush_batches, 0);
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- Faults -------------------------------------------------------------- */

static void pause_redis(void *arg)
{
    test_redis *r = arg;
    sleep_ms(200);
    test_redis_kill(r, SIGSTOP);
    sleep_ms(3000);
    test_redis_kill(r, SIGCONT);
}

/* Load across a fault, then: every cost in Redis exactly once. Returns the stats. */
static tally_stats survive(test_redis *r, const char *name, const char *prefix,
                           void (*fault)(void *))
{
    cr_assert(test_redis_start(r));
    tally_engine *e = open_engine(4096);
    uint32_t pol = add_fixed(e, name, UINT64_C(1) << 40);
    cr_assert_eq(start_flusher(e, r, prefix, NULL, 20), 0);
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    struct load l = { .e = e, .policy = pol, .cost = cost };
    uint64_t win0 = this_hour();
    uint64_t worst = run_load(&l, fault, r);
    fprintf(stderr, "%s: worst tally_hit latency during the fault %.1f us\n", name, (double)worst / 1e3);
    cr_assert_eq(flush_until_ok(e, 50), 0);
    assert_totals(r, prefix, name, win0, cost);
    tally_stats s;
    tally_stats_read(e, &s);
    tally_close(e);
    test_redis_stop(r);
    return s;
}

Test(redis, paused_redis_loses_and_doubles_nothing, .timeout = 120)
{
    test_redis r = { 0 };
    tally_stats s = survive(&r, "pause", "t2:", pause_redis);
    cr_assert_gt(s.flush_failures, 0, "the pause must have made flushes fail");
}

static void restart_redis(void *arg)
{
    test_redis *r = arg;
    sleep_ms(200);
    test_redis_kill(r, SIGKILL);
    sleep_ms(1500);
    test_redis_start(r);
}

Test(redis, killed_and_restarted_redis_loses_and_doubles_nothing, .timeout = 120)
{
    /* append-only with fsync always: what Redis acknowledged survives the kill */
    test_redis r = { .extra = { "--appendonly", "yes", "--appendfsync", "always", NULL } };
    tally_stats s = survive(&r, "restart", "t3:", restart_redis);
    cr_assert_gt(s.redis_reconnects, 0);
}

Test(redis, refused_writes_then_recovery, .timeout = 120)
{
    test_redis r = { .extra = { "--requirepass", "right", NULL } };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(4096);
    uint32_t pol = add_fixed(e, "refused", UINT64_C(1) << 40);
    cr_assert_eq(start_flusher(e, &r, "t4:", "wrong", 20), 0, "a wrong password is not a start error");
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    struct load l = { .e = e, .policy = pol, .cost = cost };
    uint64_t win0 = this_hour();
    run_load(&l, NULL, NULL);
    cr_assert_eq(tally_flush(e, 3000), TALLY_EIO, "nothing can be written with a wrong password");
    tally_stats s;
    tally_stats_read(e, &s);
    cr_assert_gt(s.pending_cost, 0, "the refused deltas stay pending");

    /* the server now accepts our password, then runs out of memory for writes */
    redisContext *c = test_redis_connect(&r);
    redisReply *rep = redisCommand(c, "AUTH right");
    freeReplyObject(rep);
    rep = redisCommand(c, "CONFIG SET requirepass wrong");
    freeReplyObject(rep);
    rep = redisCommand(c, "CONFIG SET maxmemory-policy noeviction");
    freeReplyObject(rep);
    rep = redisCommand(c, "CONFIG SET maxmemory 1");
    freeReplyObject(rep);
    cr_assert_eq(tally_flush(e, 3000), TALLY_EIO, "maxmemory with noeviction refuses the writes");
    rep = redisCommand(c, "CONFIG SET maxmemory 0");
    freeReplyObject(rep);
    redisFree(c);
    cr_assert_eq(flush_until_ok(e, 30), 0);

    /* read back with the password */
    r.extra[0] = NULL;
    uint64_t last = this_hour();
    c = test_redis_connect(&r);
    rep = redisCommand(c, "AUTH wrong");
    freeReplyObject(rep);
    for (int k = 0; k < KEYS; k++) {
        char key[32], name[256];
        snprintf(key, sizeof(key), "user-%d", k);
        uint64_t got = 0;
        for (uint64_t w = win0; w <= last; w += HOUR) {
            int len = key_name(name, sizeof(name), "t4:", "refused", 0, key, w);
            rep = redisCommand(c, "GET %b", name, (size_t)len);
            got += rep && rep->type == REDIS_REPLY_STRING ? strtoull(rep->str, NULL, 10) : 0;
            freeReplyObject(rep);
        }
        cr_assert_eq(got, atomic_load(&cost[k]), "key %s", key);
    }
    redisFree(c);
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- Two engines, one limit ---------------------------------------------- */

static long long stored_standalone(void *arg, const char *key, uint64_t window)
{
    char name[256];
    int len = key_name(name, sizeof(name), "t5:", "shared", 0, key, window);
    return test_redis_get(arg, name, (size_t)len);
}

Test(redis, two_engines_enforce_one_limit_within_the_bound, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *a = open_engine(64), *b = open_engine(64);
    uint32_t pa = shared_limit_policy(a), pb = shared_limit_policy(b);
    cr_assert_eq(start_flusher(a, &r, "t5:", NULL, SHARED_INTERVAL), 0);
    cr_assert_eq(start_flusher(b, &r, "t5:", NULL, SHARED_INTERVAL), 0);
    shared_limit_run("standalone", a, pa, b, pb, "shared", stored_standalone, &r);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* An engine that pushes nothing still learns, every flush, what the others
   counted for its live keys: A hits once and idles, B admits the rest, then A
   bursts and must admit nothing more. One case per shared window kind. */
static void idle_engine_learns(const tally_limit *l, unsigned flags, const char *prefix)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *a = open_engine(64), *b = open_engine(64);
    tally_policy p = { .name = "idle", .n_limits = 1, .flags = flags, .limits = { *l } };
    uint32_t pa, pb;
    tally_result res;
    cr_assert_eq(tally_policy_add(a, &p, &pa), 0);
    cr_assert_eq(tally_policy_add(b, &p, &pb), 0);
    cr_assert_eq(start_flusher(a, &r, prefix, NULL, 10), 0);
    cr_assert_eq(start_flusher(b, &r, prefix, NULL, 10), 0);
    cr_assert_eq(tally_hit(a, pa, "idle-key", 8, NULL, &res), 0);
    cr_assert(res.allowed);
    cr_assert_eq(flush_until_ok(a, 20), 0);
    sleep_ms(300);                                /* about 30 of A's flush intervals */
    uint64_t admitted_b = 0;
    for (uint64_t i = 0; i < l->max; i++) {
        cr_assert_eq(tally_hit(b, pb, "idle-key", 8, NULL, &res), 0);
        admitted_b += res.allowed;
    }
    cr_assert_eq(flush_until_ok(b, 20), 0);
    cr_assert_eq(flush_until_ok(a, 20), 0);       /* one flush of A after B's push */
    uint64_t admitted_a = 0;
    for (uint64_t i = 0; i < l->max; i++) {
        cr_assert_eq(tally_hit(a, pa, "idle-key", 8, NULL, &res), 0);
        admitted_a += res.allowed;
    }
    fprintf(stderr, "idle engine (%s): A admitted 1 + %" PRIu64 ", B %" PRIu64 " of max %" PRIu64 "\n",
            prefix, admitted_a, admitted_b, l->max);
    /* B had never seen the key, so it decided its burst locally (docs/SYNC.md: a key
       seen for the first time); A had, and must know B's count by now */
    cr_assert_geq(admitted_b, l->max - 1);
    cr_assert_eq(admitted_a, 0, "the idle engine decided without the others' count");
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

Test(redis, idle_engine_learns_the_others_count_aligned_fixed, .timeout = 120)
{
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = HOUR };
    idle_engine_learns(&l, TALLY_ALIGNED, "idle1:");
}

Test(redis, idle_engine_learns_the_others_count_calendar, .timeout = 120)
{
    tally_limit l = { .algo = TALLY_CALENDAR_WINDOW, .max = 1000, .unit = TALLY_DAY };
    idle_engine_learns(&l, 0, "idle2:");
}

Test(redis, idle_engine_learns_the_others_count_sliding, .timeout = 120)
{
    tally_limit l = { .algo = TALLY_SLIDING_WINDOW, .max = 1000, .period_ns = 24 * HOUR };
    idle_engine_learns(&l, 0, "idle3:");
}

/* The same at the start of a window: A's state is still in the window before
   when B takes the whole of the new one; A's next flush must tell it. */
Test(redis, idle_engine_learns_the_others_count_in_a_new_window, .timeout = 120)
{
    const uint64_t P = 2 * SEC;
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *a = open_engine(64), *b = open_engine(64);
    tally_policy p = { .name = "roll", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = P } } };
    uint32_t pa, pb;
    tally_result res;
    cr_assert_eq(tally_policy_add(a, &p, &pa), 0);
    cr_assert_eq(tally_policy_add(b, &p, &pb), 0);
    cr_assert_eq(start_flusher(a, &r, "roll:", NULL, 10), 0);
    cr_assert_eq(start_flusher(b, &r, "roll:", NULL, 10), 0);
    bool done = false;
    for (int attempt = 0; attempt < 4 && !done; attempt++) {
        char key[32];
        snprintf(key, sizeof(key), "roll-%d", attempt);
        uint64_t now = tally_now_ns();
        sleep_ms((unsigned)((P - now % P) / 1000000) + 50);   /* 50 ms into window W */
        uint64_t w = tally_now_ns() / P;
        cr_assert_eq(tally_hit(a, pa, key, strlen(key), NULL, &res), 0);
        cr_assert_eq(flush_until_ok(a, 20), 0);
        now = tally_now_ns();
        sleep_ms((unsigned)((P - now % P) / 1000000) + 50);   /* 50 ms into W + 1 */
        uint64_t admitted_b = 0, admitted_a = 0;
        for (int i = 0; i < 5; i++) {
            cr_assert_eq(tally_hit(b, pb, key, strlen(key), NULL, &res), 0);
            admitted_b += res.allowed;
        }
        cr_assert_eq(flush_until_ok(b, 20), 0);
        cr_assert_eq(flush_until_ok(a, 20), 0);
        cr_assert_eq(tally_hit(a, pa, key, strlen(key), NULL, &res), 0);
        admitted_a = res.allowed;
        if (tally_now_ns() / P != w + 1)
            continue;                             /* the steps straddled a window: again */
        done = true;
        cr_assert_eq(admitted_b, 5);
        cr_assert_eq(admitted_a, 0, "A decided the new window without B's count");
    }
    cr_assert(done, "no attempt fitted in one window");
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* ---- Events -------------------------------------------------------------- */

struct events {
    pthread_mutex_t lock;
    int             n;
    uint64_t        win;
    char            key[64];
};

static void on_event(void *ctx, const tally_event *ev)
{
    struct events *x = ctx;
    pthread_mutex_lock(&x->lock);
    x->n++;
    x->win = ev->window_start_ns;
    memcpy(x->key, ev->key, ev->key_len < 63 ? ev->key_len : 63);
    pthread_mutex_unlock(&x->lock);
}

static tally_engine *event_engine(const test_redis *r, struct events *x, uint32_t *pol)
{
    tally_engine *e = open_engine(64);
    tally_policy p = { .name = "ev", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = HOUR } } };
    cr_assert_eq(tally_policy_add(e, &p, pol), 0);
    tally_redis_options ro = { .host = "127.0.0.1", .port = r->port, .key_prefix = "t6:" };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 20;
    fo.redis = &ro;
    fo.on_event = on_event;
    fo.ctx = x;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    return e;
}

Test(redis, one_event_per_key_limit_and_window_across_restarts, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    static struct events x = { .lock = PTHREAD_MUTEX_INITIALIZER };
    uint32_t pol;
    uint64_t now = tally_now_ns();
    tally_engine *e = event_engine(&r, &x, &pol);
    tally_result res;
    for (int i = 0; i < 10; i++)
        cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, now, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(x.n, 1);
    cr_assert_str_eq(x.key, "k");
    cr_assert_eq(x.win, now - now % HOUR);
    tally_close(e);

    /* a restarted process crosses the same window again: Redis remembers */
    e = event_engine(&r, &x, &pol);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, now, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(x.n, 1, "no second notification in the same window");

    /* the next window is a new one */
    for (int i = 0; i < 10; i++)
        cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, now + HOUR, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(x.n, 2);
    cr_assert_eq(x.win, now - now % HOUR + HOUR);
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- Without Redis: the callback sink ------------------------------------ */

struct sums {
    pthread_mutex_t lock;
    uint64_t        delta, calls;
};

static void on_deltas(void *ctx, const tally_delta *d, size_t n)
{
    struct sums *s = ctx;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < n; i++)
        if (d[i].limit == 0)
            s->delta += d[i].delta;
    s->calls++;
    pthread_mutex_unlock(&s->lock);
}

Test(redis, callback_sink_gets_every_cost_once, .timeout = 120)
{
    tally_engine *e = open_engine(4096);
    uint32_t pol = add_fixed(e, "cb", UINT64_C(1) << 40);
    static struct sums sums = { .lock = PTHREAD_MUTEX_INITIALIZER };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 5;
    fo.on_deltas = on_deltas;
    fo.ctx = &sums;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    struct load l = { .e = e, .policy = pol, .cost = cost };
    run_load(&l, NULL, NULL);
    cr_assert_eq(tally_flush(e, 3000), 0);
    uint64_t want = 0;
    for (int k = 0; k < KEYS; k++)
        want += atomic_load(&cost[k]);
    cr_assert_eq(sums.delta, want);
    cr_assert_eq(tally_flusher_stop(e), 0);
    cr_assert_eq(tally_flusher_stop(e), 0, "stop is idempotent");
    cr_assert_eq(tally_flush(e, 10), TALLY_ESTATE, "no flusher");
    static char text[65536];
    int n = tally_stats_prometheus(e, text, sizeof(text));
    cr_assert_gt(n, 0);
    cr_assert_lt((size_t)n, sizeof(text));
    char line[64];
    snprintf(line, sizeof(line), "\ntally_hits %d\n", THREADS * HITS);
    cr_assert_not_null(strstr(text, line), "prometheus text has the hit count");
    cr_assert_not_null(strstr(text, "# TYPE tally_pending_cost gauge"));
    tally_close(e);
}

/* A delta spilled because its window rolled before a flush took it still
   reaches the sink with the key's bytes, not its digest. */
struct named {
    pthread_mutex_t lock;
    int             n, bad;
    uint64_t        sum;
};

static void on_named(void *ctx, const tally_delta *d, size_t n)
{
    struct named *s = ctx;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < n; i++) {
        s->n++;
        s->sum += d[i].delta;
        if (d[i].key_len != 9 || memcmp(d[i].key, "spill-key", 9) != 0)
            s->bad++;
    }
    pthread_mutex_unlock(&s->lock);
}

Test(redis, spilled_deltas_reach_the_sink_with_the_key_bytes, .timeout = 120)
{
    tally_engine *e = open_engine(64);
    tally_policy p = { .name = "spill", .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = SEC } } };
    uint32_t pol;
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    static struct named got = { .lock = PTHREAD_MUTEX_INITIALIZER };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 100000;                      /* flushes only when asked */
    fo.on_deltas = on_named;
    fo.ctx = &got;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    uint64_t t0 = tally_now_ns(), five = 5, seven = 7;
    tally_result r;
    cr_assert_eq(tally_hit_at(e, pol, "spill-key", 9, &five, t0, &r), 0);
    cr_assert_eq(tally_hit_at(e, pol, "spill-key", 9, &seven, t0 + 2 * SEC, &r), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(got.n, 2, "one delta per window");
    cr_assert_eq(got.sum, 12);
    cr_assert_eq(got.bad, 0, "a delta came with other bytes than the key's");
    tally_close(e);
}

/* A key Redis refuses inside the batch script (here WRONGTYPE: a list sits
   where the count should be) stops neither the script nor the other keys,
   and its own cost stays pending until Redis takes it: never acknowledged
   unapplied, never applied twice. */
Test(redis, a_key_refused_inside_the_script_stays_pending_alone, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(64);
    uint32_t pol = add_fixed(e, "wt", 1000);
    cr_assert_eq(start_flusher(e, &r, "wt:", NULL, 100000), 0);
    uint64_t now = tally_now_ns(), win = now - now % HOUR, five = 5;
    char kb[256], ka[256];
    key_name(kb, sizeof(kb), "wt:", "wt", 0, "key-b", win);
    key_name(ka, sizeof(ka), "wt:", "wt", 0, "key-a", win);
    redisContext *c = test_redis_connect(&r);
    cr_assert_not_null(c);
    freeReplyObject(redisCommand(c, "RPUSH %s x", kb));
    uint64_t costs[2] = { 5, 5 };
    tally_result res;
    cr_assert_eq(tally_hit_at(e, pol, "key-a", 5, costs, now, &res), 0);
    cr_assert_eq(tally_hit_at(e, pol, "key-b", 5, costs, now, &res), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(tally_flush(e, 3000), TALLY_EIO, "key-b's cost is not in Redis");
    redisReply *v = redisCommand(c, "GET %s", ka);
    cr_assert(v && v->type == REDIS_REPLY_STRING && strcmp(v->str, "5") == 0,
              "the other key of the batch is applied, once");
    freeReplyObject(v);
    tally_stats st;
    tally_stats_read(e, &st);
    cr_assert_eq(st.pending_cost, five, "key-b's cost stays pending");
    cr_assert_gt(st.redis_permanent_errors, 0);
    char text[256];
    cr_assert_gt(tally_flusher_last_error(e, text, sizeof(text)), 0);
    cr_assert_eq(strncmp(text, "WRONGTYPE", 9), 0, "last error: %s", text);
    freeReplyObject(redisCommand(c, "DEL %s", kb));
    cr_assert_eq(flush_until_ok(e, 20), 0);
    v = redisCommand(c, "MGET %s %s", ka, kb);
    cr_assert(v && v->type == REDIS_REPLY_ARRAY && v->elements == 2);
    cr_assert(v->element[0]->type == REDIS_REPLY_STRING && strcmp(v->element[0]->str, "5") == 0);
    cr_assert(v->element[1]->type == REDIS_REPLY_STRING && strcmp(v->element[1]->str, "5") == 0,
              "key-b's cost reached Redis once the key could take it");
    freeReplyObject(v);
    redisFree(c);
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- Bad input ----------------------------------------------------------- */

Test(redis, bad_options_are_refused_and_unreachable_redis_is_not_fatal, .timeout = 120)
{
    tally_engine *e = open_engine(64);
    uint32_t pol = add_fixed(e, "bad", 10);
    tally_flusher_options fo;
    tally_redis_options ro = { .host = "127.0.0.1", .port = 0 };
    tally_flusher_options_init(&fo);
    cr_assert_eq(tally_flusher_start(NULL, &fo), TALLY_EINVAL);
    cr_assert_eq(tally_flusher_start(e, NULL), TALLY_EINVAL);
    fo.interval_ms = 0;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);
    fo.interval_ms = 10;
    fo.cpu = -2;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);
    fo.cpu = -1;
    fo.redis = &ro;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL, "port 0");
    ro.port = 70000;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);
    ro.port = 6379;
    ro.host = NULL;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL, "neither host nor unix_path");
    ro.unix_path = "";
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);
    char long_prefix[300];
    memset(long_prefix, 'p', sizeof(long_prefix) - 1);
    long_prefix[sizeof(long_prefix) - 1] = 0;
    ro.unix_path = NULL;
    ro.host = "127.0.0.1";
    ro.key_prefix = long_prefix;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);
    ro.db = -1;
    ro.key_prefix = NULL;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL);

    /* a port nobody listens on: start works, flushes fail, hits go on */
    ro.db = 0;
    ro.port = free_port();
    ro.connect_timeout_ms = 200;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_ESTATE, "started twice");
    tally_result r;
    cr_assert_eq(tally_hit(e, pol, "k", 1, NULL, &r), 0);
    cr_assert(r.allowed, "fail open");
    cr_assert_eq(tally_flush(e, 3000), TALLY_EIO);
    cr_assert_eq(tally_flusher_stop(e), TALLY_EIO, "the final flush could not push");
    cr_assert_eq(tally_flusher_stop(e), 0);

    /* an unknown host */
    ro.host = "no-such-host.invalid";
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    cr_assert_eq(tally_flush(e, 3000), TALLY_EIO);
    tally_close(e);
}

Test(redis, prefix_with_spaces_and_newlines_is_safe, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(64);
    uint32_t pol = add_fixed(e, "odd policy", 100);
    const char *prefix = "we ird\r\nSET x 1\r\n:";
    cr_assert_eq(start_flusher(e, &r, prefix, NULL, 20), 0);
    tally_result res;
    uint64_t c[2] = { 7, 1 };
    cr_assert_eq(tally_hit(e, pol, "k", 1, c, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    uint64_t now = tally_now_ns();
    char name[256];
    int len = key_name(name, sizeof(name), prefix, "odd policy", 0, "k", now - now % HOUR);
    cr_assert_eq(test_redis_get(&r, name, (size_t)len), 7);
    cr_assert_eq(test_redis_get(&r, "x", 1), -1, "nothing was injected");
    tally_close(e);
    test_redis_stop(&r);
}

Test(redis, fail_closed_denies_once_the_global_view_is_stale, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(64);
    uint32_t pol = add_fixed(e, "closed", 100);
    tally_redis_options ro = { .host = "127.0.0.1", .port = r.port, .key_prefix = "t7:",
                               .command_timeout_ms = 200, .connect_timeout_ms = 200 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 20;
    fo.redis = &ro;
    fo.fail_closed_after_ms = 300;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    tally_result res;
    cr_assert_eq(tally_hit(e, pol, "k", 1, NULL, &res), 0);
    cr_assert(res.allowed);
    cr_assert_eq(tally_flush(e, 3000), 0);
    test_redis_kill(&r, SIGKILL);
    sleep_ms(800);
    cr_assert_eq(tally_hit(e, pol, "k", 1, NULL, &res), 0);
    cr_assert_not(res.allowed, "no flush for longer than the bound: deny");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 1, "the denied hit consumed nothing");
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- The rejection watch's flag through Redis ----------------------------- */

static void count_flags(void *ctx, uint32_t policy, const tally_flag *f)
{
    (void)policy;
    (void)f;
    atomic_fetch_add((_Atomic int *)ctx, 1);
}

static int count_listed(void *ctx, const tally_flag *f)
{
    (void)f;
    (*(int *)ctx)++;
    return 0;
}

static tally_engine *watch_engine(const test_redis *r, _Atomic int *flags, uint32_t *pol)
{
    tally_engine *e = open_engine(64);
    tally_policy p = { .name = "watch", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = HOUR } } };
    cr_assert_eq(tally_policy_add(e, &p, pol), 0);
    tally_watch w = { .threshold = 10, .window_ns = 600 * SEC };
    cr_assert_eq(tally_watch_set(e, *pol, &w), 0);
    tally_redis_options ro = { .host = "127.0.0.1", .port = r->port, .key_prefix = "t8:" };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 20;
    fo.redis = &ro;
    fo.on_flag = count_flags;
    fo.ctx = flags;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    return e;
}

Test(redis, flag_survives_a_restart_and_is_told_once, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    static _Atomic int flags;
    atomic_store(&flags, 0);
    uint32_t pol;
    tally_result res;
    tally_engine *e = watch_engine(&r, &flags, &pol);
    for (int i = 0; i < 20; i++)
        cr_assert_eq(tally_hit(e, pol, "bad", 3, NULL, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(atomic_load(&flags), 1);
    tally__digest d = tally__key_digest(e, "bad", 3);
    char name[256];
    int len = snprintf(name, sizeof(name), "t8:watch:flag:%s:%016" PRIx64 "%016" PRIx64,
                       hash_tag(e->hasher.kind), d.hi & TALLY__DIGEST_HI_MASK, d.lo);
    redisContext *c = test_redis_connect(&r);
    redisReply *rep = redisCommand(c, "EXISTS %b", name, (size_t)len);
    cr_assert_eq(rep->integer, 1, "the flag is stored in Redis");
    freeReplyObject(rep);
    tally_close(e);

    /* a restarted process learns the flag as soon as the key is active */
    e = watch_engine(&r, &flags, &pol);
    cr_assert_eq(tally_hit(e, pol, "bad", 3, NULL, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    int listed = 0;
    cr_assert_eq(tally_watch_flagged(e, pol, 0, count_listed, &listed), 1);
    for (int i = 0; i < 20; i++)
        cr_assert_eq(tally_hit(e, pol, "bad", 3, NULL, &res), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(atomic_load(&flags), 1, "told once across engines");

    /* an operator clears it: locally and in Redis */
    cr_assert_eq(tally_watch_clear(e, pol, "bad", 3), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);
    rep = redisCommand(c, "EXISTS %b", name, (size_t)len);
    cr_assert_eq(rep->integer, 0, "the flag is gone from Redis");
    freeReplyObject(rep);
    redisFree(c);
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- Windows rolling between flushes -------------------------------------- */

Test(redis, deltas_of_rolled_windows_reach_their_own_keys, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(4096);
    /* 50 ms windows, flushed every 120 ms: most deltas leave after their window rolled */
    tally_policy p = { .name = "roll", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40,
                                     .period_ns = 50 * 1000000 } } };
    uint32_t pol;
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    cr_assert_eq(start_flusher(e, &r, "t9:", NULL, 120), 0);
    uint64_t total = 0;
    char key[32];
    for (int i = 0; i < 20000; i++) {
        tally_result res;
        uint64_t cost = 1 + (uint64_t)(i % 3);
        snprintf(key, sizeof(key), "k%d", i % 50);
        cr_assert_eq(tally_hit(e, pol, key, strlen(key), &cost, &res), 0);
        total += cost;
        if (i % 100 == 0)
            sleep_ms(1);
    }
    cr_assert_eq(tally_flush(e, 5000), 0);
    redisContext *c = test_redis_connect(&r);
    redisReply *keys = redisCommand(c, "KEYS t9:roll:0:*");
    cr_assert_eq(keys->type, REDIS_REPLY_ARRAY);
    uint64_t sum = 0;
    for (size_t i = 0; i < keys->elements; i++) {
        redisReply *v = redisCommand(c, "GET %b", keys->element[i]->str, (size_t)keys->element[i]->len);
        if (v->type == REDIS_REPLY_STRING)
            sum += strtoull(v->str, NULL, 10);
        freeReplyObject(v);
    }
    cr_assert_gt(keys->elements, 50, "many windows: %zu keys", keys->elements);
    freeReplyObject(keys);
    redisFree(c);
    cr_assert_eq(sum, total, "every cost in Redis once, in its own window's key");
    tally_close(e);
    test_redis_stop(&r);
}

/* ---- The hash in key names ------------------------------------------------- */

/* Engines with the same hash_key but different hashes share one Redis: each
   writes under its own hash's tag, and neither counts the other's hits. */
Test(redis, engines_with_different_hashes_keep_separate_counts, .timeout = 120)
{
    enum { LIMIT = 10, EACH = 6 };
    static const tally_hash hash[2] = { TALLY_HASH_SIPHASH, TALLY_HASH_AES };
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_policy p = { .name = "h", .n_limits = 1, .flags = TALLY_ALIGNED,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = LIMIT, .period_ns = HOUR } } };
    tally_engine *e[2];
    uint32_t pol[2];
    tally_result res;
    uint64_t now = tally_now_ns(), win = now - now % HOUR;
    for (int i = 0; i < 2; i++) {
        tally_options o;
        tally_options_init(&o);
        memcpy(o.hash_key, HASH_KEY, 16);
        o.hash = hash[i];
        cr_assert_eq(tally_open(&o, &e[i]), 0);
        cr_assert_eq(tally_policy_add(e[i], &p, &pol[i]), 0);
        cr_assert_eq(start_flusher(e[i], &r, "th:", NULL, 10), 0);
        for (int n = 0; n < EACH; n++)
            cr_assert_eq(tally_hit(e[i], pol[i], "shared", 6, NULL, &res), 0);
    }
    /* each pushes, then each reads back what Redis holds under its names */
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 2; i++)
            cr_assert_eq(flush_until_ok(e[i], 20), 0);
    for (int i = 0; i < 2; i++) {
        char name[256];
        int len = key_name_with(name, sizeof(name), hash[i], "th:", "h", 0, "shared", win);
        cr_assert_eq(test_redis_get(&r, name, (size_t)len), EACH, "%s", name);
        uint64_t admitted = 0;
        for (int n = 0; n < LIMIT; n++) {
            cr_assert_eq(tally_hit(e[i], pol[i], "shared", 6, NULL, &res), 0);
            admitted += res.allowed;
        }
        cr_assert_eq(admitted, LIMIT - EACH, "engine %d counted the other hash's hits", i);
    }
    tally_close(e[0]);
    tally_close(e[1]);
    test_redis_stop(&r);
}

/* ---- Redis modes: options -------------------------------------------------- */

/* A refused start leaves no flusher: tally_flush has none to ask. */
static void expect_refused(tally_engine *e, const tally_redis_options *ro, const char *why)
{
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 10;
    fo.redis = ro;
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_EINVAL, "%s", why);
    cr_assert_eq(tally_flush(e, 10), TALLY_ESTATE, "%s: nothing started", why);
}

Test(redis, options_of_each_mode_are_checked_before_anything_starts, .timeout = 60)
{
    tally_engine *e = open_engine(64);
    uint32_t pol = add_fixed(e, "modes", 10);
    int dead = free_port();
    char nodes[64];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d", dead);
    tally_redis_options ro = { .host = "127.0.0.1", .port = dead, .mode = (tally_redis_mode)3 };
    expect_refused(e, &ro, "mode 3");
    ro.mode = (tally_redis_mode)-1;
    expect_refused(e, &ro, "mode -1");

    ro = (tally_redis_options){ .mode = TALLY_REDIS_CLUSTER };
    expect_refused(e, &ro, "cluster without nodes");
    ro.host = "127.0.0.1";
    ro.port = dead;
    expect_refused(e, &ro, "cluster with host and port but no nodes");
    static const char *const bad_nodes[] = {
        "", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", ":6379", "a:1,,b:2",
        "a:1,", ",a:1", "a:1 ,b:2", "a:-1", "a:+1", "a:1x",
    };
    for (size_t i = 0; i < sizeof(bad_nodes) / sizeof(bad_nodes[0]); i++) {
        char why[64];
        snprintf(why, sizeof(why), "cluster nodes \"%s\"", bad_nodes[i]);
        ro.nodes = bad_nodes[i];
        expect_refused(e, &ro, why);
    }
    ro.nodes = nodes;
    ro.db = 1;
    expect_refused(e, &ro, "a cluster has database 0 only");
    ro.db = 0;
    ro.key_prefix = "pre{fix}:";
    expect_refused(e, &ro, "braces in a cluster's prefix would move the slot tag");
    ro.key_prefix = NULL;

    ro = (tally_redis_options){ .mode = TALLY_REDIS_SENTINEL, .nodes = nodes };
    expect_refused(e, &ro, "sentinel without master_name");
    ro.master_name = "";
    expect_refused(e, &ro, "sentinel with an empty master_name");
    ro.master_name = "mymaster";
    ro.nodes = NULL;
    expect_refused(e, &ro, "sentinel without nodes");
    ro.nodes = "127.0.0.1:26379,";
    expect_refused(e, &ro, "sentinel with a bad node list");

    /* well-formed but unreachable: each mode starts, fails open, flushes fail */
    static const tally_redis_mode modes[] = { TALLY_REDIS_STANDALONE, TALLY_REDIS_CLUSTER,
                                              TALLY_REDIS_SENTINEL };
    for (size_t i = 0; i < 3; i++) {
        ro = (tally_redis_options){ .host = "127.0.0.1", .port = dead, .mode = modes[i],
                                    .nodes = nodes, .master_name = "mymaster",
                                    .connect_timeout_ms = 200, .command_timeout_ms = 200 };
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = 10;
        fo.redis = &ro;
        cr_assert_eq(tally_flusher_start(e, &fo), 0, "mode %d", (int)modes[i]);
        tally_result r;
        cr_assert_eq(tally_hit(e, pol, "k", 1, NULL, &r), 0);
        cr_assert(r.allowed, "fail open");
        cr_assert_eq(tally_flush(e, 3000), TALLY_EIO, "mode %d: nobody answers", (int)modes[i]);
        cr_assert_gt(tally_flusher_last_error(e, NULL, 0), 0, "mode %d keeps why", (int)modes[i]);
        cr_assert_eq(tally_flusher_stop(e), TALLY_EIO);
    }
    tally_close(e);
}

/* ---- WAIT ------------------------------------------------------------------ */

/* A replica of @master, started and in sync. */
static void start_replica(test_redis *replica, const test_redis *master, char *port_buf, size_t len)
{
    snprintf(port_buf, len, "%d", master->port);
    replica->extra[0] = "--replicaof";
    replica->extra[1] = "127.0.0.1";
    replica->extra[2] = port_buf;
    replica->extra[3] = NULL;
    cr_assert(test_redis_start(replica), "the replica did not start");
    redisContext *c = test_redis_connect(replica);
    cr_assert_not_null(c);
    bool up = false;
    for (int i = 0; i < 500 && !up; i++) {
        redisReply *rep = redisCommand(c, "INFO replication");
        up = rep && rep->type == REDIS_REPLY_STRING && strstr(rep->str, "master_link_status:up");
        freeReplyObject(rep);
        if (!up)
            sleep_ms(10);
    }
    redisFree(c);
    cr_assert(up, "the replica never synced");
}

static int start_waiting_flusher(tally_engine *e, const test_redis *r, const char *prefix,
                                 unsigned replicas)
{
    tally_redis_options ro = { .host = "127.0.0.1", .port = r->port, .key_prefix = prefix,
                               .command_timeout_ms = 500, .connect_timeout_ms = 500,
                               .wait_replicas = replicas, .wait_timeout_ms = 100 };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 600000;                      /* flushes only when asked */
    fo.redis = &ro;
    return tally_flusher_start(e, &fo);
}

/* With wait_replicas, a flush succeeds only once WAIT saw the batches on
   that many replicas. The replica stopped: Redis applied the batches, but
   the flush must not report success, and the batches resent until the
   replica is back must not be applied again, on the master or the replica. */
Test(redis, wait_replicas_holds_success_until_replicas_have_every_cost, .timeout = 120)
{
    test_redis m = { 0 }, rep = { 0 };
    char port[16];
    cr_assert(test_redis_start(&m));
    start_replica(&rep, &m, port, sizeof(port));
    tally_engine *e = open_engine(4096), *greedy = open_engine(64);
    uint32_t pol = add_fixed(e, "wait", UINT64_C(1) << 40), gpol = add_fixed(greedy, "wait2", 100);
    cr_assert_eq(start_waiting_flusher(e, &m, "w1:", 1), 0);
    cr_assert_eq(start_waiting_flusher(greedy, &m, "w2:", 2), 0);
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    struct load l = { .e = e, .policy = pol, .cost = cost };
    uint64_t win0 = this_hour();
    run_load(&l, NULL, NULL);
    cr_assert_eq(flush_until_ok(e, 20), 0);
    /* WAIT returned: the replica has it all, without any waiting of ours */
    assert_totals(&rep, "w1:", "wait", win0, cost);
    assert_totals(&m, "w1:", "wait", win0, cost);

    tally_result res;
    cr_assert_eq(tally_hit(greedy, gpol, "k", 1, NULL, &res), 0);
    cr_assert_eq(tally_flush(greedy, 3000), TALLY_EIO, "two replicas asked for, one exists");

    test_redis_kill(&rep, SIGSTOP);
    run_load(&l, NULL, NULL);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(tally_flush(e, 3000), TALLY_EIO, "flush %d with the replica stopped", i);
    tally_stats st;
    tally_stats_read(e, &st);
    cr_assert_gt(st.pending_cost, 0, "unconfirmed batches stay pending");
    char text[256];
    cr_assert_gt(tally_flusher_last_error(e, text, sizeof(text)), 0);
    cr_assert_eq(strncmp(text, "WAIT", 4), 0, "last error: %s", text);
    assert_totals(&m, "w1:", "wait", win0, cost); /* applied once, resends and all */

    test_redis_kill(&rep, SIGCONT);
    cr_assert_eq(flush_until_ok(e, 20), 0);
    assert_totals(&m, "w1:", "wait", win0, cost);
    assert_totals(&rep, "w1:", "wait", win0, cost);
    tally_stats_read(e, &st);
    cr_assert_eq(st.pending_cost, 0);
    tally_close(e);
    tally_close(greedy);
    test_redis_stop(&rep);
    test_redis_stop(&m);
}

/* ---- Bookkeeping ----------------------------------------------------------- */

/* Keys under @prefix that are not counts of @policy. */
static long long bookkeeping_keys(const test_redis *r, const char *prefix, const char *policy)
{
    redisContext *c = test_redis_connect(r);
    cr_assert_not_null(c);
    char pattern[64], counts[64];
    snprintf(pattern, sizeof(pattern), "%s*", prefix);
    snprintf(counts, sizeof(counts), "%s%s:", prefix, policy);
    long long n = 0;
    char cursor[32] = "0";
    do {
        redisReply *rep = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        cr_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2);
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
        for (size_t i = 0; i < rep->element[1]->elements; i++)
            n += strncmp(rep->element[1]->element[i]->str, counts, strlen(counts)) != 0;
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0);
    redisFree(c);
    return n;
}

/* Hundreds of batches from two engines leave a fixed number of bookkeeping
   keys (a record per engine instance), each with a TTL, and exact counts. */
Test(redis, bookkeeping_keys_stay_flat, .timeout = 120)
{
    enum { FLUSHES = 300, PER_FLUSH = 20 };
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e[2];
    uint32_t pol[2];
    for (int i = 0; i < 2; i++) {
        e[i] = open_engine(1024);
        pol[i] = add_fixed(e[i], "flat", UINT64_C(1) << 40);
        cr_assert_eq(start_flusher(e[i], &r, "flat:", NULL, 600000), 0);
    }
    static _Atomic uint64_t cost[KEYS];
    memset(cost, 0, sizeof(cost));
    long long after_first = -1;
    uint64_t win0 = this_hour();
    for (int n = 0; n < FLUSHES; n++) {
        for (int i = 0; i < 2; i++) {
            for (int k = 0; k < PER_FLUSH; k++) {
                int key = (n * PER_FLUSH + k) % KEYS;
                char name[32];
                snprintf(name, sizeof(name), "user-%d", key);
                uint64_t costs[2] = { 1, 1 };
                tally_result res;
                cr_assert_eq(tally_hit(e[i], pol[i], name, strlen(name), costs, &res), 0);
                atomic_fetch_add(&cost[key], 1);
            }
            cr_assert_eq(tally_flush(e[i], 3000), 0);
        }
        if (n == 0)
            after_first = bookkeeping_keys(&r, "flat:", "flat");
    }
    long long after_all = bookkeeping_keys(&r, "flat:", "flat");
    fprintf(stderr, "bookkeeping keys: %lld after the first flushes, %lld after %d\n", after_first,
            after_all, 2 * FLUSHES);
    cr_assert_gt(after_first, 0, "the engines keep a record");
    cr_assert_leq(after_all, after_first, "bookkeeping grew with the batches");
    assert_totals(&r, "flat:", "flat", win0, cost);
    /* every bookkeeping key expires */
    redisContext *c = test_redis_connect(&r);
    redisReply *keys = redisCommand(c, "KEYS flat:seen:*");
    cr_assert(keys && keys->type == REDIS_REPLY_ARRAY);
    cr_assert_eq((long long)keys->elements, after_all);
    for (size_t i = 0; i < keys->elements; i++) {
        redisReply *ttl = redisCommand(c, "PTTL %s", keys->element[i]->str);
        cr_assert(ttl && ttl->type == REDIS_REPLY_INTEGER && ttl->integer > 0, "%s has no TTL",
                  keys->element[i]->str);
        freeReplyObject(ttl);
    }
    freeReplyObject(keys);
    redisFree(c);
    tally_close(e[0]);
    tally_close(e[1]);
    test_redis_stop(&r);
}

/* ---- Eviction (TALLY_EVICT_LRU) ---------------------------------------------- */

/* The Redis count of @key in policy "lru" (limit 0, fixed hourly windows, aligned). */
static uint64_t redis_count(const test_redis *r, const char *prefix, const char *key)
{
    char name[256];
    uint64_t win = tally_now_ns() / HOUR * HOUR;
    key_name(name, sizeof(name), prefix, "lru", 0, key, win);
    redisContext *c = test_redis_connect(r);
    redisReply *v = redisCommand(c, "GET %s", name);
    cr_assert(v && (v->type == REDIS_REPLY_STRING || v->type == REDIS_REPLY_NIL));
    uint64_t n = v->type == REDIS_REPLY_STRING ? strtoull(v->str, NULL, 10) : 0;
    freeReplyObject(v);
    redisFree(c);
    return n;
}

static const tally_policy LRU = {
    .name = "lru", .n_limits = 1, .flags = TALLY_EVICT_LRU | TALLY_ALIGNED,
    .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 20, .period_ns = HOUR } }
};

/* Engines A and B of capacity 64 sharing policy @p (named "lru", with
   TALLY_EVICT_LRU) through @r, each with a flusher; A hits "back" @hits_a
   times, B @hits_b times, and both flush. */
static void lru_pair(test_redis *r, const tally_policy *p, tally_engine **a, uint32_t *pa,
                     tally_engine **b, uint32_t *pb, int hits_a, int hits_b)
{
    tally_result res;
    cr_assert(test_redis_start(r));
    *a = open_engine(64);
    *b = open_engine(64);
    cr_assert_eq(tally_policy_add(*a, p, pa), 0);
    cr_assert_eq(tally_policy_add(*b, p, pb), 0);
    cr_assert_eq(start_flusher(*a, r, "lru:", NULL, 10), 0);
    cr_assert_eq(start_flusher(*b, r, "lru:", NULL, 10), 0);
    for (int i = 0; i < hits_a; i++) {
        cr_assert_eq(tally_hit(*a, *pa, "back", 4, NULL, &res), 0);
        cr_assert(res.allowed, "A's hit %d", i);
    }
    for (int i = 0; i < hits_b; i++) {
        cr_assert_eq(tally_hit(*b, *pb, "back", 4, NULL, &res), 0);
        cr_assert(res.allowed, "B's hit %d", i);
    }
    cr_assert_eq(flush_until_ok(*a, 20), 0);
    cr_assert_eq(flush_until_ok(*b, 20), 0);
    /* and A's read-back learns B's cost */
    cr_assert_eq(flush_until_ok(*a, 20), 0);
}

/* New keys named @prefix-N through A's full table until "back", the least
   recently hit, is evicted; their cost is pushed as they go, since a key with
   cost to push is never evicted. Return how many it took. */
static int evict_back(tally_engine *a, uint32_t pa, const char *prefix)
{
    tally_snapshot snap;
    tally_result res;
    tally_stats before, after;
    cr_assert_eq(tally_stats_read(a, &before), 0);
    int i = 0;
    for (; i < 4000 && tally_read(a, pa, "back", 4, &snap) == 0; i++) {
        char key[32];
        int len = snprintf(key, sizeof(key), "%s-%d", prefix, i);
        cr_assert_eq(tally_hit(a, pa, key, (size_t)len, NULL, &res), 0, "new key %d", i);
        if (i % 16 == 15)
            cr_assert_eq(flush_until_ok(a, 20), 0);
    }
    cr_assert_eq(tally_read(a, pa, "back", 4, &snap), TALLY_ENOENT, "not evicted after %d keys", i);
    cr_assert_eq(tally_stats_read(a, &after), 0);
    cr_assert_gt(after.lru_evictions, before.lru_evictions);
    return i;
}

/* "back" returns to A's table: its first hit is decided by the new slot's
   count alone, then a flush gives the slot the count of everyone else, this
   engine's evicted slots included (from the reply to the batch of that hit),
   and @more hits follow; then two flushes, the second of which has nothing
   of the key to push and reads its total back, and @more hits again. Return
   how many A admitted. */
static uint64_t come_back(tally_engine *a, uint32_t pa, int more)
{
    tally_result res;
    cr_assert_eq(tally_hit(a, pa, "back", 4, NULL, &res), 0);
    uint64_t admitted = res.allowed;
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(flush_until_ok(a, 20), 0);
        if (round)
            cr_assert_eq(flush_until_ok(a, 20), 0);
        for (int j = 0; j < more; j++) {
            cr_assert_eq(tally_hit(a, pa, "back", 4, NULL, &res), 0);
            admitted += res.allowed;
        }
    }
    cr_assert_eq(flush_until_ok(a, 20), 0);
    return admitted;
}

/* A key A evicted: its cost is in Redis once, and when it comes back in A's
   table the cost A had counted for it before the eviction counts as others'
   cost, with B's: A admits exactly what the limit has left. */
Test(redis, an_evicted_key_keeps_its_cost_in_redis_and_learns_the_others_count_back, .timeout = 120)
{
    test_redis r = { 0 };
    tally_engine *a, *b;
    uint32_t pa, pb;
    lru_pair(&r, &LRU, &a, &pa, &b, &pb, 10, 5);
    int keys = evict_back(a, pa, "newer");
    cr_assert_eq(redis_count(&r, "lru:", "back"), 15, "the evicted key's cost is in Redis, once");

    uint64_t after = come_back(a, pa, 20);
    fprintf(stderr, "evicted after %d new keys; back in A, %" PRIu64 " admitted of max 20 after "
            "15; Redis %" PRIu64 "\n", keys, after, redis_count(&r, "lru:", "back"));
    cr_assert_eq(after, 20 - 15, "A admitted %" PRIu64 ", not what the max left", after);
    cr_assert_eq(redis_count(&r, "lru:", "back"), 20, "every admitted hit counted once");
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* Evicted twice in one window: each evicted slot's count is carried once,
   the first one's also across the second eviction. */
Test(redis, a_key_evicted_twice_in_a_window_counts_each_slot_once, .timeout = 120)
{
    test_redis r = { 0 };
    tally_engine *a, *b;
    uint32_t pa, pb;
    lru_pair(&r, &LRU, &a, &pa, &b, &pb, 10, 5);
    evict_back(a, pa, "newer");
    cr_assert_eq(come_back(a, pa, 1), 3, "A's second slot: 3 of the 5 left");
    cr_assert_eq(redis_count(&r, "lru:", "back"), 18);
    evict_back(a, pa, "later");
    cr_assert_eq(redis_count(&r, "lru:", "back"), 18, "the twice evicted key's cost is in Redis, once");
    uint64_t after = come_back(a, pa, 20);
    cr_assert_eq(after, 20 - 18, "A's third slot admitted %" PRIu64 " of the 2 left", after);
    cr_assert_eq(redis_count(&r, "lru:", "back"), 20);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* A policy of two limits, the second the one that binds: each limit's count
   is carried, the second one's too. */
Test(redis, an_evicted_key_carries_the_count_of_each_limit, .timeout = 120)
{
    static const tally_policy two = {
        .name = "lru", .n_limits = 2, .flags = TALLY_EVICT_LRU | TALLY_ALIGNED,
        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = HOUR },
                    { .algo = TALLY_FIXED_WINDOW, .max = 20, .period_ns = HOUR } }
    };
    test_redis r = { 0 };
    tally_engine *a, *b;
    uint32_t pa, pb;
    lru_pair(&r, &two, &a, &pa, &b, &pb, 10, 5);
    evict_back(a, pa, "newer");
    uint64_t after = come_back(a, pa, 20);
    cr_assert_eq(after, 20 - 15, "A admitted %" PRIu64 " of the 5 the second limit left", after);
    cr_assert_eq(redis_count(&r, "lru:", "back"), 20);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* The key back in its table before the flusher took the eviction's note
   (another thread hit it just after the kill): the slot has had its count
   from a batch's reply already, and with no other engine a read-back tells
   nothing new, so the note's count must reach the slot when it is taken.
   The note is made here as the evictor makes it. */
Test(redis, an_eviction_note_taken_after_the_key_came_back_reaches_its_slot_at_once, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *a = open_engine(64);
    uint32_t pa;
    tally_result res;
    cr_assert_eq(tally_policy_add(a, &LRU, &pa), 0);
    cr_assert_eq(start_flusher(a, &r, "lru:", NULL, 10), 0);
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(tally_hit(a, pa, "back", 4, NULL, &res), 0);
        cr_assert(res.allowed);
    }
    cr_assert_eq(flush_until_ok(a, 20), 0);
    cr_assert_eq(flush_until_ok(a, 20), 0);
    tally__note *n = tally__note_new(TALLY__NOTE_FORGET, pa, 0, tally__key_digest(a, "back", 4),
                                     "back", 4);
    cr_assert(n);
    n->win = tally_now_ns() / HOUR * HOUR;
    n->delta = 7;
    tally__note_push(&a->notes, n);
    cr_assert_eq(flush_until_ok(a, 20), 0);
    uint64_t admitted = 0;
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(tally_hit(a, pa, "back", 4, NULL, &res), 0);
        admitted += res.allowed;
    }
    cr_assert_eq(admitted, 20 - 10 - 7, "admitted %" PRIu64 " without the note's 7", admitted);
    tally_close(a);
    test_redis_stop(&r);
}

#define CHURN_KEYS   160          /* keys hit in turn through a table of capacity 64 */
#define CHURN_ROUNDS 300

struct churn {
    tally_engine      *e;
    uint32_t           policy;
    int                t;
    _Atomic uint64_t  *admitted;    /* per key */
    _Atomic int        bad_rc;
};

/* Rounds of 16 keys each, the keys in turn, with a pause for the flusher to
   push their cost: keys go and come back all the time, and threads hit keys
   as they are evicted. */
static void *churn_worker(void *arg)
{
    struct churn *c = arg;
    for (int round = 0; round < CHURN_ROUNDS; round++) {
        for (int j = 0; j < 16; j++) {
            int k = (c->t * 7 + round * 16 + j) % CHURN_KEYS;
            char key[16];
            int len = snprintf(key, sizeof(key), "churn-%d", k);
            tally_result res;
            int rc = tally_hit(c->e, c->policy, key, (size_t)len, NULL, &res);
            if (rc == 0 && res.allowed)
                atomic_fetch_add(&c->admitted[k], 1);
            else if (rc != TALLY_EFULL)
                atomic_store(&c->bad_rc, rc ? rc : -1);
        }
        sleep_ms(1);
    }
    return NULL;
}

/* Two threads churn keys through a full TALLY_EVICT_LRU table while the
   flusher runs: Redis holds every key's admitted cost once, and each key in
   the table at the end counts, its own slot and its evicted ones together,
   exactly that total (max - remaining of a peek). */
Test(redis, keys_churned_through_evictions_count_every_slot_once, .timeout = 120)
{
    static const tally_policy churn = {
        .name = "lru", .n_limits = 1, .flags = TALLY_EVICT_LRU | TALLY_ALIGNED,
        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40, .period_ns = HOUR } }
    };
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_engine *e = open_engine(64);
    uint32_t pid;
    cr_assert_eq(tally_policy_add(e, &churn, &pid), 0);
    cr_assert_eq(start_flusher(e, &r, "lru:", NULL, 2), 0);
    static _Atomic uint64_t admitted[CHURN_KEYS];
    for (int k = 0; k < CHURN_KEYS; k++)
        atomic_store(&admitted[k], 0);
    struct churn c[2];
    pthread_t th[2];
    for (int t = 0; t < 2; t++) {
        c[t] = (struct churn){ .e = e, .policy = pid, .t = t, .admitted = admitted };
        pthread_create(&th[t], NULL, churn_worker, &c[t]);
    }
    for (int t = 0; t < 2; t++) {
        pthread_join(th[t], NULL);
        cr_assert_eq(atomic_load(&c[t].bad_rc), 0, "thread %d: a hit returned %d", t,
                     atomic_load(&c[t].bad_rc));
    }
    cr_assert_eq(flush_until_ok(e, 20), 0);
    cr_assert_eq(flush_until_ok(e, 20), 0);
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    int present = 0;
    for (int k = 0; k < CHURN_KEYS; k++) {
        char key[16];
        int len = snprintf(key, sizeof(key), "churn-%d", k);
        uint64_t total = redis_count(&r, "lru:", key);
        cr_assert_eq(total, atomic_load(&admitted[k]), "%s: Redis %" PRIu64 ", admitted %" PRIu64,
                     key, total, atomic_load(&admitted[k]));
        tally_snapshot snap;
        if (tally_read(e, pid, key, (size_t)len, &snap) != 0)
            continue;
        present++;
        tally_result res;
        cr_assert_eq(tally_peek_at(e, pid, key, (size_t)len, tally_now_ns(), &res), 0);
        cr_assert_eq(churn.limits[0].max - res.remaining, total,
                     "%s: its slot (%" PRIu64 ") and its evicted slots count %" PRIu64 " of %" PRIu64,
                     key, snap.c[0].used, churn.limits[0].max - res.remaining, total);
    }
    fprintf(stderr, "churn: %" PRIu64 " evictions, %d keys in the table at the end\n",
            st.lru_evictions, present);
    cr_assert_gt(st.lru_evictions, CHURN_KEYS, "keys evicted and back");
    cr_assert_gt(present, 0);
    tally_close(e);
    test_redis_stop(&r);
}

/* A reset in A before the eviction forgets A's own count until then (B's
   stays, from Redis): the slot evicted after it carries only what it counted
   since, and the key back in A admits what it would have admitted unevicted. */
Test(redis, a_reset_before_an_eviction_does_not_come_back_with_the_key, .timeout = 120)
{
    test_redis r = { 0 };
    tally_engine *a, *b;
    uint32_t pa, pb;
    tally_result res;
    lru_pair(&r, &LRU, &a, &pa, &b, &pb, 10, 5);
    tally_snapshot snap;
    cr_assert_eq(tally_read(a, pa, "back", 4, &snap), 0);
    cr_assert_eq(snap.c[0].used, 10);
    uint32_t mask = 0;
    cr_assert_eq(tally_reset_if(a, pa, "back", 4, &snap, &mask), 0);
    cr_assert_eq(mask, 1);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(tally_hit(a, pa, "back", 4, NULL, &res), 0);
        cr_assert(res.allowed);
    }
    cr_assert_eq(res.remaining, 20 - 5 - 3, "after the reset, A counts B's 5 and its own 3");
    cr_assert_eq(flush_until_ok(a, 20), 0);
    evict_back(a, pa, "newer");
    cr_assert_eq(redis_count(&r, "lru:", "back"), 18);
    uint64_t after = come_back(a, pa, 20);
    cr_assert_eq(after, 20 - 5 - 3, "A admitted %" PRIu64 ": the reset's 10 came back, or its 3 did not", after);
    cr_assert_eq(redis_count(&r, "lru:", "back"), 18 + after);
    tally_close(a);
    tally_close(b);
    test_redis_stop(&r);
}

/* ---- Prefetch: a key new to an engine -------------------------------------- */

static const tally_policy COLD = {
    .name = "cold", .n_limits = 1, .flags = TALLY_ALIGNED,
    .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 50, .period_ns = HOUR } } };

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Engine A consumes the whole of @key and flushes, and is closed: what a
   restarted engine finds in Redis. */
static void consume_all(const test_redis *r, const char *prefix, const char *key)
{
    tally_engine *a = open_engine(64);
    uint32_t pa;
    tally_result res;
    cr_assert_eq(tally_policy_add(a, &COLD, &pa), 0);
    cr_assert_eq(start_flusher(a, r, prefix, NULL, 10), 0);
    for (uint64_t i = 0; i < COLD.limits[0].max; i++) {
        cr_assert_eq(tally_hit(a, pa, key, strlen(key), NULL, &res), 0);
        cr_assert(res.allowed);
    }
    cr_assert_eq(flush_until_ok(a, 20), 0);
    tally_close(a);
}

/* An engine started after A took the max (a restart) and whose flusher runs
   no round for a minute: only the prefetch of the key's first hit can tell
   it A's count, and it must deny the key long before a round could. */
Test(redis, cold_start_denies_a_consumed_key_within_one_round_trip, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    consume_all(&r, "cold:", "spent");
    tally_engine *b = open_engine(64);
    uint32_t pb;
    tally_result res;
    cr_assert_eq(tally_policy_add(b, &COLD, &pb), 0);
    cr_assert_eq(start_flusher(b, &r, "cold:", NULL, 60000), 0);
    uint64_t t0 = mono_ms();
    cr_assert_eq(tally_hit(b, pb, "spent", 5, NULL, &res), 0);
    uint64_t admitted = res.allowed, elapsed = 0;
    bool denied = false;
    while (!denied && elapsed < 2000) {
        sleep_ms(1);
        cr_assert_eq(tally_hit(b, pb, "spent", 5, NULL, &res), 0);
        elapsed = mono_ms() - t0;
        denied = !res.allowed;
        admitted += res.allowed;
    }
    fprintf(stderr, "cold start: denied %" PRIu64 " ms after the first hit, %" PRIu64
            " admitted before (interval 60000 ms)\n", elapsed, admitted);
    cr_assert(denied, "still admitted %" PRIu64 " ms after the first hit: nothing taught "
              "the engine A's count", elapsed);
    cr_assert_lt(admitted, COLD.limits[0].max, "the engine decided the key alone");
    cr_assert_eq(tally_flush(b, 3000), 0);
    char name[256];
    int len = key_name(name, sizeof(name), "cold:", "cold", 0, "spent", this_hour());
    cr_assert_eq(test_redis_get(&r, name, (size_t)len), (long long)(COLD.limits[0].max + admitted));
    tally_close(b);
    test_redis_stop(&r);
}

static long long dbsize(const test_redis *r)
{
    redisContext *c = test_redis_connect(r);
    cr_assert(c);
    redisReply *v = redisCommand(c, "DBSIZE");
    cr_assert(v && v->type == REDIS_REPLY_INTEGER);
    long long n = v->integer;
    freeReplyObject(v);
    redisFree(c);
    return n;
}

/* Prefetches only read: a key with no total in Redis keeps deciding from its
   own count alone, a key with one learns it and Redis keeps it as it was,
   and the flush after them counts each hit once. */
Test(redis, a_prefetch_reads_and_changes_nothing, .timeout = 60)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    consume_all(&r, "pre:", "known");
    long long keys = dbsize(&r);
    char known[256], unknown[256];
    int kl = key_name(known, sizeof(known), "pre:", "cold", 0, "known", this_hour());
    int ul = key_name(unknown, sizeof(unknown), "pre:", "cold", 0, "unknown", this_hour());
    const uint64_t max = COLD.limits[0].max;

    tally_engine *b = open_engine(64);
    uint32_t pb;
    tally_result res;
    cr_assert_eq(tally_policy_add(b, &COLD, &pb), 0);
    cr_assert_eq(start_flusher(b, &r, "pre:", NULL, 60000), 0);
    cr_assert_eq(tally_hit(b, pb, "unknown", 7, NULL, &res), 0);
    cr_assert(res.allowed);
    cr_assert_eq(tally_hit(b, pb, "known", 5, NULL, &res), 0);
    cr_assert(res.allowed);
    /* the prefetch of "unknown" was taken no later than that of "known",
       and settled before it */
    uint64_t t0 = mono_ms();
    do {
        sleep_ms(1);
        cr_assert_eq(tally_peek_at(b, pb, "known", 5, tally_now_ns(), &res), 0);
    } while (!res.exceeded && mono_ms() - t0 < 2000);
    cr_assert(res.exceeded, "\"known\" never learnt its total");
    cr_assert_eq(test_redis_get(&r, known, (size_t)kl), (long long)max, "a prefetch wrote a count");
    cr_assert_eq(test_redis_get(&r, unknown, (size_t)ul), -1, "a prefetch created a count");
    cr_assert_eq(dbsize(&r), keys, "a prefetch wrote to Redis");
    cr_assert_eq(tally_peek_at(b, pb, "unknown", 7, tally_now_ns(), &res), 0);
    cr_assert_eq(res.remaining, max - 1, "a key without a total counts only its own hit");
    for (uint64_t i = 1; i < max; i++) {
        cr_assert_eq(tally_hit(b, pb, "unknown", 7, NULL, &res), 0);
        cr_assert(res.allowed, "hit %" PRIu64 " of %" PRIu64 " denied", i + 1, max);
    }
    cr_assert_eq(tally_hit(b, pb, "unknown", 7, NULL, &res), 0);
    cr_assert(!res.allowed);
    cr_assert_eq(tally_flush(b, 3000), 0);
    cr_assert_eq(test_redis_get(&r, known, (size_t)kl), (long long)max + 1);
    cr_assert_eq(test_redis_get(&r, unknown, (size_t)ul), (long long)max);
    /* after the flush, the others' counts are the totals less B's own */
    cr_assert_eq(tally_peek_at(b, pb, "known", 5, tally_now_ns(), &res), 0);
    cr_assert(res.exceeded);
    cr_assert_eq(tally_peek_at(b, pb, "unknown", 7, tally_now_ns(), &res), 0);
    cr_assert(res.exceeded);
    tally_close(b);
    test_redis_stop(&r);
}

#define NEW_KEYS 10000

struct churn_new {
    tally_engine     *e;
    uint32_t          policy;
    int               t;
    _Atomic uint64_t *cost;
    uint64_t          denied;
};

/* Each thread hits every key once, then its half of them once more, with
   flushes and prefetch rounds going on. */
static void *new_keys_worker(void *arg)
{
    struct churn_new *w = arg;
    for (int pass = 0; pass < 2; pass++)
        for (int k = 0; k < NEW_KEYS; k++) {
            if (pass == 1 && k % 2 != w->t)
                continue;
            char key[32];
            int len = snprintf(key, sizeof(key), "new-%d", k);
            tally_result res;
            int rc = tally_hit(w->e, w->policy, key, (size_t)len, NULL, &res);
            /* every candidate for eviction may be holding unflushed cost */
            cr_assert(rc == 0 || rc == TALLY_EFULL, "rc %d", rc);
            if (rc == 0 && res.allowed)
                atomic_fetch_add(&w->cost[k], 1);
            else if (rc == 0)
                w->denied++;
        }
    return NULL;
}

/* 10K keys new to an engine, half of them already counted in Redis by
   another: every key gets a prefetch while its hits are flushed, and Redis
   ends with exactly what both engines admitted, key by key. */
Test(redis, many_new_keys_with_prefetches_keep_exact_totals, .timeout = 120)
{
    test_redis r = { 0 };
    cr_assert(test_redis_start(&r));
    tally_policy p = { .name = "many", .n_limits = 1, .flags = TALLY_ALIGNED | TALLY_EVICT_LRU,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 4, .period_ns = HOUR } } };
    uint64_t win0 = this_hour();
    _Atomic uint64_t *cost = calloc(NEW_KEYS, sizeof(*cost));
    cr_assert(cost);
    tally_engine *a = open_engine(2 * NEW_KEYS);
    uint32_t pa;
    cr_assert_eq(tally_policy_add(a, &p, &pa), 0);
    cr_assert_eq(start_flusher(a, &r, "many:", NULL, 10), 0);
    for (int k = 0; k < NEW_KEYS; k += 2) {
        char key[32];
        int len = snprintf(key, sizeof(key), "new-%d", k);
        for (int i = 0; i < 3; i++) {
            tally_result res;
            cr_assert_eq(tally_hit(a, pa, key, (size_t)len, NULL, &res), 0);
            cr_assert(res.allowed);
            atomic_fetch_add(&cost[k], 1);
        }
    }
    cr_assert_eq(flush_until_ok(a, 20), 0);
    tally_close(a);

    /* a quarter of the keys fit: evictions hand the flusher spilled deltas
       and forgotten counts between its rounds, which prefetches take too */
    tally_engine *b = open_engine(NEW_KEYS / 4);
    uint32_t pb;
    cr_assert_eq(tally_policy_add(b, &p, &pb), 0);
    cr_assert_eq(start_flusher(b, &r, "many:", NULL, 20), 0);
    pthread_t th[2];
    struct churn_new w[2];
    for (int t = 0; t < 2; t++) {
        w[t] = (struct churn_new){ b, pb, t, cost, 0 };
        cr_assert_eq(pthread_create(&th[t], NULL, new_keys_worker, &w[t]), 0);
    }
    uint64_t denied = 0;
    for (int t = 0; t < 2; t++) {
        pthread_join(th[t], NULL);
        denied += w[t].denied;
    }
    cr_assert_eq(flush_until_ok(b, 20), 0);

    /* a run across the top of an hour counts in two windows' keys */
    uint64_t *got = calloc(NEW_KEYS, sizeof(*got));
    cr_assert(got);
    redisContext *c = test_redis_connect(&r);
    cr_assert(c);
    for (uint64_t win = win0, last = this_hour(); win <= last; win += HOUR) {
        for (int k = 0; k < NEW_KEYS; k++) {
            char key[32], name[256];
            snprintf(key, sizeof(key), "new-%d", k);
            key_name(name, sizeof(name), "many:", "many", 0, key, win);
            redisAppendCommand(c, "GET %s", name);
        }
        for (int k = 0; k < NEW_KEYS; k++) {
            redisReply *v = NULL;
            cr_assert_eq(redisGetReply(c, (void **)&v), REDIS_OK);
            cr_assert(v && (v->type == REDIS_REPLY_STRING || v->type == REDIS_REPLY_NIL));
            got[k] += v->type == REDIS_REPLY_STRING ? strtoull(v->str, NULL, 10) : 0;
            freeReplyObject(v);
        }
    }
    redisFree(c);
    uint64_t admitted = 0, over = 0;
    for (int k = 0; k < NEW_KEYS; k++) {
        uint64_t want = atomic_load(&cost[k]);
        cr_assert_eq(got[k], want, "new-%d: Redis %" PRIu64 ", admitted %" PRIu64, k, got[k], want);
        admitted += want;
        over += want > p.limits[0].max;
    }
    tally_stats st;
    cr_assert_eq(tally_stats_read(b, &st), 0);
    fprintf(stderr, "many new keys: %" PRIu64 " admitted, %" PRIu64 " denied, %" PRIu64
            " keys over max, %" PRIu64 " evictions\n", admitted, denied, over, st.lru_evictions);
    cr_assert_gt(st.lru_evictions, 0);
    free(got);
    tally_close(b);
    free(cost);
    test_redis_stop(&r);
}
