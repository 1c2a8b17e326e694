/* Process identities (core/proc.h). */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/proc.h"

#define PID_MASK ((UINT64_C(1) << TALLY__PROC_PID_BITS) - 1)

/* The identity of the process @pid (0: no such process, or unreadable),
   and whether it is a zombie. */
static uint64_t identity_of(pid_t pid, bool *zombie)
{
    char path[32], buf[1024];
    FILE *f;
    size_t n;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    f = fopen(path, "re");
    if (!f)
        return 0;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* "pid (comm) state ppid ..."; comm may hold spaces and parentheses */
    char *p = strrchr(buf, ')');
    if (!p)
        return 0;
    char state = ' ';
    unsigned long long start = 0;
    /* after ") ": field 3 is the state, field 22 the start time */
    if (sscanf(p + 1, " %c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %llu",
               &state, &start) != 2)
        return 0;
    if (zombie)
        *zombie = state == 'Z' || state == 'X';
    return ((uint64_t)start << TALLY__PROC_PID_BITS) | (uint64_t)pid;
}

static _Atomic uint64_t self_id;      /* this process's identity, once read */

uint64_t tally__proc_self(void)
{
    uint64_t id = atomic_load_explicit(&self_id, memory_order_relaxed);   /* a value, no data */
    pid_t pid = getpid();

    if (!id || (pid_t)(id & PID_MASK) != pid) {
        id = identity_of(pid, NULL);
        if (!id)
            id = (uint64_t)pid;   /* no /proc: the pid alone */
        atomic_store_explicit(&self_id, id, memory_order_relaxed);
    }
    return id;
}

bool tally__proc_dead(uint64_t id)
{
    pid_t pid = (pid_t)(id & PID_MASK);
    bool zombie = false;

    if (id == 0 || pid == 0 || id == tally__proc_self())
        return false;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return true;
    uint64_t now = identity_of(pid, &zombie);
    if (!now)
        return false;
    return zombie || ((id >> TALLY__PROC_PID_BITS) != 0 && now != id);
}
