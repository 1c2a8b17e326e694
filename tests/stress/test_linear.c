/*
 * Linearizability of the single-limit hot path.
 *
 * Four threads race on two fresh keys per round with hits, peeks, reads and
 * reset_if calls, at virtual times picked around window edges from a shared
 * clock that the threads move forward while each of them may lag it (so times
 * repeat and go backwards). Every call is stamped with a tick of one global
 * counter when it starts and when it returns, which gives the real-time order.
 *
 * Each key's sub-history is then checked on its own (keys are independent) by
 * a Wing-Gong search: a depth-first walk over the orders that respect real
 * time, memoised on (calls placed, model state), looking for one order in
 * which every recorded answer is what the sequential specification gives:
 *   hit_at(now, c)  the pure step tally__algo_step() at cost c, the result
 *                   derived from it as the engine does for one limit;
 *   peek_at(now)    the step at cost 1 that neither consumes nor marks;
 *   read            ENOENT before the first hit, else the state words;
 *   reset_if(snap)  succeeds iff no successful reset came after the read that
 *                   took snap, and the state still equals snap's words and is
 *                   not empty; then the state is empty.
 * and two reads that report the same even snapshot generation have no
 * successful reset placed between them. An odd generation marks a snapshot
 * read while a reset of the key ran (tally.h): its read must overlap a
 * reset_if of the key, and resetting from it conflicts.
 *
 * A hit of one limit is one 16-byte CAS from the exact state its step was
 * computed from, so a lost or torn update, a decision taken from a state that
 * never was, or a stale snapshot resetting a state rebuilt to the same words
 * leaves a history that no order explains. Multi-limit hits are left out: by
 * design a concurrent call may see a consumption that is then taken back
 * (engine.c, guarantee 4).
 */
#include "../test.h"
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine-internal.h"

#define THREADS 4
#define OPS     8          /* per thread and round: a key's history stays far below 64 calls */
#define KEYS    2
#define SEC     UINT64_C(1000000000)
#define BASE    (UINT64_C(1699999980) * SEC)   /* a whole minute, and a multiple of 3 s */
#define EDGES   5          /* times sit at BASE + k * edge / 2 for k < EDGES ... */
#define N_TIMES (3 * EDGES) /* ... each one ns before, at and after the edge */

/* Sanitized builds run the same rounds more slowly: fewer of them. */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LINEAR_TSAN 1
#elif __has_feature(address_sanitizer)
#define LINEAR_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(TALLY_TEST_HARNESS)
#define LINEAR_TSAN 1
#elif defined(__SANITIZE_ADDRESS__)
#define LINEAR_ASAN 1
#endif
#if defined(LINEAR_TSAN)
#define ROUNDS 2000
#elif defined(LINEAR_ASAN)
#define ROUNDS 3000
#else
#define ROUNDS 10000
#endif

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* ---- Recording ------------------------------------------------------------ */

enum { OP_HIT, OP_PEEK, OP_READ, OP_RESET };

struct op {
    uint8_t        kind, thread, key;
    int            src;            /* reset: index in the thread's log of the read it used */
    uint64_t       inv, resp;      /* ticks of the global counter at start and return */
    uint64_t       now, cost;
    int            rc;
    uint32_t       mask;           /* reset: the reset mask */
    tally_result   res;            /* hit, peek */
    tally_snapshot snap;           /* read */
};

struct config {
    const char *name;
    tally_limit limit;
    unsigned    flags;
    uint64_t    edge;              /* length of a window (GCRA: of one emission interval) */
};

struct shared {
    const struct config *cfg;
    tally_engine     *e;
    uint32_t          policy;
    bool              resets;      /* this test's rounds call reset_if */
    unsigned          round;
    uint64_t          times[N_TIMES];
    char              keys[KEYS][32];
    pthread_barrier_t barrier;
    _Atomic unsigned  gate;        /* threads that reached the start of the round */
    _Atomic uint64_t  tick;        /* the real-time order */
    _Atomic unsigned  vtime;       /* index into times[]: the shared virtual clock */
    bool              stop;        /* set by the checker before it releases the threads */
    struct op         log[THREADS][OPS];
};

