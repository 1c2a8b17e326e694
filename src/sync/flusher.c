/*
 * The flusher: a thread per engine that takes the unflushed cost of every key
 * and pushes it to the sinks (a callback and Redis), learns the global totals
 * from Redis, and delivers first_exceeded events.
 *
 * Ordering and progress guarantees:
 *  1. The hot path never waits for the flusher: it adds cost to a slot's
 *     {window, delta} pair with one 16-byte CAS, and hands a delta of an
 *     older window, or an event, to a lock-free stack (malloc, push).
 *  2. The flusher takes a delta with a CAS {W, d} -> {W, 0} inside an RCU
 *     read-side section and keeps it in its own memory until every sink
 *     acknowledged it: taken is not gone. A slot is reclaimed only when its
 *     delta is 0, and a delta added after that check is spilled to the stack
 *     after the grace period (table.c).
 *  3. Redis gets each batch as a Lua script that first sets a one-time token
 *     (SET NX) and only then runs the INCRBYs: a batch whose reply was lost is
 *     sent again with the same token and the same content, and Redis applies
 *     it once. The script runs atomically, so a batch is applied wholly or not.
 *  4. The other engines' count of a key is written by the flusher alone into
 *     the slot's {rwin, remote} pair, with rwin as a seqlock sequence.
 *  5. No RCU read-side section is held across I/O.
 *  6. Every reply is paired with the command it answers, in pipeline order.
 *     An error reply by which Redis refused a batch before running it (BUSY,
 *     OOM, LOADING, READONLY, MOVED, CROSSSLOT, ...: see refused_unapplied)
 *     puts its deltas back into their entries, merged per key and window,
 *     to be sent in a later batch under a new token. A batch whose outcome is
 *     unknown (its reply was lost, or an unexpected error) is kept with its
 *     token and resent as it was; a refusal of a resend keeps it too, since
 *     an earlier send may have run. The script never stops half-way: a key
 *     Redis refused inside it (WRONGTYPE, overflow, an ACL) is answered with
 *     its error and goes back to its entry alone. While MAX_KEPT_BATCHES or
 *     more kept batches wait, no new batch is formed, so what is sent per
 *     flush is bounded by the pending keys whatever Redis answers.
 *  7. Every flush also reads the global count in the current window (MGET) of
 *     each live key hit in this window or the one before, whether or not this
 *     engine pushed anything for it, so an idle engine's view of the others is
 *     at most one flush old, also at the start of a window.
 */
#include <errno.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdio.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "engine/engine-internal.h"
#include "core/clock.h"
#include "core/rcu.h"
#include "core/tsan.h"

#define CHUNK_KEYS      500            /* keys per Lua batch */
#define TOKEN_TTL_MS    "86400000"     /* a batch token outlives any retry */
#define BACKOFF_MIN_MS  50
#define BACKOFF_MAX_MS  5000
#define TTL_SLACK_MS    60000          /* late deltas (retries) still find their key */
#define MAX_KEPT_BATCHES 8             /* batches of unknown outcome before forming stops */
#define ERRSTR_LEN      256

/* ---- The flusher's own bookkeeping --------------------------------------- */

/* A (policy, limit, key, window) with cost taken from the engine. */
typedef struct entry {
    struct entry *next;            /* hash chain */
    uint32_t      policy;
    unsigned      limit;
    tally__digest digest;
    uint64_t      win;
    uint64_t      fresh;           /* taken, not yet in a Redis batch */
    uint64_t      acked;           /* cost of this engine that Redis acknowledged */
    uint64_t      local_total;     /* the key's local count in the window when last taken */
    uint64_t      end_ns;          /* when the window stops counting */
    uint64_t      acked_seq;       /* the flush that last learnt the total from a reply */
    unsigned      inflight;        /* batch items not yet acknowledged */
    size_t        key_len;
    unsigned char *key;            /* key bytes, or the digest when digest_only */
} entry;

typedef struct item {
    entry   *e;
    uint64_t delta;
} item;

/* A batch sent (or to send) to Redis under one token. */
typedef struct batch {
    struct batch *next;
    uint64_t      token;
    unsigned      sends;          /* times it was sent */
    size_t        n;
    item          items[CHUNK_KEYS];
} batch;

typedef struct event {
    struct event *next;
    tally__note  *note;
} event;

/* A live key in its current window, whose global count the flush reads. */
typedef struct refresh {
    uint32_t      policy;
    unsigned      limit;
    tally__digest digest;
    uint64_t      win;
} refresh;

struct tally__flusher {
    tally_engine         *e;
    tally_flusher_options o;
    tally_redis_options   ro;
    char                 *host, *unix_path, *password, *prefix;
    bool                  redis_on;
    pthread_t             thread;

    pthread_mutex_t       lock;        /* guards the request fields below */
    pthread_cond_t        cond;
    bool                  stop;
    uint64_t              requested, done;   /* flush generations */
    int                   done_rc;

    /* owned by the flusher thread */
    entry               **map;
    size_t                map_size, map_count;
    batch                *inflight_head, **inflight_tail;
    refresh              *refresh;     /* this flush's keys to read back */
    size_t                refresh_n, refresh_cap;
    uint64_t              seq;         /* flushes so far */
    event                *events, **events_tail;
    uint64_t              next_token, instance;
    redisContext         *rc;
    bool                  ever_connected;
    uint64_t              next_connect_ns;
    uint32_t              backoff_ms;
    tally_delta          *cb;          /* on_deltas scratch */
    uint64_t              last_flush_ns;
    size_t                cb_cap;

    pthread_mutex_t       err_lock;    /* guards errstr: tally_flusher_last_error() */
    char                  errstr[ERRSTR_LEN];
    size_t                errlen;
};

static uint64_t hash_entry(uint32_t policy, unsigned limit, tally__digest d, uint64_t win)
{
    uint64_t h = d.lo ^ (d.hi * UINT64_C(0x9e3779b97f4a7c15)) ^ win * UINT64_C(0xc2b2ae3d27d4eb4f);
    h ^= ((uint64_t)policy << 32 | limit) * UINT64_C(0x165667b19e3779f9);
    return h ^ (h >> 29);
}

static int map_grow(struct tally__flusher *f)
{
    size_t size = f->map_size ? f->map_size * 2 : 1024;
    entry **m = calloc(size, sizeof(*m));
    if (!m)
        return TALLY_ENOMEM;
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry *x = f->map[i], *next; x; x = next) {
            next = x->next;
            size_t b = hash_entry(x->policy, x->limit, x->digest, x->win) & (size - 1);
            x->next = m[b];
            m[b] = x;
        }
    }
    free(f->map);
    f->map = m;
    f->map_size = size;
    return 0;
}

static entry *map_find(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                       uint64_t win)
{
    if (!f->map_size)
        return NULL;
    size_t b = hash_entry(policy, limit, d, win) & (f->map_size - 1);
    for (entry *x = f->map[b]; x; x = x->next)
        if (x->policy == policy && x->limit == limit && x->win == win
            && x->digest.lo == d.lo && x->digest.hi == d.hi)
            return x;
    return NULL;
}

