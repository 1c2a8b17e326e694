/*
 * RCU read-side sections for any thread, with registration on first use and
 * unregistration at thread exit (liburcu, memb flavour). Private to src/.
 *
 * The read-side fast path is inlined: these static inline functions of
 * liburcu are a few lines each (LGPL-2.1 section 5 covers them). Not under
 * ThreadSanitizer: liburcu's own plain-access protocol would then be
 * instrumented as if it were ours; TSan builds call the library instead.
 */
#ifndef TALLY_CORE_RCU_H
#define TALLY_CORE_RCU_H

#include <stdbool.h>

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TALLY__TSAN 1
#endif
#endif
#if !defined(TALLY__TSAN) && !defined(__SANITIZE_THREAD__)
#define _LGPL_SOURCE
#endif
#include <urcu/urcu-memb.h>

#include "core/atomics.h"

extern __thread bool tally__rcu_registered __attribute__((tls_model("initial-exec")));
/* The calling thread's number, in order of first use (0, 1, ...): statistics shards. */
extern __thread unsigned tally__thread_no __attribute__((tls_model("initial-exec")));

void tally__rcu_register(void);

static inline void tally__rcu_enter(void)
{
    if (TALLY__UNLIKELY(!tally__rcu_registered))
        tally__rcu_register();
    urcu_memb_read_lock();
}

static inline void tally__rcu_exit(void)
{
    urcu_memb_read_unlock();
}

/* Wait for a grace period: every read-side section begun before has ended. */
void tally__rcu_wait(void);
/* Run @fn inside a read-side section (for threads outside the hot path). */
void tally__rcu_read(void (*fn)(void *), void *arg);

#endif /* TALLY_CORE_RCU_H */
