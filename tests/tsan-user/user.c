/*
 * A program as a user writes it: built with -fsanitize=thread against the
 * installed libtally (not instrumented), which it uses from several threads
 * at once. tools/tsan-user-check runs it and requires that ThreadSanitizer
 * reports nothing: every hand-off inside the library (key bytes to the
 * flusher and to scans, notes to the flusher, shared coalesced results)
 * must be visible to it as the synchronisation it is.
 *
 * Threads: hitters crossing limits (events, denials, flags), on a churning
 * policy whose slots are reclaimed and on policies added while they run; a
 * scanner (tally_scan, flagged keys, episodes, clearing flags); a thread
 * asking for flushes; callers of a coalescer sharing each execution's result.
 * The flusher delivers to callbacks only, which read every key byte.
 *
 * Besides the sanitizer's verdict it checks what the callbacks saw: every key
 * is intact (or its digest, where the library names a key by its digest),
 * the deltas add up to the cost the hits consumed, one event per
 * first crossing, one on_flag per flag set, and every coalesced value is
 * whole and freed once, by its last holder.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <tally.h>

#define HITTERS      3
#define HITS         20000         /* per hitter; each hits api, churn and a dyn policy */
#define API_KEYS     64
#define DYN_POLICIES 6
#define CALLERS      4             /* coalescer callers, all on one key */
#define ROUNDS       200
#define VALUE_BYTES  512
#define MS           UINT64_C(1000000)

static int failures;
static pthread_mutex_t fail_lock = PTHREAD_MUTEX_INITIALIZER;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            pthread_mutex_lock(&fail_lock);                               \
            if (failures++ < 20) {                                        \
                fprintf(stderr, "user.c:%d: check failed: %s: ", __LINE__, #cond); \
                fprintf(stderr, __VA_ARGS__);                             \
                fputc('\n', stderr);                                      \
            }                                                             \
            pthread_mutex_unlock(&fail_lock);                             \
        }                                                                 \
    } while (0)

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, us % 1000000 * 1000 };
    nanosleep(&ts, NULL);
}

/* ---- Keys: "<id>:" then filler bytes derived from the id, 8 to 200 bytes ---- */

static size_t make_key(uint64_t id, unsigned char *buf)
{
    size_t n = (size_t)snprintf((char *)buf, 32, "%llu:", (unsigned long long)id);
    size_t len = 8 + (size_t)(id * 37 % 193);
    for (size_t i = n; i < len; i++)
        buf[i] = (unsigned char)(id * 131 + i * 7);
    return len;
}

/* Read every byte of a key the library handed back; true when it is intact. */
static bool key_ok(const void *key, size_t len)
{
    const unsigned char *k = key;
    unsigned char want[256];
    uint64_t id = 0;
    size_t i = 0;
    if (!k || len < 8 || len > 200)
        return false;
    while (i < len && k[i] >= '0' && k[i] <= '9')
        id = id * 10 + (uint64_t)(k[i++] - '0');
    return i < len && k[i] == ':' && make_key(id, want) == len && memcmp(want, k, len) == 0;
}

/* An episode of a key longer than 64 bytes names the key by its 16-byte
   digest (tally/ops.h). */
#define DIGEST_LEN 16
static _Atomic uint64_t digest_named;

static bool key_or_digest_ok(const void *key, size_t len)
{
    if (key_ok(key, len))
        return true;
    if (!key || len != DIGEST_LEN)
        return false;
    unsigned acc = 0;
    for (size_t i = 0; i < len; i++)
        acc |= ((const unsigned char *)key)[i];
    atomic_fetch_add(&digest_named, 1);
    return acc != 0;
}

/* ---- The engine's users ----------------------------------------------------- */

static tally_engine *eng;
static uint32_t api, churn;
static uint32_t dyn_ids[DYN_POLICIES];
static _Atomic int dyn_ready;            /* dyn_ids[0 .. dyn_ready) are valid */
static _Atomic bool hitting = true;

/* What the hits did, summed when the hitters finish. */
static _Atomic uint64_t consumed;        /* cost consumed, over every limit */
static _Atomic uint64_t crossings;       /* first_exceeded bits */

/* What the flusher's callbacks saw (flusher thread; read after it stopped). */
static uint64_t delta_sum, deltas_seen, events_seen, flags_seen, usage_reports;

static void on_deltas(void *ctx, const tally_delta *d, size_t n)
{
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        CHECK(key_ok(d[i].key, d[i].key_len), "delta key of policy %u", d[i].policy);
        delta_sum += d[i].delta;
        deltas_seen++;
    }
}