static entry *map_get(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                      uint64_t win, const void *key, size_t key_len)
{
    if (f->map_count >= f->map_size && map_grow(f))
        return NULL;
    entry *x = map_find(f, policy, limit, d, win);
    if (x)
        return x;
    size_t b = hash_entry(policy, limit, d, win) & (f->map_size - 1);
    x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    if (!key) {
        key = &d;
        key_len = sizeof(d);
    }
    x->key = malloc(key_len);
    if (!x->key) {
        free(x);
        return NULL;
    }
    memcpy(x->key, key, key_len);
    x->key_len = key_len;
    x->policy = policy;
    x->limit = limit;
    x->digest = d;
    x->win = win;
    x->next = f->map[b];
    f->map[b] = x;
    f->map_count++;
    return x;
}

static uint64_t window_end(const tally__limit *l, uint64_t win)
{
    switch (l->spec.algo) {
    case TALLY_CALENDAR_WINDOW:
        return tally__calendar_next(l->spec.unit, l->spec.utc_offset_s, win);
    case TALLY_SLIDING_WINDOW:       /* it still counts, weighted, as the previous window */
        return win + 2 * l->spec.period_ns;
    default:
        return win + l->spec.period_ns;
    }
}

/* Keep a taken delta; on failure put it back on the stack (never drop it). */
static void keep(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                 uint64_t win, uint64_t delta, uint64_t local_total, const void *key, size_t key_len)
{
    entry *x = map_get(f, policy, limit, d, win, key, key_len);
    if (!x) {
        tally__spill(&f->e->notes, policy, limit, d, win, delta, key, key_len);
        return;
    }
    tally__policy *p = tally__policy_get(f->e, policy);
    tally__ops_usage_add(p, limit, delta);
    x->fresh += delta;
    if (local_total > x->local_total)
        x->local_total = local_total;
    x->end_ns = window_end(&p->limits[limit], win);
}

/* ---- Collecting ----------------------------------------------------------- */

typedef struct collect_arg {
    struct tally__flusher *f;
    tally__policy         *p;
    size_t                 from, to;
    uint64_t               now;
    bool                   refresh;   /* Redis is on: note live keys to read back */
} collect_arg;

/* The window every engine agrees on at @now and the one before it, or false
   when the limit's windows are this engine's own (GCRA, fixed windows not
   TALLY_ALIGNED). */
static bool shared_window(const tally__limit *l, uint64_t now, uint64_t *win, uint64_t *prev)
{
    const tally_limit *s = &l->spec;
    switch (s->algo) {
    case TALLY_CALENDAR_WINDOW:
        *win = tally__calendar_start(s->unit, s->utc_offset_s, now);
        *prev = tally__calendar_start(s->unit, s->utc_offset_s, *win ? *win - 1 : 0);
        return true;
    case TALLY_SLIDING_WINDOW:
    case TALLY_FIXED_WINDOW:
        *win = now - now % s->period_ns;
        *prev = *win >= s->period_ns ? *win - s->period_ns : 0;
        return s->algo == TALLY_SLIDING_WINDOW || l->aligned;
    default:
        return false;
    }
}

static void note_refresh(struct tally__flusher *f, uint32_t policy, unsigned limit,
                         tally__digest d, uint64_t win)
{
    if (f->refresh_n == f->refresh_cap) {
        size_t cap = f->refresh_cap ? 2 * f->refresh_cap : 1024;
        refresh *r = realloc(f->refresh, cap * sizeof(*r));
        if (!r)
            return;                           /* the key's view stays one flush older */
        f->refresh = r;
        f->refresh_cap = cap;
    }
    f->refresh[f->refresh_n++] = (refresh){ policy, limit, d, win };
}

/* Keys of slot @s hit in the current shared window or the one before: their
   count in the current window is read back (guarantee 7). */
static void collect_refresh(collect_arg *a, tally__slot *s, tally__digest d)
{
    tally__table *t = &a->p->table;
    for (unsigned l = 0; l < t->n_limits; l++) {
        uint64_t win, prev;
        if (!shared_window(&t->limits[l], a->now, &win, &prev))
            continue;
        tally__state st = tally__state_load_atomic(&s->st[l]);
        if (tally__state_is_empty(st) || tally__state_is_dead(st))
            continue;
        tally_counter c;
        tally__algo_counter(&t->limits[l], st, a->now, &c);
        if (c.window_start_ns == win || c.window_start_ns == prev)
            note_refresh(a->f, t->policy, l, d, win);
    }
}

/* Take the deltas of slots [from, to) of one table (inside a read-side section). */
static void collect_range(void *arg)
{
    collect_arg *a = arg;
    tally__table *t = &a->p->table;
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    if (!y)
        return;
    for (size_t i = a->from; i < a->to; i++) {
        tally__sync *ys = &y[i * t->n_limits];
        bool any = false;
        for (unsigned l = 0; l < t->n_limits; l++)
            any |= __atomic_load_n(&ys[l].delta, __ATOMIC_RELAXED) != 0;
        if (!any && !a->refresh)
            continue;
        tally__slot *s = (tally__slot *)(t->mem + i * t->stride);
        uint64_t hi = __atomic_load_n(&s->d_hi, __ATOMIC_ACQUIRE);
        if ((hi >> TALLY__STATUS_SHIFT) != TALLY__LIVE)
            continue;                         /* being reclaimed: the reclaim spills it */
        tally__digest d = { __atomic_load_n(&s->d_lo, __ATOMIC_ACQUIRE), hi & TALLY__DIGEST_HI_MASK };
        if (a->refresh)
            collect_refresh(a, s, d);
        if (!any)
            continue;
        const size_t *kp = t->keys ? __atomic_load_n(&t->keys[i], __ATOMIC_ACQUIRE) : NULL;
        tally__tsan_acquire(kp);
        for (unsigned l = 0; l < t->n_limits; l++) {
            tally__state *pair = (tally__state *)&ys[l].win;
            tally__state cur = tally__state_load(pair);
            if (!cur.w1)
                continue;
            /* the local count first, so that it never includes more than we take */
            tally_counter c;
            tally__algo_counter(&t->limits[l], tally__state_load_atomic(&s->st[l]), cur.w0, &c);
            while (!tally__state_cas(pair, cur, (tally__state){ cur.w0, 0 })) {
                cur = tally__state_load(pair);
                if (!cur.w1)
                    break;
            }
            if (cur.w1)
                keep(a->f, t->policy, l, d, cur.w0, cur.w1,
                     c.window_start_ns == cur.w0 ? c.used : 0,
                     kp ? (const void *)(kp + 1) : NULL, kp ? *kp : 0);
        }
        tally__tsan_release(kp);
    }
}

static void collect(struct tally__flusher *f)
{
    tally_engine *e = f->e;

    /* spilled deltas and events first */
    for (tally__note *n = tally__notes_take(&e->notes), *next; n; n = next) {
        next = n->next;
        if (n->kind != TALLY__NOTE_DELTA) {
            /* events, flags and flag clearings, delivered or stored in order */
            event *ev = malloc(sizeof(*ev));
            if (ev) {
                ev->note = n;
                ev->next = NULL;
                *f->events_tail = ev;
                f->events_tail = &ev->next;
            } else {
                free(n);
            }
            continue;
        }
        keep(f, n->policy, n->limit, n->digest, n->win, n->delta, 0, n->key, n->key_len);
        free(n);
    }
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    uint64_t now = tally_now_ns();
    f->refresh_n = 0;
    for (uint32_t id = 0; id < np; id++) {
        collect_arg a = { .f = f, .p = tally__policy_get(e, id), .now = now, .refresh = f->redis_on };
        /* short read-side sections: a reclaim waiting for a grace period is not held up long */
        for (a.from = 0; a.from < a.p->table.n_slots; a.from = a.to) {
            a.to = a.from + 4096 < a.p->table.n_slots ? a.from + 4096 : a.p->table.n_slots;
            tally__rcu_read(collect_range, &a);
        }
    }
}

