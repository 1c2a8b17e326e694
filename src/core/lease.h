/*
 * A lease in shared memory: one process of those that map it holds it at a
 * time (the flusher of a shared region, so that one process per region
 * syncs it). Private to src/.
 *
 *  1. The lease is one word, the holder's process identity (core/proc.h),
 *     0 when free; it changes only by CAS, so two processes never both
 *     take it from one value.
 *  2. A process takes a free lease, or one whose holder died (SIGKILL, a
 *     crash, an exit without giving it back): a pid reused by another
 *     process is not its holder. A live holder keeps it until it gives it
 *     back; a holder that hangs keeps it too (nothing here can tell a slow
 *     process from a stuck one).
 */
#ifndef TALLY_CORE_LEASE_H
#define TALLY_CORE_LEASE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct tally__lease {
    _Atomic uint64_t holder;
} tally__lease;

/* Take @l for this process if it is free or its holder died. Return true
   when this process holds it (taken now, or held already). */
bool tally__lease_take(tally__lease *l);
/* Give @l back if this process holds it. */
void tally__lease_give(tally__lease *l);
/* Whether this process holds @l. */
bool tally__lease_held(tally__lease *l);

#endif /* TALLY_CORE_LEASE_H */