static void on_event(void *ctx, const tally_event *ev)
{
    (void)ctx;
    CHECK(key_ok(ev->key, ev->key_len), "event key of policy %u", ev->policy);
    CHECK(ev->used >= ev->max, "event with used %llu below max %llu",
          (unsigned long long)ev->used, (unsigned long long)ev->max);
    events_seen++;
}

static void on_flag(void *ctx, uint32_t policy, const tally_flag *f)
{
    (void)ctx;
    CHECK(policy == api && key_ok(f->key, f->key_len), "flag key of policy %u", policy);
    flags_seen++;
}

static void on_usage(void *ctx, const tally_usage_report *r)
{
    (void)ctx;
    (void)r;
    usage_reports++;
}

static void hit_one(uint32_t policy, unsigned n_limits, uint64_t id, uint64_t *used,
                    uint64_t *crossed)
{
    unsigned char key[256];
    size_t len = make_key(id, key);
    tally_result r;
    int rc = tally_hit(eng, policy, key, len, NULL, &r);
    if (rc == TALLY_EFULL && policy == churn)
        return;                          /* every slot live: the hit changed nothing */
    CHECK(rc == 0, "tally_hit on policy %u: %s", policy, tally_strerror(rc));
    if (rc)
        return;
    if (r.allowed)
        *used += n_limits;
    *crossed += (uint64_t)__builtin_popcount(r.first_exceeded);
}

static void *hitter(void *arg)
{
    uint64_t t = (uint64_t)(uintptr_t)arg, s = 0x9e3779b97f4a7c15u * (t + 1), used = 0, crossed = 0;
    for (int i = 0; i < HITS; i++) {
        hit_one(api, 2, rnd(&s) % API_KEYS, &used, &crossed);
        hit_one(churn, 1, 1000000 + t * HITS + (uint64_t)i, &used, &crossed);
        int nd = atomic_load(&dyn_ready);
        if (nd)
            hit_one(dyn_ids[rnd(&s) % (uint64_t)nd], 1, rnd(&s) % 16, &used, &crossed);
    }
    atomic_fetch_add(&consumed, used);
    atomic_fetch_add(&crossings, crossed);
    return NULL;
}

static void *adder(void *arg)
{
    (void)arg;
    for (int i = 0; i < DYN_POLICIES; i++) {
        char name[32];
        snprintf(name, sizeof(name), "dyn-%d", i);
        tally_policy p = { .name = name, .n_limits = 1,
                           .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = 10 * MS } } };
        int rc = tally_policy_add(eng, &p, &dyn_ids[i]);
        CHECK(rc == 0, "tally_policy_add %s: %s", name, tally_strerror(rc));
        if (rc)
            break;
        atomic_store(&dyn_ready, i + 1);
        sleep_us(3000);
    }
    return NULL;
}

static uint64_t scanned;

static int scan_cb(void *ctx, const tally_scan_entry *en)
{
    (void)ctx;
    CHECK(key_ok(en->key, en->key_len), "scanned key");
    scanned++;
    return 0;
}

typedef struct flagged_ctx {
    unsigned char key[256];
    size_t len;
    uint64_t seen;
} flagged_ctx;

static int flagged_cb(void *ctx, const tally_flag *f)
{
    flagged_ctx *c = ctx;
    CHECK(key_ok(f->key, f->key_len), "flagged key");
    if (f->key_len <= sizeof(c->key)) {
        memcpy(c->key, f->key, f->key_len);
        c->len = f->key_len;
    }
    c->seen++;
    return 0;
}

static int episode_cb(void *ctx, const tally_episode *ep)
{
    (void)ctx;
    CHECK(key_or_digest_ok(ep->key, ep->key_len), "episode key");
    return 0;
}

static void *scanner(void *arg)
{
    (void)arg;
    flagged_ctx fc = { .len = 0 };
    while (atomic_load(&hitting)) {
        int n = tally_scan(eng, api, NULL, scan_cb, NULL);
        CHECK(n >= 0, "tally_scan api: %s", tally_strerror(n));
        n = tally_scan(eng, churn, NULL, scan_cb, NULL);
        CHECK(n >= 0, "tally_scan churn: %s", tally_strerror(n));
        fc.len = 0;
        n = tally_watch_flagged(eng, api, 0, flagged_cb, &fc);
        CHECK(n >= 0, "tally_watch_flagged: %s", tally_strerror(n));
        if (fc.len) {
            int rc = tally_watch_clear(eng, api, fc.key, fc.len);
            CHECK(rc == 0 || rc == TALLY_ENOENT, "tally_watch_clear: %s", tally_strerror(rc));
        }
        n = tally_watch_episodes(eng, api, 0, episode_cb, NULL);
        CHECK(n >= 0, "tally_watch_episodes: %s", tally_strerror(n));
        sleep_us(1000);
    }
    CHECK(scanned > 0 && fc.seen > 0, "scanned %llu keys, %llu flagged",
          (unsigned long long)scanned, (unsigned long long)fc.seen);
    return NULL;
}

