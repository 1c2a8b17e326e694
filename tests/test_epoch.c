/*
 * Epochs in shared memory (src/core/epoch.c): grace periods across threads
 * and processes, readers given back by exiting threads and forgotten
 * domains, and readers of killed processes recovered. The processes are
 * real (fork, SIGKILL), sharing an anonymous MAP_SHARED mapping.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test.h"
#include "core/epoch.h"

#define NS_PER_MS 1000000L

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * NS_PER_MS };
    nanosleep(&ts, NULL);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / NS_PER_MS;
}

/* A domain of @n readers followed by @extra bytes, in memory shared with
   the children this process forks. */
static tally__epoch *shared_domain(uint32_t n, size_t extra, void **extra_out)
{
    size_t head = (tally__epoch_size(n) + 63) & ~(size_t)63;
    void *m = mmap(NULL, head + extra, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(m, MAP_FAILED);
    tally__epoch_init(m, n);
    if (extra_out)
        *extra_out = (char *)m + head;
    return m;
}

static size_t reader_index(tally__epoch *d, tally__epoch_reader *r)
{
    return (size_t)(r - d->readers);
}

/* Run tally__epoch_wait(@d) in a thread; true if it returned within @ms. */
typedef struct waiter {
    tally__epoch *d;
    _Atomic bool  done;
    pthread_t     thread;
} waiter;

static void *wait_main(void *arg)
{
    waiter *w = arg;
    tally__epoch_wait(w->d);
    atomic_store(&w->done, true);
    return NULL;
}

static void waiter_start(waiter *w, tally__epoch *d)
{
    w->d = d;
    atomic_store(&w->done, false);
    cr_assert_eq(pthread_create(&w->thread, NULL, wait_main, w), 0);
}

static bool waiter_done_within(waiter *w, long ms)
{
    for (long t = 0; t < ms && !atomic_load(&w->done); t += 5)
        sleep_ms(5);
    return atomic_load(&w->done);
}

/* ---- threads ---------------------------------------------------------------- */

typedef struct holder {
    tally__epoch   *d;
    _Atomic int     phase;      /* 1: inside; 2: told to leave; 3: left and done */
    _Atomic bool    got;        /* it had a reader */
    _Atomic bool    reenter;    /* leave, enter again at the next epoch, hold until phase 2 */
    _Atomic uint64_t entered_epoch;
    pthread_t       thread;
} holder;

static void *hold_main(void *arg)
{
    holder *h = arg;
    tally__epoch_reader *r = tally__epoch_reader_get(h->d);
    atomic_store(&h->got, r != NULL);
    if (!r) {
        atomic_store(&h->phase, 3);
        return NULL;
    }
    tally__epoch_enter(h->d, r);
    atomic_store(&h->entered_epoch, atomic_load(&r->epoch));
    atomic_store(&h->phase, 1);
    if (atomic_load(&h->reenter)) {
        /* once a wait has advanced past this section's epoch, leave and
           begin a new section, which that wait must not wait for */
        while (atomic_load(&h->d->now) <= atomic_load(&h->entered_epoch))
            sleep_ms(1);
        tally__epoch_exit(r);
        tally__epoch_enter(h->d, r);
    }
    while (atomic_load(&h->phase) != 2)
        sleep_ms(1);
    tally__epoch_exit(r);
    atomic_store(&h->phase, 3);
    return NULL;
}

static void holder_start(holder *h, tally__epoch *d, bool reenter)
{
    memset(h, 0, sizeof(*h));
    h->d = d;
    atomic_store(&h->reenter, reenter);
    cr_assert_eq(pthread_create(&h->thread, NULL, hold_main, h), 0);
    while (atomic_load(&h->phase) == 0)
        sleep_ms(1);
}

static void holder_stop(holder *h)
{
    if (atomic_load(&h->phase) == 1)
        atomic_store(&h->phase, 2);
    pthread_join(h->thread, NULL);
}

Test(epoch, a_wait_waits_for_a_section_begun_before_it, .timeout = 60)
{
    tally__epoch *d = shared_domain(4, 0, NULL);
    holder h;
    waiter w;

    holder_start(&h, d, false);
    cr_assert(atomic_load(&h.got));
    waiter_start(&w, d);
    cr_assert_not(waiter_done_within(&w, 300), "the wait returned while the section ran");
    holder_stop(&h);
    cr_assert(waiter_done_within(&w, 20000), "the wait did not return after the section ended");
    pthread_join(w.thread, NULL);
}

Test(epoch, a_wait_does_not_wait_for_a_section_begun_after_it, .timeout = 60)
{
    tally__epoch *d = shared_domain(4, 0, NULL);
    holder h;
    waiter w;

    holder_start(&h, d, true);
    waiter_start(&w, d);
    /* the holder leaves its first section once the wait advanced, and then
       stays inside its second one */
    cr_assert(waiter_done_within(&w, 20000), "the wait waited for a section begun after it");
    cr_assert_eq(atomic_load(&h.phase), 1);
    holder_stop(&h);
    pthread_join(w.thread, NULL);
}

static void *take_and_leave(void *arg)
{
    tally__epoch *d = arg;
    tally__epoch_reader *r = tally__epoch_reader_get(d);
    if (r) {
        tally__epoch_enter(d, r);
        tally__epoch_exit(r);
    }
    return (void *)(uintptr_t)(r != NULL);
}

Test(epoch, readers_of_exited_threads_are_given_back)
{
    tally__epoch *d = shared_domain(2, 0, NULL);
    for (int i = 0; i < 12; i++) {
        pthread_t t;
        void *got;
        cr_assert_eq(pthread_create(&t, NULL, take_and_leave, d), 0);
        pthread_join(t, &got);
        cr_assert(got, "thread %d found no reader in a domain of 2 after %d threads exited", i, i);
    }
    for (uint32_t i = 0; i < d->n_readers; i++)
        cr_assert_eq(atomic_load(&d->readers[i].owner), 0);
}

Test(epoch, a_domain_whose_readers_are_all_taken_refuses_another, .timeout = 60)
{
    tally__epoch *d = shared_domain(2, 0, NULL);
    holder a, b, c;

    holder_start(&a, d, false);
    holder_start(&b, d, false);
    holder_start(&c, d, false);
    cr_assert(atomic_load(&a.got) && atomic_load(&b.got));
    cr_assert_not(atomic_load(&c.got), "a third thread took a reader of a domain of 2");
    holder_stop(&c);
    holder_stop(&a);
    holder_start(&c, d, false);
    cr_assert(atomic_load(&c.got), "the reader of an exited thread was not given back");
    holder_stop(&b);
    holder_stop(&c);
}

Test(epoch, a_thread_keeps_one_reader_per_domain)
{
    tally__epoch *d = shared_domain(4, 0, NULL);
    tally__epoch_reader *r = tally__epoch_reader_get(d);
    cr_assert_not_null(r);
    cr_assert_eq(tally__epoch_reader_get(d), r);
    size_t owned = 0;
    for (uint32_t i = 0; i < d->n_readers; i++)
        owned += atomic_load(&d->readers[i].owner) != 0;
    cr_assert_eq(owned, 1);
    tally__epoch_forget(d);
}

Test(epoch, forget_gives_back_every_reader_of_the_process, .timeout = 60)
{
    tally__epoch *d = shared_domain(4, 0, NULL);
    tally__epoch *other = shared_domain(4, 0, NULL);
    holder h;

    tally__epoch_reader *mine = tally__epoch_reader_get(d);
    tally__epoch_reader *mine_other = tally__epoch_reader_get(other);
    cr_assert(mine && mine_other);
    holder_start(&h, d, false);
    atomic_store(&h.phase, 2);           /* it leaves its section, and keeps its reader until it exits */
    while (atomic_load(&h.phase) != 3)
        sleep_ms(1);
    tally__epoch_forget(d);
    for (uint32_t i = 0; i < d->n_readers; i++)
        cr_assert_eq(atomic_load(&d->readers[i].owner), 0, "reader %u still owned after forget", i);
    pthread_join(h.thread, NULL);
    /* the other domain's reader is found again, not taken twice */
    cr_assert_eq(tally__epoch_reader_get(other), mine_other);
    tally__epoch_forget(other);
}

/* ---- processes -------------------------------------------------------------- */

typedef struct shared_flags {
    _Atomic int  inside, done;
    _Atomic long index;
} shared_flags;

Test(epoch, a_section_of_another_process_is_waited_for, .timeout = 60)
{
    void *extra;
    tally__epoch *d = shared_domain(4, sizeof(shared_flags), &extra);
    shared_flags *f = extra;

    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        tally__epoch_reader *r = tally__epoch_reader_get(d);
        if (!r)
            _exit(1);
        tally__epoch_enter(d, r);
        atomic_store(&f->inside, 1);
        sleep_ms(300);
        atomic_store(&f->done, 1);
        tally__epoch_exit(r);
        _exit(0);
    }
    while (!atomic_load(&f->inside))
        sleep_ms(1);
    tally__epoch_wait(d);
    cr_assert_eq(atomic_load(&f->done), 1, "the wait returned before the child's section ended");
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* A child that dies by SIGKILL inside a section; reaped or left a zombie. */
static void killed_inside_a_section_does_not_stall(bool reap_first)
{
    void *extra;
    tally__epoch *d = shared_domain(4, sizeof(shared_flags), &extra);
    shared_flags *f = extra;
    waiter w;

    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        tally__epoch_reader *r = tally__epoch_reader_get(d);
        if (!r)
            _exit(1);
        atomic_store(&f->index, (long)reader_index(d, r));
        tally__epoch_enter(d, r);
        atomic_store(&f->inside, 1);
        for (;;)
            pause();
    }
    while (!atomic_load(&f->inside))
        sleep_ms(1);
    kill(pid, SIGKILL);
    if (reap_first)
        cr_assert_eq(waitpid(pid, NULL, 0), pid);
    waiter_start(&w, d);
    cr_assert(waiter_done_within(&w, 20000), "a wait stalled on the reader of a killed process");
    pthread_join(w.thread, NULL);
    cr_assert_eq(atomic_load(&d->readers[atomic_load(&f->index)].owner), 0,
                 "the killed process's reader was not given back");
    if (!reap_first)
        cr_assert_eq(waitpid(pid, NULL, 0), pid);
}

