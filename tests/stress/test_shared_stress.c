/*
 * Shared engines across real processes (include/tally/shared.h): forked
 * processes of several threads each, and an unrelated program that maps a
 * shared file, hitting one engine. Counts are exact across them: exactly
 * max admitted, one first_exceeded, one reset winner. A process SIGKILLed
 * in a hot loop of new keys stalls no one, and the slots its reclaims held
 * come back to the others.
 */
#include "../test.h"
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tally.h"

#define SEC  UINT64_C(1000000000)
#define MS   UINT64_C(1000000)
#define T0   (UINT64_C(1700000000) * SEC)

#define PROCS    4
#define THREADS  2
#define KEYS     64
#define TRIES    300               /* hits a thread makes on each key */
#define MAX      1000

/* Control and results, in a mapping of their own beside the region. */
typedef struct ctl {
    _Atomic int      started, go, done;
    _Atomic int      round, resets_seen;
    _Atomic uint64_t admitted[2][KEYS], first[2][KEYS], calls;
    _Atomic uint64_t wins[256];
    tally_snapshot   snap;        /* the parent's, for the resetting children */
    _Atomic int      errors;
} ctl;

static void *map_anon(size_t len)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(m, MAP_FAILED);
    return m;
}

static tally_options digest_opts(size_t capacity)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = true;
    return o;
}

/* A shared engine of @n policies in a fresh mapping (*@mem, *@len). */
static tally_engine *create(const tally_policy *p, size_t n, size_t capacity, void **mem, size_t *len)
{
    tally_options o = digest_opts(capacity);
    cr_assert_eq(tally_shared_size(&o, p, n, 64, len), 0);
    *mem = map_anon(*len);
    tally_engine *e;
    cr_assert_eq(tally_shared_create(*mem, *len, &o, p, n, 64, &e), 0);
    return e;
}

static void wait_for(_Atomic int *v, int at_least)
{
    while (atomic_load(v) < at_least)
        sched_yield();
}

static pid_t child(void (*fn)(tally_engine *, ctl *, int), tally_engine *e, ctl *c, int no)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        fn(e, c, no);
        _exit(0);
    }
    return pid;
}

/* PROCS children running @fn, each told when it has started. */
static void spawn(void (*fn)(tally_engine *, ctl *, int), tally_engine *e, ctl *c, pid_t *pid)
{
    for (int p = 0; p < PROCS; p++)
        pid[p] = child(fn, e, c, p);
    wait_for(&c->started, PROCS);
}

static void reap(pid_t pid)
{
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %d: status %#x", (int)pid, st);
}

/* ---- Exact counts across processes ------------------------------------------ */

typedef struct hitter {
    tally_engine *e;
    ctl          *c;
    int           no;
} hitter;

static void *hit_keys(void *arg)
{
    hitter *h = arg;
    tally_result r;
    char key[16];
    wait_for(&h->c->go, 1);
    for (int i = 0; i < TRIES; i++)
        for (int k = 0; k < KEYS; k++) {
            int len = snprintf(key, sizeof(key), "key-%d", (k + h->no) % KEYS);
            for (uint32_t pol = 0; pol < 2; pol++) {
                if (tally_hit_at(h->e, pol, key, (size_t)len, NULL, T0, &r) != 0) {
                    atomic_fetch_add(&h->c->errors, 1);
                    continue;
                }
                atomic_fetch_add(&h->c->calls, 1);
                int kk = (k + h->no) % KEYS;
                if (r.allowed)
                    atomic_fetch_add(&h->c->admitted[pol][kk], 1);
                if (r.first_exceeded)
                    atomic_fetch_add(&h->c->first[pol][kk], 1);
            }
        }
    return NULL;
}

static void hit_process(tally_engine *e, ctl *c, int no)
{
    pthread_t t[THREADS];
    hitter h[THREADS];
    for (int i = 0; i < THREADS; i++) {
        h[i] = (hitter){ e, c, no * THREADS + i };
        if (pthread_create(&t[i], NULL, hit_keys, &h[i]) != 0)
            _exit(2);
    }
    atomic_fetch_add(&c->started, 1);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    tally_shared_detach(e);
}

static const tally_policy EXACT[2] = {
    { .name = "fixed", .n_limits = 1,
      .limits = { { .algo = TALLY_FIXED_WINDOW, .max = MAX, .period_ns = 3600 * SEC } } },
    { .name = "gcra", .n_limits = 1,
      .limits = { { .algo = TALLY_GCRA, .max = MAX / 2, .period_ns = 3600 * SEC } } },
};

