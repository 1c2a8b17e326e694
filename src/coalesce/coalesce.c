/*
 * Coalescing of per-key work, its limits and counters. The circuit breaker
 * it may wrap calls in is breaker.c.
 *
 * Layout: a fixed pool of `capacity` entries, one per key in use, chained in
 * buckets by a keyed 128-bit digest of the key. Bucket b belongs to lock
 * stripe b mod STRIPES; a stripe's mutex guards its buckets' chains, every
 * field of the entries linked there, the `done` flag of their running
 * results, and the stripe's counters. Unused entries sit on a lock-free
 * free list (a Treiber stack of indices with a tag against ABA), except one
 * spare per stripe, kept under the stripe's lock so that a call on a key of
 * its own does not touch the shared list head twice (the spares go back to
 * the list when a new key finds it empty).
 *
 * Ordering and progress guarantees:
 *  1. At most one execution runs per key: a leader installs its result as
 *     the entry's flight under the stripe lock, and every later caller of
 *     the key finds it there under the same lock until the leader clears it.
 *  2. A leader writes status and value before it takes the lock to mark the
 *     result done; a waiter reads done under that lock, so it sees them.
 *  3. A result is freed by the holder that drops its last reference (an
 *     acq_rel decrement): the leader holds one until it returns, so a waiter
 *     that gives up never frees it, and nobody frees it while another reads.
 *  4. An entry is unlinked only when it has no flight, no waiter (a waiter
 *     sleeps on the entry's condvar) and no unexpired attempt state. It moves
 *     between stripes only through the free list, whose push is a release CAS
 *     and pop an acquire CAS: they order the entry's fields between stripes.
 *  5. The breaker word changes only by CAS from the exact word a pure step
 *     was computed from (tally__breaker_enter_step/leave_step), so exactly
 *     one caller moves it from open to half-open and becomes the probe.
 *  6. Shutdown sets `closing`, then takes each stripe's lock: a caller that
 *     takes the lock later sees `closing` and leaves; one that took it before
 *     is counted in the stripe's `active` (leaders and waiters), which
 *     shutdown waits to reach zero. Leaders touch the coalescer's atomics
 *     only while counted, so nothing touches it once every stripe is drained.
 *  7. Waiters block (condvar); leaders run the caller's code; the breaker,
 *     the cap and the free list are lock-free CAS loops.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <stdatomic.h>

#include "coalesce/coalesce-internal.h"
#include "core/atomics.h"
#include "core/hash.h"
#include "core/clock.h"
#include "core/prom.h"
#include "core/tsan.h"

#define DEFAULT_CAPACITY 4096
#define STRIPES          64u        /* lock stripes; a power of two */
#define MIN_BUCKETS      STRIPES
#define SWEEP_BUCKETS    1024u      /* buckets one reclaim sweep examines */
#define NIL              UINT32_MAX

_Static_assert(SWEEP_BUCKETS >= STRIPES && MIN_BUCKETS >= STRIPES, "a sweep visits every stripe");

/* ---- Shared results ------------------------------------------------------ */

struct tally_coalesce_result {
    _Atomic uint32_t refs;
    bool   done;               /* under the stripe lock of the key it ran for */
    int    status;
    void  *value;
    void (*free_value)(void *value);
};

void *tally_coalesce_value(const tally_coalesce_result *r)
{
    return r ? r->value : NULL;
}

int tally_coalesce_status(const tally_coalesce_result *r)
{
    return r ? r->status : TALLY_EINVAL;
}

tally_coalesce_result *tally_coalesce_retain(tally_coalesce_result *r)
{
    /* relaxed: the caller already holds a reference, which orders the rest */
    if (r)
        atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
    return r;
}