Test(epoch, a_process_killed_in_a_section_does_not_stall_a_wait, .timeout = 60)
{
    killed_inside_a_section_does_not_stall(true);
}

Test(epoch, a_zombie_killed_in_a_section_does_not_stall_a_wait, .timeout = 60)
{
    killed_inside_a_section_does_not_stall(false);
}

Test(epoch, a_fork_child_takes_a_reader_of_its_own, .timeout = 60)
{
    void *extra;
    tally__epoch *d = shared_domain(4, sizeof(shared_flags), &extra);
    shared_flags *f = extra;
    tally__epoch_reader *mine = tally__epoch_reader_get(d);
    cr_assert_not_null(mine);
    uint64_t owner = atomic_load(&mine->owner);

    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        tally__epoch_reader *r = tally__epoch_reader_get(d);
        atomic_store(&f->index, r ? (long)reader_index(d, r) : -1);
        _exit(0);
    }
    cr_assert_eq(waitpid(pid, NULL, 0), pid);
    cr_assert_geq(atomic_load(&f->index), 0);
    cr_assert_neq((size_t)atomic_load(&f->index), reader_index(d, mine),
                  "the child took its parent's reader");
    cr_assert_eq(atomic_load(&mine->owner), owner);
    tally__epoch_forget(d);
}

