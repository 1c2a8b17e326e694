/*
 * Operator views: usage histograms, the rejection watch and its set-once
 * flag, bounded throttle episodes, and the table scan.
 */
#include "test.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "tally.h"
#include "engine_open.h"

#define HOUR (3600 * SEC)

static uint32_t add_policy(tally_engine *e, const char *name, uint64_t max)
{
    tally_policy p = { .name = name, .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = max, .period_ns = HOUR } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

/* ---- Usage histograms ----------------------------------------------------- */

struct usage {
    pthread_mutex_t    lock;
    tally_usage_report last;     /* the last report with keys */
    int                reports;
};

static void on_usage(void *ctx, const tally_usage_report *r)
{
    struct usage *u = ctx;
    pthread_mutex_lock(&u->lock);
    if (r->keys) {
        u->last = *r;
        u->reports++;
    }
    pthread_mutex_unlock(&u->lock);
}

Test(ops, usage_histogram_buckets_and_sum_are_exact)
{
    tally_engine *e = open_engine(64);
    uint32_t pol = add_policy(e, "usage", 1000000);
    static struct usage u = { .lock = PTHREAD_MUTEX_INITIALIZER };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 3600 * 1000;          /* only tally_flush reports */
    fo.on_usage = on_usage;
    fo.ctx = &u;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    tally_result r;
    uint64_t c1 = 1, c3 = 3, c1000 = 1000, c2 = 2;
    cr_assert_eq(tally_hit(e, pol, "a", 1, &c1, &r), 0);
    cr_assert_eq(tally_hit(e, pol, "b", 1, &c3, &r), 0);
    cr_assert_eq(tally_hit(e, pol, "c", 1, &c1000, &r), 0);
    cr_assert_eq(tally_hit(e, pol, "d", 1, &c2, &r), 0);
    cr_assert_eq(tally_hit(e, pol, "d", 1, &c2, &r), 0);   /* d used 4 in the interval */
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(u.reports, 1);
    cr_assert_eq(u.last.keys, 4);
    cr_assert_eq(u.last.sum, 1 + 3 + 1000 + 4);
    /* bucket i holds 2^(i-1) < d <= 2^i */
    cr_assert_eq(u.last.buckets[0], 1, "1");
    cr_assert_eq(u.last.buckets[2], 2, "3 and 4");
    cr_assert_eq(u.last.buckets[10], 1, "1000");
    uint64_t total = 0;
    for (int i = 0; i < TALLY_USAGE_BUCKETS; i++)
        total += u.last.buckets[i];
    cr_assert_eq(total, 4);

    char text[65536];
    int n = tally_stats_prometheus(e, text, sizeof(text));
    cr_assert_gt(n, 0);
    cr_assert_lt((size_t)n, sizeof(text));
    cr_assert_not_null(strstr(text, "# TYPE tally_usage_cost histogram"));
    cr_assert_not_null(strstr(text, "tally_usage_cost_bucket{policy=\"usage\",limit=\"0\",le=\"1\"} 1\n"));
    cr_assert_not_null(strstr(text, "tally_usage_cost_bucket{policy=\"usage\",limit=\"0\",le=\"4\"} 3\n"));
    cr_assert_not_null(strstr(text, "tally_usage_cost_bucket{policy=\"usage\",limit=\"0\",le=\"+Inf\"} 4\n"));
    cr_assert_not_null(strstr(text, "tally_usage_cost_sum{policy=\"usage\",limit=\"0\"} 1008\n"));

    /* the next interval starts empty */
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(u.reports, 1, "no usage, no report with keys");
    tally_close(e);
}

/* ---- The watch: flag once ------------------------------------------------- */

struct flags {
    pthread_mutex_t lock;
    int             n;
    uint64_t        denied;
};

static void on_flag(void *ctx, uint32_t policy, const tally_flag *f)
{
    (void)policy;
    struct flags *x = ctx;
    pthread_mutex_lock(&x->lock);
    x->n++;
    x->denied = f->denied;
    pthread_mutex_unlock(&x->lock);
}

#define CROSS_THREADS 8
#define CROSS_HITS    400

struct crosser {
    tally_engine      *e;
    uint32_t           policy;
    pthread_barrier_t *start;
};

static void *cross_worker(void *arg)
{
    struct crosser *c = arg;
    pthread_barrier_wait(c->start);
    for (int i = 0; i < CROSS_HITS; i++) {
        tally_result r;
        tally_hit(c->e, c->policy, "abuser", 6, NULL, &r);
    }
    return NULL;
}

static int count_flag(void *ctx, const tally_flag *f)
{
    struct flags *x = ctx;
    x->n++;
    x->denied = f->denied;
    cr_assert_eq(f->key_len, 6);
    cr_assert_eq(memcmp(f->key, "abuser", 6), 0);
    cr_assert_gt(f->flagged_at_ns, 0);
    return 0;
}

Test(ops, flag_is_set_once_when_threads_cross_together, .timeout = 120)
{
    tally_engine *e = open_engine(64);
    uint32_t pol = add_policy(e, "watched", 1);
    tally_watch w = { .threshold = 1000, .window_ns = 600 * SEC };
    cr_assert_eq(tally_watch_set(e, pol, &w), 0);
    static struct flags got = { .lock = PTHREAD_MUTEX_INITIALIZER };
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 10;
    fo.on_flag = on_flag;
    fo.ctx = &got;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);

    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, CROSS_THREADS);
    pthread_t th[CROSS_THREADS];
    struct crosser c = { e, pol, &start };
    for (int i = 0; i < CROSS_THREADS; i++)
        pthread_create(&th[i], NULL, cross_worker, &c);
    for (int i = 0; i < CROSS_THREADS; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(got.n, 1, "one flag event for %d threads crossing together", CROSS_THREADS);
    cr_assert_geq(got.denied, 1000);

    struct flags listed = { .lock = PTHREAD_MUTEX_INITIALIZER };
    cr_assert_eq(tally_watch_flagged(e, pol, 0, count_flag, &listed), 1);
    cr_assert_eq(listed.n, 1);
    tally_scan_filter only = { .flagged_only = true };
    cr_assert_eq(tally_scan(e, pol, &only, NULL, NULL), TALLY_EINVAL, "a NULL callback");

    /* cleared by an operator: the key can be flagged again */
    cr_assert_eq(tally_watch_clear(e, pol, "abuser", 6), 0);
    cr_assert_eq(tally_watch_clear(e, pol, "abuser", 6), TALLY_ENOENT, "not flagged any more");
    listed.n = 0;
    cr_assert_eq(tally_watch_flagged(e, pol, 0, count_flag, &listed), 0);
    for (int i = 0; i < 1001; i++) {
        tally_result r;
        tally_hit(e, pol, "abuser", 6, NULL, &r);
    }
    cr_assert_eq(tally_flush(e, 3000), 0);
    cr_assert_eq(got.n, 2);
    pthread_barrier_destroy(&start);
    tally_close(e);
}