/* ---- Redis ---------------------------------------------------------------- */

/*
 * One batch. The token's SET NX is the only command whose error stops the
 * script, and it comes before any write. After it nothing can stop the
 * script half-way: each INCRBY runs under pcall, and a key Redis refused
 * (WRONGTYPE, overflow, an ACL) is answered with its error in its place and
 * listed in the token, so that a resend of the batch (its reply was lost)
 * answers that key with an error again rather than with a total that does
 * not hold its cost.
 */
static const char LUA_BATCH[] =
    "local out = {}\n"
    "if redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[1]) then\n"
    "  local failed = {}\n"
    "  for i = 2, #KEYS do\n"
    "    local r = redis.pcall('INCRBY', KEYS[i], ARGV[2 * i - 2])\n"
    "    out[i - 1] = r\n"
    "    if type(r) == 'table' then\n"
    "      failed[#failed + 1] = i\n"
    "    else\n"
    "      redis.pcall('PEXPIRE', KEYS[i], ARGV[2 * i - 1], 'NX')\n"
    "    end\n"
    "  end\n"
    "  if #failed > 0 then\n"
    "    redis.pcall('SET', KEYS[1], table.concat(failed, ','), 'KEEPTTL')\n"
    "  end\n"
    "else\n"
    "  local failed = {}\n"
    "  for i in string.gmatch(redis.call('GET', KEYS[1]) or '', '%d+') do\n"
    "    failed[tonumber(i)] = true\n"
    "  end\n"
    "  for i = 2, #KEYS do\n"
    "    if failed[i] then\n"
    "      out[i - 1] = redis.error_reply('REFUSED by Redis when the batch first ran')\n"
    "    else\n"
    "      local v = redis.pcall('GET', KEYS[i])\n"
    "      out[i - 1] = type(v) == 'string' and tonumber(v) or 0\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

static struct timeval ms_tv(uint32_t ms)
{
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };
    return tv;
}

/* Keep @text as the sink's last error (tally_flusher_last_error()). */
static void set_error(struct tally__flusher *f, const char *text, size_t len)
{
    if (len >= ERRSTR_LEN)
        len = ERRSTR_LEN - 1;
    pthread_mutex_lock(&f->err_lock);
    memcpy(f->errstr, text, len);
    f->errstr[len] = 0;
    f->errlen = len;
    pthread_mutex_unlock(&f->err_lock);
}

enum {
    REPLY_OK,          /* applied (now, or by an earlier send of the same batch) */
    REPLY_PARTLY,      /* applied but for keys Redis refused: those went back to their entries */
    REPLY_REFUSED,     /* refused before it ran */
    REPLY_UNKNOWN      /* may or may not have run */
};

static bool code_is(const char *str, size_t len, const char *code)
{
    size_t n = strlen(code);
    return len >= n && memcmp(str, code, n) == 0 && (len == n || str[n] == ' ');
}

/*
 * An error reply: count it, keep its text, and tell whether Redis refused the
 * command before it changed anything. These codes are raised before a command
 * runs or, in a script, by its first write (Redis denies OOM and READONLY at
 * the first write only, so a script never stops half-way for them). Any other
 * error may come from inside the script after it wrote: its outcome is unknown.
 */
static int refused_unapplied(struct tally__flusher *f, const redisReply *r)
{
    static const char *const transient[] = {
        "BUSY", "LOADING", "OOM", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY",
        "NOREPLICAS", "MISCONF",
    };
    static const char *const permanent[] = {
        "MOVED", "ASK", "CROSSSLOT", "NOAUTH", "WRONGPASS", "NOPERM",
    };
    const char *str = r->str ? r->str : "";
    size_t len = r->str ? r->len : 0;
    set_error(f, str, len);
    atomic_fetch_add_explicit(&f->e->redis_errors, 1, memory_order_relaxed);
    for (size_t i = 0; i < sizeof(transient) / sizeof(transient[0]); i++)
        if (code_is(str, len, transient[i]))
            return REPLY_REFUSED;
    atomic_fetch_add_explicit(&f->e->redis_permanent_errors, 1, memory_order_relaxed);
    for (size_t i = 0; i < sizeof(permanent) / sizeof(permanent[0]); i++)
        if (code_is(str, len, permanent[i]))
            return REPLY_REFUSED;
    return REPLY_UNKNOWN;
}

static void redis_drop(struct tally__flusher *f)
{
    if (f->rc)
        redisFree(f->rc);
    f->rc = NULL;
}

/* One command, for AUTH and SELECT: true when the reply is not an error. */
static bool redis_simple(struct tally__flusher *f, redisContext *c, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    bool ok = r && r->type != REDIS_REPLY_ERROR;
    if (r && !ok)
        refused_unapplied(f, r);
    else if (!r)
        set_error(f, c->errstr, strlen(c->errstr));
    if (r)
        freeReplyObject(r);
    return ok;
}

static bool redis_ready(struct tally__flusher *f)
{
    if (f->rc)
        return true;
    uint64_t now = tally_now_ns();
    if (now < f->next_connect_ns)
        return false;
    struct timeval ct = ms_tv(f->ro.connect_timeout_ms);
    redisContext *c = f->unix_path ? redisConnectUnixWithTimeout(f->unix_path, ct)
                                   : redisConnectWithTimeout(f->host, f->ro.port, ct);
    bool ok = c && !c->err && redisSetTimeout(c, ms_tv(f->ro.command_timeout_ms)) == REDIS_OK;
    if (!ok) {
        const char *why = c ? c->errstr : "cannot allocate a Redis context";
        set_error(f, why, strlen(why));
    }
    if (ok && f->password) {
        const char *argv[] = { "AUTH", f->password };
        ok = redis_simple(f, c, 2, argv);
    }
    if (ok && f->ro.db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", f->ro.db);
        const char *argv[] = { "SELECT", db };
        ok = redis_simple(f, c, 2, argv);
    }
    if (!ok) {
        if (c)
            redisFree(c);
        f->backoff_ms = f->backoff_ms ? f->backoff_ms * 2 : BACKOFF_MIN_MS;
        if (f->backoff_ms > BACKOFF_MAX_MS)
            f->backoff_ms = BACKOFF_MAX_MS;
        f->next_connect_ns = now + (uint64_t)f->backoff_ms * 1000000u;
        return false;
    }
    if (f->ever_connected)
        atomic_fetch_add_explicit(&f->e->redis_reconnects, 1, memory_order_relaxed);
    f->ever_connected = true;
    f->backoff_ms = 0;
    f->rc = c;
    return true;
}