static void *flush_asker(void *arg)
{
    (void)arg;
    while (atomic_load(&hitting)) {
        int rc = tally_flush(eng, 10000);
        CHECK(rc == 0, "tally_flush: %s", tally_strerror(rc));
        sleep_us(2000);
    }
    return NULL;
}

/* ---- The coalescer's users -------------------------------------------------- */

static tally_coalesce *coal;
static pthread_barrier_t round_start;
static _Atomic int values_live, values_freed;

typedef struct caller_arg {
    int round;
} caller_arg;

typedef struct value {
    int round;
    unsigned char bytes[VALUE_BYTES];
} value;

/* The leader's operation: wait until every other caller joined this round's
   execution, so that CALLERS holders share one result, then make the value.
   If a caller never joins (coalescing broken), the wait ends after 200000
   polls (10 s at least) and the count of coalesced calls checked at the end
   tells. */
static int op_run(void *arg, void **out)
{
    caller_arg *a = arg;
    for (int polls = 0; polls < 200000; polls++) {
        tally_coalesce_stats st;
        tally_coalesce_read_stats(coal, &st);
        if (st.coalesced >= (uint64_t)(a->round + 1) * (CALLERS - 1))
            break;
        sleep_us(50);
    }
    value *v = malloc(sizeof(*v));
    if (!v)
        return 1;
    v->round = a->round;
    memset(v->bytes, a->round & 0xff, sizeof(v->bytes));
    atomic_fetch_add(&values_live, 1);
    *out = v;
    return 0;
}

static void free_value(void *p)
{
    value *v = p;
    memset(v->bytes, 0xee, sizeof(v->bytes));    /* a holder still reading would see it */
    free(v);
    atomic_fetch_sub(&values_live, 1);
    atomic_fetch_add(&values_freed, 1);
}

static void *caller(void *arg)
{
    uint64_t s = 0x2545f4914f6cdd1du * ((uint64_t)(uintptr_t)arg + 1);
    caller_arg a;
    tally_coalesce_op op = { op_run, free_value, &a };
    for (int r = 0; r < ROUNDS; r++) {
        a.round = r;
        pthread_barrier_wait(&round_start);
        tally_coalesce_result *res = NULL;
        int rc = tally_coalesce_do(coal, "token", 5, &op, TALLY_COALESCE_FOREVER, &res);
        CHECK(rc == 0, "tally_coalesce_do: %s", tally_strerror(rc));
        if (rc)
            continue;
        const value *v = tally_coalesce_value(res);
        CHECK(tally_coalesce_status(res) == 0 && v && v->round == r, "round %d result", r);
        for (size_t i = 0; v && i < sizeof(v->bytes); i++)
            if (v->bytes[i] != (r & 0xff)) {
                CHECK(false, "round %d value byte %zu is %#x", r, i, v->bytes[i]);
                break;
            }
        /* the holders let go in a random order: any of them may be the last */
        sleep_us((long)(rnd(&s) % 200));
        tally_coalesce_release(res);
    }
    return NULL;
}

/* ---- Main --------------------------------------------------------------------- */

static uint64_t prometheus_value(const char *name)
{
    static char buf[1 << 16];
    char pat[64];
    int n = tally_stats_prometheus(eng, buf, sizeof(buf));
    if (n < 0 || (size_t)n >= sizeof(buf))
        return UINT64_MAX;
    snprintf(pat, sizeof(pat), "\n%s ", name);
    const char *p = strstr(buf, pat);
    return p ? strtoull(p + strlen(pat), NULL, 10) : UINT64_MAX;
}

