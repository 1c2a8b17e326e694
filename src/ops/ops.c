/*
 * Operator views: the rejection watch and its set-once flag, throttle
 * episodes, the table scan, and per-interval usage histograms.
 *
 * The hot path's half of the rejection watch (counting denials, setting the
 * flag) is engine/watch.c.
 *
 * Ordering and progress guarantees:
 *  1. Only tally_watch_clear sets a flag back to 0; a flagged slot is never
 *     reclaimed (engine/table.c), so the flag stays until cleared.
 *  2. The scan reads slots in chunks inside RCU read-side sections, copies
 *     what it reports, and calls back outside them.
 *  3. Episodes and the last usage reports belong to the flusher thread; the
 *     readers take the engine's ops_lock to copy them.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "engine/algo-step.h"
#include "core/prom.h"
#include "core/rcu.h"
#include "engine/section.h"

#define DEFAULT_EPISODES 200
#define SCAN_CHUNK       1024

/* ---- The rejection watch -------------------------------------------------- */

typedef struct episode {
    struct episode *prev, *next;      /* LRU, most recently throttled first */
    struct episode *chain;            /* hash chain */
    tally__digest   digest;
    uint64_t        denied, first_ns, last_ns;
    size_t          key_len;
    unsigned char   key[];
} episode;

struct tally__episodes {
    episode **buckets;
    size_t    n_buckets, count;
    episode  *head, *tail;
};

int tally_watch_set(tally_engine *e, uint32_t policy, const tally_watch *w)
{
    if (!e || !w || w->threshold == 0 || w->window_ns == 0)
        return TALLY_EINVAL;
    if (e->region)
        return TALLY_ESTATE;        /* a watch's arrays and episodes are one process's */
    if (w->window_ns > TALLY_MAX_PERIOD_NS || w->threshold > TALLY_SLIDING_MAX_COUNT)
        return TALLY_EINVAL;
    tally__policy *p = tally__policy_get(e, policy);
    if (!p)
        return TALLY_EINVAL;
    tally_limit rule = { .algo = TALLY_SLIDING_WINDOW, .max = w->threshold, .period_ns = w->window_ns };
    tally__limit compiled;
    if (tally__limit_compile(&rule, &compiled))
        return TALLY_EINVAL;
    tally__table *t = &p->table;
    size_t cap = w->episodes ? w->episodes : DEFAULT_EPISODES;
    struct tally__episodes *eps = calloc(1, sizeof(*eps));
    tally__watch_slot *slots = NULL;
    size_t n_buckets = 1;
    while (n_buckets < cap * 2)
        n_buckets <<= 1;
    if (eps)
        eps->buckets = calloc(n_buckets, sizeof(*eps->buckets));
    if (!eps || !eps->buckets
        || posix_memalign((void **)&slots, 64, t->n_slots * sizeof(*slots)) != 0) {
        if (eps)
            free(eps->buckets);
        free(eps);
        return TALLY_ENOMEM;
    }
    memset(slots, 0, t->n_slots * sizeof(*slots));
    eps->n_buckets = n_buckets;

    tally__lock(&e->add_lock);
    /* relaxed: the watch is set only under add_lock; closing is only a
       diagnostic (tally_close() in tally.h) */
    int rc = atomic_load_explicit(&e->closing, memory_order_relaxed)
        || atomic_load_explicit(&t->watch, memory_order_relaxed) ? TALLY_ESTATE : 0;
    if (!rc) {
        p->watch_rule = compiled;
        p->episodes_cap = cap;
        tally__lock(&e->ops_lock);
        p->episodes = eps;
        pthread_mutex_unlock(&e->ops_lock);
        /* release: the rule before the array that makes hits use it; paired
           with the acquire loads of t->watch, in tally__watch_feed()
           (engine/watch.c) first */
        atomic_store_explicit(&t->watch, slots, memory_order_release);
    }
    pthread_mutex_unlock(&e->add_lock);
    if (rc) {
        free(eps->buckets);
        free(eps);
        free(slots);
    }
    return rc;
}

