/*
 * Coalescing, its limits, the circuit breaker and the counters, through the
 * public API (tally/coalesce.h), and the breaker's pure steps through
 * src/coalesce-internal.h. Threads are used where the contract is about
 * concurrent callers; leaders are held on a gate until the test has seen the
 * state it checks, so no assertion depends on timing.
 */
#include "test.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tally.h"
#include "coalesce/coalesce-internal.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED_HEAP 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED_HEAP 1
#endif
#ifdef SANITIZED_HEAP
size_t __sanitizer_get_current_allocated_bytes(void);
#else
#include <malloc.h>
#endif

#define MS  UINT64_C(1000000)
#define SEC UINT64_C(1000000000)
#define T0  (UINT64_C(1700000000) * SEC)

/* ---- Helpers ----------------------------------------------------------------- */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * SEC + (uint64_t)ts.tv_nsec;
}

/* Bytes the allocator has handed out and not got back. */
static size_t heap_in_use(void)
{
#ifdef SANITIZED_HEAP
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

/* Poll @cond (a state the test waits for, not a speed) for up to 30 s. */
#define WAIT_UNTIL(cond)                                                           \
    do {                                                                           \
        uint64_t t0_ = mono_ns();                                                  \
        while (!(cond)) {                                                          \
            cr_assert_lt(mono_ns() - t0_, 30 * SEC, "never reached: %s", #cond);   \
            usleep(200);                                                           \
        }                                                                          \
    } while (0)

typedef struct gate {
    pthread_mutex_t m;
    pthread_cond_t  cv;
    bool            open;
} gate;

static void gate_init(gate *g)
{
    pthread_mutex_init(&g->m, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->open = false;
}

static void gate_wait(gate *g)
{
    pthread_mutex_lock(&g->m);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->m);
    pthread_mutex_unlock(&g->m);
}

static void gate_open(gate *g)
{
    pthread_mutex_lock(&g->m);
    g->open = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->m);
}

static void gate_destroy(gate *g)
{
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->m);
}

/* An operation: counts its runs, may wait on a gate, returns a malloc'd value
   that counts its frees. */
typedef struct work {
    gate       *g;
    int         status;
    int         payload;
    _Atomic int runs;
    _Atomic int frees;
} work;

typedef struct value {
    work *w;
    int   payload;
    int   run_no;
} value;

static int work_run(void *arg, void **out)
{
    work *w = arg;
    int n = atomic_fetch_add(&w->runs, 1) + 1;
    if (w->g)
        gate_wait(w->g);
    value *v = malloc(sizeof(*v));
    cr_assert_not_null(v);
    v->w = w;
    v->payload = w->payload;
    v->run_no = n;
    *out = v;
    return w->status;
}

static void work_free(void *p)
{
    value *v = p;
    atomic_fetch_add(&v->w->frees, 1);
    free(v);
}

static tally_coalesce_op op_of(work *w)
{
    return (tally_coalesce_op){ .run = work_run, .free_value = work_free, .arg = w };
}

static tally_coalesce *open_c(const tally_coalesce_options *o)
{
    tally_coalesce *c = NULL;
    cr_assert_eq(tally_coalesce_open(o, &c), 0);
    cr_assert_not_null(c);
    return c;
}

static tally_coalesce_stats stats(tally_coalesce *c)
{
    tally_coalesce_stats s;
    cr_assert_eq(tally_coalesce_read_stats(c, &s), 0);
    return s;
}

static int call_at(tally_coalesce *c, const char *key, work *w, uint64_t now,
                   tally_coalesce_result **r)
{
    tally_coalesce_op op = op_of(w);
    return tally_coalesce_do_at(c, key, strlen(key), &op, now, TALLY_COALESCE_FOREVER, r);
}

/* Call and drop the result; return the call's code. */
static int call_drop(tally_coalesce *c, const char *key, work *w, uint64_t now)
{
    tally_coalesce_result *r = NULL;
    int rc = call_at(c, key, w, now, &r);
    cr_assert_eq(rc == 0, r != NULL, "a result exactly when the call succeeds");
    tally_coalesce_release(r);
    return rc;
}

/* A caller thread: one tally_coalesce_do on its key. */
typedef struct caller {
    tally_coalesce        *c;
    const char            *key;
    work                  *w;
    uint64_t               now;      /* 0: real time */
    uint64_t               timeout;
    int                    rc;
    tally_coalesce_result *r;
} caller;

static void *caller_main(void *p)
{
    caller *a = p;
    tally_coalesce_op op = op_of(a->w);
    a->r = NULL;
    if (a->now)
        a->rc = tally_coalesce_do_at(a->c, a->key, strlen(a->key), &op, a->now, a->timeout, &a->r);
    else
        a->rc = tally_coalesce_do(a->c, a->key, strlen(a->key), &op, a->timeout, &a->r);
    return NULL;
}

static void start(pthread_t *t, caller *a)
{
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 256 * 1024);
    cr_assert_eq(pthread_create(t, &at, caller_main, a), 0);
    pthread_attr_destroy(&at);
}

/* ---- Options and errors ------------------------------------------------------------ */