struct worker_arg {
    struct shared *s;
    int            t;
};

/* A time near the shared clock, which this call may move one step forward. */
static uint64_t pick_time(struct shared *s, uint64_t *rng)
{
    unsigned v = atomic_load_explicit(&s->vtime, memory_order_relaxed);
    if (rnd(rng) % 3 == 0 && v + 1 < N_TIMES &&
        atomic_compare_exchange_strong_explicit(&s->vtime, &v, v + 1, memory_order_relaxed,
                                                memory_order_relaxed))
        v++;
    int i = (int)v + (int)(rnd(rng) % 4) - 2;   /* lag up to two steps, or lead by one */
    i = i < 0 ? 0 : i >= N_TIMES ? N_TIMES - 1 : i;
    return s->times[i];
}

/* A snapshot this thread read of @key: the latest half of the time, else an older one. */
static int pick_snapshot(const struct op *log, int n, unsigned key, uint64_t *rng)
{
    int found[OPS], m = 0;
    for (int i = 0; i < n; i++)
        if (log[i].kind == OP_READ && log[i].key == key && log[i].rc == 0)
            found[m++] = i;
    if (m == 0)
        return -1;
    if (m == 1 || rnd(rng) % 2)
        return found[m - 1];
    return found[rnd(rng) % (uint64_t)(m - 1)];
}

static void run_ops(struct shared *s, int t, uint64_t *rng)
{
    struct op *log = s->log[t];
    for (int i = 0; i < OPS; i++) {
        struct op *o = &log[i];
        memset(o, 0, sizeof(*o));
        o->thread = (uint8_t)t;
        o->key = (uint8_t)(rnd(rng) % KEYS);
        o->src = -1;
        unsigned r = (unsigned)(rnd(rng) % 10);
        o->kind = r < 5 ? OP_HIT : r < 6 ? OP_PEEK : r < 8 ? OP_READ : OP_RESET;
        if (o->kind == OP_RESET && (!s->resets || (o->src = pick_snapshot(log, i, o->key, rng)) < 0))
            o->kind = OP_READ;
        if (o->kind == OP_HIT || o->kind == OP_PEEK)
            o->now = pick_time(s, rng);
        o->cost = o->kind == OP_HIT ? 1 + rnd(rng) % 3 : 1;
        const char *k = s->keys[o->key];
        size_t kl = strlen(k);
        /* a short random pause shifts the threads against each other */
        for (volatile unsigned spin = (unsigned)(rnd(rng) % 64); spin > 0; spin--)
            ;
        o->inv = atomic_fetch_add(&s->tick, 1);
        switch (o->kind) {
        case OP_HIT:
            o->rc = tally_hit_at(s->e, s->policy, k, kl, &o->cost, o->now, &o->res);
            break;
        case OP_PEEK:
            o->rc = tally_peek_at(s->e, s->policy, k, kl, o->now, &o->res);
            break;
        case OP_READ:
            o->rc = tally_read(s->e, s->policy, k, kl, &o->snap);
            break;
        default:
            o->rc = tally_reset_if(s->e, s->policy, k, kl, &log[o->src].snap, &o->mask);
            break;
        }
        o->resp = atomic_fetch_add(&s->tick, 1);
    }
}

static void *worker(void *p)
{
    struct worker_arg *a = p;
    struct shared *s = a->s;
    cpu_set_t all, one;
    /* threads alternate between two CPUs, so that two of them run at once */
    if (sched_getaffinity(0, sizeof(all), &all) == 0 && CPU_COUNT(&all) >= 2) {
        int want = a->t % 2, cpu = -1;
        for (int i = 0; i < CPU_SETSIZE && want >= 0; i++)
            if (CPU_ISSET(i, &all) && want-- == 0)
                cpu = i;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
    }
    for (uint64_t round = 0; round < ROUNDS; round++) {
        pthread_barrier_wait(&s->barrier);       /* the round's keys are set up */
        if (s->stop)
            break;
        uint64_t rng = ((round + 1) * UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)(a->t + 1) << 40) | 1;
        atomic_fetch_add(&s->gate, 1);
        for (unsigned spins = 1; atomic_load(&s->gate) < THREADS; spins++)
            if (spins % 1024 == 0)
                sched_yield();                   /* start together, also on fewer cores */
        run_ops(s, a->t, &rng);
        pthread_barrier_wait(&s->barrier);       /* the history is complete */
    }
    return NULL;
}