/* The watch slot of key @d, or NULL when the key is not in the table. */
static tally__watch_slot *watch_slot_of(tally__policy *p, tally__digest d)
{
    tally__table *t = &p->table;
    tally__slot *s = tally__table_find(t, d);
    /* acquire: paired with the release store of tally_watch_set() */
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    return s && w ? &w[tally__slot_index(t, s)] : NULL;
}

typedef struct clear_arg {
    tally_engine *e;
    tally__policy *p;
    tally__digest d;
    int rc;
} clear_arg;

static void clear_in_rcu(void *arg)
{
    clear_arg *a = arg;
    tally__watch_slot *ws = watch_slot_of(a->p, a->d);
    a->rc = TALLY_ENOENT;
    if (!ws)
        return;
    /* acquire: paired with the flag CAS of tally__watch_feed() (engine/watch.c) */
    uint64_t at = atomic_load_explicit(&ws->flag_at, memory_order_acquire);
    /* acq_rel: paired with the flag CASes of tally__watch_feed() and import_in_rcu() */
    if (at && atomic_compare_exchange_strong_explicit(&ws->flag_at, &at, 0, memory_order_acq_rel,
                                                      memory_order_relaxed)) {
        /* the window of denials starts over with the flag */
        tally__word_store_relaxed(&ws->denied.w0, 0);
        tally__word_store_relaxed(&ws->denied.w1, 0);
        a->rc = 0;
    }
}

/* The policy behind @id if it has a watch: 0, TALLY_ESTATE or TALLY_EINVAL. */
static int watched_policy(tally_engine *e, uint32_t id, tally__policy **out)
{
    /* relaxed: only a diagnostic (tally_close() in tally.h) */
    if (atomic_load_explicit(&e->closing, memory_order_relaxed))
        return TALLY_ESTATE;
    *out = tally__policy_get(e, id);
    /* acquire: paired with the release store of tally_watch_set() */
    if (!*out || !atomic_load_explicit(&(*out)->table.watch, memory_order_acquire))
        return TALLY_EINVAL;
    return 0;
}

int tally_watch_clear(tally_engine *e, uint32_t policy, const void *key, size_t key_len)
{
    if (!e || !key || key_len == 0 || key_len > e->opts.max_key_len)
        return TALLY_EINVAL;
    tally__policy *p;
    int rc = watched_policy(e, policy, &p);
    if (rc)
        return rc;
    clear_arg a = { e, p, tally__key_digest(e, key, key_len), 0 };
    tally__rcu_read(clear_in_rcu, &a);
    /* with Redis, the flusher deletes the shared flag too (whether or not this
       engine held the key: a restarted process may not have it yet) */
    tally__note *n = tally__note_new(TALLY__NOTE_UNFLAG, policy, 0, a.d, NULL, 0);
    if (n)
        tally__note_push(&e->notes, n);
    return a.rc;
}

typedef struct import_arg {
    tally__policy *p;
    tally__digest d;
    uint64_t at, amount;
} import_arg;

static void import_in_rcu(void *arg)
{
    import_arg *a = arg;
    tally__watch_slot *ws = watch_slot_of(a->p, a->d);
    if (!ws)
        return;
    uint64_t expect = 0;
    /* acq_rel: paired with the CAS of clear_in_rcu() and the acquire loads of
       flag_at in scan_in_rcu() and kill_expired() (engine/table.c) */
    if (atomic_compare_exchange_strong_explicit(&ws->flag_at, &expect, a->at, memory_order_acq_rel,
                                                memory_order_relaxed))
        atomic_store_explicit(&ws->flag_amount, a->amount, memory_order_relaxed);
}

void tally__watch_import(tally_engine *e, uint32_t policy, tally__digest d, uint64_t at,
                         uint64_t amount)
{
    tally__policy *p = tally__policy_get(e, policy);
    if (!p)
        return;
    import_arg a = { p, d, at ? at : 1, amount };
    tally__rcu_read(import_in_rcu, &a);
}

/* ---- The scan ------------------------------------------------------------- */

typedef struct scan_item {
    tally_scan_entry entry;       /* first: callbacks get &entry and may look past it */
    size_t key_off;
    uint64_t flag_amount;
} scan_item;