Test(coalesce, options_defaults_and_bounds)
{
    tally_coalesce_options o;
    memset(&o, 0x5a, sizeof(o));
    tally_coalesce_options_init(&o);
    cr_assert_eq(o.capacity, 4096);
    cr_assert_eq(o.max_running, 0);
    cr_assert_eq(o.max_attempts, 0);
    cr_assert_eq(o.breaker_failures, 0);
    cr_assert_null(o.name);

    tally_coalesce *c = NULL;
    cr_assert_eq(tally_coalesce_open(NULL, &c), 0, "NULL options mean the defaults");
    tally_coalesce_close(c);
    tally_coalesce_close(NULL);
    cr_assert_eq(tally_coalesce_open(NULL, NULL), TALLY_EINVAL);

    c = (tally_coalesce *)0x1;
    tally_coalesce_options_init(&o);
    o.capacity = 0;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "capacity 0");
    o.capacity = TALLY_COALESCE_MAX_CAPACITY + 1;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "capacity too large");
    tally_coalesce_options_init(&o);
    o.max_attempts = 3;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "attempts without a window");
    o.attempt_window_ns = TALLY_MAX_PERIOD_NS + 1;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "window too long");
    o.attempt_window_ns = SEC;
    o.cooldown_ns = TALLY_MAX_PERIOD_NS + 1;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "cooldown too long");
    tally_coalesce_options_init(&o);
    o.breaker_failures = 3;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "breaker without open time");
    o.breaker_open_ns = SEC;
    o.breaker_failures = TALLY_BREAKER_MAX_FAILURES + 1;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "too many failures to open");
    tally_coalesce_options_init(&o);
    char name[TALLY_COALESCE_MAX_NAME + 2];
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    o.name = name;
    cr_assert_eq(tally_coalesce_open(&o, &c), TALLY_EINVAL, "name too long");
    cr_assert_eq(c, (tally_coalesce *)0x1, "untouched on failure");
    name[TALLY_COALESCE_MAX_NAME] = '\0';
    c = open_c(&o);
    tally_coalesce_close(c);
}

Test(coalesce, new_error_codes_have_messages)
{
    cr_assert_eq(TALLY_EBUSY, -9);
    cr_assert_eq(TALLY_ECOOLDOWN, -10);
    cr_assert_eq(TALLY_EOPEN, -11);
    cr_assert_str_eq(tally_strerror(TALLY_EBUSY), "too many operations running");
    cr_assert_str_eq(tally_strerror(TALLY_ECOOLDOWN), "key cooling down after too many attempts");
    cr_assert_str_eq(tally_strerror(TALLY_EOPEN), "circuit breaker open");
}

Test(coalesce, invalid_arguments)
{
    tally_coalesce *c = open_c(NULL);
    work w = { .payload = 1 };
    tally_coalesce_op op = op_of(&w);
    tally_coalesce_op no_run = { .run = NULL };
    tally_coalesce_result *r = (tally_coalesce_result *)0x1;

    cr_assert_eq(tally_coalesce_do(NULL, "k", 1, &op, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, NULL, 1, &op, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, "k", 0, &op, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, "k", TALLY_MAX_KEY_LEN + 1, &op, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, "k", 1, NULL, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, "k", 1, &no_run, 0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do(c, "k", 1, &op, 0, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_do_at(c, "k", 1, &op, (uint64_t)INT64_MAX + 1, 0, &r), TALLY_EINVAL);
    cr_assert_eq(r, (tally_coalesce_result *)0x1, "untouched on failure");
    cr_assert_eq(atomic_load(&w.runs), 0);
    cr_assert_eq(stats(c).calls, 0, "invalid calls are not counted");
    cr_assert_eq(tally_coalesce_read_stats(NULL, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_shutdown(NULL, 0), TALLY_EINVAL);
    cr_assert_eq(tally_coalesce_prometheus(NULL, NULL, 0), 0);
    tally_coalesce_release(NULL);
    cr_assert_null(tally_coalesce_retain(NULL));
    tally_coalesce_close(c);
}

/* ---- One caller ---------------------------------------------------------------------- */

Test(coalesce, single_call_runs_and_returns_its_result)
{
    tally_coalesce *c = open_c(NULL);
    work w = { .payload = 42 };
    tally_coalesce_result *r = NULL;

    cr_assert_eq(tally_coalesce_do(c, "user-1", 6, &(tally_coalesce_op){ work_run, work_free, &w },
                                   TALLY_COALESCE_FOREVER, &r), 0);
    cr_assert_not_null(r);
    cr_assert_eq(tally_coalesce_status(r), 0);
    cr_assert_eq(((value *)tally_coalesce_value(r))->payload, 42);
    cr_assert_eq(atomic_load(&w.runs), 1);

    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.calls, 1);
    cr_assert_eq(s.executions, 1);
    cr_assert_eq(s.coalesced, 0);
    cr_assert_eq(s.failures, 0);
    cr_assert_eq(s.running, 0);
    cr_assert_eq(s.keys, 0, "no attempt limit: the entry is recycled at once");
    cr_assert_not(s.has_breaker);

    /* a later call runs again: coalescing is only with a running execution */
    cr_assert_eq(call_drop(c, "user-1", &w, T0), 0);
    cr_assert_eq(atomic_load(&w.runs), 2);

    tally_coalesce_retain(r);
    tally_coalesce_release(r);
    cr_assert_eq(atomic_load(&w.frees), 1, "the second call's value only");
    tally_coalesce_release(r);
    cr_assert_eq(atomic_load(&w.frees), 2, "the last reference frees the value");
    tally_coalesce_close(c);
}

static int bare_run(void *arg, void **value)
{
    (void)arg;
    (void)value;
    return 0;
}

Test(coalesce, a_failed_run_is_a_result_with_its_status)
{
    tally_coalesce *c = open_c(NULL);
    work w = { .status = 7, .payload = 3 };
    tally_coalesce_result *r = NULL;

    cr_assert_eq(call_at(c, "k", &w, T0, &r), 0);
    cr_assert_eq(tally_coalesce_status(r), 7);
    cr_assert_eq(((value *)tally_coalesce_value(r))->payload, 3, "a failure may carry a value");
    cr_assert_eq(stats(c).failures, 1);
    tally_coalesce_release(r);
    cr_assert_eq(atomic_load(&w.frees), 1);

    /* no value and no destructor: nothing to free */
    tally_coalesce_op bare = { .run = bare_run };
    cr_assert_eq(tally_coalesce_do(c, "k", 1, &bare, 0, &r), 0);
    cr_assert_null(tally_coalesce_value(r));
    cr_assert_eq(tally_coalesce_status(r), 0);
    tally_coalesce_release(r);
    tally_coalesce_close(c);
}

/* ---- Circuit breaker: pure steps ------------------------------------------------- */

static const tally__breaker_cfg brk3 = { .failures_to_open = 3, .open_ns = 10 * SEC };

/* enter; assert the verdict; return the ticket and update *w */
static uint64_t enter_ok(uint64_t *w, uint64_t now)
{
    uint64_t next, ticket;
    cr_assert_eq(tally__breaker_enter_step(&brk3, *w, now, &next, &ticket), 0);
    *w = next;
    return ticket;
}

static void enter_refused(uint64_t w, uint64_t now)
{
    uint64_t next = 1, ticket = 1;
    cr_assert_eq(tally__breaker_enter_step(&brk3, w, now, &next, &ticket), TALLY_EOPEN);
    cr_assert_eq(next, w, "a refusal changes nothing");
}

Test(coalesce, breaker_opens_after_n_consecutive_failures)
{
    uint64_t w = tally__brk_word(TALLY_BREAKER_CLOSED, 0, 0);
    uint64_t t = enter_ok(&w, T0);
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_CLOSED);

    w = tally__breaker_leave_step(&brk3, w, t, false, T0);
    w = tally__breaker_leave_step(&brk3, w, t, false, T0);
    cr_assert_eq(tally__brk_failures(w), 2);
    w = tally__breaker_leave_step(&brk3, w, t, true, T0);
    cr_assert_eq(tally__brk_failures(w), 0, "a success resets the count");
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_CLOSED);

    for (int i = 0; i < 2; i++)
        w = tally__breaker_leave_step(&brk3, w, t, false, T0 + 1);
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_CLOSED);
    w = tally__breaker_leave_step(&brk3, w, t, false, T0 + 1);
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_OPEN, "the third failure opens it");
    cr_assert_eq(tally__brk_failures(w), 3);
    cr_assert_eq(tally__brk_opened_ms(w), T0 / MS + 1, "opening time rounded up to the ms");

    /* late reports from the closed period change nothing */
    cr_assert_eq(tally__breaker_leave_step(&brk3, w, t, false, T0 + 2), w);
    cr_assert_eq(tally__breaker_leave_step(&brk3, w, t, true, T0 + 2), w);
}