/* ---- The sequential specification ------------------------------------------ */

struct model {
    tally__state st;
    uint64_t     stale;            /* reads placed before a successful reset that came after them */
    bool         exists;           /* a hit was placed: the key is tracked */
};

struct memo_entry {
    uint64_t     placed, stale, w0, w1;
    uint32_t     epoch;
    bool         exists;
};

struct checker {
    const struct config *cfg;
    tally__limit l;
    unsigned     how;              /* a hit's step */
    bool         use_gen;          /* apply the generation rule */
    bool         aba;              /* a reset after the snapshot's read makes reset_if fail */
    int          n;
    const struct op *ops[64];
    int          src[64];          /* reset: the read it used, as an index into ops */
    uint64_t     reads;            /* reads that returned a snapshot */
    uint64_t     deps[64];         /* read: the calls whose verdict depends on its stale bit */
    int          path[64], best[64], best_len;
    struct memo_entry *memo;
    size_t       memo_cap, memo_used;
    uint32_t     epoch;
};

static void result_of(unsigned flags, const tally__step *r, tally_result *out)
{
    /* fill_result() in engine.c for a single limit */
    memset(out, 0, sizeof(*out));
    out->allowed = r->fits || (flags & TALLY_SHADOW);
    out->exceeded = !r->fits;
    out->first_exceeded = r->first;
    out->remaining = r->remaining;
    out->reset_after_ns = r->reset_after_ns;
    out->retry_after_ns = out->allowed ? 0 : r->retry_after_ns;
}

static bool same_result(const tally_result *a, const tally_result *b)
{
    return a->allowed == b->allowed && a->exceeded == b->exceeded &&
           a->first_exceeded == b->first_exceeded && a->remaining == b->remaining &&
           a->reset_after_ns == b->reset_after_ns && a->retry_after_ns == b->retry_after_ns;
}

static bool same_state(tally__state a, const uint64_t raw[2])
{
    return a.w0 == raw[0] && a.w1 == raw[1];
}

static void fmt_result(char *buf, size_t n, const tally_result *r)
{
    snprintf(buf, n, "allowed %d exceeded %" PRIu32 " first %" PRIu32 " remaining %" PRIu64
             " reset_after %" PRIu64 " retry_after %" PRIu64, r->allowed, r->exceeded,
             r->first_exceeded, r->remaining, r->reset_after_ns, r->retry_after_ns);
}

/* A hit of this key that is not placed yet and started before @o returned. */
static bool hit_pending(const struct checker *c, uint64_t placed, const struct op *o)
{
    for (int i = 0; i < c->n; i++)
        if (!(placed >> i & 1) && c->ops[i]->kind == OP_HIT && c->ops[i]->inv < o->resp)
            return true;
    return false;
}

/* A reset_if of this key that ran while @o did. */
static bool reset_overlaps(const struct checker *c, const struct op *o)
{
    for (int i = 0; i < c->n; i++)
        if (c->ops[i]->kind == OP_RESET && c->ops[i]->inv < o->resp && o->inv < c->ops[i]->resp)
            return true;
    return false;
}

/*
 * Place call @i after the calls in @placed, from model @m. Return whether its
 * recorded answer is the specified one; *next is the model after it. With
 * @why, describe what the specification expected.
 */
static bool place(const struct checker *c, uint64_t placed, const struct model *m, int i,
                  struct model *next, char *why, size_t wn)
{
    const struct op *o = c->ops[i];
    tally__step r;
    tally_result want;
    char a[160];
    bool ok = false;

