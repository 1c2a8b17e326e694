/*
 * The engine: options, open and the last steps of close, and the policy
 * registry with its updates. The hot path that runs on it is hit.c.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>

#include "core/region.h"
#include "engine/algo-step.h"
#include "engine/section.h"

#define DEFAULT_CAPACITY    65536
#define DEFAULT_MAX_KEY_LEN 256

/* ---- Engine -------------------------------------------------------------- */

void tally__options_init(tally_options *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof(*opts));
    opts->capacity = DEFAULT_CAPACITY;
    opts->max_key_len = DEFAULT_MAX_KEY_LEN;
}

int tally__options_resolve(const tally_options *opts, tally_options *o, tally__hasher *h)
{
    if (opts)
        *o = *opts;
    else
        tally__options_init(o);
    if (o->capacity == 0 || o->capacity > TALLY_MAX_CAPACITY)
        return TALLY_EINVAL;
    if (o->max_key_len == 0 || o->max_key_len > TALLY_MAX_KEY_LEN)
        return TALLY_EINVAL;
    if (tally__hash_key_fill(o->hash_key))
        return TALLY_ENOMEM;
    /* the CPU is asked here, once: the hot path reads the engine's choice */
    if (tally__hasher_init(h, o->hash, o->hash_key))
        return TALLY_EINVAL;
    o->hash = h->kind;
    return 0;
}

void tally__mutex_init(pthread_mutex_t *m, bool shared)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    if (shared) {
        /* the processes of a region lock it, and one may die holding it */
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    }
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
}

void tally__engine_init(tally_engine *e, const tally_options *o, const tally__hasher *h,
                        tally__region *r)
{
    e->opts = *o;
    e->hasher = *h;
    e->region = r;
    tally__mutex_init(&e->add_lock, r != NULL);
    tally__mutex_init(&e->ops_lock, r != NULL);
}

int tally__open(const tally_options *opts, tally_engine **out)
{
    tally_options o;
    tally__hasher h;
    tally_engine *e;

    if (!out)
        return TALLY_EINVAL;
    int rc = tally__options_resolve(opts, &o, &h);
    if (rc)
        return rc;
    e = calloc(1, sizeof(*e));
    if (!e)
        return TALLY_ENOMEM;
    tally__engine_init(e, &o, &h, NULL);
    *out = e;
    return 0;
}