/*
 * Readers in 4 processes of 2 threads each follow a pointer (an index into a
 * pool of nodes) inside sections; the writer moves the pointer to a fresh
 * node, waits for a grace period, and poisons the node it unlinked. A reader
 * that ever sees poison read a node after its grace period. Meanwhile the
 * writer SIGKILLs a random reader process every few milliseconds and starts
 * another: the writer must keep completing grace periods.
 */
#define POOL   8
#define POISON UINT64_C(0xdeaddeaddeaddead)
#define STRESS_READERS 4

typedef struct pool {
    _Atomic uint32_t cur;
    _Atomic bool     stop;
    _Atomic uint64_t reads, violations;
    _Atomic uint64_t value[POOL];
} pool;

static void *read_main(void *arg)
{
    void **a = arg;
    tally__epoch *d = a[0];
    pool *p = a[1];
    tally__epoch_reader *r = tally__epoch_reader_get(d);
    if (!r)
        return NULL;
    while (!atomic_load_explicit(&p->stop, memory_order_relaxed)) {
        tally__epoch_enter(d, r);
        uint32_t i = atomic_load_explicit(&p->cur, memory_order_acquire);
        for (int k = 0; k < 8; k++) {
            if (atomic_load_explicit(&p->value[i], memory_order_relaxed) == POISON)
                atomic_fetch_add(&p->violations, 1);
        }
        tally__epoch_exit(r);
        atomic_fetch_add_explicit(&p->reads, 1, memory_order_relaxed);
    }
    return NULL;
}