    *next = *m;
    if (why)
        why[0] = 0;
    switch (o->kind) {
    case OP_HIT:
    case OP_PEEK: {
        bool hit = o->kind == OP_HIT;
        tally__algo_step(&c->l, m->st, o->now, o->cost, hit ? c->how : TALLY__ADD_NEVER | TALLY__NO_MARK,
                         NULL, &r);
        result_of(c->cfg->flags, &r, &want);
        ok = o->rc == 0 && same_result(&want, &o->res);
        if (hit) {
            next->st = r.changed ? r.next : m->st;
            next->exists = true;
        }
        if (why) {
            fmt_result(a, sizeof(a), &want);
            snprintf(why, wn, "rc 0, %s; state then {%#" PRIx64 ", %" PRIu64 "}", a,
                     next->st.w0, next->st.w1);
        }
        break;
    }
    case OP_READ: {
        tally__state st = m->st;
        if (!m->exists && o->rc == 0 && hit_pending(c, placed, o))
            ok = true;                    /* the slot of a hit still under way: empty */
        else
            ok = m->exists ? o->rc == 0 : o->rc == TALLY_ENOENT;
        if (ok && o->rc == 0) {
            tally_counter want_c;
            tally__algo_counter(&c->l, st, 0, &want_c);
            ok = o->snap.policy == 0 && o->snap.n_limits == 1 && same_state(st, o->snap.c[0].raw) &&
                 o->snap.c[0].used == want_c.used &&
                 (c->cfg->limit.algo == TALLY_SLIDING_WINDOW ||
                  o->snap.c[0].window_start_ns == want_c.window_start_ns);
        }
        bool odd = o->rc == 0 && (o->snap.generation & 1);
        if (ok && odd)
            ok = reset_overlaps(c, o);
        int clash = -1;
        for (int y = 0; ok && c->use_gen && o->rc == 0 && !odd && y < c->n; y++)
            if (y != i && (placed >> y & 1) && (c->reads >> y & 1) && (m->stale >> y & 1) &&
                c->ops[y]->snap.generation == o->snap.generation) {
                ok = false;
                clash = y;
            }
        if (why) {
            if (!m->exists)
                snprintf(why, wn, "ENOENT (or an empty snapshot while a hit that started "
                         "before it returned is still under way)");
            else if (odd && !reset_overlaps(c, o))
                snprintf(why, wn, "an even generation: no reset_if of the key ran meanwhile");
            else if (clash >= 0)
                snprintf(why, wn, "a generation other than %" PRIu64 ": call #%d reported it and "
                         "a successful reset came between", o->snap.generation, clash);
            else
                snprintf(why, wn, "rc 0, raw {%#" PRIx64 ", %" PRIu64 "}", st.w0, st.w1);
        }
        break;
    }
    default: {
        int y = c->src[i];
        const tally_counter *seen = &c->ops[y]->snap.c[0];
        bool after_reset = (m->stale >> y & 1) != 0;
        bool in_flux = (c->ops[y]->snap.generation & 1) != 0;
        bool wins = (placed >> y & 1) && !(c->aba && after_reset) && !in_flux &&
                    same_state(m->st, seen->raw) && (seen->raw[0] | seen->raw[1]) != 0;
        if (o->rc == 0 && o->mask == 1) {
            ok = wins;
            next->st = (tally__state){ 0, 0 };
            next->stale |= placed & c->reads;
        } else {
            ok = o->rc == TALLY_ECONFLICT && o->mask == 0 && !wins;
        }
        if (why) {
            if (wins)
                snprintf(why, wn, "rc 0, mask 1: the state still is the snapshot's");
            else if (in_flux)
                snprintf(why, wn, "TALLY_ECONFLICT: the snapshot #%d was read during a reset "
                         "(odd generation)", y);
            else if (after_reset && c->aba)
                snprintf(why, wn, "TALLY_ECONFLICT: a successful reset came after the read #%d "
                         "that took the snapshot", y);
            else
                snprintf(why, wn, "TALLY_ECONFLICT: the state {%#" PRIx64 ", %" PRIu64 "} is not "
                         "the snapshot's, or is empty", m->st.w0, m->st.w1);
        }
        break;
    }
    }
    /* a stale bit no longer matters once every call that reads it is placed */
    uint64_t now_placed = placed | UINT64_C(1) << i;
    for (int y = 0; y < c->n; y++)
        if ((next->stale >> y & 1) && !(c->deps[y] & ~now_placed))
            next->stale &= ~(UINT64_C(1) << y);
    return ok;
}