Test(coalesce, breaker_open_refuses_until_open_time_then_one_probe)
{
    uint64_t opened = T0 / MS + 5;
    uint64_t w = tally__brk_word(TALLY_BREAKER_OPEN, 3, opened);
    uint64_t end = opened * MS + brk3.open_ns;

    enter_refused(w, end - 1);
    uint64_t probe = enter_ok(&w, end);
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_HALF_OPEN);
    cr_assert_eq(probe, w, "the probe's ticket is the half-open word");
    enter_refused(w, end);
    enter_refused(w, end + 100 * SEC);

    /* success of the probe closes it; the opening time stays (it names the period) */
    uint64_t closed = tally__breaker_leave_step(&brk3, w, probe, true, end + 1);
    cr_assert_eq(tally__brk_state(closed), TALLY_BREAKER_CLOSED);
    cr_assert_eq(tally__brk_failures(closed), 0);
    cr_assert_eq(tally__brk_opened_ms(closed), opened);

    /* failure of the probe opens it again, from the time of the report */
    uint64_t again = tally__breaker_leave_step(&brk3, w, probe, false, end + 7 * MS);
    cr_assert_eq(tally__brk_state(again), TALLY_BREAKER_OPEN);
    cr_assert_eq(tally__brk_opened_ms(again), (end + 7 * MS) / MS);
    cr_assert_eq(tally__brk_failures(again), 4);
    enter_refused(again, end + 7 * MS + brk3.open_ns - 1);

    /* a non-probe report in half-open changes nothing */
    uint64_t old_closed_ticket = tally__brk_word(TALLY_BREAKER_CLOSED, 0, opened - 100);
    cr_assert_eq(tally__breaker_leave_step(&brk3, w, old_closed_ticket, false, end), w);
    cr_assert_eq(tally__breaker_leave_step(&brk3, w, old_closed_ticket, true, end), w);
}

Test(coalesce, breaker_ignores_reports_from_an_earlier_closed_period)
{
    /* a call entered while closed (period A); the breaker then opened and closed again */
    uint64_t period_a = tally__brk_word(TALLY_BREAKER_CLOSED, 1, 10);
    uint64_t now_closed = tally__brk_word(TALLY_BREAKER_CLOSED, 2, 20);
    cr_assert_eq(tally__breaker_leave_step(&brk3, now_closed, period_a, false, T0), now_closed);
    cr_assert_eq(tally__breaker_leave_step(&brk3, now_closed, period_a, true, T0), now_closed);

    /* each opening names a new period, even within the same millisecond */
    uint64_t w = tally__brk_word(TALLY_BREAKER_HALF_OPEN, 3, T0 / MS);
    uint64_t reopened = tally__breaker_leave_step(&brk3, w, w, false, T0);
    cr_assert_gt(tally__brk_opened_ms(reopened), T0 / MS);
}

