/*
 * Epochs in shared memory (core/epoch.h has the layout and the numbered
 * guarantees): readers taken and given back, grace periods, and the
 * recovery of readers whose process died.
 */
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/epoch.h"
#include "core/proc.h"

#define RECOVERING     UINT64_MAX
#define CACHE_ENTRIES  4              /* domains one thread uses at a time */
#define SPINS_BEFORE_SLEEP 256        /* a section's usual length; then sleep between looks */
#define SLEEP_NS       20000
#define DEAD_CHECK_NS  1000000        /* how often a waiter asks whether a reader's owner died */

/* ---- this process ---------------------------------------------------------- */

static pthread_mutex_t proc_lock = PTHREAD_MUTEX_INITIALIZER;  /* forget vs thread exit */
static _Atomic uint64_t proc_gen = 1;     /* bumped at each forget */
#define FORGOTTEN_MAX 64
/* The last forgets (under proc_lock): domain and the generation it began. */
static struct forgotten {
    const tally__epoch *d;
    uint64_t            gen;
} forgotten[FORGOTTEN_MAX];
static unsigned forgotten_n;
static pthread_once_t proc_once = PTHREAD_ONCE_INIT;
static pthread_key_t thread_key;

typedef struct cache_entry {
    tally__epoch        *d;
    tally__epoch_reader *r;
    uint64_t             gen;
} cache_entry;

static __thread cache_entry cache[CACHE_ENTRIES];
static __thread unsigned next_evict;      /* the entry a full cache gives up next */

static void give_back(tally__epoch_reader *r)
{
    atomic_store_explicit(&r->epoch, 0, memory_order_relaxed);   /* owner's release orders it */
    /* release: the reader's last writes before a new owner's; paired with
       the acquire of the CAS that takes it in tally__epoch_reader_get() */
    atomic_store_explicit(&r->owner, 0, memory_order_release);
}

/* Whether @e's domain was not forgotten since @e was made (its reader is
   still this thread's, in memory still mapped). Under proc_lock. */
static bool entry_current(const cache_entry *e)
{
    uint64_t oldest = UINT64_MAX;
    for (unsigned i = 0; i < forgotten_n && i < FORGOTTEN_MAX; i++) {
        if (forgotten[i].d == e->d && forgotten[i].gen > e->gen)
            return false;
        if (forgotten[i].gen < oldest)
            oldest = forgotten[i].gen;
    }
    /* older than the forgets remembered: it cannot be told, so not */
    return forgotten_n <= FORGOTTEN_MAX || e->gen >= oldest;
}

/* At thread exit: give back the readers of domains still in use here. */
static void thread_exit(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&proc_lock);
    for (int i = 0; i < CACHE_ENTRIES; i++) {
        if (cache[i].d && entry_current(&cache[i]))
            give_back(cache[i].r);
        cache[i].d = NULL;
    }
    pthread_mutex_unlock(&proc_lock);
}

/* In the child of a fork, where the forking thread is the only one: the
   parent's readers are not ours. */
static void after_fork_child(void)
{
    memset(cache, 0, sizeof(cache));
    forgotten_n = 0;
    pthread_mutex_init(&proc_lock, NULL);
}

/* @e, of @d, made under an older generation: still good (then brought up to
   @gen), or emptied. */
static bool revalidate(cache_entry *e, uint64_t gen)
{
    pthread_mutex_lock(&proc_lock);
    bool ok = entry_current(e);
    if (ok)
        e->gen = gen;
    else
        e->d = NULL;
    pthread_mutex_unlock(&proc_lock);
    return ok;
}

static void proc_init(void)
{
    pthread_key_create(&thread_key, thread_exit);
    pthread_atfork(NULL, NULL, after_fork_child);
}

/* ---- domains ------------------------------------------------------------- */

size_t tally__epoch_size(uint32_t n_readers)
{
    return sizeof(tally__epoch) + (size_t)n_readers * sizeof(tally__epoch_reader);
}

void tally__epoch_init(tally__epoch *d, uint32_t n_readers)
{
    memset(d, 0, tally__epoch_size(n_readers));
    d->n_readers = n_readers;
    atomic_store_explicit(&d->now, 1, memory_order_relaxed);   /* published with the region */
}

/* Give back @r if its owner @owner died. Return whether it is free now. */
static bool recover(tally__epoch_reader *r, uint64_t owner)
{
    if (owner == RECOVERING || !tally__proc_dead(owner))
        return false;
    /* relaxed: the one CAS that claims the recovery (guarantee 4); the dead
       process's stores are all visible once the kernel says it died */
    if (!atomic_compare_exchange_strong_explicit(&r->owner, &owner, RECOVERING, memory_order_relaxed,
                                                 memory_order_relaxed))
        return false;
    give_back(r);
    return true;
}