int main(void)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 256;                    /* the churning policy fills it: slots get reclaimed */
    int rc = tally_open(&o, &eng);
    if (rc) {
        fprintf(stderr, "tally_open: %s\n", tally_strerror(rc));
        return 1;
    }
    tally_policy pa = { .name = "api", .n_limits = 2,
                        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 4, .period_ns = 20 * MS },
                                    { .algo = TALLY_FIXED_WINDOW, .max = 40, .period_ns = 500 * MS } } };
    tally_policy pc = { .name = "churn", .n_limits = 1,
                        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 1 * MS } } };
    tally_watch w = { .threshold = 6, .window_ns = 100 * MS, .episodes = 32 };
    if (tally_policy_add(eng, &pa, &api) || tally_policy_add(eng, &pc, &churn)
        || tally_watch_set(eng, api, &w)) {
        fprintf(stderr, "policy setup failed\n");
        return 1;
    }
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 2;
    fo.on_deltas = on_deltas;
    fo.on_event = on_event;
    fo.on_flag = on_flag;
    fo.on_usage = on_usage;
    rc = tally_flusher_start(eng, &fo);
    if (rc) {
        fprintf(stderr, "tally_flusher_start: %s\n", tally_strerror(rc));
        return 1;
    }

    tally_coalesce_options co;
    tally_coalesce_options_init(&co);
    co.capacity = 16;
    if (tally_coalesce_open(&co, &coal) || pthread_barrier_init(&round_start, NULL, CALLERS)) {
        fprintf(stderr, "coalescer setup failed\n");
        return 1;
    }

    pthread_t hit_t[HITTERS], call_t[CALLERS], add_t, scan_t, flush_t;
    for (int i = 0; i < HITTERS; i++)
        pthread_create(&hit_t[i], NULL, hitter, (void *)(uintptr_t)i);
    for (int i = 0; i < CALLERS; i++)
        pthread_create(&call_t[i], NULL, caller, (void *)(uintptr_t)i);
    pthread_create(&add_t, NULL, adder, NULL);
    pthread_create(&scan_t, NULL, scanner, NULL);
    pthread_create(&flush_t, NULL, flush_asker, NULL);

    for (int i = 0; i < HITTERS; i++)
        pthread_join(hit_t[i], NULL);
    pthread_join(add_t, NULL);
    atomic_store(&hitting, false);
    pthread_join(scan_t, NULL);
    pthread_join(flush_t, NULL);
    for (int i = 0; i < CALLERS; i++)
        pthread_join(call_t[i], NULL);

    rc = tally_flush(eng, 10000);
    CHECK(rc == 0, "final tally_flush: %s", tally_strerror(rc));
    rc = tally_flusher_stop(eng);
    CHECK(rc == 0, "tally_flusher_stop: %s", tally_strerror(rc));

    tally_stats st;
    tally_stats_read(eng, &st);
    CHECK(st.lost_cost == 0 && st.pending_cost == 0, "lost %llu, pending %llu",
          (unsigned long long)st.lost_cost, (unsigned long long)st.pending_cost);
    CHECK(delta_sum == atomic_load(&consumed), "deltas add up to %llu, hits consumed %llu",
          (unsigned long long)delta_sum, (unsigned long long)atomic_load(&consumed));
    CHECK(events_seen == atomic_load(&crossings) && st.events == events_seen,
          "%llu events delivered (stats %llu), %llu first crossings",
          (unsigned long long)events_seen, (unsigned long long)st.events,
          (unsigned long long)atomic_load(&crossings));
    uint64_t flags_set = prometheus_value("tally_watch_flags");
    CHECK(flags_seen > 0 && flags_seen == flags_set, "%llu on_flag calls, %llu flags set",
          (unsigned long long)flags_seen, (unsigned long long)flags_set);
    CHECK(st.evictions > 0, "no slot of the churning policy was reclaimed");
    CHECK(usage_reports > 0, "no usage report");
    tally_close(eng);

    tally_coalesce_stats cs;
    tally_coalesce_read_stats(coal, &cs);
    CHECK(cs.executions == ROUNDS && cs.coalesced == (uint64_t)ROUNDS * (CALLERS - 1),
          "%llu executions, %llu coalesced calls", (unsigned long long)cs.executions,
          (unsigned long long)cs.coalesced);
    tally_coalesce_close(coal);
    CHECK(atomic_load(&values_live) == 0 && atomic_load(&values_freed) == ROUNDS,
          "%d values live, %d freed", atomic_load(&values_live), atomic_load(&values_freed));
    pthread_barrier_destroy(&round_start);

    printf("tsan-user: %llu hits, cost consumed %llu, %llu deltas, %llu events, %llu flags, "
           "%llu evictions, %llu keys scanned, %llu named by digest, %d coalesced rounds: %s\n",
           (unsigned long long)st.hits, (unsigned long long)delta_sum,
           (unsigned long long)deltas_seen, (unsigned long long)events_seen,
           (unsigned long long)flags_seen, (unsigned long long)st.evictions,
           (unsigned long long)scanned, (unsigned long long)atomic_load(&digest_named), ROUNDS,
           failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
