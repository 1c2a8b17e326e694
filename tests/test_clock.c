/*
 * tally_now_ns() (src/core/clock.h): it never goes back, in one thread or
 * from one thread to another, and it follows tally__clock_ref_ns(), the wall
 * clock at load advanced by CLOCK_MONOTONIC. Both sources are checked: the
 * TSC clock where this machine allows it (with its normal lines, and with
 * lines of a few microseconds, so that readers cross thousands of
 * re-anchors), and clock_gettime as TALLY_CLOCK=gettime forces it.
 *
 * Agreement is checked by sandwiches: CLOCK_MONOTONIC read before and after
 * the call bounds what the call may return, whatever the scheduler does in
 * between, so no assertion depends on timing.
 */
#include "test.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"
#include "core/clock.h"

#define US  UINT64_C(1000)
#define MS  UINT64_C(1000000)

/*
 * How far the TSC clock may be from the reference. A line is aimed at the
 * reference at its end from a sample taken half a line before its start, so
 * the error is the reference's change of rate over 1.5 lines (~400 ms):
 * NTP slews CLOCK_MONOTONIC by at most 500 ppm, 200 us, plus the sampling
 * (tens of ns) and the first rate measured over 20 us at start, which errs
 * by a few us over the first 1 ms line. A wrong scale misses by far more
 * within a second.
 */
#define EPS (1 * MS)

/* What clock.h says the machine must offer for the TSC source. */
static bool machine_has_tsc(void)
{
#if defined(__x86_64__)
    const char *env = getenv("TALLY_CLOCK");
    if (env && strcmp(env, "gettime") == 0)
        return false;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return false;
    char line[8192];
    int have = 0;
    while (fgets(line, sizeof(line), f)) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "flags", 5) != 0 || !colon)
            continue;
        for (char *w = strtok(colon + 1, " \t\n"); w; w = strtok(NULL, " \t\n"))
            have |= (strcmp(w, "constant_tsc") == 0) << 0 | (strcmp(w, "nonstop_tsc") == 0) << 1 |
                    (strcmp(w, "rdtscp") == 0) << 2;
        break;
    }
    fclose(f);
    char cs[32] = "";
    f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (!f)
        return false;
    bool tsc = fgets(cs, sizeof(cs), f) && strcmp(cs, "tsc\n") == 0;
    fclose(f);
    return have == 7 && tsc;
#else
    return false;
#endif
}

/* ---- Each thread's reads never go back ---------------------------------------- */

typedef struct reader {
    uint64_t n;
    uint64_t backs, worst;   /* reads below the one before, and by how much at most */
} reader;

static void *reader_main(void *arg)
{
    reader *r = arg;
    uint64_t prev = tally_now_ns();
    for (uint64_t i = 0; i < r->n; i++) {
        uint64_t t = tally_now_ns();
        if (t < prev) {
            r->backs++;
            if (prev - t > r->worst)
                r->worst = prev - t;
        }
        prev = t;
    }
    return NULL;
}

static void check_readers(int threads, uint64_t n)
{
    pthread_t th[8];
    reader r[8];
    cr_assert_leq(threads, 8);
    for (int i = 0; i < threads; i++) {
        r[i] = (reader){ .n = n };
        cr_assert_eq(pthread_create(&th[i], NULL, reader_main, &r[i]), 0);
    }
    for (int i = 0; i < threads; i++)
        cr_assert_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < threads; i++)
        cr_assert_eq(r[i].backs, 0, "thread %d: %llu reads went back, by up to %llu ns", i,
                     (unsigned long long)r[i].backs, (unsigned long long)r[i].worst);
}

/* ---- From one thread to another ------------------------------------------------- */

/*
 * Two threads pass a baton: each reads the clock, publishes the reading
 * (release), and the other, having acquired it, reads the clock again and
 * must not see less.
 */
typedef struct baton {
    _Atomic uint64_t turn;   /* odd: thread 1's turn to read, even: thread 0's */
    _Atomic uint64_t time;   /* the reading of the thread that passed */
    uint64_t rounds;
    _Atomic uint64_t backs;
} baton;

typedef struct runner {
    baton *b;
    uint64_t parity;
} runner;