typedef struct scan_chunk {
    tally__policy *p;
    tally_engine  *e;
    const tally_scan_filter *f;
    size_t from, to;
    scan_item *items;
    size_t n;
    unsigned char *keys;
    size_t keys_len, keys_cap;
    int rc;
} scan_chunk;

static void scan_in_rcu(void *arg)
{
    scan_chunk *c = arg;
    tally__table *t = &c->p->table;
    /* acquire: paired with the release stores of tally__table_sync_alloc()
       (engine/table.c) and tally_watch_set() */
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    uint64_t now = tally_now_ns();

    for (size_t i = c->from; i < c->to; i++) {
        tally__digest d;
        tally__slot *s = tally__table_live(t, i, &d);
        if (!s)
            continue;
        scan_item *it = &c->items[c->n];
        memset(it, 0, sizeof(*it));
        it->entry.n_limits = t->n_limits;
        bool dead = false, big = c->f->min_used == 0;
        /* acquire: paired with the release store of tally_policy_update()
           (engine/engine.c): every limit read from one version of the policy */
        const tally__limit *lim = atomic_load_explicit(&t->limits, memory_order_acquire);
        for (unsigned l = 0; l < t->n_limits; l++) {
            tally__state st = tally__state_load_atomic(&s->st[l]);
            dead |= tally__state_is_dead(st);
            tally__algo_counter(&lim[l], st, now, &it->entry.c[l]);
            big |= it->entry.c[l].used >= c->f->min_used;
            if (y)
                it->entry.pending[l] = tally__word_load_relaxed(&y[i * t->n_limits + l].delta);
        }
        if (w) {
            /* acquire: paired with the flag CASes of tally__watch_feed()
               (engine/watch.c) and import_in_rcu() */
            it->entry.flagged_at_ns = atomic_load_explicit(&w[i].flag_at, memory_order_acquire);
            it->entry.flagged = it->entry.flagged_at_ns != 0;
            it->flag_amount = atomic_load_explicit(&w[i].flag_amount, memory_order_relaxed);
        }
        if (dead || !big || (c->f->flagged_only && !it->entry.flagged))
            continue;
        size_t key_len = sizeof(d);
        const void *kept = tally__table_key(t, i, &key_len);
        const void *key = kept ? kept : &d;
        if (c->keys_len + key_len > c->keys_cap) {
            size_t cap = (c->keys_cap + key_len) * 2;
            unsigned char *k = realloc(c->keys, cap);
            if (!k) {
                c->rc = TALLY_ENOMEM;
                return;
            }
            c->keys = k;
            c->keys_cap = cap;
        }
        memcpy(c->keys + c->keys_len, key, key_len);
        tally__table_key_done(kept);
        it->key_off = c->keys_len;
        it->entry.key_len = key_len;
        c->keys_len += key_len;
        c->n++;
    }
}

int tally_scan(tally_engine *e, uint32_t policy, const tally_scan_filter *filter,
               int (*cb)(void *ctx, const tally_scan_entry *entry), void *ctx)
{
    static const tally_scan_filter all = { 0 };
    if (!e || !cb)
        return TALLY_EINVAL;
    /* relaxed: only a diagnostic (tally_close() in tally.h) */
    if (atomic_load_explicit(&e->closing, memory_order_relaxed))
        return TALLY_ESTATE;
    tally__policy *p = tally__policy_get(e, policy);
    if (!p)
        return TALLY_EINVAL;
    scan_chunk c = { .p = p, .e = e, .f = filter ? filter : &all };
    c.items = malloc(SCAN_CHUNK * sizeof(*c.items));
    if (!c.items)
        return TALLY_ENOMEM;
    size_t reported = 0;
    bool stop = false;
    for (c.from = 0; c.from < p->table.n_slots && !stop && !c.rc; c.from = c.to) {
        c.to = c.from + SCAN_CHUNK < p->table.n_slots ? c.from + SCAN_CHUNK : p->table.n_slots;
        c.n = 0;
        c.keys_len = 0;
        int rc = tally__sec_read(e, scan_in_rcu, &c);
        if (rc) {
            c.rc = rc;
            break;
        }
        for (size_t i = 0; i < c.n && !stop; i++) {
            c.items[i].entry.key = c.keys + c.items[i].key_off;
            stop = cb(ctx, &c.items[i].entry) != 0;
            reported++;
            if (c.f->limit && reported >= c.f->limit)
                stop = true;
        }
    }
    free(c.items);
    free(c.keys);
    return c.rc ? c.rc : (int)reported;
}