Test(coalesce, breaker_word_fields)
{
    uint64_t w = tally__brk_word(TALLY_BREAKER_HALF_OPEN, TALLY_BREAKER_MAX_FAILURES, TALLY__BRK_MS_MASK);
    cr_assert_eq(tally__brk_state(w), TALLY_BREAKER_HALF_OPEN);
    cr_assert_eq(tally__brk_failures(w), TALLY_BREAKER_MAX_FAILURES);
    cr_assert_eq(tally__brk_opened_ms(w), TALLY__BRK_MS_MASK);

    /* the failure count saturates instead of spilling into the state */
    tally__breaker_cfg big = { .failures_to_open = TALLY_BREAKER_MAX_FAILURES, .open_ns = SEC };
    uint64_t h = tally__brk_word(TALLY_BREAKER_HALF_OPEN, TALLY_BREAKER_MAX_FAILURES, 5);
    uint64_t o = tally__breaker_leave_step(&big, h, h, false, T0);
    cr_assert_eq(tally__brk_state(o), TALLY_BREAKER_OPEN);
    cr_assert_eq(tally__brk_failures(o), TALLY_BREAKER_MAX_FAILURES);
}

/* ---- Circuit breaker: the public object ------------------------------------------ */

Test(coalesce, breaker_public_api)
{
    tally_breaker *b = NULL;
    tally_breaker_options bo = { .failures_to_open = 2, .open_ns = SEC };
    tally_breaker_options bad = { .failures_to_open = 0, .open_ns = SEC };
    tally_breaker_ticket t, probe;
    tally_breaker_view v;

    cr_assert_eq(tally_breaker_new(&bad, &b), TALLY_EINVAL);
    bad = (tally_breaker_options){ .failures_to_open = 1, .open_ns = 0 };
    cr_assert_eq(tally_breaker_new(&bad, &b), TALLY_EINVAL);
    cr_assert_eq(tally_breaker_new(NULL, &b), TALLY_EINVAL);
    cr_assert_null(b);
    cr_assert_eq(tally_breaker_new(&bo, &b), 0);

    cr_assert_eq(tally_breaker_read(b, &v), 0);
    cr_assert_eq(v.state, TALLY_BREAKER_CLOSED);
    cr_assert_eq(v.opened_at_ns, 0);
    cr_assert_eq(tally_breaker_enter_at(b, T0, &t), 0);
    cr_assert_eq(tally_breaker_leave_at(b, t, false, T0), 0);
    cr_assert_eq(tally_breaker_enter_at(b, T0, &t), 0);
    cr_assert_eq(tally_breaker_leave_at(b, t, false, T0 + 1), 0);
    cr_assert_eq(tally_breaker_read(b, &v), 0);
    cr_assert_eq(v.state, TALLY_BREAKER_OPEN);
    cr_assert_eq(v.failures, 2);
    cr_assert_eq(v.opened_at_ns, T0 + MS, "rounded up to the next ms");

    cr_assert_eq(tally_breaker_enter_at(b, T0 + MS + SEC - 1, &t), TALLY_EOPEN);
    cr_assert_eq(tally_breaker_enter_at(b, T0 + MS + SEC, &probe), 0);
    cr_assert_eq(tally_breaker_enter_at(b, T0 + MS + SEC, &t), TALLY_EOPEN, "one probe");
    cr_assert_eq(tally_breaker_read(b, &v), 0);
    cr_assert_eq(v.state, TALLY_BREAKER_HALF_OPEN);
    cr_assert_eq(tally_breaker_leave_at(b, probe, true, T0 + 2 * SEC), 0);
    cr_assert_eq(tally_breaker_read(b, &v), 0);
    cr_assert_eq(v.state, TALLY_BREAKER_CLOSED);
    cr_assert_eq(v.failures, 0);

    /* real-time variants */
    cr_assert_eq(tally_breaker_enter(b, &t), 0);
    cr_assert_eq(tally_breaker_leave(b, t, true), 0);

    cr_assert_eq(tally_breaker_enter_at(NULL, T0, &t), TALLY_EINVAL);
    cr_assert_eq(tally_breaker_enter_at(b, T0, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_breaker_enter_at(b, (uint64_t)INT64_MAX + 1, &t), TALLY_EINVAL);
    cr_assert_eq(tally_breaker_leave_at(NULL, t, true, T0), TALLY_EINVAL);
    cr_assert_eq(tally_breaker_read(NULL, &v), TALLY_EINVAL);
    tally_breaker_free(b);
    tally_breaker_free(NULL);
}

typedef struct probe_arg {
    tally_breaker *b;
    uint64_t       now;
    int            rc;
} probe_arg;

static void *probe_main(void *p)
{
    probe_arg *a = p;
    tally_breaker_ticket t;
    a->rc = tally_breaker_enter_at(a->b, a->now, &t);
    return NULL;
}

Test(coalesce, breaker_exactly_one_probe_among_concurrent_callers)
{
    enum { N = 16, ROUNDS = 50 };
    tally_breaker_options bo = { .failures_to_open = 1, .open_ns = SEC };
    for (int round = 0; round < ROUNDS; round++) {
        tally_breaker *b;
        tally_breaker_ticket t;
        cr_assert_eq(tally_breaker_new(&bo, &b), 0);
        cr_assert_eq(tally_breaker_enter_at(b, T0, &t), 0);
        cr_assert_eq(tally_breaker_leave_at(b, t, false, T0), 0);
        probe_arg a[N];
        pthread_t th[N];
        for (int i = 0; i < N; i++) {
            a[i] = (probe_arg){ .b = b, .now = T0 + 2 * SEC };
            cr_assert_eq(pthread_create(&th[i], NULL, probe_main, &a[i]), 0);
        }
        int probes = 0;
        for (int i = 0; i < N; i++) {
            pthread_join(th[i], NULL);
            cr_assert(a[i].rc == 0 || a[i].rc == TALLY_EOPEN);
            probes += a[i].rc == 0;
        }
        cr_assert_eq(probes, 1, "round %d", round);
        tally_breaker_free(b);
    }
}

/* ---- Coalescing ------------------------------------------------------------------- */

/* N callers of one key while the leader is held: one execution, one shared result. */
static void one_key_many_callers(int n)
{
    tally_coalesce *c = open_c(NULL);
    gate g;
    gate_init(&g);
    work w = { .g = &g, .payload = 99 };
    caller *a = calloc((size_t)n, sizeof(*a));
    pthread_t *th = calloc((size_t)n, sizeof(*th));
    cr_assert(a && th);

    for (int i = 0; i < n; i++) {
        a[i] = (caller){ .c = c, .key = "token:expired", .w = &w, .timeout = TALLY_COALESCE_FOREVER };
        start(&th[i], &a[i]);
    }
    WAIT_UNTIL(stats(c).coalesced == (uint64_t)n - 1);
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.executions, 1);
    cr_assert_eq(s.running, 1);
    cr_assert_eq(atomic_load(&w.runs), 1);
    gate_open(&g);
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);

    s = stats(c);
    cr_assert_eq(s.calls, (uint64_t)n);
    cr_assert_eq(s.executions, 1);
    cr_assert_eq(s.coalesced, (uint64_t)n - 1);
    cr_assert_eq(s.timeouts, 0);
    cr_assert_eq(s.running, 0);
    cr_assert_eq(s.keys, 0);
    cr_assert_eq(atomic_load(&w.runs), 1, "exactly one execution");
    for (int i = 0; i < n; i++) {
        cr_assert_eq(a[i].rc, 0);
        cr_assert_eq(a[i].r, a[0].r, "every caller holds the same result");
        cr_assert_eq(((value *)tally_coalesce_value(a[i].r))->payload, 99);
    }
    for (int i = 0; i < n; i++) {
        cr_assert_eq(atomic_load(&w.frees), 0, "freed before the last reference");
        tally_coalesce_release(a[i].r);
    }
    cr_assert_eq(atomic_load(&w.frees), 1, "freed once, by the last reference");
    free(a);
    free(th);
    gate_destroy(&g);
    tally_coalesce_close(c);
}

