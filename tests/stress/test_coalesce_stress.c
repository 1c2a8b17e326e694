/*
 * Coalescing under real threads: callers racing on a few keys while the
 * executions overlap, waiters give up at random, the breaker opens and
 * closes, and shutdown lands in the middle. Each test checks an exact
 * invariant: at most one execution per key at any moment, every value freed
 * exactly once and only after its last holder, every counter equal to what
 * the callers saw, at most one breaker probe at a time.
 */
#include "../test.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tally.h"
#include "coalesce/coalesce-internal.h"

#define THREADS 6
#define KEYS    4
#define MS      UINT64_C(1000000)
#define US      UINT64_C(1000)

static void spin_ns(uint64_t ns)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do
        clock_gettime(CLOCK_MONOTONIC, &b);
    while ((uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)(b.tv_nsec - a.tv_nsec) < ns);
}

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* ---- Shared: an operation that checks it runs alone for its key ---------------- */

typedef struct key_state {
    _Atomic int running;          /* executions of this key running now */
} key_state;

typedef struct shared {
    tally_coalesce *c;
    key_state       keys[KEYS];
    uint64_t        work_ns;      /* how long an execution takes */
    bool          (*fails)(int n); /* whether the n-th execution fails; NULL: none */
    _Atomic int     runs;
    _Atomic int     frees;
    _Atomic int     overlaps;     /* executions that found another of their key running */
    _Atomic int     bad_frees;    /* values freed before their last holder let go */
    _Atomic int     stop;
} shared;

typedef struct op_arg {
    shared *sh;
    int     key;
} op_arg;

typedef struct value {
    shared     *sh;
    int         run_no;
    _Atomic int holders;          /* callers holding it, counted by the callers */
} value;

static int op_run(void *arg, void **out)
{
    op_arg *a = arg;
    shared *sh = a->sh;
    if (atomic_fetch_add(&sh->keys[a->key].running, 1) != 0)
        atomic_fetch_add(&sh->overlaps, 1);
    int n = atomic_fetch_add(&sh->runs, 1) + 1;
    spin_ns(sh->work_ns);
    value *v = malloc(sizeof(*v));
    cr_assert_not_null(v);
    v->sh = sh;
    v->run_no = n;
    atomic_init(&v->holders, 0);
    *out = v;
    atomic_fetch_sub(&sh->keys[a->key].running, 1);
    return sh->fails && sh->fails(n) ? 1 : 0;
}

static void op_free(void *p)
{
    value *v = p;
    if (atomic_load(&v->holders) != 0)
        atomic_fetch_add(&v->sh->bad_frees, 1);
    atomic_fetch_add(&v->sh->frees, 1);
    free(v);
}

static bool every_7th(int n)
{
    return n % 7 == 0;
}

/* runs of 8 failures: enough to open a breaker of 3 */
static bool blocks_of_8(int n)
{
    return n / 8 % 2 == 1;
}

typedef struct worker {
    shared  *sh;
    int      t;
    int      rounds;
    uint64_t max_timeout_ns;      /* 0: wait forever; else a random bound below it */
    int      ok, timedout, estate, busy, open, other;
} worker;

static void *worker_main(void *p)
{
    worker *w = p;
    uint64_t seed = 0x9e3779b97f4a7c15u * (uint64_t)(w->t + 1);
    for (int i = 0; i < w->rounds && !atomic_load(&w->sh->stop); i++) {
        op_arg a = { w->sh, (int)(rnd(&seed) % KEYS) };
        char key[16];
        int n = snprintf(key, sizeof(key), "key-%d", a.key);
        tally_coalesce_op op = { .run = op_run, .free_value = op_free, .arg = &a };
        uint64_t timeout = w->max_timeout_ns ? rnd(&seed) % w->max_timeout_ns
                                             : TALLY_COALESCE_FOREVER;
        tally_coalesce_result *r = NULL;
        int rc = tally_coalesce_do(w->sh->c, key, (size_t)n, &op, timeout, &r);
        value *v = rc == 0 ? tally_coalesce_value(r) : NULL;
        if (v) {
            atomic_fetch_add(&v->holders, 1);
            if (v->run_no <= 0 || v->run_no > atomic_load(&w->sh->runs))
                w->other++;
            atomic_fetch_sub(&v->holders, 1);
            tally_coalesce_release(r);
            w->ok++;
        } else if (rc == TALLY_ETIMEDOUT) {
            w->timedout++;
        } else if (rc == TALLY_ESTATE) {
            w->estate++;
        } else if (rc == TALLY_EBUSY) {
            w->busy++;
        } else if (rc == TALLY_EOPEN) {
            w->open++;
        } else {
            w->other++;
        }
    }
    return NULL;
}