Test(shared_stress, processes_admit_exactly_max_and_one_first_exceeded, .timeout = 300)
{
    void *m;
    size_t len;
    tally_engine *e = create(EXACT, 2, 4096, &m, &len);
    ctl *c = map_anon(sizeof(ctl));
    pid_t pid[PROCS];
    spawn(hit_process, e, c, pid);
    atomic_store(&c->go, 1);
    for (int p = 0; p < PROCS; p++)
        reap(pid[p]);

    cr_assert_eq(atomic_load(&c->errors), 0);
    uint64_t calls = (uint64_t)PROCS * THREADS * TRIES * KEYS * 2;
    cr_assert_eq(atomic_load(&c->calls), calls);
    for (int k = 0; k < KEYS; k++) {
        cr_assert_eq(atomic_load(&c->admitted[0][k]), MAX, "fixed key-%d: %" PRIu64 " admitted", k,
                     atomic_load(&c->admitted[0][k]));
        cr_assert_eq(atomic_load(&c->admitted[1][k]), MAX / 2, "gcra key-%d", k);
        cr_assert_eq(atomic_load(&c->first[0][k]), 1, "fixed key-%d: one first_exceeded", k);
        cr_assert_eq(atomic_load(&c->first[1][k]), 1, "gcra key-%d: one first_exceeded", k);
        char key[16];
        int n = snprintf(key, sizeof(key), "key-%d", k);
        tally_snapshot s;
        cr_assert_eq(tally_read(e, 0, key, (size_t)n, &s), 0);
        cr_assert_eq(s.c[0].used, MAX, "the engine holds what was admitted");
    }
    /* the statistics of every process's threads, none lost to another's */
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    cr_assert_eq(st.hits, calls);
    cr_assert_eq(st.denials, calls - (uint64_t)KEYS * (MAX + MAX / 2));
    tally_shared_detach(e);
    munmap(m, len);
    munmap(c, sizeof(ctl));
}

/* ---- One reset winner across processes ---------------------------------------- */

#define ROUNDS 200

/* Round r, phase 2r - 1: every child resets from the parent's snapshot of
   the round, of which exactly one may win. Phase 2r: the parent has hit the
   key again, so that its state words are the snapshot's once more but in a
   new instance: no child may reset from the snapshot. */
static void reset_process(tally_engine *e, ctl *c, int no)
{
    (void)no;
    atomic_fetch_add(&c->started, 1);
    for (int phase = 1; phase <= 2 * ROUNDS; phase++) {
        wait_for(&c->round, phase);
        tally_snapshot s = c->snap;
        if (tally_reset_if(e, 0, "hot", 3, &s, NULL) == 0)
            atomic_fetch_add(&c->wins[phase % 256], 1);
        atomic_fetch_add(&c->resets_seen, 1);
    }
    tally_shared_detach(e);
}

Test(shared_stress, of_processes_resetting_one_snapshot_exactly_one_wins, .timeout = 300)
{
    void *m;
    size_t len;
    tally_engine *e = create(EXACT, 1, 1024, &m, &len);
    ctl *c = map_anon(sizeof(ctl));
    pid_t pid[PROCS];
    spawn(reset_process, e, c, pid);
    tally_result r;
    for (int round = 1; round <= ROUNDS; round++) {
        cr_assert_eq(tally_hit_at(e, 0, "hot", 3, NULL, T0, &r), 0);
        cr_assert_eq(tally_read(e, 0, "hot", 3, &c->snap), 0);
        cr_assert_eq(c->snap.c[0].used, 1);
        for (int phase = 2 * round - 1; phase <= 2 * round; phase++) {
            atomic_store(&c->wins[phase % 256], 0);
            /* seq_cst: the snapshot before the phase that hands it over */
            atomic_store(&c->round, phase);
            wait_for(&c->resets_seen, phase * PROCS);
            int wins = (int)atomic_load(&c->wins[phase % 256]);
            if (phase % 2) {
                cr_assert_eq(wins, 1, "round %d: %d resets won", round, wins);
                /* the same words again, in a new instance */
                cr_assert_eq(tally_hit_at(e, 0, "hot", 3, NULL, T0, &r), 0);
                tally_snapshot now;
                cr_assert_eq(tally_read(e, 0, "hot", 3, &now), 0);
                cr_assert(now.c[0].raw[0] == c->snap.c[0].raw[0] && now.c[0].raw[1] == c->snap.c[0].raw[1]
                          && now.generation != c->snap.generation);
            } else {
                cr_assert_eq(wins, 0, "round %d: a reset from an old instance won", round);
                tally_snapshot now;
                cr_assert_eq(tally_read(e, 0, "hot", 3, &now), 0);
                cr_assert(tally_reset_if(e, 0, "hot", 3, &now, NULL) == 0, "round %d", round);
            }
        }
    }
    for (int p = 0; p < PROCS; p++)
        reap(pid[p]);
    tally_shared_detach(e);
    munmap(m, len);
    munmap(c, sizeof(ctl));
}