Test(coalesce, one_hundred_callers_one_execution)
{
    one_key_many_callers(100);
}

Test(coalesce, one_thousand_callers_one_execution)
{
    one_key_many_callers(1000);
}

Test(coalesce, waiter_times_out_while_the_leader_runs)
{
    tally_coalesce *c = open_c(NULL);
    gate g;
    gate_init(&g);
    work w = { .g = &g, .payload = 5 };
    caller lead = { .c = c, .key = "k", .w = &w, .timeout = TALLY_COALESCE_FOREVER };
    caller patient = lead;
    pthread_t tl, tp;

    start(&tl, &lead);
    WAIT_UNTIL(stats(c).running == 1);
    start(&tp, &patient);
    WAIT_UNTIL(stats(c).coalesced == 1);

    /* a waiter with a bound gives up, no earlier than its bound */
    tally_coalesce_op op = op_of(&w);
    tally_coalesce_result *r = (tally_coalesce_result *)0x1;
    uint64_t t = mono_ns();
    cr_assert_eq(tally_coalesce_do(c, "k", 1, &op, 20 * MS, &r), TALLY_ETIMEDOUT);
    cr_assert_geq(mono_ns() - t, 20 * MS);
    cr_assert_eq(r, (tally_coalesce_result *)0x1, "untouched on failure");
    /* and one that does not wait at all */
    cr_assert_eq(tally_coalesce_do(c, "k", 1, &op, 0, &r), TALLY_ETIMEDOUT);

    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.timeouts, 2);
    cr_assert_eq(s.running, 1, "the execution goes on");
    cr_assert_eq(s.coalesced, 3);

    gate_open(&g);
    pthread_join(tl, NULL);
    pthread_join(tp, NULL);
    cr_assert_eq(lead.rc, 0);
    cr_assert_eq(patient.rc, 0, "the other waiter still gets the result");
    cr_assert_eq(patient.r, lead.r);
    cr_assert_eq(atomic_load(&w.runs), 1);
    tally_coalesce_release(lead.r);
    cr_assert_eq(atomic_load(&w.frees), 0);
    tally_coalesce_release(patient.r);
    cr_assert_eq(atomic_load(&w.frees), 1);
    cr_assert_eq(stats(c).keys, 0);
    gate_destroy(&g);
    tally_coalesce_close(c);
}

/* ---- Limits ------------------------------------------------------------------------ */

Test(coalesce, cap_on_running_executions)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.max_running = 2;
    tally_coalesce *c = open_c(&o);
    gate g;
    gate_init(&g);
    work held = { .g = &g }, quick = { 0 };
    caller a1 = { .c = c, .key = "k1", .w = &held, .timeout = TALLY_COALESCE_FOREVER };
    caller a2 = a1;
    a2.key = "k2";
    pthread_t t1, t2;

    start(&t1, &a1);
    start(&t2, &a2);
    WAIT_UNTIL(stats(c).running == 2);

    cr_assert_eq(call_drop(c, "k3", &quick, T0), TALLY_EBUSY, "a third key is refused at once");
    cr_assert_eq(atomic_load(&quick.runs), 0);
    tally_coalesce_op op = op_of(&quick);
    tally_coalesce_result *r;
    cr_assert_eq(tally_coalesce_do(c, "k1", 2, &op, 0, &r), TALLY_ETIMEDOUT,
                 "a caller of a running key joins it: the cap does not apply");
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.rejected_busy, 1);
    cr_assert_eq(s.executions, 2);
    cr_assert_eq(s.keys, 2, "the refused key holds no entry");

    gate_open(&g);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    tally_coalesce_release(a1.r);
    tally_coalesce_release(a2.r);
    cr_assert_eq(call_drop(c, "k3", &quick, T0), 0, "room again");
    gate_destroy(&g);
    tally_coalesce_close(c);
}