/* "<prefix><policy>:<limit>:<32 hex digest>:<window start ns>" */
static int count_key(struct tally__flusher *f, const entry *x, char *buf, size_t len)
{
    tally__policy *p = tally__policy_get(f->e, x->policy);
    return snprintf(buf, len, "%s%s:%u:%016" PRIx64 "%016" PRIx64 ":%" PRIu64, f->prefix, p->name,
                    x->limit, x->digest.hi, x->digest.lo, x->win);
}

static int append_batch(struct tally__flusher *f, batch *b)
{
    size_t argc = 5 + 3 * b->n;       /* EVAL script numkeys token keys... ttl (delta ttl)... */
    const char **argv = malloc(argc * sizeof(*argv));
    size_t *argl = malloc(argc * sizeof(*argl));
    char *text = malloc((b->n + 1) * 640 + 2 * b->n * 24 + 64);
    int rc = TALLY_ENOMEM;
    if (!argv || !argl || !text)
        goto out;
    char *w = text;
    size_t k = 0;
    char nkeys[24];
    argv[k] = "EVAL"; argl[k++] = 4;
    argv[k] = LUA_BATCH; argl[k++] = sizeof(LUA_BATCH) - 1;
    snprintf(nkeys, sizeof(nkeys), "%zu", b->n + 1);
    argv[k] = nkeys; argl[k++] = strlen(nkeys);
    int n = snprintf(w, 640, "%stoken:%016" PRIx64 ":%" PRIu64, f->prefix, f->instance, b->token);
    argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    for (size_t i = 0; i < b->n; i++) {
        n = count_key(f, b->items[i].e, w, 640);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    }
    argv[k] = TOKEN_TTL_MS; argl[k++] = strlen(TOKEN_TTL_MS);
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < b->n; i++) {
        entry *x = b->items[i].e;
        n = snprintf(w, 24, "%" PRIu64, b->items[i].delta);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
        uint64_t ttl = (x->end_ns > now ? (x->end_ns - now) / 1000000u : 0) + TTL_SLACK_MS;
        n = snprintf(w, 24, "%" PRIu64, ttl);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    }
    rc = redisAppendCommandArgv(f->rc, (int)k, argv, argl) == REDIS_OK ? 0 : TALLY_EIO;
    if (!rc)
        b->sends++;
out:
    free(argv);
    free(argl);
    free(text);
    return rc;
}

/* Write the other engines' count of an entry's key into its slot. */
typedef struct remote_arg {
    struct tally__flusher *f;
    entry                 *x;
    uint64_t               others;
} remote_arg;

static void store_remote(void *arg)
{
    remote_arg *a = arg;
    tally__policy *p = tally__policy_get(a->f->e, a->x->policy);
    tally__table *t = &p->table;
    tally__sync *y = atomic_load_explicit(&t->sync, memory_order_acquire);
    tally__slot *s = y ? tally__table_find(t, a->x->digest) : NULL;
    if (!s)
        return;
    tally__sync *ys = &y[tally__slot_index(t, s) * t->n_limits + a->x->limit];
    uint64_t rwin = __atomic_load_n(&ys->rwin, __ATOMIC_RELAXED);
    if (rwin > a->x->win + 1)
        return;                               /* it already knows a later window */
    /* seqlock write: invalidate, write the count, publish the window */
    __atomic_store_n(&ys->rwin, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&ys->remote, a->others, __ATOMIC_RELAXED);
    __atomic_store_n(&ys->rwin, a->x->win + 1, __ATOMIC_RELEASE);
}

static void deliver_deltas(struct tally__flusher *f, const item *items, const uint64_t *totals,
                           size_t n)
{
    if (!f->o.on_deltas || n == 0)
        return;
    if (f->cb_cap < n) {
        tally_delta *cb = realloc(f->cb, n * sizeof(*cb));
        if (!cb)
            return;
        f->cb = cb;
        f->cb_cap = n;
    }
    for (size_t i = 0; i < n; i++) {
        const entry *x = items[i].e;
        f->cb[i] = (tally_delta){ .policy = x->policy, .limit = x->limit, .key = x->key,
                                  .key_len = x->key_len, .window_start_ns = x->win,
                                  .delta = items[i].delta, .total = totals[i] };
    }
    f->o.on_deltas(f->o.ctx, f->cb, n);
}

/* Read a batch's reply: one of the REPLY_ values, or TALLY_EIO when the
   connection failed (no reply to read). */
static int read_batch(struct tally__flusher *f, batch *b)
{
    redisReply *r = NULL;
    if (redisGetReply(f->rc, (void **)&r) != REDIS_OK || !r) {
        set_error(f, f->rc->errstr, strlen(f->rc->errstr));
        return TALLY_EIO;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        int kind = refused_unapplied(f, r);
        freeReplyObject(r);
        return kind;
    }
    int rc = r->type == REDIS_REPLY_ARRAY && r->elements == b->n ? REPLY_OK : REPLY_UNKNOWN;
    uint64_t totals[CHUNK_KEYS];
    bool refused[CHUNK_KEYS];
    for (size_t i = 0; i < b->n && rc == REPLY_OK; i++) {
        redisReply *v = r->element[i];
        refused[i] = v->type == REDIS_REPLY_ERROR;
        if (refused[i])
            refused_unapplied(f, v);              /* the key's INCRBY did not run */
        else if (v->type != REDIS_REPLY_INTEGER || v->integer < 0)
            rc = REPLY_UNKNOWN;
        else
            totals[i] = (uint64_t)v->integer;
    }
    freeReplyObject(r);
    if (rc != REPLY_OK) {
        static const char shape[] = "unexpected reply to a batch script";
        set_error(f, shape, sizeof(shape) - 1);
        return rc;
    }
    size_t n = 0;
    for (size_t i = 0; i < b->n; i++) {
        entry *x = b->items[i].e;
        x->inflight--;
        if (refused[i]) {
            x->fresh += b->items[i].delta;        /* sent again, under a new token */
            rc = REPLY_REFUSED;
            continue;
        }
        x->acked += b->items[i].delta;
        x->acked_seq = f->seq;
        remote_arg a = { f, x, totals[i] > x->acked ? totals[i] - x->acked : 0 };
        tally__rcu_read(store_remote, &a);
        b->items[n] = b->items[i];
        totals[n++] = totals[i];
    }
    deliver_deltas(f, b->items, totals, n);
    return rc == REPLY_REFUSED ? REPLY_PARTLY : REPLY_OK;
}

/* A batch Redis refused unapplied: its deltas go back to their entries, to
   be merged with what comes next and sent under a new token. */
static void dissolve(batch *b)
{
    for (size_t i = 0; i < b->n; i++) {
        b->items[i].e->fresh += b->items[i].delta;
        b->items[i].e->inflight--;
    }
}

/* Form batches from the fresh cost of every entry, unless MAX_KEPT_BATCHES
   or more batches of unknown outcome wait (guarantee 6): the cost then stays
   merged in the entries. Every batch still listed was sent before. */