void tally_coalesce_release(tally_coalesce_result *r)
{
    /* the decrement's ordering, told to the sanitizer (tsan-internal.h) */
    tally__tsan_release(r);
    /* acq_rel: every holder's reads happen before the last one frees;
       paired with the same decrement by each other holder */
    if (!r || atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    tally__tsan_acquire(r);
    if (r->free_value && r->value)
        r->free_value(r->value);
    free(r);
}

/* ---- The coalescer -------------------------------------------------------- */

typedef struct entry {
    uint64_t d_lo, d_hi;             /* the key's digest */
    tally_coalesce_result *flight;   /* the running execution, or NULL */
    uint32_t next;                   /* bucket chain */
    uint32_t waiters;                /* callers sleeping on cond */
    uint32_t attempts;               /* executions in the current attempt window */
    uint64_t window_start;
    uint64_t cooldown_until;         /* 0: not cooling down */
    _Atomic uint32_t free_next;      /* free list link, only while free */
    pthread_cond_t cond;             /* waiters of this key, with the stripe lock */
} entry;

typedef struct stripe {
    _Alignas(64) pthread_mutex_t lock;
    pthread_cond_t drained;          /* shutdown waits here for active == 0 */
    uint32_t spare;                  /* a free entry kept for this stripe, or NIL */
    uint32_t active;                 /* leaders running and waiters waiting */
    uint32_t leaders;                /* leaders running */
    uint32_t keys;                   /* entries linked */
    uint64_t calls, coalesced, executions, failures, timeouts;
    uint64_t rej_busy, rej_cooldown, rej_open, rej_full;
} stripe;

struct tally_coalesce {
    /* read by every call, written only by open and shutdown */
    _Alignas(64) tally_coalesce_options opts;  /* name points to label */
    size_t         bucket_mask;
    uint32_t      *buckets;          /* chain heads, under their stripe's lock */
    entry         *entries;
    stripe        *stripes;
    _Atomic bool   closing;
    bool           has_breaker;
    char           label[2 * TALLY_COALESCE_MAX_NAME + 1]; /* name, escaped for a label */
    /* written by calls: one cache line each, away from the read-mostly fields */
    _Alignas(64) _Atomic uint64_t free_head; /* tag << 32 | index of the first free entry */
    _Alignas(64) _Atomic uint32_t running;   /* executions running, kept only with a cap */
    _Atomic size_t sweep;                    /* cursor of the reclaim sweep */
    _Alignas(64) tally_breaker breaker;
};

void tally_coalesce_options_init(tally_coalesce_options *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->capacity = DEFAULT_CAPACITY;
}

static int check_options(const tally_coalesce_options *o)
{
    if (o->capacity == 0 || o->capacity > TALLY_COALESCE_MAX_CAPACITY)
        return TALLY_EINVAL;
    if (o->max_attempts && o->attempt_window_ns == 0)
        return TALLY_EINVAL;
    if (o->attempt_window_ns > TALLY_MAX_PERIOD_NS || o->cooldown_ns > TALLY_MAX_PERIOD_NS)
        return TALLY_EINVAL;
    if (o->breaker_failures) {
        tally_breaker_options bo = { o->breaker_failures, o->breaker_open_ns };
        if (tally__breaker_check(&bo))
            return TALLY_EINVAL;
    }
    if (o->name && strnlen(o->name, TALLY_COALESCE_MAX_NAME + 1) > TALLY_COALESCE_MAX_NAME)
        return TALLY_EINVAL;
    return 0;
}

static void free_coalescer(tally_coalesce *c, size_t n_entries, unsigned n_stripes)
{
    for (size_t i = 0; i < n_entries; i++)
        pthread_cond_destroy(&c->entries[i].cond);
    for (unsigned i = 0; i < n_stripes; i++) {
        pthread_cond_destroy(&c->stripes[i].drained);
        pthread_mutex_destroy(&c->stripes[i].lock);
    }
    free(c->entries);
    free(c->stripes);
    free(c->buckets);
    free(c);
}

static tally_coalesce *alloc_coalescer(void)
{
    size_t size = (sizeof(tally_coalesce) + 63) & ~(size_t)63;
    tally_coalesce *c = aligned_alloc(_Alignof(tally_coalesce), size);
    if (c)
        memset(c, 0, size);
    return c;
}

int tally_coalesce_open(const tally_coalesce_options *opts, tally_coalesce **out)
{
    tally_coalesce_options o;
    tally_coalesce *c;
    size_t n_buckets = MIN_BUCKETS;
    size_t i;
    unsigned s;

    if (!out)
        return TALLY_EINVAL;
    if (opts)
        o = *opts;
    else
        tally_coalesce_options_init(&o);
    if (check_options(&o))
        return TALLY_EINVAL;
    if (tally__hash_key_fill(o.hash_key))
        return TALLY_ENOMEM;
    while (n_buckets < o.capacity)
        n_buckets <<= 1;

    c = alloc_coalescer();
    if (!c)
        return TALLY_ENOMEM;
    c->buckets = malloc(n_buckets * sizeof(*c->buckets));
    c->entries = calloc(o.capacity, sizeof(*c->entries));
    c->stripes = aligned_alloc(_Alignof(stripe), STRIPES * sizeof(stripe));
    if (!c->buckets || !c->entries || !c->stripes) {
        free_coalescer(c, 0, 0);
        return TALLY_ENOMEM;
    }
    memset(c->stripes, 0, STRIPES * sizeof(stripe));
    for (s = 0; s < STRIPES; s++) {
        c->stripes[s].spare = NIL;
        if (pthread_mutex_init(&c->stripes[s].lock, NULL))
            break;
        if (tally__cond_init_mono(&c->stripes[s].drained)) {
            pthread_mutex_destroy(&c->stripes[s].lock);
            break;
        }
    }
    for (i = 0; s == STRIPES && i < o.capacity; i++)
        if (tally__cond_init_mono(&c->entries[i].cond))
            break;
    if (s < STRIPES || i < o.capacity) {
        free_coalescer(c, i, s);
        return TALLY_ENOMEM;
    }
    for (i = 0; i < n_buckets; i++)
        c->buckets[i] = NIL;
    /* the free list holds every entry, in index order */
    for (i = 0; i < o.capacity; i++)
        atomic_init(&c->entries[i].free_next, i + 1 < o.capacity ? (uint32_t)(i + 1) : NIL);
    atomic_init(&c->free_head, 0);
    c->bucket_mask = n_buckets - 1;
    tally__prom_escape(c->label, sizeof(c->label), o.name);
    o.name = c->label;
    c->opts = o;
    if (o.breaker_failures) {
        tally_breaker_options bo = { o.breaker_failures, o.breaker_open_ns };
        tally__breaker_init(&c->breaker, &bo);
        c->has_breaker = true;
    }
    *out = c;
    return 0;
}

/* ---- Free list ------------------------------------------------------------ */

static uint32_t pool_pop(tally_coalesce *c)
{
    /* acquire: the entry's fields, written before its push, are ours now;
       paired with the release CAS of pool_push() */
    uint64_t h = atomic_load_explicit(&c->free_head, memory_order_acquire);
    for (;;) {
        uint32_t i = (uint32_t)h;
        if (i == NIL)
            return NIL;
        uint32_t next = atomic_load_explicit(&c->entries[i].free_next, memory_order_relaxed);
        uint64_t nh = ((h >> 32) + 1) << 32 | next;
        /* acquire, also on failure: paired with the release CAS of pool_push() */
        if (atomic_compare_exchange_weak_explicit(&c->free_head, &h, nh, memory_order_acquire,
                                                  memory_order_acquire))
            return i;
    }
}

static void pool_push(tally_coalesce *c, uint32_t i)
{
    uint64_t h = atomic_load_explicit(&c->free_head, memory_order_relaxed);
    uint64_t nh;
    do {
        atomic_store_explicit(&c->entries[i].free_next, (uint32_t)h, memory_order_relaxed);
        nh = ((h >> 32) + 1) << 32 | i;
        /* release: publish the entry's fields to its next owner; paired
           with the acquires of pool_pop() */
    } while (!atomic_compare_exchange_weak_explicit(&c->free_head, &h, nh, memory_order_release,
                                                    memory_order_relaxed));
}

/* ---- Entries (under their stripe's lock) ---------------------------------- */

static stripe *stripe_of(tally_coalesce *c, size_t bucket)
{
    return &c->stripes[bucket & (STRIPES - 1)];
}

static uint32_t entry_take(tally_coalesce *c, stripe *s)
{
    uint32_t i = s->spare;
    if (i == NIL)
        return pool_pop(c);
    s->spare = NIL;
    return i;
}

static void entry_give(tally_coalesce *c, stripe *s, uint32_t i)
{
    if (s->spare == NIL)
        s->spare = i;
    else
        pool_push(c, i);
}

/* True when @e holds nothing that must outlive this moment. */
static bool entry_idle(const tally_coalesce *c, const entry *e, uint64_t now)
{
    if (e->flight || e->waiters)
        return false;
    if (e->cooldown_until && now < e->cooldown_until)
        return false;
    return e->attempts == 0 ||
           (now >= e->window_start && now - e->window_start >= c->opts.attempt_window_ns);
}

/* Unlink every idle entry of @bucket; return the entry of digest @d, or NULL. */
static entry *bucket_scan(tally_coalesce *c, size_t bucket, const tally__digest *d, uint64_t now)
{
    stripe *s = stripe_of(c, bucket);
    uint32_t *link = &c->buckets[bucket];
    entry *found = NULL;

    while (*link != NIL) {
        uint32_t i = *link;
        entry *e = &c->entries[i];
        if (d && e->d_lo == d->lo && e->d_hi == d->hi) {
            found = e;
        } else if (entry_idle(c, e, now)) {
            *link = e->next;
            s->keys--;
            entry_give(c, s, i);
            continue;
        }
        link = &e->next;
    }
    return found;
}

/* Unlink @e if it is idle. */
static void entry_recycle(tally_coalesce *c, entry *e, uint64_t now)
{
    if (!entry_idle(c, e, now))
        return;
    size_t bucket = e->d_lo & c->bucket_mask;
    uint32_t i = (uint32_t)(e - c->entries);
    for (uint32_t *link = &c->buckets[bucket]; *link != NIL; link = &c->entries[*link].next) {
        if (*link == i) {
            stripe *s = stripe_of(c, bucket);
            *link = e->next;
            s->keys--;
            entry_give(c, s, i);
            return;
        }
    }
}

static entry *entry_link(tally_coalesce *c, size_t bucket, const tally__digest *d)
{
    stripe *s = stripe_of(c, bucket);
    uint32_t i = entry_take(c, s);
    if (i == NIL)
        return NULL;
    entry *e = &c->entries[i];
    e->d_lo = d->lo;
    e->d_hi = d->hi;
    e->flight = NULL;
    e->waiters = 0;
    e->attempts = 0;
    e->window_start = 0;
    e->cooldown_until = 0;
    e->next = c->buckets[bucket];
    c->buckets[bucket] = i;
    s->keys++;
    return e;
}

/* Reclaim idle entries from SWEEP_BUCKETS buckets after a rotating cursor,
   and the spares of their stripes (every stripe: SWEEP_BUCKETS >= STRIPES).
   Called with no lock held; takes one stripe lock at a time. */
static void sweep(tally_coalesce *c, uint64_t now)
{
    size_t n = c->bucket_mask + 1 < SWEEP_BUCKETS ? c->bucket_mask + 1 : SWEEP_BUCKETS;
    size_t start = atomic_fetch_add_explicit(&c->sweep, n, memory_order_relaxed);
    for (size_t k = 0; k < n; k++) {
        size_t b = (start + k) & c->bucket_mask;
        stripe *s = stripe_of(c, b);
        pthread_mutex_lock(&s->lock);
        bucket_scan(c, b, NULL, now);
        if (s->spare != NIL) {
            pool_push(c, s->spare);
            s->spare = NIL;
        }
        pthread_mutex_unlock(&s->lock);
    }
}

/* ---- Limits (under the key's stripe lock) --------------------------------- */

static int attempts_check(tally_coalesce *c, entry *e, uint64_t now)
{
    const tally_coalesce_options *o = &c->opts;
    if (!o->max_attempts)
        return 0;
    if (e->cooldown_until) {
        if (now < e->cooldown_until)
            return TALLY_ECOOLDOWN;
        e->cooldown_until = 0;
        e->attempts = 0;
    }
    if (e->attempts && now >= e->window_start && now - e->window_start >= o->attempt_window_ns)
        e->attempts = 0;
    if (e->attempts >= o->max_attempts) {
        uint64_t end = e->window_start + o->attempt_window_ns;
        uint64_t until = now + o->cooldown_ns;
        e->cooldown_until = until > end ? until : end;
        return TALLY_ECOOLDOWN;
    }
    return 0;
}

static int cap_take(tally_coalesce *c)
{
    uint32_t max = c->opts.max_running;
    if (!max)
        return 0;
    uint32_t n = atomic_load_explicit(&c->running, memory_order_relaxed);
    do {
        if (n >= max)
            return TALLY_EBUSY;
        /* relaxed: the count orders nothing but itself */
    } while (!atomic_compare_exchange_weak_explicit(&c->running, &n, n + 1, memory_order_relaxed,
                                                    memory_order_relaxed));
    return 0;
}

static void cap_give(tally_coalesce *c)
{
    if (c->opts.max_running)
        atomic_fetch_sub_explicit(&c->running, 1, memory_order_relaxed);
}

/* ---- The call ------------------------------------------------------------- */

static void stripe_leave(tally_coalesce *c, stripe *s)
{
    /* relaxed: under the stripe lock, which shutdown takes after setting it */
    if (--s->active == 0 && atomic_load_explicit(&c->closing, memory_order_relaxed))
        pthread_cond_broadcast(&s->drained);
}

/* Join the running execution of @e; called and returns with @s locked. */
static int join(tally_coalesce *c, stripe *s, entry *e, uint64_t now, uint64_t timeout_ns,
                tally_coalesce_result **out)
{
    tally_coalesce_result *r = tally_coalesce_retain(e->flight);
    struct timespec dl = { 0, 0 };
    int rc;

    e->waiters++;
    s->active++;
    s->coalesced++;
    if (timeout_ns != 0 && timeout_ns != TALLY_COALESCE_FOREVER)
        dl = tally__deadline(timeout_ns);
    /* relaxed loads of closing: under the stripe lock (guarantee 6) */
    while (!r->done && !atomic_load_explicit(&c->closing, memory_order_relaxed)) {
        if (timeout_ns == 0)
            break;
        if (timeout_ns == TALLY_COALESCE_FOREVER)
            pthread_cond_wait(&e->cond, &s->lock);
        else if (pthread_cond_timedwait(&e->cond, &s->lock, &dl) == ETIMEDOUT)
            break;
    }
    if (r->done) {
        *out = r;
        rc = 0;
    } else {
        /* not the last reference: the leader holds one until it is done */
        tally_coalesce_release(r);
        if (atomic_load_explicit(&c->closing, memory_order_relaxed)) {
            rc = TALLY_ESTATE;
        } else {
            s->timeouts++;
            rc = TALLY_ETIMEDOUT;
        }
    }
    e->waiters--;
    entry_recycle(c, e, now);
    stripe_leave(c, s);
    return rc;
}

/* Refuse or admit a leader; called with @s locked. On 0, *@rp is the new result. */
static int admit(tally_coalesce *c, stripe *s, entry *e, uint64_t now,
                 tally_breaker_ticket *ticket, tally_coalesce_result **rp)
{
    int rc = attempts_check(c, e, now);
    if (rc) {
        s->rej_cooldown++;
        return rc;
    }
    tally_coalesce_result *r = malloc(sizeof(*r));
    if (!r)
        return TALLY_ENOMEM;
    rc = cap_take(c);
    if (rc) {
        s->rej_busy++;
        free(r);
        return rc;
    }
    if (c->has_breaker && (rc = tally__breaker_enter(&c->breaker, now, ticket)) != 0) {
        s->rej_open++;
        cap_give(c);
        free(r);
        return rc;
    }
    atomic_init(&r->refs, 1);
    r->done = false;
    r->status = 0;
    r->value = NULL;
    r->free_value = NULL;
    *rp = r;
    return 0;
}

static int coalesce_do(tally_coalesce *c, const void *key, size_t key_len,
                       const tally_coalesce_op *op, uint64_t now, bool real_time,
                       uint64_t timeout_ns, tally_coalesce_result **out)
{
    tally__digest d;
    tally_breaker_ticket ticket = 0;
    tally_coalesce_result *r;
    entry *e;
    int rc;

    if (!c || !key || !op || !op->run || !out || key_len == 0 || key_len > TALLY_MAX_KEY_LEN ||
        now > TALLY__TIME_MAX)
        return TALLY_EINVAL;
    d = tally__siphash128(c->opts.hash_key, key, key_len);
    size_t bucket = d.lo & c->bucket_mask;
    stripe *s = stripe_of(c, bucket);

    pthread_mutex_lock(&s->lock);
    /* relaxed: shutdown sets it before it takes this lock (guarantee 6) */
    if (atomic_load_explicit(&c->closing, memory_order_relaxed)) {
        pthread_mutex_unlock(&s->lock);
        return TALLY_ESTATE;
    }
    s->calls++;
    e = bucket_scan(c, bucket, &d, now);
    if (!e && !(e = entry_link(c, bucket, &d))) {
        /* idle entries and spares wait in other stripes: reclaim and look again */
        pthread_mutex_unlock(&s->lock);
        sweep(c, now);
        pthread_mutex_lock(&s->lock);
        if (atomic_load_explicit(&c->closing, memory_order_relaxed)) {
            s->calls--;            /* as if shutdown had come first */
            pthread_mutex_unlock(&s->lock);
            return TALLY_ESTATE;
        }
        e = bucket_scan(c, bucket, &d, now);
        if (!e)
            e = entry_link(c, bucket, &d);
    }
    if (!e) {
        s->rej_full++;
        pthread_mutex_unlock(&s->lock);
        return TALLY_EFULL;
    }
    if (e->flight) {
        rc = join(c, s, e, now, timeout_ns, out);
        pthread_mutex_unlock(&s->lock);
        return rc;
    }
    rc = admit(c, s, e, now, &ticket, &r);
    if (rc) {
        entry_recycle(c, e, now);
        pthread_mutex_unlock(&s->lock);
        return rc;
    }
    if (c->opts.max_attempts && e->attempts++ == 0)
        e->window_start = now;
    e->flight = r;
    s->executions++;
    s->leaders++;
    s->active++;
    pthread_mutex_unlock(&s->lock);

    void *value = NULL;
    int status = op->run(op->arg, &value);
    r->status = status;
    r->value = value;
    r->free_value = op->free_value;

    /* report while still counted in `active`: shutdown waits for it (guarantee 6) */
    if (c->has_breaker)
        tally__breaker_leave(&c->breaker, ticket, status == 0, real_time ? tally_now_ns() : now);
    cap_give(c);

    pthread_mutex_lock(&s->lock);
    r->done = true;
    e->flight = NULL;
    if (status)
        s->failures++;
    s->leaders--;
    if (e->waiters)
        pthread_cond_broadcast(&e->cond);
    entry_recycle(c, e, now);
    stripe_leave(c, s);
    pthread_mutex_unlock(&s->lock);
    *out = r;
    return 0;
}

int tally_coalesce_do_at(tally_coalesce *c, const void *key, size_t key_len,
                         const tally_coalesce_op *op, uint64_t now_ns, uint64_t timeout_ns,
                         tally_coalesce_result **out)
{
    return coalesce_do(c, key, key_len, op, now_ns, false, timeout_ns, out);
}

int tally_coalesce_do(tally_coalesce *c, const void *key, size_t key_len,
                      const tally_coalesce_op *op, uint64_t timeout_ns,
                      tally_coalesce_result **out)
{
    /* read the clock only when a limit needs it: it costs as much as a quick call */
    uint64_t now = c && (c->opts.max_attempts || c->has_breaker) ? tally_now_ns() : 0;
    return coalesce_do(c, key, key_len, op, now, true, timeout_ns, out);
}

/* ---- Counters ------------------------------------------------------------- */

int tally_coalesce_read_stats(tally_coalesce *c, tally_coalesce_stats *out)
{
    if (!c || !out)
        return TALLY_EINVAL;
    memset(out, 0, sizeof(*out));
    for (unsigned i = 0; i < STRIPES; i++) {
        stripe *s = &c->stripes[i];
        pthread_mutex_lock(&s->lock);
        out->calls += s->calls;
        out->coalesced += s->coalesced;
        out->executions += s->executions;
        out->failures += s->failures;
        out->timeouts += s->timeouts;
        out->rejected_busy += s->rej_busy;
        out->rejected_cooldown += s->rej_cooldown;
        out->rejected_open += s->rej_open;
        out->rejected_full += s->rej_full;
        out->running += s->leaders;
        out->keys += s->keys;
        pthread_mutex_unlock(&s->lock);
    }
    out->has_breaker = c->has_breaker;
    if (c->has_breaker)
        tally_breaker_read(&c->breaker, &out->breaker);
    return 0;
}

static void put_metric(tally__prom *t, const char *label, const char *name, const char *type,
                       const char *help, uint64_t v)
{
    tally__prom_put(t, "# HELP tally_coalesce_%s %s\n# TYPE tally_coalesce_%s %s\n", name, help,
                    name, type);
    tally__prom_put(t, "tally_coalesce_%s{name=\"%s\"} %llu\n", name, label, (unsigned long long)v);
}

size_t tally_coalesce_prometheus(tally_coalesce *c, char *buf, size_t size)
{
    tally_coalesce_stats st;
    tally__prom t = { .buf = buf, .len = size };
    const char *l;

    if (tally_coalesce_read_stats(c, &st))
        return 0;
    l = c->label;
    put_metric(&t, l, "calls_total", "counter", "Calls past argument checks and shutdown.", st.calls);
    put_metric(&t, l, "coalesced_total", "counter", "Calls that joined a running execution.",
               st.coalesced);
    put_metric(&t, l, "executions_total", "counter", "Operations started.", st.executions);
    put_metric(&t, l, "failures_total", "counter", "Operations that returned a failure.",
               st.failures);
    put_metric(&t, l, "timeouts_total", "counter", "Calls that gave up waiting for an execution.",
               st.timeouts);
    tally__prom_put(&t, "# HELP tally_coalesce_rejected_total Calls refused at once, by reason.\n"
                        "# TYPE tally_coalesce_rejected_total counter\n");
    tally__prom_put(&t, "tally_coalesce_rejected_total{name=\"%s\",reason=\"busy\"} %llu\n", l,
                    (unsigned long long)st.rejected_busy);
    tally__prom_put(&t, "tally_coalesce_rejected_total{name=\"%s\",reason=\"cooldown\"} %llu\n", l,
                    (unsigned long long)st.rejected_cooldown);
    tally__prom_put(&t, "tally_coalesce_rejected_total{name=\"%s\",reason=\"open\"} %llu\n", l,
                    (unsigned long long)st.rejected_open);
    tally__prom_put(&t, "tally_coalesce_rejected_total{name=\"%s\",reason=\"full\"} %llu\n", l,
                    (unsigned long long)st.rejected_full);
    put_metric(&t, l, "running", "gauge", "Operations running now.", st.running);
    put_metric(&t, l, "keys", "gauge", "Keys running or holding attempt state.", st.keys);
    if (st.has_breaker) {
        put_metric(&t, l, "breaker_state", "gauge",
                   "Circuit breaker state: 0 closed, 1 open, 2 half-open.", st.breaker.state);
        put_metric(&t, l, "breaker_failures", "gauge",
                   "Consecutive failures counted by the circuit breaker.", st.breaker.failures);
        tally__prom_put(&t, "# HELP tally_coalesce_breaker_opened_at_seconds When the circuit "
                            "breaker last opened (0: never).\n"
                            "# TYPE tally_coalesce_breaker_opened_at_seconds gauge\n");
        tally__prom_put(&t, "tally_coalesce_breaker_opened_at_seconds{name=\"%s\"} %llu.%03llu\n",
                        l, (unsigned long long)(st.breaker.opened_at_ns / 1000000000u),
                        (unsigned long long)(st.breaker.opened_at_ns / TALLY__NS_PER_MS % 1000u));
    }
    return tally__prom_end(&t);
}

/* ---- Shutdown ------------------------------------------------------------- */

int tally_coalesce_shutdown(tally_coalesce *c, uint64_t timeout_ns)
{
    struct timespec dl = { 0, 0 };
    bool expired = timeout_ns == 0;
    int rc = 0;

    if (!c)
        return TALLY_EINVAL;
    if (timeout_ns != 0 && timeout_ns != TALLY_COALESCE_FOREVER)
        dl = tally__deadline(timeout_ns);
    /* relaxed: releasing each stripe lock below publishes it to later lockers */
    atomic_store_explicit(&c->closing, true, memory_order_relaxed);
    for (unsigned i = 0; i < STRIPES; i++) {
        stripe *s = &c->stripes[i];
        pthread_mutex_lock(&s->lock);
        /* wake this stripe's waiters: they see `closing` and leave */
        for (size_t b = i; s->active && b <= c->bucket_mask; b += STRIPES)
            for (uint32_t k = c->buckets[b]; k != NIL; k = c->entries[k].next)
                if (c->entries[k].waiters)
                    pthread_cond_broadcast(&c->entries[k].cond);
        while (s->active && !expired) {
            if (timeout_ns == TALLY_COALESCE_FOREVER)
                pthread_cond_wait(&s->drained, &s->lock);
            else if (pthread_cond_timedwait(&s->drained, &s->lock, &dl) == ETIMEDOUT)
                expired = true;
        }
        if (s->active)
            rc = TALLY_ETIMEDOUT;
        pthread_mutex_unlock(&s->lock);
    }
    return rc;
}

void tally_coalesce_close(tally_coalesce *c)
{
    if (!c)
        return;
    tally_coalesce_shutdown(c, TALLY_COALESCE_FOREVER);
    free_coalescer(c, c->opts.capacity, STRIPES);
}
