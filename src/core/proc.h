/*
 * Process identities, for memory that several processes map: the process's
 * start time (clock ticks since boot, /proc/PID/stat field 22) << 22 | its
 * pid. A pid alone is reused once its process is gone; the pair names one
 * process for the life of the boot (two processes would need the same pid
 * within one clock tick). Private to src/.
 */
#ifndef TALLY_CORE_PROC_H
#define TALLY_CORE_PROC_H

#include <stdbool.h>
#include <stdint.h>

#define TALLY__PROC_PID_BITS 22       /* pid_max is at most 2^22 on Linux */

/* This process's identity (never 0). A system call each time (getpid): a
   child forked without a fork handler must not keep its parent's. */
uint64_t tally__proc_self(void);

/* Whether the process @id is gone: no such pid, a zombie, or another
   process under its pid. When that cannot be told, it is not. */
bool tally__proc_dead(uint64_t id);

#endif /* TALLY_CORE_PROC_H */