Test(coalesce, attempts_per_window_then_cooldown)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.max_attempts = 2;
    o.attempt_window_ns = 10 * SEC;
    o.cooldown_ns = 30 * SEC;
    tally_coalesce *c = open_c(&o);
    work w = { 0 };

    cr_assert_eq(call_drop(c, "sess", &w, T0), 0);
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 1 * SEC), 0);
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 2 * SEC), TALLY_ECOOLDOWN, "third in the window");
    cr_assert_eq(atomic_load(&w.runs), 2);
    cr_assert_eq(call_drop(c, "other", &w, T0 + 2 * SEC), 0, "other keys are not affected");
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 20 * SEC), TALLY_ECOOLDOWN, "window over, cooldown not");
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 32 * SEC - 1), TALLY_ECOOLDOWN);
    cr_assert_eq(stats(c).rejected_cooldown, 3);
    cr_assert_eq(atomic_load(&w.runs), 3);

    /* the cooldown ends 30 s after the refusal; a fresh window starts */
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 32 * SEC), 0);
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 33 * SEC), 0);
    cr_assert_eq(call_drop(c, "sess", &w, T0 + 41 * SEC), TALLY_ECOOLDOWN);
    cr_assert_eq(atomic_load(&w.runs), 5);
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.rejected_cooldown, 4);
    cr_assert_eq(s.executions, 5);
    cr_assert_eq(s.calls, 9);
    tally_coalesce_close(c);
}

Test(coalesce, attempt_window_without_cooldown)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.max_attempts = 1;
    o.attempt_window_ns = 10 * SEC;
    tally_coalesce *c = open_c(&o);
    work w = { 0 };

    cr_assert_eq(call_drop(c, "k", &w, T0), 0);
    cr_assert_eq(call_drop(c, "k", &w, T0 + 5 * SEC), TALLY_ECOOLDOWN);
    cr_assert_eq(call_drop(c, "k", &w, T0 + 10 * SEC - 1), TALLY_ECOOLDOWN,
                 "refused until the end of the window");
    cr_assert_eq(call_drop(c, "k", &w, T0 + 10 * SEC), 0);
    cr_assert_eq(call_drop(c, "k", &w, T0 + 19 * SEC), TALLY_ECOOLDOWN);
    cr_assert_eq(call_drop(c, "k", &w, T0 + 20 * SEC), 0, "a window opens at the first attempt");
    tally_coalesce_close(c);
}

Test(coalesce, full_table_refuses_new_keys_then_reclaims)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.capacity = 2;
    o.max_attempts = 1;
    o.attempt_window_ns = 10 * SEC;
    tally_coalesce *c = open_c(&o);
    work w = { 0 };

    cr_assert_eq(call_drop(c, "a", &w, T0), 0);
    cr_assert_eq(call_drop(c, "b", &w, T0), 0);
    cr_assert_eq(stats(c).keys, 2, "both keep their attempt state");
    cr_assert_eq(call_drop(c, "c", &w, T0 + 1), TALLY_EFULL);
    cr_assert_eq(call_drop(c, "a", &w, T0 + 1), TALLY_ECOOLDOWN, "known keys still answer");
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.rejected_full, 1);
    cr_assert_eq(s.rejected_cooldown, 1);
    cr_assert_eq(s.executions, 2);

    /* once their windows ended the entries are reclaimed for new keys */
    cr_assert_eq(call_drop(c, "c", &w, T0 + 10 * SEC), 0);
    cr_assert_eq(call_drop(c, "d", &w, T0 + 10 * SEC), 0);
    cr_assert_eq(stats(c).keys, 2);
    tally_coalesce_close(c);

    /* without attempt state, running keys hold the entries */
    tally_coalesce_options_init(&o);
    o.capacity = 1;
    c = open_c(&o);
    gate g;
    gate_init(&g);
    work held = { .g = &g };
    caller a = { .c = c, .key = "a", .w = &held, .timeout = TALLY_COALESCE_FOREVER };
    pthread_t t;
    start(&t, &a);
    WAIT_UNTIL(stats(c).running == 1);
    cr_assert_eq(call_drop(c, "b", &w, T0), TALLY_EFULL);
    gate_open(&g);
    pthread_join(t, NULL);
    tally_coalesce_release(a.r);
    cr_assert_eq(call_drop(c, "b", &w, T0), 0);
    gate_destroy(&g);
    tally_coalesce_close(c);
}

/* ---- The breaker around executions ---------------------------------------------------- */

/* The probe holds until every other caller has been refused. */
typedef struct probe_work {
    tally_coalesce *c;
    uint64_t        refused_before;
    int             others;
    int             status;
    _Atomic int     runs;
} probe_work;

static int probe_run(void *arg, void **value)
{
    probe_work *p = arg;
    (void)value;
    atomic_fetch_add(&p->runs, 1);
    WAIT_UNTIL(stats(p->c).rejected_open == p->refused_before + (uint64_t)p->others);
    tally_coalesce_stats s = stats(p->c);
    cr_assert_eq(s.breaker.state, TALLY_BREAKER_HALF_OPEN);
    return p->status;
}

typedef struct probe_caller {
    tally_coalesce *c;
    probe_work     *p;
    char            key[16];
    uint64_t        now;
    int             rc;
} probe_caller;

static void *probe_caller_main(void *arg)
{
    probe_caller *a = arg;
    tally_coalesce_op op = { .run = probe_run, .arg = a->p };
    tally_coalesce_result *r = NULL;
    a->rc = tally_coalesce_do_at(a->c, a->key, strlen(a->key), &op, a->now,
                                 TALLY_COALESCE_FOREVER, &r);
    tally_coalesce_release(r);
    return NULL;
}