static int form_batches(struct tally__flusher *f)
{
    batch *b = NULL;
    size_t kept = 0;
    for (const batch *k = f->inflight_head; k; k = k->next)
        kept++;
    if (kept >= MAX_KEPT_BATCHES)
        return 0;
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry *x = f->map[i]; x; x = x->next) {
            if (!x->fresh)
                continue;
            if (!b) {
                b = calloc(1, sizeof(*b));
                if (!b)
                    return TALLY_ENOMEM;
                b->token = ++f->next_token;
                *f->inflight_tail = b;
                f->inflight_tail = &b->next;
            }
            b->items[b->n++] = (item){ x, x->fresh };
            x->fresh = 0;
            x->inflight++;
            if (b->n == CHUNK_KEYS)
                b = NULL;
        }
    }
    return 0;
}

static void deliver_note(struct tally__flusher *f, const tally__note *n)
{
    tally__policy *p = tally__policy_get(f->e, n->policy);
    if (!p)
        return;
    if (n->kind == TALLY__NOTE_FLAG && f->o.on_flag) {
        tally_flag fl = { .key = n->key, .key_len = n->key_len, .flagged_at_ns = n->win,
                          .denied = n->delta };
        f->o.on_flag(f->o.ctx, n->policy, &fl);
    } else if (n->kind == TALLY__NOTE_EVENT && f->o.on_event) {
        tally_event ev = { .policy = n->policy, .limit = n->limit, .key = n->key,
                           .key_len = n->key_len, .window_start_ns = n->win, .used = n->delta,
                           .max = p->limits[n->limit].spec.max };
        f->o.on_event(f->o.ctx, &ev);
        atomic_fetch_add_explicit(&f->e->events_delivered, 1, memory_order_relaxed);
    }
}

/* "<prefix><policy>:flag:<32 hex digest>": a flag shared by every engine */
static int flag_key(struct tally__flusher *f, uint32_t policy, tally__digest d, char *buf, size_t len)
{
    tally__policy *p = tally__policy_get(f->e, policy);
    return snprintf(buf, len, "%s%s:flag:%016" PRIx64 "%016" PRIx64, f->prefix, p->name, d.hi, d.lo);
}

/* Events: "<count key>:notified" SET NX with the window's TTL. Flags: SET NX
   without TTL (an operator clears them); clearings: DEL. */
static int push_events_redis(struct tally__flusher *f)
{
    size_t sent = 0;
    for (event *ev = f->events; ev; ev = ev->next) {
        const tally__note *n = ev->note;
        tally__policy *p = tally__policy_get(f->e, n->policy);
        char key[700], val[48], ttl[24];
        int len, rc;
        if (n->kind == TALLY__NOTE_EVENT) {
            entry tmp = { .policy = n->policy, .limit = n->limit, .digest = n->digest, .win = n->win };
            len = count_key(f, &tmp, key, sizeof(key) - 16);
            len += snprintf(key + len, sizeof(key) - (size_t)len, ":notified");
            uint64_t end = window_end(&p->limits[n->limit], n->win), now = tally_now_ns();
            if (p->limits[n->limit].spec.algo == TALLY_GCRA)
                end = now + p->limits[n->limit].spec.period_ns;
            snprintf(ttl, sizeof(ttl), "%" PRIu64, (end > now ? (end - now) / 1000000u : 0) + 1);
            const char *argv[] = { "SET", key, "1", "NX", "PX", ttl };
            size_t argl[] = { 3, (size_t)len, 1, 2, 2, strlen(ttl) };
            rc = redisAppendCommandArgv(f->rc, 6, argv, argl);
        } else if (n->kind == TALLY__NOTE_FLAG) {
            len = flag_key(f, n->policy, n->digest, key, sizeof(key));
            int vl = snprintf(val, sizeof(val), "%" PRIu64 ":%" PRIu64, n->win, n->delta);
            const char *argv[] = { "SET", key, val, "NX" };
            size_t argl[] = { 3, (size_t)len, (size_t)vl, 2 };
            rc = redisAppendCommandArgv(f->rc, 4, argv, argl);
        } else {
            len = flag_key(f, n->policy, n->digest, key, sizeof(key));
            const char *argv[] = { "DEL", key };
            size_t argl[] = { 3, (size_t)len };
            rc = redisAppendCommandArgv(f->rc, 2, argv, argl);
        }
        if (rc != REDIS_OK)
            return TALLY_EIO;
        sent++;
    }
    return (int)sent;
}

static int read_events_redis(struct tally__flusher *f, size_t sent)
{
    event **pp = &f->events;
    int rc = 0;
    for (size_t i = 0; i < sent && *pp; i++) {
        redisReply *r = NULL;
        if (redisGetReply(f->rc, (void **)&r) != REDIS_OK || !r) {
            set_error(f, f->rc->errstr, strlen(f->rc->errstr));
            return TALLY_EIO;
        }
        event *ev = *pp;
        if (r->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, r);
            rc = TALLY_EIO;                   /* keep it for the next flush */
            pp = &ev->next;
        } else {
            if (r->type == REDIS_REPLY_STATUS)
                deliver_note(f, ev->note);    /* OK: this process is the first to tell */
            *pp = ev->next;
            free(ev->note);
            free(ev);
        }
        freeReplyObject(r);
    }
    f->events_tail = pp;
    while (*f->events_tail)
        f->events_tail = &(*f->events_tail)->next;
    return rc;
}

/* Flags other engines stored: GET the flag of every watched key pushed now. */
static void import_flags(struct tally__flusher *f, const batch *first)
{
    size_t asked = 0;
    for (const batch *b = first; b; b = b->next)
        for (size_t i = 0; i < b->n; i++) {
            const entry *x = b->items[i].e;
            tally__policy *p = tally__policy_get(f->e, x->policy);
            if (x->limit != 0 || !atomic_load_explicit(&p->table.watch, memory_order_acquire))
                continue;
            char key[700];
            int len = flag_key(f, x->policy, x->digest, key, sizeof(key));
            const char *argv[] = { "GET", key };
            size_t argl[] = { 3, (size_t)len };
            if (redisAppendCommandArgv(f->rc, 2, argv, argl) != REDIS_OK)
                return;
            asked++;
        }
    for (const batch *b = first; b && asked; b = b->next)
        for (size_t i = 0; i < b->n && asked; i++) {
            const entry *x = b->items[i].e;
            tally__policy *p = tally__policy_get(f->e, x->policy);
            if (x->limit != 0 || !atomic_load_explicit(&p->table.watch, memory_order_acquire))
                continue;
            redisReply *r = NULL;
            asked--;
            if (redisGetReply(f->rc, (void **)&r) != REDIS_OK || !r) {
                redis_drop(f);
                return;
            }
            uint64_t at, amount;
            if (r->type == REDIS_REPLY_STRING && sscanf(r->str, "%" SCNu64 ":%" SCNu64, &at, &amount) == 2)
                tally__watch_import(f->e, x->policy, x->digest, at, amount);
            freeReplyObject(r);
        }
}

static bool has_fresh(const struct tally__flusher *f)
{
    for (size_t i = 0; i < f->map_size; i++)
        for (const entry *x = f->map[i]; x; x = x->next)
            if (x->fresh)
                return true;
    return false;
}

/* Read the global count of each noted live key (guarantee 7): one MGET per
   CHUNK_KEYS keys, pipelined. Appends only; read_refresh() reads. */