typedef struct flagged_arg {
    int (*cb)(void *ctx, const tally_flag *f);
    void *ctx;
    tally__policy *p;
} flagged_arg;

static int flagged_one(void *ctx, const tally_scan_entry *en)
{
    flagged_arg *a = ctx;
    const scan_item *it = (const scan_item *)en;
    tally_flag f = { .key = en->key, .key_len = en->key_len, .flagged_at_ns = en->flagged_at_ns,
                     .denied = it->flag_amount };
    return a->cb(a->ctx, &f);
}

int tally_watch_flagged(tally_engine *e, uint32_t policy, size_t limit,
                        int (*cb)(void *ctx, const tally_flag *f), void *ctx)
{
    if (!e || !cb)
        return TALLY_EINVAL;
    tally__policy *p = tally__policy_get(e, policy);
    /* acquire: paired with the release store of tally_watch_set() */
    if (!p || !atomic_load_explicit(&p->table.watch, memory_order_acquire))
        return TALLY_EINVAL;
    tally_scan_filter f = { .flagged_only = true, .limit = limit };
    flagged_arg a = { cb, ctx, p };
    return tally_scan(e, policy, &f, flagged_one, &a);
}

/* ---- Episodes (flusher thread) -------------------------------------------- */

static void lru_unlink(struct tally__episodes *x, episode *ep)
{
    if (ep->prev)
        ep->prev->next = ep->next;
    else
        x->head = ep->next;
    if (ep->next)
        ep->next->prev = ep->prev;
    else
        x->tail = ep->prev;
    ep->prev = ep->next = NULL;
}

static void lru_front(struct tally__episodes *x, episode *ep)
{
    ep->next = x->head;
    ep->prev = NULL;
    if (x->head)
        x->head->prev = ep;
    x->head = ep;
    if (!x->tail)
        x->tail = ep;
}

static void episode_drop(struct tally__episodes *x, episode *ep)
{
    size_t b = ep->digest.lo & (x->n_buckets - 1);
    for (episode **pp = &x->buckets[b]; *pp; pp = &(*pp)->chain) {
        if (*pp == ep) {
            *pp = ep->chain;
            break;
        }
    }
    lru_unlink(x, ep);
    free(ep);
    x->count--;
}

/* Add @denied to the key's episode, as the most recently throttled. */
static void episode_add(tally__policy *p, tally__digest d, const void *key, size_t key_len,
                        uint64_t denied, uint64_t now)
{
    struct tally__episodes *x = p->episodes;
    size_t b = d.lo & (x->n_buckets - 1);
    episode *ep = x->buckets[b];
    while (ep && (ep->digest.lo != d.lo || ep->digest.hi != d.hi))
        ep = ep->chain;
    if (ep) {
        lru_unlink(x, ep);
    } else {
        if (x->count >= p->episodes_cap && x->tail)
            episode_drop(x, x->tail);         /* bounded: the least recently throttled goes */
        ep = malloc(sizeof(*ep) + key_len);
        if (!ep)
            return;
        memset(ep, 0, sizeof(*ep));
        ep->digest = d;
        ep->first_ns = now;
        ep->key_len = key_len;
        memcpy(ep->key, key, key_len);
        ep->chain = x->buckets[b];
        x->buckets[b] = ep;
        x->count++;
    }
    ep->denied += denied;
    ep->last_ns = now;
    lru_front(x, ep);
}

typedef struct acc_item {
    tally__digest d;
    uint64_t denied;
    size_t key_len;
    unsigned char key[64];
} acc_item;

typedef struct acc_chunk {
    tally__policy *p;
    size_t from, to, n;
    acc_item items[256];
} acc_chunk;