/* N callers of distinct keys after the open time: return how many ran. */
static int probe_round(tally_coalesce *c, uint64_t now, int status)
{
    enum { N = 8 };
    probe_work p = { .c = c, .refused_before = stats(c).rejected_open, .others = N - 1,
                     .status = status };
    probe_caller a[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        a[i] = (probe_caller){ .c = c, .p = &p, .now = now };
        snprintf(a[i].key, sizeof(a[i].key), "dep-%d", i);
        cr_assert_eq(pthread_create(&th[i], NULL, probe_caller_main, &a[i]), 0);
    }
    int ran = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        cr_assert(a[i].rc == 0 || a[i].rc == TALLY_EOPEN, "rc %d", a[i].rc);
        ran += a[i].rc == 0;
    }
    cr_assert_eq(atomic_load(&p.runs), ran);
    return ran;
}

Test(coalesce, breaker_transitions_with_one_probe_among_concurrent_callers)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.breaker_failures = 3;
    o.breaker_open_ns = 5 * SEC;
    tally_coalesce *c = open_c(&o);
    work bad = { .status = -1 }, good = { 0 };

    for (int i = 0; i < 3; i++) {
        char key[8];
        snprintf(key, sizeof(key), "f%d", i);
        cr_assert_eq(call_drop(c, key, &bad, T0), 0, "a failed execution is still a result");
    }
    tally_coalesce_stats s = stats(c);
    cr_assert(s.has_breaker);
    cr_assert_eq(s.breaker.state, TALLY_BREAKER_OPEN);
    cr_assert_eq(s.breaker.failures, 3);
    cr_assert_eq(s.failures, 3);
    uint64_t opened = s.breaker.opened_at_ns;
    cr_assert_eq(opened, T0);

    cr_assert_eq(call_drop(c, "x", &good, opened + 5 * SEC - 1), TALLY_EOPEN);
    cr_assert_eq(atomic_load(&good.runs), 0);
    cr_assert_eq(stats(c).rejected_open, 1);

    /* open time over: one probe among 8 concurrent callers; it fails and reopens */
    uint64_t t1 = opened + 5 * SEC;
    cr_assert_eq(probe_round(c, t1, -1), 1);
    s = stats(c);
    cr_assert_eq(s.breaker.state, TALLY_BREAKER_OPEN);
    cr_assert_eq(s.breaker.opened_at_ns, t1, "reopened at the probe's report");
    cr_assert_eq(call_drop(c, "x", &good, t1 + 5 * SEC - 1), TALLY_EOPEN);

    /* next probe succeeds and closes it */
    uint64_t t2 = t1 + 5 * SEC;
    cr_assert_eq(probe_round(c, t2, 0), 1);
    s = stats(c);
    cr_assert_eq(s.breaker.state, TALLY_BREAKER_CLOSED);
    cr_assert_eq(s.breaker.failures, 0);
    cr_assert_eq(s.executions, 5);
    cr_assert_eq(s.rejected_open, 1 + 7 + 1 + 7);
    cr_assert_eq(call_drop(c, "x", &good, t2), 0);
    cr_assert_eq(atomic_load(&good.runs), 1);
    tally_coalesce_close(c);
}

/* ---- Shutdown -------------------------------------------------------------------------- */

Test(coalesce, shutdown_is_bounded_idempotent_and_leaks_nothing)
{
    tally_coalesce *c = open_c(NULL);
    gate g;
    gate_init(&g);
    work w = { .g = &g, .payload = 8 };
    caller lead = { .c = c, .key = "k", .w = &w, .timeout = TALLY_COALESCE_FOREVER };
    caller waiter = lead;
    pthread_t tl, tw;

    start(&tl, &lead);
    WAIT_UNTIL(stats(c).running == 1);
    start(&tw, &waiter);
    WAIT_UNTIL(stats(c).coalesced == 1);

    cr_assert_eq(tally_coalesce_shutdown(c, 20 * MS), TALLY_ETIMEDOUT, "the leader still runs");
    pthread_join(tw, NULL);
    cr_assert_eq(waiter.rc, TALLY_ESTATE, "a waiter leaves at shutdown");
    cr_assert_null(waiter.r);
    cr_assert_eq(call_drop(c, "k", &w, T0), TALLY_ESTATE);
    cr_assert_eq(call_drop(c, "new", &w, T0), TALLY_ESTATE);
    cr_assert_eq(tally_coalesce_shutdown(c, 0), TALLY_ETIMEDOUT);

    gate_open(&g);
    pthread_join(tl, NULL);
    cr_assert_eq(lead.rc, 0, "a running execution completes and returns its result");
    cr_assert_eq(tally_coalesce_shutdown(c, TALLY_COALESCE_FOREVER), 0);
    cr_assert_eq(tally_coalesce_shutdown(c, 0), 0, "again");
    cr_assert_eq(tally_coalesce_shutdown(c, 20 * MS), 0, "and again");
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.running, 0);
    cr_assert_eq(s.keys, 0);
    cr_assert_eq(s.executions, 1);
    tally_coalesce_close(c);

    /* the result outlives its coalescer */
    cr_assert_eq(((value *)tally_coalesce_value(lead.r))->payload, 8);
    cr_assert_eq(atomic_load(&w.frees), 0);
    tally_coalesce_release(lead.r);
    cr_assert_eq(atomic_load(&w.frees), 1);
    gate_destroy(&g);
}

/* ---- Memory ------------------------------------------------------------------------------ */

typedef struct churn_arg {
    tally_coalesce *c;
    work           *w;
    int             rounds, t;
    int             errors;
} churn_arg;