static uint64_t memo_hash(uint64_t placed, const struct model *m)
{
    uint64_t h = placed * UINT64_C(0x9e3779b97f4a7c15);
    h ^= (m->stale + UINT64_C(0x632be59bd9b4e019)) * UINT64_C(0xbf58476d1ce4e5b9);
    h ^= (m->st.w0 ^ (m->st.w1 << 1) ^ m->exists) * UINT64_C(0x94d049bb133111eb);
    return h ^ (h >> 31);
}

/* Record (placed, model) as visited; false if it already was. */
static bool memo_add(struct checker *c, uint64_t placed, const struct model *m)
{
    if (2 * (c->memo_used + 1) > c->memo_cap) {
        struct memo_entry *old = c->memo;
        size_t old_cap = c->memo_cap;
        c->memo_cap = old_cap ? 2 * old_cap : 4096;
        c->memo = calloc(c->memo_cap, sizeof(*c->memo));
        cr_assert_not_null(c->memo);
        c->memo_used = 0;
        for (size_t i = 0; i < old_cap; i++) {
            if (old[i].epoch != c->epoch)
                continue;
            struct model om = { { old[i].w0, old[i].w1 }, old[i].stale, old[i].exists };
            size_t j = memo_hash(old[i].placed, &om) & (c->memo_cap - 1);
            while (c->memo[j].epoch == c->epoch)
                j = (j + 1) & (c->memo_cap - 1);
            c->memo[j] = old[i];
            c->memo_used++;
        }
        free(old);
    }
    size_t j = memo_hash(placed, m) & (c->memo_cap - 1);
    for (;; j = (j + 1) & (c->memo_cap - 1)) {
        struct memo_entry *x = &c->memo[j];
        if (x->epoch != c->epoch) {
            *x = (struct memo_entry){ placed, m->stale, m->st.w0, m->st.w1, c->epoch, m->exists };
            c->memo_used++;
            return true;
        }
        if (x->placed == placed && x->stale == m->stale && x->w0 == m->st.w0 && x->w1 == m->st.w1 &&
            x->exists == m->exists)
            return false;
    }
}

/* The earliest return among the calls not yet placed: no call that started
   after it may be placed before that call. */
static uint64_t earliest_response(const struct checker *c, uint64_t placed)
{
    uint64_t min_resp = UINT64_MAX;
    for (int i = 0; i < c->n; i++)
        if (!(placed >> i & 1) && c->ops[i]->resp < min_resp)
            min_resp = c->ops[i]->resp;
    return min_resp;
}

static bool search(struct checker *c, uint64_t placed, const struct model *m, int depth)
{
    if (depth == c->n)
        return true;
    if (depth > c->best_len) {
        c->best_len = depth;
        memcpy(c->best, c->path, sizeof(int) * (size_t)depth);
    }
    /* a call may go next only if no call still to place returned before it started */
    uint64_t min_resp = earliest_response(c, placed);
    for (int i = 0; i < c->n; i++) {
        struct model next;
        if ((placed >> i & 1) || c->ops[i]->inv > min_resp)
            continue;
        if (!place(c, placed, m, i, &next, NULL, 0))
            continue;
        uint64_t np = placed | UINT64_C(1) << i;
        if (!memo_add(c, np, &next))
            continue;
        c->path[depth] = i;
        if (search(c, np, &next, depth + 1))
            return true;
    }
    return false;
}

static bool linearizable(struct checker *c)
{
    struct model m0 = { { 0, 0 }, 0, false };
    for (int y = 0; y < c->n; y++) {
        c->deps[y] = 0;
        for (int i = 0; i < c->n; i++)
            if ((c->ops[i]->kind == OP_RESET && c->src[i] == y) ||
                (c->use_gen && i != y && (c->reads >> i & 1) && (c->reads >> y & 1) &&
                 !(c->ops[y]->snap.generation & 1) &&
                 c->ops[i]->snap.generation == c->ops[y]->snap.generation))
                c->deps[y] |= UINT64_C(1) << i;
    }
    c->best_len = 0;
    if (++c->epoch == 0) {
        memset(c->memo, 0, c->memo_cap * sizeof(*c->memo));
        c->epoch = 1;
    }
    c->memo_used = 0;
    return search(c, 0, &m0, 0);
}