static void acc_in_rcu(void *arg)
{
    acc_chunk *c = arg;
    tally__table *t = &c->p->table;
    /* acquire: paired with the release store of tally_watch_set() */
    tally__watch_slot *w = atomic_load_explicit(&t->watch, memory_order_acquire);
    for (; c->from < c->to && c->n < 256; c->from++) {
        size_t i = c->from;
        if (!atomic_load_explicit(&w[i].acc, memory_order_relaxed))
            continue;
        tally__digest d;
        if (!tally__table_live(t, i, &d))
            continue;
        acc_item *it = &c->items[c->n++];
        it->d = d;
        it->denied = atomic_exchange_explicit(&w[i].acc, 0, memory_order_relaxed);
        size_t len = 0;
        const void *kept = tally__table_key(t, i, &len);
        if (kept && len <= sizeof(it->key)) {
            it->key_len = len;
            memcpy(it->key, kept, len);
            tally__table_key_done(kept);
        } else {
            tally__table_key_done(kept);
            /* digest_only, or a key too long to copy here: the digest names it */
            it->key_len = sizeof(it->d);
            memcpy(it->key, &it->d, sizeof(it->d));
        }
    }
}

void tally__ops_flush(tally_engine *e, uint64_t now)
{
    /* acquire: paired with the release store in tally_policy_add() (engine/engine.c) */
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    acc_chunk *c = malloc(sizeof(*c));
    if (!c)
        return;
    for (uint32_t id = 0; id < np; id++) {
        tally__policy *p = tally__policy_get(e, id);
        /* acquire: paired with the release store of tally_watch_set() */
        if (!atomic_load_explicit(&p->table.watch, memory_order_acquire))
            continue;
        c->p = p;
        c->from = 0;
        while (c->from < p->table.n_slots) {
            c->to = c->from + 4096 < p->table.n_slots ? c->from + 4096 : p->table.n_slots;
            c->n = 0;
            tally__rcu_read(acc_in_rcu, c);
            tally__lock(&e->ops_lock);
            for (size_t i = 0; i < c->n; i++)
                episode_add(p, c->items[i].d, c->items[i].key, c->items[i].key_len,
                            c->items[i].denied, now);
            pthread_mutex_unlock(&e->ops_lock);
        }
    }
    free(c);
}

int tally_watch_episodes(tally_engine *e, uint32_t policy, size_t limit,
                         int (*cb)(void *ctx, const tally_episode *ep), void *ctx)
{
    if (!e || !cb)
        return TALLY_EINVAL;
    tally__policy *p;
    int rc = watched_policy(e, policy, &p);
    if (rc)
        return rc;
    /* copy under the lock, call back outside it */
    tally__lock(&e->ops_lock);
    size_t n = p->episodes->count, keys = 0, got = 0;
    if (limit && limit < n)
        n = limit;
    for (episode *ep = p->episodes->head; ep && got < n; ep = ep->next, got++)
        keys += ep->key_len;
    tally_episode *out = malloc((got ? got : 1) * sizeof(*out));
    unsigned char *arena = malloc(keys ? keys : 1);
    size_t k = 0, off = 0;
    for (episode *ep = p->episodes->head; out && arena && ep && k < got; ep = ep->next, k++) {
        memcpy(arena + off, ep->key, ep->key_len);
        out[k] = (tally_episode){ .key = arena + off, .key_len = ep->key_len, .denied = ep->denied,
                                  .first_ns = ep->first_ns, .last_ns = ep->last_ns };
        off += ep->key_len;
    }
    pthread_mutex_unlock(&e->ops_lock);
    int reported = 0;
    if (out && arena)
        for (size_t i = 0; i < got; i++) {
            reported++;
            if (cb(ctx, &out[i]))
                break;
        }
    else
        reported = TALLY_ENOMEM;
    free(out);
    free(arena);
    return reported;
}

/* ---- Usage histograms (flusher thread) ------------------------------------ */

struct tally__usage_last {
    tally_usage_report r;
    char name[TALLY_MAX_POLICY_NAME + 1];
};

void tally__ops_usage_add(tally__policy *p, unsigned limit, uint64_t delta)
{
    /* bucket i holds 2^(i-1) < delta <= 2^i */
    unsigned b = delta <= 1 ? 0 : 64 - (unsigned)__builtin_clzll(delta - 1);
    p->usage_keys[limit]++;
    p->usage_sum[limit] += delta;
    p->usage_buckets[limit][b]++;
}