/* ---- Episodes: bounded under a spray of keys ------------------------------ */

struct episodes {
    int      n;
    char     first_key[32];
    uint64_t last_ns_prev;
    bool     ordered;
};

static int count_episode(void *ctx, const tally_episode *ep)
{
    struct episodes *x = ctx;
    if (x->n == 0)
        memcpy(x->first_key, ep->key, ep->key_len < 31 ? ep->key_len : 31);
    if (x->n > 0 && ep->last_ns > x->last_ns_prev)
        x->ordered = false;
    x->last_ns_prev = ep->last_ns;
    x->n++;
    return 0;
}

Test(ops, episodes_stay_bounded_under_a_key_spray, .timeout = 300)
{
    enum { SPRAY = 100000, CAP = 200 };
    tally_engine *e = open_engine(SPRAY);
    uint32_t pol = add_policy(e, "spray", 1);
    tally_watch w = { .threshold = 1000000, .window_ns = 600 * SEC, .episodes = CAP };
    cr_assert_eq(tally_watch_set(e, pol, &w), 0);
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 3600 * 1000;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    char key[32];
    for (int round = 0; round < 2; round++) {
        for (int k = round * SPRAY / 2; k < (round + 1) * SPRAY / 2; k++) {
            tally_result r;
            snprintf(key, sizeof(key), "spray-%d", k);
            tally_hit(e, pol, key, strlen(key), NULL, &r);
            tally_hit(e, pol, key, strlen(key), NULL, &r);      /* denied: max 1 */
            cr_assert_not(r.allowed);
        }
        cr_assert_eq(tally_flush(e, 30000), 0);
    }
    struct episodes x = { .ordered = true };
    cr_assert_eq(tally_watch_episodes(e, pol, 0, count_episode, &x), CAP);
    cr_assert_eq(x.n, CAP, "at most %d series are kept", CAP);
    cr_assert(x.ordered, "most recently throttled first");
    /* the kept series come from the second flush: the first ones were evicted */
    int k;
    cr_assert_eq(sscanf(x.first_key, "spray-%d", &k), 1);
    cr_assert_geq(k, SPRAY / 2);
    struct episodes y = { .ordered = true };
    cr_assert_eq(tally_watch_episodes(e, pol, 5, count_episode, &y), 5);
    tally_close(e);
}

/* ---- The scan: every live key once while threads hit --------------------- */

#define SCAN_KEYS 20000

struct scan_seen {
    _Atomic unsigned char seen[SCAN_KEYS];
    int dup, total;
};

static int mark_seen(void *ctx, const tally_scan_entry *en)
{
    struct scan_seen *s = ctx;
    char buf[32] = { 0 };
    memcpy(buf, en->key, en->key_len < 31 ? en->key_len : 31);
    int k;
    if (sscanf(buf, "scan-%d", &k) == 1 && k >= 0 && k < SCAN_KEYS) {
        if (atomic_fetch_add(&s->seen[k], 1) != 0)
            s->dup++;
        s->total++;
    }
    return 0;
}