tally__epoch_reader *tally__epoch_reader_get(tally__epoch *d)
{
    uint64_t gen = atomic_load_explicit(&proc_gen, memory_order_relaxed);   /* a value, no data */
    cache_entry *spare = NULL;

    for (int i = 0; i < CACHE_ENTRIES; i++) {
        if (cache[i].d == d && (cache[i].gen == gen || revalidate(&cache[i], gen)))
            return cache[i].r;
    }
    for (int i = 0; i < CACHE_ENTRIES && !spare; i++) {
        if (!cache[i].d || (cache[i].gen != gen && !revalidate(&cache[i], gen)))
            spare = &cache[i];
    }
    if (!spare) {
        /* A thread of more domains than the cache holds: it gives back the
           reader of the one it took longest ago, and takes it again when it
           comes back to that domain. Safe here: sections do not nest
           (guarantee 5), so the thread is in none of them. */
        spare = &cache[next_evict++ % CACHE_ENTRIES];
        pthread_mutex_lock(&proc_lock);
        if (entry_current(spare))
            give_back(spare->r);
        spare->d = NULL;
        pthread_mutex_unlock(&proc_lock);
    }
    pthread_once(&proc_once, proc_init);
    pthread_setspecific(thread_key, cache);   /* any non-NULL value: thread_exit() runs */
    uint64_t me = tally__proc_self();
    uint32_t tid = (uint32_t)gettid();
    tally__epoch_reader *r = NULL;

    /* ours already (a cache emptied by a forget of another domain), else a
       free one, else one whose owner died */
    for (uint32_t i = 0; i < d->n_readers && !r; i++) {
        tally__epoch_reader *c = &d->readers[i];
        if (atomic_load_explicit(&c->owner, memory_order_relaxed) == me            /* only we write ours */
            && atomic_load_explicit(&c->tid, memory_order_relaxed) == tid)
            r = c;
    }
    for (int pass = 0; pass < 2 && !r; pass++) {
        for (uint32_t i = 0; i < d->n_readers && !r; i++) {
            tally__epoch_reader *c = &d->readers[i];
            uint64_t owner = atomic_load_explicit(&c->owner, memory_order_relaxed);   /* CAS decides */
            if (owner != 0 && !(pass == 1 && recover(c, owner)))
                continue;
            owner = 0;
            /* acquire: paired with the release in give_back() by its last owner */
            if (atomic_compare_exchange_strong_explicit(&c->owner, &owner, me, memory_order_acquire,
                                                        memory_order_relaxed)) {
                atomic_store_explicit(&c->tid, tid, memory_order_relaxed);   /* read only by this process */
                r = c;
            }
        }
    }
    if (r)
        *spare = (cache_entry){ .d = d, .r = r, .gen = gen };
    return r;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void tally__epoch_wait(tally__epoch *d)
{
    /* seq_cst: the advance (a release of what the caller unlinked) and then
       the fence of guarantee 1, paired with tally__epoch_enter()'s */
    uint64_t g = atomic_fetch_add(&d->now, 1) + 1;
    atomic_thread_fence(memory_order_seq_cst);

    for (uint32_t i = 0; i < d->n_readers; i++) {
        tally__epoch_reader *r = &d->readers[i];
        unsigned spins = 0;
        uint64_t next_check = 0;
        for (;;) {
            /* acquire: paired with the release stores of enter and exit, guarantee 3 */
            uint64_t e = atomic_load_explicit(&r->epoch, memory_order_acquire);
            if (e == 0 || e >= g)
                break;
            if (spins < SPINS_BEFORE_SLEEP) {
                __builtin_ia32_pause();
                spins++;
                continue;
            }
            /* a section longer than a few microseconds: its thread was
               preempted, or its process died; look once a millisecond */
            uint64_t now = mono_ns();
            if (!next_check) {
                next_check = now + DEAD_CHECK_NS;
            } else if (now >= next_check) {
                if (recover(r, atomic_load_explicit(&r->owner, memory_order_relaxed)))   /* CAS decides */
                    break;
                next_check = now + DEAD_CHECK_NS;
            }
            struct timespec ts = { 0, SLEEP_NS };
            nanosleep(&ts, NULL);
        }
    }
}

void tally__epoch_forget(tally__epoch *d)
{
    uint64_t me = tally__proc_self();

    pthread_mutex_lock(&proc_lock);
    for (uint32_t i = 0; i < d->n_readers; i++) {
        tally__epoch_reader *r = &d->readers[i];
        if (atomic_load_explicit(&r->owner, memory_order_relaxed) == me)   /* only we write ours */
            give_back(r);
    }
    /* every thread's cache entry of @d is stale from here on; those of
       other domains are revalidated against this record */
    uint64_t gen = atomic_fetch_add_explicit(&proc_gen, 1, memory_order_relaxed) + 1;   /* under proc_lock */
    forgotten[forgotten_n % FORGOTTEN_MAX] = (struct forgotten){ .d = d, .gen = gen };
    forgotten_n++;
    pthread_mutex_unlock(&proc_lock);
}