static void run_workers(worker *w, int n)
{
    pthread_t th[THREADS];
    for (int i = 0; i < n; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
}

static void check_shared(shared *sh)
{
    cr_assert_eq(atomic_load(&sh->overlaps), 0, "two executions of one key overlapped");
    cr_assert_eq(atomic_load(&sh->bad_frees), 0, "a value was freed while held");
    cr_assert_eq(atomic_load(&sh->frees), atomic_load(&sh->runs), "every value freed once");
}

Test(coalesce_stress, one_execution_per_key_at_a_time)
{
    shared sh = { .work_ns = 20 * US, .fails = every_7th };
    cr_assert_eq(tally_coalesce_open(NULL, &sh.c), 0);
    worker w[THREADS];
    for (int i = 0; i < THREADS; i++)
        w[i] = (worker){ .sh = &sh, .t = i, .rounds = 3000 };
    run_workers(w, THREADS);

    int ok = 0;
    for (int i = 0; i < THREADS; i++) {
        cr_assert_eq(w[i].other, 0);
        cr_assert_eq(w[i].timedout + w[i].estate + w[i].busy + w[i].open, 0);
        ok += w[i].ok;
    }
    check_shared(&sh);
    tally_coalesce_stats s;
    cr_assert_eq(tally_coalesce_read_stats(sh.c, &s), 0);
    cr_assert_eq(s.calls, (uint64_t)ok);
    cr_assert_eq(s.executions, (uint64_t)atomic_load(&sh.runs));
    cr_assert_eq(s.executions + s.coalesced, s.calls);
    cr_assert_eq(s.failures, (uint64_t)atomic_load(&sh.runs) / 7);
    cr_assert_gt(s.coalesced, 0, "callers did meet running executions");
    cr_assert_eq(s.running, 0);
    cr_assert_eq(s.keys, 0);
    tally_coalesce_close(sh.c);
}

Test(coalesce_stress, waiters_giving_up_harm_no_one)
{
    shared sh = { .work_ns = 100 * US };
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.max_running = 3;
    cr_assert_eq(tally_coalesce_open(&o, &sh.c), 0);
    worker w[THREADS];
    for (int i = 0; i < THREADS; i++)
        w[i] = (worker){ .sh = &sh, .t = i, .rounds = 1500, .max_timeout_ns = 150 * US };
    run_workers(w, THREADS);

    int ok = 0, timedout = 0, busy = 0;
    for (int i = 0; i < THREADS; i++) {
        cr_assert_eq(w[i].other + w[i].estate + w[i].open, 0);
        ok += w[i].ok;
        timedout += w[i].timedout;
        busy += w[i].busy;
    }
    check_shared(&sh);
    tally_coalesce_stats s;
    cr_assert_eq(tally_coalesce_read_stats(sh.c, &s), 0);
    cr_assert_eq(s.timeouts, (uint64_t)timedout);
    cr_assert_eq(s.rejected_busy, (uint64_t)busy);
    cr_assert_eq(s.calls, (uint64_t)(ok + timedout + busy));
    cr_assert_eq(s.executions + s.coalesced + s.rejected_busy, s.calls);
    cr_assert_eq(s.running, 0);
    cr_assert_eq(s.keys, 0);
    tally_coalesce_close(sh.c);
}

Test(coalesce_stress, shutdown_in_the_middle)
{
    for (int round = 0; round < 20; round++) {
        shared sh = { .work_ns = 50 * US, .fails = blocks_of_8 };
        tally_coalesce_options o;
        tally_coalesce_options_init(&o);
        o.breaker_failures = 3;
        o.breaker_open_ns = MS;
        cr_assert_eq(tally_coalesce_open(&o, &sh.c), 0);
        worker w[THREADS];
        for (int i = 0; i < THREADS; i++)
            w[i] = (worker){ .sh = &sh, .t = i + round, .rounds = 1000000,
                             .max_timeout_ns = round % 2 ? 0 : 200 * US };
        pthread_t th[THREADS];
        for (int i = 0; i < THREADS; i++)
            cr_assert_eq(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
        tally_coalesce_stats s;
        /* a state to reach, not a speed: some executions completed */
        for (uint64_t t0 = 0; t0 < 30000; t0++) {
            cr_assert_eq(tally_coalesce_read_stats(sh.c, &s), 0);
            if (s.executions >= 40)
                break;
            spin_ns(MS);
        }
        cr_assert_geq(s.executions, 40);
        int rc;
        while ((rc = tally_coalesce_shutdown(sh.c, 100 * US)) == TALLY_ETIMEDOUT)
            ;
        cr_assert_eq(rc, 0);
        cr_assert_eq(tally_coalesce_read_stats(sh.c, &s), 0);
        cr_assert_eq(s.running, 0, "nothing runs once shutdown returned 0");
        uint64_t calls = s.calls;
        /* the workers keep calling until told: every call now gets TALLY_ESTATE */
        spin_ns(MS);
        atomic_store(&sh.stop, 1);
        for (int i = 0; i < THREADS; i++)
            pthread_join(th[i], NULL);
        cr_assert_eq(tally_coalesce_read_stats(sh.c, &s), 0);
        cr_assert_eq(s.calls, calls, "no call got in after shutdown");
        int open = 0;
        for (int i = 0; i < THREADS; i++) {
            cr_assert_eq(w[i].other + w[i].busy, 0);
            open += w[i].open;
        }
        cr_assert_eq(s.rejected_open, (uint64_t)open);
        op_arg a = { &sh, 0 };
        tally_coalesce_op op = { .run = op_run, .free_value = op_free, .arg = &a };
        tally_coalesce_result *r = NULL;
        cr_assert_eq(tally_coalesce_do(sh.c, "key-0", 5, &op, 0, &r), TALLY_ESTATE);
        check_shared(&sh);
        cr_assert_eq(tally_coalesce_shutdown(sh.c, 0), 0, "idempotent");
        tally_coalesce_close(sh.c);
    }
}

/* ---- The breaker word under contention ------------------------------------------- */

typedef struct brk_arg {
    tally_breaker *b;
    int            t;
    _Atomic int   *probes_running;
    _Atomic int   *probes;
    _Atomic int   *stop;
    int            twice;         /* two probes found running at once */
} brk_arg;

static void *brk_main(void *p)
{
    brk_arg *a = p;
    uint64_t seed = 0x2545f4914f6cdd1du * (uint64_t)(a->t + 1);
    while (!atomic_load(a->stop)) {
        tally_breaker_ticket t;
        if (tally_breaker_enter(a->b, &t) != 0)
            continue;
        bool probe = tally__brk_state(t) == TALLY_BREAKER_HALF_OPEN;
        if (probe) {
            atomic_fetch_add(a->probes, 1);
            if (atomic_fetch_add(a->probes_running, 1) != 0)
                a->twice++;
        }
        spin_ns(2 * US);
        if (probe)
            atomic_fetch_sub(a->probes_running, 1);
        /* fail often enough that the breaker keeps opening */
        cr_assert_eq(tally_breaker_leave(a->b, t, rnd(&seed) % 3 == 0), 0);
    }
    return NULL;
}

Test(coalesce_stress, breaker_one_probe_at_a_time)
{
    tally_breaker_options bo = { .failures_to_open = 3, .open_ns = 200 * US };
    tally_breaker *b;
    cr_assert_eq(tally_breaker_new(&bo, &b), 0);
    _Atomic int probes_running = 0, probes = 0, stop = 0;
    brk_arg a[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        a[i] = (brk_arg){ .b = b, .t = i, .probes_running = &probes_running, .probes = &probes,
                          .stop = &stop };
        cr_assert_eq(pthread_create(&th[i], NULL, brk_main, &a[i]), 0);
    }
    spin_ns(300 * MS);
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(a[i].twice, 0, "two probes ran at once");
    }
    cr_assert_gt(atomic_load(&probes), 0, "the breaker did open and probe");
    tally_breaker_view v;
    cr_assert_eq(tally_breaker_read(b, &v), 0);
    cr_assert_neq(v.state, TALLY_BREAKER_HALF_OPEN, "every probe reported");
    tally_breaker_free(b);
}