static pid_t start_reader_process(tally__epoch *d, pool *p)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    prctl(PR_SET_PDEATHSIG, SIGKILL);      /* never outlive a test that failed */
    void *a[2] = { d, p };
    pthread_t t;
    if (pthread_create(&t, NULL, read_main, a) != 0)
        _exit(1);
    read_main(a);
    pthread_join(t, NULL);
    _exit(0);
}

Test(epoch_stress, killed_readers_never_see_poison_nor_stall_the_writer, .timeout = 120)
{
    void *extra;
    tally__epoch *d = shared_domain(64, sizeof(pool), &extra);
    pool *p = extra;
    pid_t pids[STRESS_READERS];
    unsigned seed = 12345;
    uint64_t kills = 0, rounds = 0;


    for (int i = 0; i < POOL; i++)
        atomic_store(&p->value[i], 1);
    for (int i = 0; i < STRESS_READERS; i++) {
        pids[i] = start_reader_process(d, p);
        cr_assert_gt(pids[i], 0);
    }
    /* bounded by work done, not by time: the machine may be loaded; a
       writer that stalls is caught by the deadline */
    uint64_t deadline = now_ms() + 60000;
    while (rounds < 1000 || kills < 20) {
        cr_assert_lt(now_ms(), deadline, "the writer stalled: %llu grace periods, %llu kills in 60 s",
                     (unsigned long long)rounds, (unsigned long long)kills);
        uint32_t old = atomic_load(&p->cur), next = (old + 1 + (uint32_t)rand_r(&seed) % (POOL - 1)) % POOL;
        atomic_store_explicit(&p->value[next], 1, memory_order_relaxed);
        /* release: the fresh node's value before the pointer to it */
        atomic_store_explicit(&p->cur, next, memory_order_release);
        tally__epoch_wait(d);
        atomic_store_explicit(&p->value[old], POISON, memory_order_relaxed);
        rounds++;
        if (rounds % 25 == 0) {
            int k = rand_r(&seed) % STRESS_READERS;
            kill(pids[k], SIGKILL);
            waitpid(pids[k], NULL, 0);
            pids[k] = start_reader_process(d, p);
            cr_assert_gt(pids[k], 0);
            kills++;
        }
    }
    atomic_store(&p->stop, true);
    for (int i = 0; i < STRESS_READERS; i++)
        waitpid(pids[i], NULL, 0);
    cr_assert_eq(atomic_load(&p->violations), 0, "%llu reads of a node after its grace period",
                 (unsigned long long)atomic_load(&p->violations));
    cr_assert_gt(atomic_load(&p->reads), 1000);
}

/* A thread that exits after another domain was forgotten still gives back
   its reader of this one. */
static void *take_then_wait(void *arg)
{
    holder *h = arg;
    atomic_store(&h->got, tally__epoch_reader_get(h->d) != NULL);
    atomic_store(&h->phase, 1);
    while (atomic_load(&h->phase) != 2)
        sleep_ms(1);
    return NULL;
}

Test(epoch, a_forget_of_another_domain_leaves_a_threads_reader_to_its_exit, .timeout = 60)
{
    tally__epoch *kept = shared_domain(2, 0, NULL);
    tally__epoch *gone = shared_domain(2, 0, NULL);
    holder h;

    for (int round = 0; round < 6; round++) {
        memset(&h, 0, sizeof(h));
        h.d = kept;
        cr_assert_eq(pthread_create(&h.thread, NULL, take_then_wait, &h), 0);
        while (atomic_load(&h.phase) != 1)
            sleep_ms(1);
        cr_assert(atomic_load(&h.got), "round %d: no reader left in a domain of 2", round);
        cr_assert_not_null(tally__epoch_reader_get(gone));
        tally__epoch_forget(gone);
        atomic_store(&h.phase, 2);
        pthread_join(h.thread, NULL);
        for (uint32_t i = 0; i < kept->n_readers; i++)
            cr_assert_eq(atomic_load(&kept->readers[i].owner), 0,
                         "round %d: an exited thread kept reader %u", round, i);
    }
}