static void print_op(const struct checker *c, int i)
{
    const struct op *o = c->ops[i];
    char a[200] = "";
    static const char *kinds[] = { "hit_at", "peek_at", "read", "reset_if" };

    if (o->kind == OP_HIT || o->kind == OP_PEEK) {
        fmt_result(a, sizeof(a), &o->res);
        fprintf(stderr, "    #%-2d t%d [%3" PRIu64 ",%3" PRIu64 "] %-8s now BASE%+" PRId64 " cost %" PRIu64
                " -> rc %d, %s\n", i, o->thread, o->inv, o->resp, kinds[o->kind],
                (int64_t)(o->now - BASE), o->cost, o->rc, a);
    } else if (o->kind == OP_READ) {
        fprintf(stderr, "    #%-2d t%d [%3" PRIu64 ",%3" PRIu64 "] %-8s -> rc %d", i, o->thread, o->inv,
                o->resp, kinds[o->kind], o->rc);
        if (o->rc == 0)
            fprintf(stderr, ", raw {%#" PRIx64 ", %" PRIu64 "} used %" PRIu64 " window_start %" PRIu64
                    " generation %" PRIu64, o->snap.c[0].raw[0], o->snap.c[0].raw[1], o->snap.c[0].used,
                    o->snap.c[0].window_start_ns, o->snap.generation);
        fprintf(stderr, "\n");
    } else {
        fprintf(stderr, "    #%-2d t%d [%3" PRIu64 ",%3" PRIu64 "] %-8s snapshot of #%d -> rc %d mask %" PRIu32
                "\n", i, o->thread, o->inv, o->resp, kinds[o->kind], c->src[i], o->rc, o->mask);
    }
}

/* The history, the longest order found and what the specification wanted next. */
static void report(struct checker *c, unsigned round, unsigned key)
{
    char why[300];
    struct model m = { { 0, 0 }, 0, false };
    uint64_t placed = 0;

    fprintf(stderr, "linear: policy %s, round %u, key %u: no order of these calls explains "
            "their results\n  (by start; [start, return] ticks of the real-time order; times in ns "
            "from BASE = %" PRIu64 ")\n", c->cfg->name, round, key, BASE);
    bool shown[64] = { false };
    for (int k = 0; k < c->n; k++) {
        int first = -1;
        for (int i = 0; i < c->n; i++)
            if (!shown[i] && (first < 0 || c->ops[i]->inv < c->ops[first]->inv))
                first = i;
        shown[first] = true;
        print_op(c, first);
    }
    fprintf(stderr, "  longest order found (%d of %d calls):", c->best_len, c->n);
    for (int d = 0; d < c->best_len; d++) {
        struct model next;
        int i = c->best[d];
        fprintf(stderr, " #%d", i);
        place(c, placed, &m, i, &next, NULL, 0);
        m = next;
        placed |= UINT64_C(1) << i;
    }
    fprintf(stderr, "\n  model after it: state {%#" PRIx64 ", %" PRIu64 "}, %s\n", m.st.w0, m.st.w1,
            m.exists ? "tracked" : "not tracked");
    uint64_t min_resp = earliest_response(c, placed);
    for (int i = 0; i < c->n; i++) {
        struct model next;
        if ((placed >> i & 1) || c->ops[i]->inv > min_resp)
            continue;
        bool ok = place(c, placed, &m, i, &next, why, sizeof(why));
        fprintf(stderr, "  next #%d %s: the specification gives %s\n", i,
                ok ? "fits (but leads nowhere)" : "does not fit", why);
    }
}

