/*
 * Clocks and deadlines, written once. Private to src/.
 *   tally_now_ns()        the public clock: wall time read once at load,
 *                         advanced by CLOCK_MONOTONIC (never goes back).
 *   tally__mono_ns()      CLOCK_MONOTONIC in ns.
 *   tally__deadline()     an absolute CLOCK_MONOTONIC timespec @timeout_ns from
 *                         now, saturating, for condition variables created
 *                         with tally__cond_init_mono().
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

uint64_t tally__mono_ns(void);
struct timespec tally__deadline(uint64_t timeout_ns);
/* A condition variable whose timed waits take tally__deadline()s. Return 0 or an errno. */
int tally__cond_init_mono(pthread_cond_t *c);

#endif /* TALLY_CORE_CLOCK_H */