static void *runner_main(void *arg)
{
    runner *me = arg;
    baton *b = me->b;
    for (uint64_t k = me->parity; k < 2 * b->rounds; k += 2) {
        unsigned spins = 0;
        /* acquire: pairs with the other thread's release of turn, after its reading */
        while (atomic_load_explicit(&b->turn, memory_order_acquire) != k)
            if (++spins % 128 == 0)
                sched_yield();
        uint64_t before = atomic_load_explicit(&b->time, memory_order_relaxed);
        uint64_t t = tally_now_ns();
        if (t < before)
            atomic_fetch_add_explicit(&b->backs, 1, memory_order_relaxed);
        atomic_store_explicit(&b->time, t, memory_order_relaxed);
        /* release: the reading above happens before the other thread's next one */
        atomic_store_explicit(&b->turn, k + 1, memory_order_release);
    }
    return NULL;
}

static void check_handoff(uint64_t rounds)
{
    baton b = { .rounds = rounds };
    atomic_init(&b.turn, 0);
    atomic_init(&b.time, tally_now_ns());
    atomic_init(&b.backs, 0);
    runner r[2] = { { &b, 0 }, { &b, 1 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, runner_main, &r[i]), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_join(th[i], NULL), 0);
    cr_assert_eq(atomic_load(&b.turn), 2 * rounds);
    cr_assert_eq(atomic_load(&b.backs), 0, "%llu of %llu hand-offs saw the clock go back",
                 (unsigned long long)atomic_load(&b.backs), (unsigned long long)(2 * rounds));
}

/* ---- Agreement with the reference ------------------------------------------------ */

/* Sandwich reads for @run_ns: each call within @eps of the reference range
   that CLOCK_MONOTONIC read around it maps to. */
static void check_agreement(uint64_t run_ns, uint64_t eps)
{
    uint64_t start = tally__mono_ns(), m2;
    uint64_t reads = 0;
    do {
        uint64_t m1 = tally__mono_ns();
        uint64_t t = tally_now_ns();
        m2 = tally__mono_ns();
        uint64_t lo = tally__clock_ref_ns(m1), hi = tally__clock_ref_ns(m2);
        cr_assert(t + eps >= lo, "read %llu: %llu ns before the reference (eps %llu)",
                  (unsigned long long)reads, (unsigned long long)(lo - t), (unsigned long long)eps);
        cr_assert(t <= hi + eps, "read %llu: %llu ns after the reference (eps %llu)",
                  (unsigned long long)reads, (unsigned long long)(t - hi), (unsigned long long)eps);
        reads++;
    } while (m2 - start < run_ns);
}

/* ---- The tests ------------------------------------------------------------------- */

Test(clock, source_follows_the_machine)
{
    tally__clock_restart(0);
    cr_assert_eq(tally__clock_source(), machine_has_tsc() ? TALLY__CLOCK_TSC : TALLY__CLOCK_GETTIME);
    /* only "gettime" means anything to TALLY_CLOCK */
    setenv("TALLY_CLOCK", "tsc-please", 1);
    tally__clock_restart(0);
    cr_assert_eq(tally__clock_source(), machine_has_tsc() ? TALLY__CLOCK_TSC : TALLY__CLOCK_GETTIME);
    setenv("TALLY_CLOCK", "gettime", 1);
    tally__clock_restart(0);
    cr_assert_eq(tally__clock_source(), TALLY__CLOCK_GETTIME);
    unsetenv("TALLY_CLOCK");
    tally__clock_restart(0);
}

Test(clock, never_goes_back_in_each_of_four_threads, .timeout = 120)
{
    tally__clock_restart(0);
    uint64_t a0 = tally__clock_anchors();
    check_readers(4, 2000000);
    /* the first lines are short: the readers crossed re-anchors */
    if (tally__clock_source() == TALLY__CLOCK_TSC)
        cr_assert_gt(tally__clock_anchors(), a0);
}

Test(clock, never_goes_back_from_thread_to_thread, .timeout = 120)
{
    /* lines of 20 us: re-anchors fall between a reading and the next */
    tally__clock_restart(20 * US);
    uint64_t a0 = tally__clock_anchors();
    check_handoff(100000);
    if (tally__clock_source() == TALLY__CLOCK_TSC)
        cr_assert_gt(tally__clock_anchors(), a0);
    tally__clock_restart(0);
    check_handoff(20000);
}

Test(clock, agrees_with_the_monotonic_clock, .timeout = 120)
{
    /* from the start: the first rate measured over 20 us, the lines
       lengthening from 1 ms, then lines of the normal length */
    tally__clock_restart(0);
    uint64_t a0 = tally__clock_anchors();
    check_agreement(1500 * MS, EPS);
    if (tally__clock_source() == TALLY__CLOCK_TSC)
        cr_assert_geq(tally__clock_anchors() - a0, 5, "lines of 1, 2, 4, 8, 16 ms at least");
}