void *tally__zalloc(tally__region *r, size_t size, size_t align)
{
    if (r)
        return tally__region_alloc(r, size, align);
    void *p;
    if (posix_memalign(&p, align, size ? size : 1) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

/* Give back what tally__zalloc() took from the heap; a region keeps its own. */
static void zfree(tally__region *r, void *p)
{
    if (!r)
        free(p);
}

void tally__engine_quiesce(tally_engine *e)
{
    /* seq_cst: paired with the fetch_add of reclaimers and the load of
       closing in acquire_slot() (hit.c): a reclaim sees closing, or we wait
       for it below */
    atomic_store(&e->closing, true);
    /* every call whose read-side section began before now has left it */
    tally__sec_wait(e);
    /* and calls parked outside RCU to wait for a grace period are done;
       seq_cst: paired with the fetch_add and fetch_sub in acquire_slot() */
    while (atomic_load(&e->reclaimers) != 0)
        sched_yield();
}

void tally__engine_free(tally_engine *e)
{
    /* relaxed: close runs alone here, after tally__engine_quiesce() */
    uint32_t n = atomic_load_explicit(&e->n_policies, memory_order_relaxed);
    for (uint32_t i = 0; i < n; i++) {
        tally__policy *p = atomic_load_explicit(&e->policies[i], memory_order_relaxed);
        tally__table_destroy(&p->table);
        pthread_mutex_destroy(&p->reset_lock);
        for (tally__cfg *c = atomic_load_explicit(&p->cfg, memory_order_relaxed), *o; c; c = o) {
            o = c->older;
            free(c);
        }
        free(p);
    }
    tally__notes_drain(&e->notes);
    pthread_mutex_destroy(&e->ops_lock);
    pthread_mutex_destroy(&e->add_lock);
    free(e);
}

/* ---- Policies ------------------------------------------------------------ */

#define KNOWN_FLAGS (TALLY_SHADOW | TALLY_COUNT_REJECTED | TALLY_ALIGNED | TALLY_EVICT_LRU)

/* Validate @p's limits and flags into a new block (*@out, to be freed by the
   caller). Return 0, TALLY_EINVAL or TALLY_ENOMEM. */
static int cfg_build(const tally_policy *p, tally__region *r, tally__cfg **out)
{
    if (p->n_limits == 0 || p->n_limits > TALLY_MAX_LIMITS)
        return TALLY_EINVAL;
    if (p->flags & ~(unsigned)KNOWN_FLAGS)
        return TALLY_EINVAL;
    tally__cfg *c = tally__zalloc(r, sizeof(*c), _Alignof(tally__cfg));
    if (!c)
        return TALLY_ENOMEM;
    c->flags = p->flags;
    c->how = (p->flags & (TALLY_SHADOW | TALLY_COUNT_REJECTED)) ? TALLY__ADD_ALWAYS
                                                                : TALLY__ADD_IF_FITS;
    c->conc = -1;
    c->all_gcra = true;
    for (unsigned i = 0; i < p->n_limits; i++) {
        int rc = tally__limit_compile(&p->limits[i], &c->limits[i]);
        if (!rc && p->limits[i].algo == TALLY_CONCURRENCY) {
            /* one holder count a key: a release is then one CAS */
            rc = c->conc >= 0 ? TALLY_EINVAL : 0;
            c->conc = (int)i;
        }
        if (rc) {
            zfree(r, c);
            return rc;
        }
        c->limits[i].aligned = (p->flags & TALLY_ALIGNED) != 0;
        c->all_gcra &= p->limits[i].algo == TALLY_GCRA;
    }
    *out = c;
    return 0;
}

int tally__policy_check(const tally_policy *p)
{
    tally__cfg *cfg;
    if (!p || !p->name)
        return TALLY_EINVAL;
    size_t name_len = strnlen(p->name, TALLY_MAX_POLICY_NAME + 1);
    if (name_len == 0 || name_len > TALLY_MAX_POLICY_NAME)
        return TALLY_EINVAL;
    int rc = cfg_build(p, NULL, &cfg);
    if (!rc)
        free(cfg);
    return rc;
}

int tally_policy_add(tally_engine *e, const tally_policy *p, uint32_t *id_out)
{
    if (e && e->region)
        return TALLY_ESTATE;        /* a shared engine's policies are those it was made with */
    return tally__policy_add(e, p, id_out);
}

int tally__policy_add(tally_engine *e, const tally_policy *p, uint32_t *id_out)
{
    tally__policy *np;
    tally__cfg *cfg;
    size_t name_len;
    int rc;

    if (!e || !p || !id_out || !p->name)
        return TALLY_EINVAL;
    name_len = strnlen(p->name, TALLY_MAX_POLICY_NAME + 1);
    if (name_len == 0 || name_len > TALLY_MAX_POLICY_NAME)
        return TALLY_EINVAL;
    tally__region *r = e->region;
    if ((rc = cfg_build(p, r, &cfg)) != 0)
        return rc;

    np = tally__zalloc(r, sizeof(*np), _Alignof(tally__policy));
    if (!np) {
        zfree(r, cfg);
        return TALLY_ENOMEM;
    }
    memcpy(np->name, p->name, name_len);
    np->n_limits = p->n_limits;
    /* relaxed: published with the policy, by the release stores below */
    atomic_store_explicit(&np->cfg, cfg, memory_order_relaxed);
    atomic_store_explicit(&np->limits, cfg->limits, memory_order_relaxed);

    tally__lock(&e->add_lock);
    /* relaxed: the policies change only under add_lock; closing is only a
       diagnostic (tally_close() in tally.h) */
    uint32_t n = atomic_load_explicit(&e->n_policies, memory_order_relaxed);
    rc = atomic_load_explicit(&e->closing, memory_order_relaxed) ? TALLY_ESTATE
        : n == TALLY_MAX_POLICIES ? TALLY_ENOMEM : 0;
    for (uint32_t i = 0; i < n && !rc; i++)
        if (strcmp(atomic_load_explicit(&e->policies[i], memory_order_relaxed)->name, np->name) == 0)
            rc = TALLY_EINVAL;
    if (!rc)
        rc = tally__table_init(&np->table, e->opts.capacity, np->n_limits, cfg->limits,
                               !e->opts.digest_only, r);
    np->table.notes = &e->notes;
    np->table.policy = n;
    /* relaxed: add_lock orders the store of tally_flusher_start() before us */
    if (!rc && atomic_load_explicit(&e->syncing, memory_order_relaxed)
        && (rc = tally__table_sync_alloc(&np->table)) != 0)
        tally__table_destroy(&np->table);
    if (!rc && (cfg->flags & TALLY_EVICT_LRU) && (rc = tally__table_stamp_alloc(&np->table, r)) != 0)
        tally__table_destroy(&np->table);
    /* relaxed: published with the policy, by the release stores below */
    atomic_store_explicit(&np->table.lru, (cfg->flags & TALLY_EVICT_LRU) != 0, memory_order_relaxed);
    if (!rc) {
        tally__mutex_init(&np->reset_lock, r != NULL);
        np->reset_slot = SIZE_MAX;
        /* release: the policy before the count that makes its id valid;
           paired with the acquire loads of tally__policy_get() */
        atomic_store_explicit(&e->policies[n], np, memory_order_release);
        atomic_store_explicit(&e->n_policies, n + 1, memory_order_release);
        *id_out = n;
    }
    pthread_mutex_unlock(&e->add_lock);
    if (rc) {
        zfree(r, cfg);
        zfree(r, np);
    }
    return rc;
}

int tally_policy_update(tally_engine *e, uint32_t id, const tally_policy *p)
{
    tally__cfg *cfg;
    int rc;

    if (!e || !p || !p->name)
        return TALLY_EINVAL;
    if (e->region)
        return TALLY_ESTATE;        /* its blocks would have to come from the region */
    tally__policy *pol = tally__policy_get(e, id);
    if (!pol || p->n_limits != pol->n_limits
        || strnlen(p->name, TALLY_MAX_POLICY_NAME + 1) > TALLY_MAX_POLICY_NAME
        || strcmp(p->name, pol->name) != 0)
        return TALLY_EINVAL;
    if ((rc = cfg_build(p, NULL, &cfg)) != 0)
        return rc;

    /* add_lock: one update of the engine's policies at a time, so that each
       block's older chain is the blocks it replaced, in order */
    tally__lock(&e->add_lock);
    /* relaxed: the blocks change only under add_lock */
    tally__cfg *old = atomic_load_explicit(&pol->cfg, memory_order_relaxed);
    /* relaxed: a diagnostic, as in tally_policy_add() */
    rc = atomic_load_explicit(&e->closing, memory_order_relaxed) ? TALLY_ESTATE : 0;
    for (unsigned i = 0; i < p->n_limits && !rc; i++)
        if (!tally__limit_state_compatible(&old->limits[i], &cfg->limits[i]))
            rc = TALLY_EINVAL;
    /* the stamps exist before a block with the flag does (tally__table_touch());
       they stay when the flag is cleared, as hits of the old block may run */
    if (!rc && (cfg->flags & TALLY_EVICT_LRU))
        rc = tally__table_stamp_alloc(&pol->table, NULL);
    if (!rc) {
        cfg->older = old;
        /* One pointer names the whole block, so a call decides under the
           old block or the new one, never a mix; states are not touched, as
           both blocks read them alike (tally__limit_state_compatible()).
           release: the block's contents before the pointer; paired with the
           acquire loads of p->cfg in hit.c and of limits in the flusher,
           reclaim and scans, which read each limit from one block */
        atomic_store_explicit(&pol->cfg, cfg, memory_order_release);
        atomic_store_explicit(&pol->limits, cfg->limits, memory_order_release);
        atomic_store_explicit(&pol->table.limits, cfg->limits, memory_order_release);
        /* relaxed: read by acquire_slot() (hit.c) alone, which judges
           nothing else by it; tally__table_evict() orders its own reads */
        atomic_store_explicit(&pol->table.lru, (cfg->flags & TALLY_EVICT_LRU) != 0,
                              memory_order_relaxed);
    }
    pthread_mutex_unlock(&e->add_lock);
    if (rc)
        free(cfg);
    return rc;
}

/* For tests and benchmarks: bytes of the table behind @policy. */
size_t tally__policy_bytes(tally_engine *e, uint32_t policy)
{
    tally__policy *p = e ? tally__policy_get(e, policy) : NULL;
    return p ? tally__table_bytes(&p->table) : 0;
}