static int send_refresh(struct tally__flusher *f)
{
    size_t chunks = 0;
    for (size_t from = 0; from < f->refresh_n; from += CHUNK_KEYS, chunks++) {
        size_t n = f->refresh_n - from < CHUNK_KEYS ? f->refresh_n - from : CHUNK_KEYS;
        const char **argv = malloc((n + 1) * sizeof(*argv));
        size_t *argl = malloc((n + 1) * sizeof(*argl));
        char *text = malloc(n * 640);
        int rc = argv && argl && text ? REDIS_OK : REDIS_ERR;
        if (rc == REDIS_OK) {
            argv[0] = "MGET";
            argl[0] = 4;
            for (size_t i = 0; i < n; i++) {
                const refresh *q = &f->refresh[from + i];
                entry tmp = { .policy = q->policy, .limit = q->limit, .digest = q->digest, .win = q->win };
                argv[i + 1] = text + i * 640;
                argl[i + 1] = (size_t)count_key(f, &tmp, text + i * 640, 640);
            }
            rc = redisAppendCommandArgv(f->rc, (int)n + 1, argv, argl);
        }
        free(argv);
        free(argl);
        free(text);
        if (rc != REDIS_OK)
            return -1;
    }
    return (int)chunks;
}

static int read_refresh(struct tally__flusher *f, size_t chunks)
{
    int rc = 0;
    for (size_t c = 0; c < chunks; c++) {
        redisReply *r = NULL;
        if (redisGetReply(f->rc, (void **)&r) != REDIS_OK || !r) {
            set_error(f, f->rc->errstr, strlen(f->rc->errstr));
            return TALLY_EIO;
        }
        size_t from = c * CHUNK_KEYS;
        size_t n = f->refresh_n - from < CHUNK_KEYS ? f->refresh_n - from : CHUNK_KEYS;
        if (r->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, r);
            rc = TALLY_EIO;
        } else if (r->type == REDIS_REPLY_ARRAY && r->elements == n) {
            for (size_t i = 0; i < n; i++) {
                const refresh *q = &f->refresh[from + i];
                redisReply *v = r->element[i];
                if (v->type != REDIS_REPLY_STRING)
                    continue;                 /* nil: nobody counted in this window yet */
                uint64_t total = strtoull(v->str, NULL, 10);
                entry *x = map_find(f, q->policy, q->limit, q->digest, q->win);
                /* a batch of unknown outcome may be in the total or not: wait
                   for its reply; a reply of this flush already told the total */
                if (x && (x->inflight || x->acked_seq == f->seq))
                    continue;
                uint64_t mine = x ? x->acked : 0;
                entry tmp = { .policy = q->policy, .limit = q->limit, .digest = q->digest, .win = q->win };
                remote_arg a = { f, &tmp, total > mine ? total - mine : 0 };
                if (a.others)
                    tally__rcu_read(store_remote, &a);
            }
        } else {
            rc = TALLY_EIO;
        }
        freeReplyObject(r);
    }
    return rc;
}

/* Push everything in flight to Redis in one pipeline, then read the global
   counts of the live keys back. */
static int push_redis(struct tally__flusher *f)
{
    if (!redis_ready(f))
        return TALLY_EIO;
    batch **fresh = f->inflight_tail;          /* batches formed now start here */
    int rc = form_batches(f);
    if (!rc && *fresh) {
        import_flags(f, *fresh);
        if (!f->rc)
            return TALLY_EIO;
    }
    size_t nb = 0;
    for (batch *b = f->inflight_head; b && !rc; b = b->next, nb++)
        rc = append_batch(f, b);
    int sent = rc ? 0 : push_events_redis(f);
    if (sent < 0)
        rc = sent;
    int chunks = rc ? 0 : send_refresh(f);
    if (chunks < 0)
        rc = TALLY_EIO;
    /* with nothing to send, a PING: a flush counts as good only if Redis answered */
    bool ping = !rc && nb == 0 && sent == 0 && chunks == 0;
    if (ping && redisAppendCommand(f->rc, "PING") != REDIS_OK)
        rc = TALLY_EIO;
    if (rc) {
        redis_drop(f);
        return rc;
    }
    if (ping) {
        redisReply *r = NULL;
        rc = redisGetReply(f->rc, (void **)&r) == REDIS_OK && r && r->type != REDIS_REPLY_ERROR
            ? 0 : TALLY_EIO;
        if (r && r->type == REDIS_REPLY_ERROR)
            refused_unapplied(f, r);
        else if (!r)
            set_error(f, f->rc->errstr, strlen(f->rc->errstr));
        if (r)
            freeReplyObject(r);
        if (rc)
            redis_drop(f);
        return rc;
    }
    /* each reply answers the batch at its place in the pipeline (guarantee 6) */
    batch **pp = &f->inflight_head;
    while (nb-- > 0) {
        batch *b = *pp;
        int r = read_batch(f, b);
        if (r == TALLY_EIO) {                  /* the connection is gone: resend the rest */
            redis_drop(f);
            return TALLY_EIO;
        }
        /* A refusal proves only that this send did not run: a batch sent
           before may have run then, so it keeps its token. */
        if (r == REPLY_UNKNOWN || (r == REPLY_REFUSED && b->sends > 1)) {
            rc = TALLY_EIO;                    /* kept as it is, token and all */
            pp = &b->next;
            continue;
        }
        if (r == REPLY_REFUSED)
            dissolve(b);
        if (r != REPLY_OK)
            rc = TALLY_EIO;
        *pp = b->next;
        free(b);
    }
    f->inflight_tail = pp;
    while (*f->inflight_tail)
        f->inflight_tail = &(*f->inflight_tail)->next;
    int er = read_events_redis(f, (size_t)sent);
    if (er == TALLY_EIO && f->rc->err) {
        redis_drop(f);
        return TALLY_EIO;
    }
    /* the read-back only freshens the view: its failure is counted and kept
       as the last error, but every cost may still have been acknowledged */
    if (read_refresh(f, (size_t)chunks) && f->rc->err) {
        redis_drop(f);
        return TALLY_EIO;
    }
    /* cost held back while batches of unknown outcome waited is not in Redis yet */
    if (!rc && has_fresh(f))
        rc = TALLY_EIO;
    return rc ? rc : er;
}

/* Without Redis the callback is the only sink: hand it the fresh cost. */
static void push_callback_only(struct tally__flusher *f)
{
    item *items = NULL;
    uint64_t *totals = NULL;
    size_t n = 0, cap = 0;
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry *x = f->map[i]; x; x = x->next) {
            if (!x->fresh)
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 256;
                item *ni = realloc(items, cap * sizeof(*ni));
                uint64_t *nt = realloc(totals, cap * sizeof(*nt));
                if (ni)
                    items = ni;
                if (nt)
                    totals = nt;
                if (!ni || !nt)
                    goto out;                 /* the rest stays fresh for the next flush */
            }
            x->acked += x->fresh;
            items[n] = (item){ x, x->fresh };
            totals[n++] = x->local_total > x->acked ? x->local_total : x->acked;
            x->fresh = 0;
        }
    }
out:
    deliver_deltas(f, items, totals, n);
    free(items);
    free(totals);
    for (event *ev = f->events, *next; ev; ev = next) {
        next = ev->next;
        deliver_note(f, ev->note);
        free(ev->note);
        free(ev);
    }
    f->events = NULL;
    f->events_tail = &f->events;
}