/* ---- An unrelated program on a shared file -------------------------------------- */

/* A shared engine of EXACT's first policy in a new file @path (a mkstemp
   template) in /dev/shm, mapped here at *@mem. */
static tally_engine *create_in_file(char *path, void **mem, size_t *len)
{
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    tally_options o = digest_opts(1024);
    cr_assert_eq(tally_shared_size(&o, EXACT, 1, 16, len), 0);
    cr_assert_eq(ftruncate(fd, (off_t)*len), 0);
    *mem = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(*mem, MAP_FAILED);
    close(fd);
    tally_engine *e;
    cr_assert_eq(tally_shared_create(*mem, *len, &o, EXACT, 1, 16, &e), 0);
    return e;
}

Test(shared_stress, an_unrelated_program_attaches_a_shared_file, .timeout = 120)
{
    char path[] = "/dev/shm/tally-shared-XXXXXX";
    size_t len;
    void *m;
    tally_engine *e = create_in_file(path, &m, &len);

    /* two programs at once, one key: the max holds across them */
    char lenarg[32];
    snprintf(lenarg, sizeof(lenarg), "%zu", len);
    pid_t pid[2];
    int out[2];
    for (int i = 0; i < 2; i++) {
        int fds[2];
        cr_assert_eq(pipe(fds), 0);
        pid[i] = fork();
        cr_assert_geq(pid[i], 0);
        if (pid[i] == 0) {
            dup2(fds[1], 1);
            close(fds[0]);
            execl(SHARED_CHILD, SHARED_CHILD, path, lenarg, "shared-key", "700", (char *)NULL);
            _exit(127);
        }
        close(fds[1]);
        out[i] = fds[0];
    }
    tally_result r;
    uint64_t admitted = 0;
    for (int i = 0; i < 700; i++) {
        cr_assert_eq(tally_hit_at(e, 0, "shared-key", 10, NULL, T0, &r), 0);
        admitted += r.allowed;
    }
    for (int i = 0; i < 2; i++) {
        char buf[64] = { 0 };
        ssize_t got = 0, n;
        while ((n = read(out[i], buf + got, sizeof(buf) - 1 - (size_t)got)) > 0)
            got += n;
        close(out[i]);
        int st;
        cr_assert_eq(waitpid(pid[i], &st, 0), pid[i]);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the program failed: status %#x", st);
        admitted += strtoull(buf, NULL, 10);
    }
    cr_assert_eq(admitted, MAX, "three processes, 2100 tries, one max");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, 0, "shared-key", 10, &s), 0);
    cr_assert_eq(s.c[0].used, MAX);
    tally_shared_detach(e);
    munmap(m, len);
    unlink(path);
}

/* A program in another PID namespace (a container sharing /dev/shm) cannot
   tell this one's processes dead or alive: it is refused the engine. */
Test(shared_stress, a_program_in_another_pid_namespace_is_refused, .timeout = 60)
{
    char path[] = "/dev/shm/tally-shared-XXXXXX";
    size_t len;
    void *m;
    tally_engine *e = create_in_file(path, &m, &len);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "unshare --pid --fork %s %s %zu k 1 2>&1", SHARED_CHILD, path, len);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    char out[512] = { 0 };
    size_t got = fread(out, 1, sizeof(out) - 1, p);
    out[got] = 0;
    int st = pclose(p);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1, "status %#x: %s", st, out);
    cr_assert_not_null(strstr(out, "another PID namespace"), "%s", out);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, 0, "k", 1, &s), TALLY_ENOENT, "it hit nothing");
    tally_shared_detach(e);
    munmap(m, len);
    unlink(path);
}

/* ---- SIGKILL in a hot loop ----------------------------------------------------- */

#define CHURN_CAP 1024
#define KILLS     24

