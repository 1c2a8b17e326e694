/*
 * Clocks and deadlines, written once. Private to src/.
 *   tally_now_ns()        the public clock (tally.h): ns since the epoch, the
 *                         wall clock read once at load advanced by
 *                         CLOCK_MONOTONIC (tally__clock_ref_ns()); never goes
 *                         back, in one thread or across threads.
 *   tally__mono_ns()      CLOCK_MONOTONIC in ns.
 *   tally__deadline()     an absolute CLOCK_MONOTONIC timespec @timeout_ns from
 *                         now, saturating, for condition variables created
 *                         with tally__cond_init_mono().
 *
 * Where tally_now_ns() reads time is decided once, at load:
 *   TALLY__CLOCK_TSC      the x86-64 time-stamp counter, taken only when the
 *                         kernel vouches for it: /proc/cpuinfo lists
 *                         constant_tsc, nonstop_tsc and rdtscp, and
 *                         /sys/devices/system/clocksource/clocksource0/current_clocksource
 *                         is "tsc" (the kernel keeps that only while the
 *                         counters of all CPUs agree). A call is then an
 *                         rdtscp, a multiply and a shift, without a
 *                         clock_gettime.
 *   TALLY__CLOCK_GETTIME  clock_gettime(CLOCK_MONOTONIC) mapped by
 *                         tally__clock_ref_ns(): everywhere else, and whenever
 *                         the environment has TALLY_CLOCK=gettime (any other
 *                         value of TALLY_CLOCK changes nothing).
 *
 * The TSC clock is a chain of lines, each a (tsc, ns, mult) triple:
 * ns + ((tsc' - tsc) * mult >> TALLY__CLOCK_SHIFT). Each line is fixed before
 * any reader evaluates it, and starts exactly where the one before ends, so
 * the chain is one nondecreasing function of the counter that every reader
 * evaluates alike (a reader that finds the counter past the last fixed line,
 * the clock having sat idle, fixes the next line itself or waits for the
 * thread that does, 20 us at most, and meanwhile is held at the line's end).
 * Halfway along a line the first reader to notice samples
 * CLOCK_MONOTONIC and fixes the next line, its slope chosen to meet the
 * reference at the line's end (tally__clock_ref_ns() plus the measured rate):
 * drift is taken out by slope, never by a step. Lines are ~268 ms long
 * (shorter right after load, while the first rates are measured); the error
 * against tally__clock_ref_ns() is the change of CLOCK_MONOTONIC's rate
 * (NTP slew) over about 1.5 lines, plus tens of ns of sampling.
 */
#ifndef TALLY_CORE_CLOCK_H
#define TALLY_CORE_CLOCK_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define TALLY__NS_PER_MS UINT64_C(1000000)
#define TALLY__NS_PER_S  UINT64_C(1000000000)
/* The latest time tally takes: ns since the epoch fit in 63 bits. */
#define TALLY__TIME_MAX  ((uint64_t)INT64_MAX)

/* A line's mult is ns per counter tick in this many fraction bits. */
#define TALLY__CLOCK_SHIFT 32

enum { TALLY__CLOCK_GETTIME, TALLY__CLOCK_TSC };

uint64_t tally__mono_ns(void);
struct timespec tally__deadline(uint64_t timeout_ns);
/* A condition variable whose timed waits take tally__deadline()s. Return 0 or an errno. */
int tally__cond_init_mono(pthread_cond_t *c);

/* The epoch time tally_now_ns() follows at CLOCK_MONOTONIC @mono_ns: the wall
   clock at load plus the monotonic time since. TALLY__CLOCK_GETTIME returns
   exactly this; TALLY__CLOCK_TSC tracks it. */
uint64_t tally__clock_ref_ns(uint64_t mono_ns);
/* TALLY__CLOCK_TSC or TALLY__CLOCK_GETTIME. */
int tally__clock_source(void);
/* How many times the TSC clock fixed its next line since it started. */
uint64_t tally__clock_anchors(void);
/*
 * For tests: what the current TSC parameter set (@back 0), or the one it
 * replaced (@back 1), gives at counter value @tsc, and in *lo, *hi the
 * counter range it covers; meaningful while no line is being fixed.
 */
uint64_t tally__clock_set_at(unsigned back, uint64_t tsc, uint64_t *lo, uint64_t *hi);
/*
 * For tests: start the clock afresh as at load (the wall clock, TALLY_CLOCK
 * and the machine read again), with TSC lines of @period_ns, or the default
 * when 0. The clock may step either way. No other thread may be in
 * tally_now_ns() meanwhile.
 */
void tally__clock_restart(uint64_t period_ns);

#endif /* TALLY_CORE_CLOCK_H */