/* Forget entries whose window ended and that hold nothing. */
static void prune(struct tally__flusher *f)
{
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < f->map_size; i++) {
        for (entry **pp = &f->map[i]; *pp;) {
            entry *x = *pp;
            if (!x->fresh && !x->inflight && x->end_ns <= now) {
                *pp = x->next;
                free(x->key);
                free(x);
                f->map_count--;
            } else {
                pp = &x->next;
            }
        }
    }
}

static void count_pending(struct tally__flusher *f)
{
    uint64_t d = 0, c = 0;
    for (size_t i = 0; i < f->map_size; i++)
        for (entry *x = f->map[i]; x; x = x->next)
            if (x->fresh) {
                d++;
                c += x->fresh;
            }
    for (batch *b = f->inflight_head; b; b = b->next)
        for (size_t i = 0; i < b->n; i++) {
            d++;
            c += b->items[i].delta;
        }
    atomic_store_explicit(&f->e->pending_deltas, d, memory_order_relaxed);
    atomic_store_explicit(&f->e->pending_cost, c, memory_order_relaxed);
}

/* One flush. Return 0 when nothing taken is left unacknowledged. */
static int flush_once(struct tally__flusher *f)
{
    uint64_t start = f->last_flush_ns ? f->last_flush_ns : tally_now_ns();
    f->seq++;
    collect(f);
    uint64_t now = tally_now_ns();
    tally__ops_flush(f->e, now);
    tally__ops_usage_emit(f->e, start, now, f->o.on_usage, f->o.ctx);
    f->last_flush_ns = now;
    int rc = 0;
    bool had = f->inflight_head != NULL || f->events != NULL;
    for (size_t i = 0; i < f->map_size && !had; i++)
        for (entry *x = f->map[i]; x && !had; x = x->next)
            had = x->fresh != 0;
    if (f->redis_on)
        rc = push_redis(f);
    else
        push_callback_only(f);
    prune(f);
    count_pending(f);
    tally_engine *e = f->e;
    if (had) {
        atomic_fetch_add_explicit(&e->flush_batches, 1, memory_order_relaxed);
        if (rc)
            atomic_fetch_add_explicit(&e->flush_failures, 1, memory_order_relaxed);
    }
    if (!rc)
        atomic_store_explicit(&e->last_flush_ok_ns, tally_now_ns(), memory_order_relaxed);
    return rc;
}

/* ---- The thread ----------------------------------------------------------- */