static void *churn_main(void *p)
{
    churn_arg *a = p;
    tally_coalesce_op op = op_of(a->w);
    for (int i = 0; i < a->rounds; i++) {
        char key[16];
        int n = snprintf(key, sizeof(key), "key-%d", (i + a->t) % 4);
        tally_coalesce_result *r = NULL;
        if (tally_coalesce_do(a->c, key, (size_t)n, &op, TALLY_COALESCE_FOREVER, &r) != 0 ||
            ((value *)tally_coalesce_value(r))->payload != 11)
            a->errors++;
        tally_coalesce_release(r);
    }
    return NULL;
}

static void churn(tally_coalesce *c, work *w, int rounds)
{
    churn_arg a[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        a[i] = (churn_arg){ .c = c, .w = w, .rounds = rounds, .t = i };
        cr_assert_eq(pthread_create(&th[i], NULL, churn_main, &a[i]), 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(a[i].errors, 0);
    }
}

Test(coalesce, memory_stays_flat_over_100k_rounds)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.capacity = 64;
    o.max_running = 8;
    o.breaker_failures = 1000;
    o.breaker_open_ns = SEC;
    tally_coalesce *c = open_c(&o);
    work w = { .payload = 11 };

    churn(c, &w, 2000);            /* warm: thread arenas, caches */
    size_t before = heap_in_use();
    churn(c, &w, 50000);           /* 2 threads x 50K = 100K rounds */
    size_t after = heap_in_use();

    int runs = atomic_load(&w.runs);
    cr_assert_eq(atomic_load(&w.frees), runs, "every value freed");
    tally_coalesce_stats s = stats(c);
    cr_assert_eq(s.calls, 104000);
    cr_assert_eq(s.executions, (uint64_t)runs);
    cr_assert_eq(s.executions + s.coalesced, s.calls);
    cr_assert_eq(s.keys, 0, "every entry back on the free list");
    /* a leak of one result or value per round would be several MB */
    cr_assert_lt(after > before ? after - before : 0, 64 * 1024,
                 "heap grew from %zu to %zu bytes", before, after);
    tally_coalesce_close(c);
}

/* ---- Prometheus text ---------------------------------------------------------------------- */

Test(coalesce, prometheus_text)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.name = "auth \"refresh\"\\";
    o.max_attempts = 1;
    o.attempt_window_ns = SEC;
    o.breaker_failures = 5;
    o.breaker_open_ns = SEC;
    tally_coalesce *c = open_c(&o);
    work w = { .status = 2 };

    cr_assert_eq(call_drop(c, "k", &w, T0), 0);
    cr_assert_eq(call_drop(c, "k", &w, T0), TALLY_ECOOLDOWN);
    cr_assert_eq(call_drop(c, "j", &w, T0), 0);

    char buf[8192];
    size_t n = tally_coalesce_prometheus(c, buf, sizeof(buf));
    cr_assert_lt(n, sizeof(buf));
    cr_assert_eq(strlen(buf), n);
#define HAS(line) cr_assert_not_null(strstr(buf, line "\n"), "missing: %s", line)
    HAS("# TYPE tally_coalesce_calls_total counter");
    HAS("tally_coalesce_calls_total{name=\"auth \\\"refresh\\\"\\\\\"} 3");
    HAS("tally_coalesce_executions_total{name=\"auth \\\"refresh\\\"\\\\\"} 2");
    HAS("tally_coalesce_failures_total{name=\"auth \\\"refresh\\\"\\\\\"} 2");
    HAS("tally_coalesce_coalesced_total{name=\"auth \\\"refresh\\\"\\\\\"} 0");
    HAS("tally_coalesce_timeouts_total{name=\"auth \\\"refresh\\\"\\\\\"} 0");
    HAS("# TYPE tally_coalesce_rejected_total counter");
    HAS("tally_coalesce_rejected_total{name=\"auth \\\"refresh\\\"\\\\\",reason=\"cooldown\"} 1");
    HAS("tally_coalesce_rejected_total{name=\"auth \\\"refresh\\\"\\\\\",reason=\"busy\"} 0");
    HAS("tally_coalesce_rejected_total{name=\"auth \\\"refresh\\\"\\\\\",reason=\"open\"} 0");
    HAS("tally_coalesce_rejected_total{name=\"auth \\\"refresh\\\"\\\\\",reason=\"full\"} 0");
    HAS("# TYPE tally_coalesce_running gauge");
    HAS("tally_coalesce_keys{name=\"auth \\\"refresh\\\"\\\\\"} 2");
    HAS("tally_coalesce_breaker_state{name=\"auth \\\"refresh\\\"\\\\\"} 0");
    HAS("tally_coalesce_breaker_failures{name=\"auth \\\"refresh\\\"\\\\\"} 2");
    HAS("tally_coalesce_breaker_opened_at_seconds{name=\"auth \\\"refresh\\\"\\\\\"} 0.000");
#undef HAS
    cr_assert_eq(buf[n - 1], '\n');

    /* snprintf rules: the length of the whole text, truncated and terminated */
    char small[40];
    memset(small, 'x', sizeof(small));
    cr_assert_eq(tally_coalesce_prometheus(c, small, sizeof(small)), n);
    cr_assert_eq(strlen(small), sizeof(small) - 1);
    cr_assert_eq(strncmp(small, buf, sizeof(small) - 1), 0);
    cr_assert_eq(tally_coalesce_prometheus(c, NULL, 0), n);
    tally_coalesce_close(c);

    /* no breaker: no breaker lines; no name: an empty label */
    c = open_c(NULL);
    n = tally_coalesce_prometheus(c, buf, sizeof(buf));
    cr_assert_lt(n, sizeof(buf));
    cr_assert_null(strstr(buf, "breaker"));
    cr_assert_not_null(strstr(buf, "tally_coalesce_calls_total{name=\"\"} 0\n"));
    tally_coalesce_close(c);
}