struct scan_hitter {
    tally_engine *e;
    uint32_t      policy;
    _Atomic bool *stop;
};

static void *scan_hit_worker(void *arg)
{
    struct scan_hitter *h = arg;
    char key[32];
    for (unsigned i = 0; !atomic_load(h->stop); i++) {
        tally_result r;
        snprintf(key, sizeof(key), "scan-%u", (i * 7919u) % SCAN_KEYS);
        tally_hit(h->e, h->policy, key, strlen(key), NULL, &r);
    }
    return NULL;
}

Test(ops, scan_sees_every_live_key_once_while_threads_hit, .timeout = 120)
{
    tally_engine *e = open_engine(SCAN_KEYS);
    uint32_t pol = add_policy(e, "scan", 1000000);
    char key[32];
    for (int k = 0; k < SCAN_KEYS; k++) {
        tally_result r;
        uint64_t cost = (uint64_t)(k % 10) + 1;
        snprintf(key, sizeof(key), "scan-%d", k);
        cr_assert_eq(tally_hit(e, pol, key, strlen(key), &cost, &r), 0);
    }
    static _Atomic bool stop;
    atomic_store(&stop, false);
    struct scan_hitter h = { e, pol, &stop };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, scan_hit_worker, &h);
    for (int round = 0; round < 5; round++) {
        static struct scan_seen s;
        memset(&s, 0, sizeof(s));
        cr_assert_eq(tally_scan(e, pol, NULL, mark_seen, &s), SCAN_KEYS);
        cr_assert_eq(s.dup, 0);
        cr_assert_eq(s.total, SCAN_KEYS);
    }
    atomic_store(&stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);

    /* filters: used >= N, and a limit */
    static struct scan_seen s;
    memset(&s, 0, sizeof(s));
    tally_scan_filter f = { .limit = 7 };
    cr_assert_eq(tally_scan(e, pol, &f, mark_seen, &s), 7);
    tally_close(e);
}

static int check_min_used(void *ctx, const tally_scan_entry *en)
{
    int *n = ctx;
    cr_assert_geq(en->c[0].used, 9);
    (*n)++;
    return 0;
}

Test(ops, scan_filter_by_usage)
{
    tally_engine *e = open_engine(256);
    uint32_t pol = add_policy(e, "filter", 1000000);
    char key[32];
    for (int k = 0; k < 100; k++) {
        tally_result r;
        uint64_t cost = (uint64_t)(k % 10) + 1;            /* 10 keys each of cost 9 and 10 */
        snprintf(key, sizeof(key), "f-%d", k);
        cr_assert_eq(tally_hit(e, pol, key, strlen(key), &cost, &r), 0);
    }
    int n = 0;
    tally_scan_filter f = { .min_used = 9 };
    cr_assert_eq(tally_scan(e, pol, &f, check_min_used, &n), 20);
    cr_assert_eq(n, 20);
    tally_close(e);
}

/* ---- Bad input ------------------------------------------------------------ */

static int never(void *ctx, const tally_episode *ep)
{
    (void)ctx;
    (void)ep;
    return 0;
}

Test(ops, bad_input_is_refused)
{
    tally_engine *e = open_engine(64);
    uint32_t pol = add_policy(e, "bad", 10);
    tally_watch w = { .threshold = 0, .window_ns = SEC };
    cr_assert_eq(tally_watch_set(e, pol, &w), TALLY_EINVAL, "zero threshold");
    w.threshold = 10;
    w.window_ns = 0;
    cr_assert_eq(tally_watch_set(e, pol, &w), TALLY_EINVAL, "zero window");
    w.window_ns = SEC;
    cr_assert_eq(tally_watch_set(NULL, pol, &w), TALLY_EINVAL);
    cr_assert_eq(tally_watch_set(e, pol, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_watch_set(e, pol + 1, &w), TALLY_EINVAL, "unknown policy");
    cr_assert_eq(tally_watch_episodes(e, pol, 0, never, NULL), TALLY_EINVAL, "no watch yet");
    cr_assert_eq(tally_watch_clear(e, pol, "k", 1), TALLY_EINVAL, "no watch yet");
    cr_assert_eq(tally_watch_set(e, pol, &w), 0);
    cr_assert_eq(tally_watch_set(e, pol, &w), TALLY_ESTATE, "one watch per policy");
    cr_assert_eq(tally_watch_episodes(e, pol, 0, NULL, NULL), TALLY_EINVAL, "NULL callback");
    cr_assert_eq(tally_watch_flagged(e, pol, 0, NULL, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_watch_clear(e, pol, "k", 1), TALLY_ENOENT);
    cr_assert_eq(tally_watch_clear(e, pol, NULL, 1), TALLY_EINVAL);
    cr_assert_eq(tally_scan(e, 99, NULL, (int (*)(void *, const tally_scan_entry *))check_min_used, NULL),
                 TALLY_EINVAL);
    cr_assert_eq(tally_watch_episodes(e, pol, 0, never, NULL), 0, "no flusher: no episodes");
    tally_close(e);
}