Test(clock, continuous_through_frequent_reanchors, .timeout = 120)
{
    tally__clock_restart(5 * US);
    cr_assert_eq(tally__clock_source(), machine_has_tsc() ? TALLY__CLOCK_TSC : TALLY__CLOCK_GETTIME);
    uint64_t a0 = tally__clock_anchors();
    check_readers(4, 500000);
    check_agreement(100 * MS, EPS);
    if (tally__clock_source() == TALLY__CLOCK_TSC)
        cr_assert_geq(tally__clock_anchors() - a0, 1000);
    tally__clock_restart(0);
}

/*
 * A reader may hold the set it read for long before it reads the counter: it
 * is then a set behind. So each set, at any counter value, must give no less
 * than the one it replaced, and both ranges only grow. On the range the two
 * share they must agree exactly (the new set keeps the old one's last line):
 * a line fixed from a later instant would tilt under the old one's end.
 * Checked at the breakpoints and at evenly spaced counter values, for 2000
 * re-anchors at varied points.
 */
Test(clock, each_set_gives_no_less_than_the_one_before, .timeout = 120)
{
    /* lines of 50 us: longer than the checks below take, so that the next
       re-anchor can come anywhere in its line */
    tally__clock_restart(50 * US);
    cr_assert_eq(tally__clock_source(), machine_has_tsc() ? TALLY__CLOCK_TSC : TALLY__CLOCK_GETTIME);
    if (tally__clock_source() != TALLY__CLOCK_TSC) {
        uint64_t a0 = tally__clock_anchors();
        check_readers(1, 100000);
        cr_assert_eq(tally__clock_anchors(), a0, "no TSC line without the TSC");
        return;
    }
    for (int k = 0; k < 2000; k++) {
        /* no reads for 0 to 70 us: the next re-anchor comes early or late in
           its line, or after the clock sat idle past the line's end */
        uint64_t a = tally__clock_anchors(), t0 = tally__mono_ns();
        while (tally__mono_ns() - t0 < (uint64_t)(k % 8) * 10 * US)
            ;
        while (tally__clock_anchors() == a) {
            (void)tally_now_ns();
            cr_assert_lt(tally__mono_ns() - t0, 10 * UINT64_C(1000000000), "no re-anchor in 10 s");
        }
        uint64_t plo, phi, clo, chi;
        tally__clock_set_at(1, 0, &plo, &phi);
        tally__clock_set_at(0, 0, &clo, &chi);
        cr_assert(plo <= phi && clo <= chi);
        cr_assert(clo >= plo && chi >= phi, "re-anchor %d: the range went back", k);
        uint64_t span = chi - plo + 2, at[256 + 8] = { plo - 1, plo, clo - 1, clo, phi - 1, phi, phi + 1, chi };
        for (int i = 0; i < 256; i++)
            at[8 + i] = plo - 1 + span * (uint64_t)i / 255;
        uint64_t lp = 0, lc = 0;
        for (size_t i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
            uint64_t lo, hi;
            uint64_t p = tally__clock_set_at(1, at[i], &lo, &hi);
            uint64_t c = tally__clock_set_at(0, at[i], &lo, &hi);
            cr_assert_geq(c, p, "re-anchor %d: at counter %llu the new set gives %llu ns less", k,
                          (unsigned long long)at[i], (unsigned long long)(p - c));
            /* the new set's first line is the old set's last: on the old
               range, readers of either set agree */
            if (at[i] >= clo && at[i] <= phi)
                cr_assert_eq(c, p, "re-anchor %d: at counter %llu the sets differ by %llu ns", k,
                             (unsigned long long)at[i], (unsigned long long)(c - p));
            if (i >= 8) {   /* the evenly spaced values rise */
                cr_assert_geq(p, lp);
                cr_assert_geq(c, lc);
                lp = p;
                lc = c;
            }
        }
    }
}

Test(clock, gettime_fallback_when_told, .timeout = 120)
{
    setenv("TALLY_CLOCK", "gettime", 1);
    tally__clock_restart(0);
    cr_assert_eq(tally__clock_source(), TALLY__CLOCK_GETTIME);
    uint64_t a0 = tally__clock_anchors();
    check_readers(4, 500000);
    check_handoff(20000);
    /* clock_gettime mapped is the reference itself */
    check_agreement(200 * MS, 0);
    cr_assert_eq(tally__clock_anchors(), a0, "no TSC line was fixed");
    unsetenv("TALLY_CLOCK");
    tally__clock_restart(0);
}
