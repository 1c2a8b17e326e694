/*
 * Process identities and the lease in shared memory (src/core/proc.c,
 * src/core/lease.c), with real processes: live holders keep the lease,
 * killed, exited and zombie holders lose it, and of the processes that race
 * for a dead holder's lease exactly one takes it.
 */
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test.h"
#include "core/lease.h"
#include "core/proc.h"

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

typedef struct region {
    tally__lease     lease;
    _Atomic int      ready, stop, got[4];
    _Atomic uint64_t id;
} region;

static region *shared_region(void)
{
    region *r = mmap(NULL, sizeof(region), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(r, MAP_FAILED);
    return r;
}

/* A child that takes the lease, says so, and lives until told to stop. */
static pid_t holder(region *r)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (!tally__lease_take(&r->lease))
            _exit(1);
        atomic_store(&r->ready, 1);
        while (!atomic_load(&r->stop))
            sleep_ms(1);
        _exit(0);
    }
    while (!atomic_load(&r->ready))
        sleep_ms(1);
    return pid;
}

Test(proc, identities_tell_a_live_process_from_a_dead_one_and_a_reused_pid)
{
    uint64_t me = tally__proc_self();
    cr_assert_neq(me, 0);
    cr_assert_eq(me & ((UINT64_C(1) << TALLY__PROC_PID_BITS) - 1), (uint64_t)getpid());
    cr_assert_not(tally__proc_dead(me));
    /* the same pid with another start time: another process under a reused pid */
    cr_assert(tally__proc_dead(me + (UINT64_C(1) << TALLY__PROC_PID_BITS)));
    cr_assert_not(tally__proc_dead(0));

    region *r = shared_region();
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        atomic_store(&r->id, tally__proc_self());
        while (!atomic_load(&r->stop))
            sleep_ms(1);
        _exit(0);
    }
    while (!atomic_load(&r->id))
        sleep_ms(1);
    uint64_t child = atomic_load(&r->id);
    cr_assert_neq(child, me, "a child kept its parent's identity");
    cr_assert_not(tally__proc_dead(child));
    atomic_store(&r->stop, 1);
    for (int i = 0; i < 5000 && !tally__proc_dead(child); i++)
        sleep_ms(1);
    cr_assert(tally__proc_dead(child), "an exited child (a zombie) is not dead");
    cr_assert_eq(waitpid(pid, NULL, 0), pid);
    cr_assert(tally__proc_dead(child), "a reaped child is not dead");
}

Test(lease, a_free_lease_is_taken_held_and_given_back)
{
    region *r = shared_region();
    cr_assert(tally__lease_take(&r->lease));
    cr_assert(tally__lease_held(&r->lease));
    cr_assert(tally__lease_take(&r->lease), "the holder's second take failed");
    tally__lease_give(&r->lease);
    cr_assert_not(tally__lease_held(&r->lease));
    cr_assert_eq(atomic_load(&r->lease.holder), 0);
}

Test(lease, a_live_holder_keeps_it_and_loses_it_when_killed, .timeout = 60)
{
    region *r = shared_region();
    pid_t pid = holder(r);

    for (int i = 0; i < 100; i++) {
        cr_assert_not(tally__lease_take(&r->lease), "the lease was taken from a live holder");
        sleep_ms(2);
    }
    tally__lease_give(&r->lease);          /* not ours: nothing changes */
    cr_assert_neq(atomic_load(&r->lease.holder), 0);
    kill(pid, SIGKILL);
    bool taken = false;
    for (int i = 0; i < 5000 && !taken; i++) {
        taken = tally__lease_take(&r->lease);
        if (!taken)
            sleep_ms(1);
    }
    cr_assert(taken, "the lease of a killed holder (a zombie) was not taken over");
    cr_assert_eq(waitpid(pid, NULL, 0), pid);
    cr_assert(tally__lease_held(&r->lease));
}

Test(lease, a_holder_that_exits_without_giving_it_back_loses_it, .timeout = 60)
{
    region *r = shared_region();
    pid_t pid = holder(r);
    atomic_store(&r->stop, 1);
    cr_assert_eq(waitpid(pid, NULL, 0), pid);
    cr_assert(tally__lease_take(&r->lease));
}

/* Three processes race for the lease of a killed holder: exactly one wins,
   and keeps it while it lives. */
Test(lease, exactly_one_of_the_racers_takes_a_dead_holders_lease, .timeout = 60)
{
    region *r = shared_region();
    pid_t h = holder(r), racers[3];

    for (int k = 0; k < 3; k++) {
        racers[k] = fork();
        cr_assert_geq(racers[k], 0);
        if (racers[k] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            while (!atomic_load(&r->stop)) {
                if (tally__lease_take(&r->lease))
                    atomic_store(&r->got[k], 1);
            }
            _exit(0);
        }
    }
    sleep_ms(100);
    cr_assert_eq(atomic_load(&r->got[0]) + atomic_load(&r->got[1]) + atomic_load(&r->got[2]), 0,
                 "a racer took the lease of a live holder");
    kill(h, SIGKILL);
    int got = 0;
    for (int i = 0; i < 5000 && !got; i++) {
        got = atomic_load(&r->got[0]) + atomic_load(&r->got[1]) + atomic_load(&r->got[2]);
        sleep_ms(1);
    }
    sleep_ms(200);      /* time for a second, wrong, taker */
    got = atomic_load(&r->got[0]) + atomic_load(&r->got[1]) + atomic_load(&r->got[2]);
    atomic_store(&r->stop, 1);
    for (int k = 0; k < 3; k++)
        waitpid(racers[k], NULL, 0);
    waitpid(h, NULL, 0);
    cr_assert_eq(got, 1, "%d racers took the lease", got);
}