static void *flusher_main(void *arg)
{
    struct tally__flusher *f = arg;

    /* A write to a connection Redis closed must fail with EPIPE here, not
       kill the process: block SIGPIPE in this thread (hiredis 0.14 writes
       with write(2), which cannot be told MSG_NOSIGNAL). */
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, NULL);
    if (f->o.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(f->o.cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    pthread_mutex_lock(&f->lock);
    for (;;) {
        if (!f->stop && f->requested == f->done) {
            struct timespec until = tally__deadline((uint64_t)f->o.interval_ms * TALLY__NS_PER_MS);
            pthread_cond_timedwait(&f->cond, &f->lock, &until);
        }
        bool stop = f->stop;
        uint64_t gen = f->requested;
        pthread_mutex_unlock(&f->lock);
        int rc = flush_once(f);
        pthread_mutex_lock(&f->lock);
        if (gen > f->done) {
            f->done = gen;
            f->done_rc = rc;
            pthread_cond_broadcast(&f->cond);
        }
        if (stop)
            break;
    }
    f->done_rc = flush_once(f) ? TALLY_EIO : 0;   /* the last word: what stop returns */
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

void tally_flusher_options_init(tally_flusher_options *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->interval_ms = 1000;
    o->cpu = -1;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static void flusher_free(struct tally__flusher *f)
{
    redis_drop(f);
    for (size_t i = 0; i < f->map_size; i++)
        for (entry *x = f->map[i], *next; x; x = next) {
            next = x->next;
            free(x->key);
            free(x);
        }
    free(f->map);
    for (batch *b = f->inflight_head, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    for (event *ev = f->events, *next; ev; ev = next) {
        next = ev->next;
        free(ev->note);
        free(ev);
    }
    free(f->cb);
    free(f->refresh);
    free(f->host);
    free(f->unix_path);
    free(f->password);
    free(f->prefix);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->err_lock);
    free(f);
}

static int check_options(const tally_flusher_options *o)
{
    if (o->interval_ms == 0 || o->cpu < -1 || o->cpu >= CPU_SETSIZE)
        return TALLY_EINVAL;
    const tally_redis_options *r = o->redis;
    if (!r)
        return 0;
    if (!r->unix_path && (!r->host || !r->host[0] || r->port <= 0 || r->port > 65535))
        return TALLY_EINVAL;
    if (r->unix_path && !r->unix_path[0])
        return TALLY_EINVAL;
    if (r->db < 0 || (r->key_prefix && strlen(r->key_prefix) > 256))
        return TALLY_EINVAL;
    return 0;
}

int tally_flusher_start(tally_engine *e, const tally_flusher_options *o)
{
    if (!e || !o)
        return TALLY_EINVAL;
    int rc = check_options(o);
    if (rc)
        return rc;
    struct tally__flusher *f = calloc(1, sizeof(*f));
    if (!f)
        return TALLY_ENOMEM;
    f->e = e;
    f->o = *o;
    f->inflight_tail = &f->inflight_head;
    f->events_tail = &f->events;
    pthread_mutex_init(&f->lock, NULL);
    if (tally__cond_init_mono(&f->cond)) {
        pthread_mutex_destroy(&f->lock);
        free(f);
        return TALLY_ENOMEM;
    }
    pthread_mutex_init(&f->err_lock, NULL);
    if (o->redis) {
        f->ro = *o->redis;
        f->redis_on = true;
        f->host = dup_or_null(o->redis->host);
        f->unix_path = dup_or_null(o->redis->unix_path);
        f->password = dup_or_null(o->redis->password);
        f->prefix = strdup(o->redis->key_prefix ? o->redis->key_prefix : "tally:");
        if (!f->ro.connect_timeout_ms)
            f->ro.connect_timeout_ms = 1000;
        if (!f->ro.command_timeout_ms)
            f->ro.command_timeout_ms = 1000;
        if ((o->redis->host && !f->host) || (o->redis->unix_path && !f->unix_path)
            || (o->redis->password && !f->password) || !f->prefix) {
            flusher_free(f);
            return TALLY_ENOMEM;
        }
    }
    uint8_t rnd[8];
    if (getrandom(rnd, sizeof(rnd), 0) == (ssize_t)sizeof(rnd))
        memcpy(&f->instance, rnd, sizeof(rnd));
    f->instance ^= tally_now_ns();

    pthread_mutex_lock(&e->add_lock);
    rc = e->flusher || atomic_load(&e->closing) ? TALLY_ESTATE : 0;
    uint32_t np = atomic_load(&e->n_policies);
    for (uint32_t i = 0; i < np && !rc; i++)
        rc = tally__table_sync_alloc(&atomic_load(&e->policies[i])->table);
    if (!rc) {
        atomic_store(&e->last_flush_ok_ns, tally_now_ns());
        atomic_store(&e->fail_closed_ns, f->redis_on ? (uint64_t)o->fail_closed_after_ms * 1000000u : 0);
        atomic_store(&e->events_on, o->on_event != NULL);
        atomic_store(&e->syncing, true);
        if (pthread_create(&f->thread, NULL, flusher_main, f) != 0) {
            atomic_store(&e->syncing, false);
            atomic_store(&e->events_on, false);
            atomic_store(&e->fail_closed_ns, 0);
            rc = TALLY_ENOMEM;
        } else {
            e->flusher = f;
        }
    }
    pthread_mutex_unlock(&e->add_lock);
    if (rc)
        flusher_free(f);
    return rc;
}

int tally_flush(tally_engine *e, uint32_t timeout_ms)
{
    if (!e)
        return TALLY_EINVAL;
    pthread_mutex_lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    if (!f) {
        pthread_mutex_unlock(&e->add_lock);
        return TALLY_ESTATE;
    }
    pthread_mutex_lock(&f->lock);
    pthread_mutex_unlock(&e->add_lock);
    uint64_t gen = ++f->requested;
    pthread_cond_broadcast(&f->cond);
    struct timespec until = tally__deadline((uint64_t)timeout_ms * TALLY__NS_PER_MS);
    int rc = 0;
    while (f->done < gen && !f->stop && rc == 0)
        rc = pthread_cond_timedwait(&f->cond, &f->lock, &until);
    rc = f->done >= gen ? (f->done_rc ? TALLY_EIO : 0) : rc == ETIMEDOUT ? TALLY_ETIMEDOUT : TALLY_ESTATE;
    pthread_mutex_unlock(&f->lock);
    return rc;
}

int tally_flusher_stop(tally_engine *e)
{
    if (!e)
        return TALLY_EINVAL;
    pthread_mutex_lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    e->flusher = NULL;
    pthread_mutex_unlock(&e->add_lock);
    if (!f)
        return 0;
    pthread_mutex_lock(&f->lock);
    f->stop = true;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    pthread_join(f->thread, NULL);
    int rc = f->done_rc;
    atomic_store(&e->syncing, false);
    atomic_store(&e->events_on, false);
    atomic_store(&e->fail_closed_ns, 0);
    /* hits that saw syncing set finish before the last notes are freed */
    tally__rcu_wait();
    flusher_free(f);
    return rc;
}

/* ---- Statistics ----------------------------------------------------------- */

int tally_stats_read(tally_engine *e, tally_stats *out)
{
    if (!e || !out)
        return TALLY_EINVAL;
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < TALLY__STAT_SHARDS; i++) {
        out->hits += atomic_load_explicit(&e->stats[i].hits, memory_order_relaxed);
        out->denials += atomic_load_explicit(&e->stats[i].denials, memory_order_relaxed);
        out->shadow_denials += atomic_load_explicit(&e->stats[i].shadow_denials, memory_order_relaxed);
        out->full_refusals += atomic_load_explicit(&e->stats[i].full_refusals, memory_order_relaxed);
    }
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    for (uint32_t i = 0; i < np; i++)
        out->evictions += atomic_load_explicit(&tally__policy_get(e, i)->table.reclaimed, memory_order_relaxed);
    out->pending_deltas = atomic_load_explicit(&e->pending_deltas, memory_order_relaxed);
    out->pending_cost = atomic_load_explicit(&e->pending_cost, memory_order_relaxed);
    out->flush_batches = atomic_load_explicit(&e->flush_batches, memory_order_relaxed);
    out->flush_failures = atomic_load_explicit(&e->flush_failures, memory_order_relaxed);
    out->redis_reconnects = atomic_load_explicit(&e->redis_reconnects, memory_order_relaxed);
    out->last_flush_ok_ns = atomic_load_explicit(&e->last_flush_ok_ns, memory_order_relaxed);
    out->events = atomic_load_explicit(&e->events_delivered, memory_order_relaxed);
    out->lost_cost = atomic_load_explicit(&e->notes.lost, memory_order_relaxed);
    out->redis_errors = atomic_load_explicit(&e->redis_errors, memory_order_relaxed);
    out->redis_permanent_errors = atomic_load_explicit(&e->redis_permanent_errors, memory_order_relaxed);
    return 0;
}

int tally_flusher_last_error(tally_engine *e, char *buf, size_t len)
{
    if (!e || (!buf && len))
        return TALLY_EINVAL;
    size_t n = 0;
    /* under add_lock the flusher cannot be freed (tally_flusher_stop) */
    pthread_mutex_lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    if (f) {
        pthread_mutex_lock(&f->err_lock);
        n = f->errlen;
        if (len) {
            size_t k = n < len - 1 ? n : len - 1;
            memcpy(buf, f->errstr, k);
            buf[k] = 0;
        }
        pthread_mutex_unlock(&f->err_lock);
    } else if (len) {
        buf[0] = 0;
    }
    pthread_mutex_unlock(&e->add_lock);
    return (int)n;
}

int tally_stats_prometheus(tally_engine *e, char *buf, size_t len)
{
    tally_stats s;
    if (!buf && len)
        return TALLY_EINVAL;
    if (tally_stats_read(e, &s))
        return TALLY_EINVAL;
    static const struct { const char *name, *type, *help; size_t off; } m[] = {
#define M(field, type, help) { "tally_" #field, type, help, offsetof(tally_stats, field) }
        M(hits, "counter", "Hits decided."),
        M(denials, "counter", "Hits denied."),
        M(shadow_denials, "counter", "Hits a shadow-mode policy would have denied."),
        M(evictions, "counter", "Slots reclaimed from keys whose windows expired."),
        M(full_refusals, "counter", "Hits refused with TALLY_EFULL."),
        M(pending_deltas, "gauge", "Deltas not yet acknowledged by every sink."),
        M(pending_cost, "gauge", "Cost of the deltas not yet acknowledged."),
        M(flush_batches, "counter", "Flushes that pushed deltas or events."),
        M(flush_failures, "counter", "Flushes in which a sink failed."),
        M(redis_reconnects, "counter", "Reconnections to Redis."),
        M(events, "counter", "first_exceeded events delivered."),
        M(lost_cost, "counter", "Cost that could not be kept for the sinks (out of memory)."),
        M(redis_errors, "counter", "Error replies from Redis."),
        M(redis_permanent_errors, "counter", "Error replies from Redis that a retry cannot cure by itself."),
#undef M
    };
    size_t w = 0;
    int n;
    for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
        uint64_t v;
        memcpy(&v, (const char *)&s + m[i].off, sizeof(v));
        n = snprintf(buf && w < len ? buf + w : NULL, buf && w < len ? len - w : 0,
                     "# HELP %s %s\n# TYPE %s %s\n%s %" PRIu64 "\n",
                     m[i].name, m[i].help, m[i].name, m[i].type, m[i].name, v);
        w += (size_t)n;
    }
    n = snprintf(buf && w < len ? buf + w : NULL, buf && w < len ? len - w : 0,
                 "# HELP tally_last_flush_ok_seconds Unix time of the last acknowledged flush.\n"
                 "# TYPE tally_last_flush_ok_seconds gauge\n"
                 "tally_last_flush_ok_seconds %.3f\n", (double)s.last_flush_ok_ns / 1e9);
    w += (size_t)n;
    return tally__ops_prometheus(e, buf, len, w);
}