/* Check each key's history of the round; print the first that fails. */
static bool check_round(struct shared *s, struct checker *c)
{
    for (unsigned k = 0; k < KEYS; k++) {
        int index[THREADS][OPS];
        c->n = 0;
        c->reads = 0;
        for (int t = 0; t < THREADS; t++)
            for (int i = 0; i < OPS; i++) {
                const struct op *o = &s->log[t][i];
                index[t][i] = -1;
                if (o->key != k)
                    continue;
                index[t][i] = c->n;
                c->src[c->n] = o->kind == OP_RESET ? index[t][o->src] : -1;
                if (o->kind == OP_READ && o->rc == 0)
                    c->reads |= UINT64_C(1) << c->n;
                c->ops[c->n++] = o;
            }
        c->use_gen = true;
        c->aba = true;
        if (linearizable(c))
            continue;
        report(c, s->round, k);
        c->use_gen = false;
        bool no_gen = linearizable(c);
        c->aba = false;
        bool no_aba = linearizable(c);
        fprintf(stderr, "  without the generation rule: %s; and with reset_if comparing only the "
                "state words: %s\n", no_gen ? "linearizable" : "still not linearizable",
                no_aba ? "linearizable" : "still not linearizable");
        return false;
    }
    return true;
}

/* ---- The rounds ----------------------------------------------------------- */

/* Pairs of hits of one key, from two threads, that ran at the same time. */
static uint64_t hits_overlapping(const struct shared *s)
{
    uint64_t n = 0;
    for (int t = 0; t < THREADS; t++)
        for (int u = t + 1; u < THREADS; u++)
            for (int i = 0; i < OPS; i++)
                for (int j = 0; j < OPS; j++) {
                    const struct op *x = &s->log[t][i], *y = &s->log[u][j];
                    n += x->kind == OP_HIT && y->kind == OP_HIT && x->key == y->key &&
                         x->inv < y->resp && y->inv < x->resp;
                }
    return n;
}

