/*
 * An engine's read-side sections: liburcu's for an engine in one process's
 * memory, the epochs in its region for a shared engine (shared.c), whose
 * readers and reclaimers are in several processes that liburcu's registry,
 * one per process, cannot see. Every call that reads a table runs in one,
 * and a slot is reused only after a grace period of the same kind
 * (table.c, guarantee 5). Private to src/.
 */
#ifndef TALLY_ENGINE_SECTION_H
#define TALLY_ENGINE_SECTION_H

#include "core/epoch.h"
#include "core/rcu.h"
#include "engine/engine-internal.h"

/* The calling thread's reader of the shared engine it is in a section of:
   set by tally__sec_enter(), kept after the exit for the re-entry of
   tally__sec_resume(). */
extern __thread tally__epoch_reader *tally__sec_reader __attribute__((tls_model("initial-exec")));

/* A shared engine's entry: the thread's reader, taken on first use. */
int tally__sec_enter_shared(tally_engine *e);

/* Enter a section of @e. Return 0, or TALLY_EBUSY (a shared engine whose
   readers are all owned by live threads): then the caller is outside. */
static inline int tally__sec_enter(tally_engine *e)
{
    /* the section's kind is fixed for the engine's life: a plain read */
    if (TALLY__LIKELY(!e->epoch)) {
        tally__rcu_enter();
        return 0;
    }
    return tally__sec_enter_shared(e);
}

static inline void tally__sec_exit(tally_engine *e)
{
    if (TALLY__LIKELY(!e->epoch))
        tally__rcu_exit();
    else
        tally__epoch_exit(tally__sec_reader);
}

/* Enter again, after a tally__sec_exit() of the same call: the reader is the
   thread's still, so this never fails. */
static inline void tally__sec_resume(tally_engine *e)
{
    if (TALLY__LIKELY(!e->epoch))
        tally__rcu_enter();
    else
        tally__epoch_enter(e->epoch, tally__sec_reader);
}

/* Wait for a grace period of @e: every section of it begun before has ended
   (or, shared, its process died). Never inside a section. */
static inline void tally__sec_wait(tally_engine *e)
{
    if (TALLY__LIKELY(!e->epoch))
        tally__rcu_wait();
    else
        tally__epoch_wait(e->epoch);
}

/* Run @fn inside a section of @e (threads outside the hot path). Return 0,
   or TALLY_EBUSY as tally__sec_enter() (then @fn did not run). */
static inline int tally__sec_read(tally_engine *e, void (*fn)(void *), void *arg)
{
    if (TALLY__LIKELY(!e->epoch)) {
        tally__rcu_read(fn, arg);
        return 0;
    }
    int rc = tally__sec_enter_shared(e);
    if (rc)
        return rc;
    fn(arg);
    tally__epoch_exit(tally__sec_reader);
    return 0;
}

#endif /* TALLY_ENGINE_SECTION_H */