void tally__ops_usage_emit(tally_engine *e, uint64_t start, uint64_t end,
                           void (*cb)(void *, const tally_usage_report *), void *ctx)
{
    /* acquire: paired with the release store in tally_policy_add() (engine/engine.c) */
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    size_t n = 0;
    for (uint32_t id = 0; id < np; id++)
        n += tally__policy_get(e, id)->n_limits;
    struct tally__usage_last *last = calloc(n ? n : 1, sizeof(*last));
    size_t k = 0;
    for (uint32_t id = 0; id < np; id++) {
        tally__policy *p = tally__policy_get(e, id);
        for (unsigned l = 0; l < p->n_limits; l++) {
            tally_usage_report r = { .policy = id, .limit = l, .interval_start_ns = start,
                                     .interval_end_ns = end, .keys = p->usage_keys[l],
                                     .sum = p->usage_sum[l] };
            memcpy(r.buckets, p->usage_buckets[l], sizeof(r.buckets));
            p->usage_keys[l] = p->usage_sum[l] = 0;
            memset(p->usage_buckets[l], 0, sizeof(p->usage_buckets[l]));
            if (cb)
                cb(ctx, &r);
            if (last) {
                last[k].r = r;
                memcpy(last[k].name, p->name, sizeof(last[k].name));
                k++;
            }
        }
    }
    if (!last)
        return;
    tally__lock(&e->ops_lock);
    free(e->usage_last);
    e->usage_last = last;
    e->usage_last_n = k;
    pthread_mutex_unlock(&e->ops_lock);
}

void tally__ops_prometheus(tally_engine *e, tally__prom *pw)
{
    tally__prom_put(pw, "# HELP tally_watch_flags Keys the rejection watch flagged.\n"
                         "# TYPE tally_watch_flags counter\ntally_watch_flags %" PRIu64 "\n",
                    atomic_load_explicit(&e->flags_set, memory_order_relaxed));
    tally__lock(&e->ops_lock);
    if (e->usage_last_n)
        tally__prom_put(pw, "# HELP tally_usage_cost Per-key cost used in the last flush "
                             "interval.\n# TYPE tally_usage_cost histogram\n");
    for (size_t i = 0; i < e->usage_last_n; i++) {
        const tally_usage_report *r = &e->usage_last[i].r;
        char name[2 * TALLY_MAX_POLICY_NAME + 2];
        tally__prom_escape(name, sizeof(name), e->usage_last[i].name);
        uint64_t cum = 0;
        for (unsigned b = 0; b < 64; b++) {
            cum += r->buckets[b];
            tally__prom_put(pw, "tally_usage_cost_bucket{policy=\"%s\",limit=\"%u\",le=\"%" PRIu64
                                 "\"} %" PRIu64 "\n", name, r->limit, UINT64_C(1) << b, cum);
        }
        tally__prom_put(pw, "tally_usage_cost_bucket{policy=\"%s\",limit=\"%u\",le=\"+Inf\"} "
                             "%" PRIu64 "\n"
                             "tally_usage_cost_sum{policy=\"%s\",limit=\"%u\"} %" PRIu64 "\n"
                             "tally_usage_cost_count{policy=\"%s\",limit=\"%u\"} %" PRIu64 "\n",
                        name, r->limit, r->keys, name, r->limit, r->sum, name, r->limit, r->keys);
    }
    pthread_mutex_unlock(&e->ops_lock);
}

void tally__ops_free(tally_engine *e)
{
    /* relaxed: close runs alone here, after tally__engine_quiesce() */
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_relaxed);
    for (uint32_t id = 0; id < np; id++) {
        tally__policy *p = atomic_load_explicit(&e->policies[id], memory_order_relaxed);
        if (p->episodes) {
            for (episode *ep = p->episodes->head, *next; ep; ep = next) {
                next = ep->next;
                free(ep);
            }
            free(p->episodes->buckets);
            free(p->episodes);
            p->episodes = NULL;
        }
    }
    free(e->usage_last);
    e->usage_last = NULL;
}