static void run_config(const struct config *cfg, bool resets)
{
    static struct shared s;
    struct checker c;
    tally_options o;
    pthread_t th[THREADS];
    struct worker_arg args[THREADS];

    memset(&s, 0, sizeof(s));
    memset(&c, 0, sizeof(c));
    s.cfg = cfg;
    s.resets = resets;
    c.cfg = cfg;
    cr_assert_eq(tally__limit_compile(&cfg->limit, &c.l), 0);
    c.l.aligned = (cfg->flags & TALLY_ALIGNED) != 0;
    c.how = (cfg->flags & (TALLY_SHADOW | TALLY_COUNT_REJECTED)) ? TALLY__ADD_ALWAYS : TALLY__ADD_IF_FITS;
    for (int k = 0; k < EDGES; k++)
        for (int d = 0; d < 3; d++)
            s.times[3 * k + d] = BASE + (uint64_t)k * (cfg->edge / 2) + (uint64_t)d - 1;

    /* fresh keys every round, and room for all of them: no slot is ever reclaimed */
    tally_options_init(&o);
    o.capacity = 2 * KEYS * ROUNDS;
    cr_assert_eq(tally_open(&o, &s.e), 0);
    tally_policy p = { .name = cfg->name, .n_limits = 1, .flags = cfg->flags, .limits = { cfg->limit } };
    cr_assert_eq(tally_policy_add(s.e, &p, &s.policy), 0);
    cr_assert_eq(s.policy, 0);
    pthread_barrier_init(&s.barrier, NULL, THREADS + 1);
    for (int t = 0; t < THREADS; t++) {
        args[t] = (struct worker_arg){ &s, t };
        cr_assert_eq(pthread_create(&th[t], NULL, worker, &args[t]), 0);
    }

    uint64_t calls[4] = { 0 }, denied = 0, firsts = 0, wins = 0, overlaps = 0;
    bool ok = true;
    for (unsigned round = 0; round < ROUNDS && ok; round++) {
        s.round = round;
        for (int k = 0; k < KEYS; k++)
            snprintf(s.keys[k], sizeof(s.keys[k]), "r%u-k%d", round, k);
        atomic_store(&s.gate, 0);
        atomic_store(&s.vtime, 0);
        pthread_barrier_wait(&s.barrier);
        pthread_barrier_wait(&s.barrier);
        for (int t = 0; t < THREADS; t++)
            for (int i = 0; i < OPS; i++) {
                const struct op *op = &s.log[t][i];
                calls[op->kind]++;
                denied += op->kind == OP_HIT && op->res.exceeded;
                firsts += op->kind == OP_HIT && op->res.first_exceeded;
                wins += op->kind == OP_RESET && op->rc == 0;
            }
        overlaps += hits_overlapping(&s);
        ok = check_round(&s, &c);
    }
    if (!ok) {
        s.stop = true;                           /* release the threads once more, to exit */
        pthread_barrier_wait(&s.barrier);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    pthread_barrier_destroy(&s.barrier);
    tally_close(s.e);
    free(c.memo);
    cr_assert(ok, "policy %s round %u: a key's history is not linearizable (printed above)",
              cfg->name, s.round);

    /* the histories covered what they are meant to: hits of one key racing,
       denials, marks and resets that won */
    cr_assert_gt(overlaps, 0, "policy %s: no two hits of one key ever overlapped", cfg->name);
    cr_assert_gt(calls[OP_PEEK], 0);
    cr_assert_gt(calls[OP_READ], 0);
    cr_assert_gt(denied, 0, "policy %s: no hit was ever over the limit", cfg->name);
    cr_assert_gt(firsts, 0, "policy %s: no hit ever crossed the limit", cfg->name);
    if (resets)
        cr_assert_gt(wins, 0, "policy %s: no reset_if ever succeeded", cfg->name);
}

static const struct config FIXED = {
    "fixed", { .algo = TALLY_FIXED_WINDOW, .max = 4, .period_ns = SEC }, 0, SEC };
static const struct config ALIGNED = {
    "aligned", { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = SEC }, TALLY_ALIGNED, SEC };
static const struct config CALENDAR = {
    "calendar", { .algo = TALLY_CALENDAR_WINDOW, .max = 5, .unit = TALLY_MINUTE }, 0, 60 * SEC };
static const struct config SLIDING = {
    "sliding", { .algo = TALLY_SLIDING_WINDOW, .max = 4, .period_ns = SEC }, 0, SEC };
static const struct config GCRA = {
    "gcra", { .algo = TALLY_GCRA, .max = 3, .period_ns = 3 * SEC }, 0, SEC };
static const struct config COUNT_REJECTED = {
    "count_rejected", { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = SEC },
    TALLY_ALIGNED | TALLY_COUNT_REJECTED, SEC };
static const struct config SHADOW = {
    "shadow", { .algo = TALLY_GCRA, .max = 2, .period_ns = 2 * SEC }, TALLY_SHADOW, SEC };

/* Hits, peeks and reads only. */
Test(linear, fixed_window_hits, .timeout = 600) { run_config(&FIXED, false); }
Test(linear, aligned_window_hits, .timeout = 600) { run_config(&ALIGNED, false); }
Test(linear, calendar_minute_hits, .timeout = 600) { run_config(&CALENDAR, false); }
Test(linear, sliding_window_hits, .timeout = 600) { run_config(&SLIDING, false); }
Test(linear, gcra_hits, .timeout = 600) { run_config(&GCRA, false); }
Test(linear, count_rejected_hits, .timeout = 600) { run_config(&COUNT_REJECTED, false); }
Test(linear, shadow_hits, .timeout = 600) { run_config(&SHADOW, false); }

/* The same with reset_if from fresh and stale snapshots. */
Test(linear, fixed_window_resets, .timeout = 600) { run_config(&FIXED, true); }
Test(linear, aligned_window_resets, .timeout = 600) { run_config(&ALIGNED, true); }
Test(linear, calendar_minute_resets, .timeout = 600) { run_config(&CALENDAR, true); }
Test(linear, sliding_window_resets, .timeout = 600) { run_config(&SLIDING, true); }
Test(linear, gcra_resets, .timeout = 600) { run_config(&GCRA, true); }
Test(linear, count_rejected_resets, .timeout = 600) { run_config(&COUNT_REJECTED, true); }
Test(linear, shadow_resets, .timeout = 600) { run_config(&SHADOW, true); }