static const tally_policy CHURN[2] = {
    { .name = "churn", .n_limits = 1,
      .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = MS } } },
    { .name = "kept", .n_limits = 1,
      .limits = { { .algo = TALLY_FIXED_WINDOW, .max = UINT64_C(1) << 40, .period_ns = 3600 * SEC } } },
};

/* New keys without end, each in a window that ends 1 ms later: the table
   turns over, and the process spends its time in reclaims. */
static void churn_process(tally_engine *e, ctl *c, int no)
{
    char key[32];
    tally_result r;
    atomic_fetch_add(&c->started, 1);
    for (uint64_t i = 0;; i++) {
        int len = snprintf(key, sizeof(key), "c%d-%" PRIu64, no, i);
        int rc = tally_hit_at(e, 0, key, (size_t)len, NULL, T0 + i * MS / 4, &r);
        if (rc != 0 && rc != TALLY_EFULL)
            atomic_fetch_add(&c->errors, 1);
    }
}

/* Hits on keys of its own, counted: they must come out exact. */
static void kept_process(tally_engine *e, ctl *c, int no)
{
    (void)no;
    char key[16];
    tally_result r;
    atomic_fetch_add(&c->started, 1);
    for (uint64_t i = 0; !atomic_load(&c->done); i++) {
        int k = (int)(i % KEYS);
        int len = snprintf(key, sizeof(key), "kept-%d", k);
        if (tally_hit_at(e, 1, key, (size_t)len, NULL, T0, &r) == 0 && r.allowed)
            atomic_fetch_add(&c->admitted[0][k], 1);
        else
            atomic_fetch_add(&c->errors, 1);
    }
    tally_shared_detach(e);
}

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}

Test(shared_stress, a_process_killed_in_a_hot_loop_stalls_no_one, .timeout = 300)
{
    void *m;
    size_t len;
    tally_engine *e = create(CHURN, 2, CHURN_CAP, &m, &len);
    ctl *c = map_anon(sizeof(ctl));
    pid_t kept = child(kept_process, e, c, 0);
    pid_t churn[2] = { child(churn_process, e, c, 0), child(churn_process, e, c, 1) };
    wait_for(&c->started, 3);
    unsigned seed = 12345;
    for (int k = 0; k < KILLS; k++) {
        int which = k % 2;
        sleep_us(2000 + (long)(rand_r(&seed) % 30000));
        cr_assert_eq(kill(churn[which], SIGKILL), 0);
        int st;
        cr_assert_eq(waitpid(churn[which], &st, 0), churn[which]);
        cr_assert(WIFSIGNALED(st), "the churn process exited by itself: %#x", st);
        churn[which] = child(churn_process, e, c, 2 + k);
    }
    for (int i = 0; i < 2; i++) {
        kill(churn[i], SIGKILL);
        waitpid(churn[i], NULL, 0);
    }
    atomic_store(&c->done, 1);
    reap(kept);
    cr_assert_eq(atomic_load(&c->errors), 0);

    /* every kept key holds exactly what its hits were told was admitted */
    for (int k = 0; k < KEYS; k++) {
        char key[16];
        int n = snprintf(key, sizeof(key), "kept-%d", k);
        tally_snapshot s;
        cr_assert_eq(tally_read(e, 1, key, (size_t)n, &s), 0);
        cr_assert_eq(s.c[0].used, atomic_load(&c->admitted[0][k]), "kept-%d", k);
    }
    /* Later, every churned key's window is over: the table takes its
       capacity of new keys again and again, so no slot a dead reclaim held
       stays lost, and no wait for a dead process's section stalls them.
       A killed process may keep one reservation out of use (killed between
       taking it and its promotion's outcome, or in an eviction before it
       gave the victim's back): the fill stops short by one a kill. */
    uint64_t later = T0 + 3600 * SEC;
    char key[32];
    tally_result r;
    for (int round = 0; round < 4; round++)
        for (int i = 0; i < CHURN_CAP - (KILLS + 2); i++) {
            int n = snprintf(key, sizeof(key), "after-%d-%d", round, i);
            int rc = tally_hit_at(e, 0, key, (size_t)n, NULL, later + (uint64_t)round * SEC, &r);
            cr_assert_eq(rc, 0, "round %d, key %d: %s", round, i, tally_strerror(rc));
        }
    tally_shared_detach(e);
    munmap(m, len);
    munmap(c, sizeof(ctl));
}
