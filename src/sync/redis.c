/*
 * The Redis sink: one connection (TCP or a unix socket, AUTH, SELECT,
 * timeouts, reconnects with a capped backoff) over which each flush is one
 * pipeline of Lua batch scripts, event and flag commands, and the MGET
 * read-back of live keys. It keeps guarantees 3 and 6 of sync/flusher.c:
 *
 *  3. Redis gets each batch as a Lua script that first sets a one-time token
 *     (SET NX) and only then runs the INCRBYs: a batch whose reply was lost is
 *     sent again with the same token and the same content, and Redis applies
 *     it once. The script runs atomically: a batch is applied wholly, but for
 *     keys Redis refuses inside it (guarantee 6).
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
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "core/clock.h"
#include "core/rcu.h"
#include "sync/sync-internal.h"

#define TOKEN_TTL_MS    "86400000"     /* a batch token outlives any retry */
#define BACKOFF_MIN_MS  50
#define BACKOFF_MAX_MS  5000
#define TTL_SLACK_MS    60000          /* late deltas (retries) still find their key */
#define KEY_MAX         640            /* bytes of one Redis key name, prefix included */

typedef struct redis_sink {
    tally__sink          base;
    tally_redis_options  ro;
    char                *host, *unix_path, *password, *prefix;
    redisContext        *rc;
    bool                 ever_connected;
    uint64_t             next_connect_ns;
    uint32_t             backoff_ms;
} redis_sink;

static inline redis_sink *R(struct tally__flusher *f)
{
    return (redis_sink *)f->sink;
}

enum {
    REPLY_OK,          /* applied (now, or by an earlier send of the same batch) */
    REPLY_PARTLY,      /* applied but for keys Redis refused: those went back to their entries */
    REPLY_REFUSED,     /* refused before it ran */
    REPLY_UNKNOWN      /* may or may not have run */
};

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
    tally__sync_set_error(f, str, len);
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
    if (R(f)->rc)
        redisFree(R(f)->rc);
    R(f)->rc = NULL;
}

/* One command, for AUTH and SELECT: true when the reply is not an error. */
static bool redis_simple(struct tally__flusher *f, redisContext *c, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    bool ok = r && r->type != REDIS_REPLY_ERROR;
    if (r && !ok)
        refused_unapplied(f, r);
    else if (!r)
        tally__sync_set_error(f, c->errstr, strlen(c->errstr));
    if (r)
        freeReplyObject(r);
    return ok;
}

static bool redis_ready(struct tally__flusher *f)
{
    if (R(f)->rc)
        return true;
    uint64_t now = tally_now_ns();
    if (now < R(f)->next_connect_ns)
        return false;
    struct timeval ct = ms_tv(R(f)->ro.connect_timeout_ms);
    redisContext *c = R(f)->unix_path ? redisConnectUnixWithTimeout(R(f)->unix_path, ct)
                                   : redisConnectWithTimeout(R(f)->host, R(f)->ro.port, ct);
    bool ok = c && !c->err && redisSetTimeout(c, ms_tv(R(f)->ro.command_timeout_ms)) == REDIS_OK;
    if (!ok) {
        const char *why = c ? c->errstr : "cannot allocate a Redis context";
        tally__sync_set_error(f, why, strlen(why));
    }
    if (ok && R(f)->password) {
        const char *argv[] = { "AUTH", R(f)->password };
        ok = redis_simple(f, c, 2, argv);
    }
    if (ok && R(f)->ro.db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", R(f)->ro.db);
        const char *argv[] = { "SELECT", db };
        ok = redis_simple(f, c, 2, argv);
    }
    if (!ok) {
        if (c)
            redisFree(c);
        R(f)->backoff_ms = R(f)->backoff_ms ? R(f)->backoff_ms * 2 : BACKOFF_MIN_MS;
        if (R(f)->backoff_ms > BACKOFF_MAX_MS)
            R(f)->backoff_ms = BACKOFF_MAX_MS;
        R(f)->next_connect_ns = now + (uint64_t)R(f)->backoff_ms * TALLY__NS_PER_MS;
        return false;
    }
    if (R(f)->ever_connected)
        atomic_fetch_add_explicit(&f->e->redis_reconnects, 1, memory_order_relaxed);
    R(f)->ever_connected = true;
    R(f)->backoff_ms = 0;
    R(f)->rc = c;
    return true;
}

/* "<prefix><policy>:<limit>:<hash tag>:<32 hex digest>:<window start ns>"; the
   tag ("s1", "a1": core/hash.h) keeps digests of different hashes apart. */
static int count_key(struct tally__flusher *f, const entry *x, char *buf, size_t len)
{
    tally__policy *p = tally__policy_get(f->e, x->policy);
    return snprintf(buf, len, "%s%s:%u:%s:%016" PRIx64 "%016" PRIx64 ":%" PRIu64, R(f)->prefix,
                    p->name, x->limit, tally__hasher_tag(&f->e->hasher), x->digest.hi, x->digest.lo,
                    x->win);
}

static int append_batch(struct tally__flusher *f, batch *b)
{
    size_t argc = 5 + 3 * b->n;       /* EVAL script numkeys token keys... ttl (delta ttl)... */
    const char **argv = malloc(argc * sizeof(*argv));
    size_t *argl = malloc(argc * sizeof(*argl));
    char *text = malloc((b->n + 1) * KEY_MAX + 2 * b->n * 24 + 64);
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
    int n = snprintf(w, KEY_MAX, "%stoken:%016" PRIx64 ":%" PRIu64, R(f)->prefix, f->instance, b->token);
    argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    for (size_t i = 0; i < b->n; i++) {
        n = count_key(f, b->items[i].e, w, KEY_MAX);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    }
    argv[k] = TOKEN_TTL_MS; argl[k++] = strlen(TOKEN_TTL_MS);
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < b->n; i++) {
        entry *x = b->items[i].e;
        n = snprintf(w, 24, "%" PRIu64, b->items[i].delta);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
        uint64_t ttl = (x->end_ns > now ? (x->end_ns - now) / TALLY__NS_PER_MS : 0) + TTL_SLACK_MS;
        n = snprintf(w, 24, "%" PRIu64, ttl);
        argv[k] = w; argl[k++] = (size_t)n; w += n + 1;
    }
    rc = redisAppendCommandArgv(R(f)->rc, (int)k, argv, argl) == REDIS_OK ? 0 : TALLY_EIO;
    if (!rc)
        b->sends++;
out:
    free(argv);
    free(argl);
    free(text);
    return rc;
}

/* Read a batch's reply: one of the REPLY_ values, or TALLY_EIO when the
   connection failed (no reply to read). */
static int read_batch(struct tally__flusher *f, batch *b)
{
    redisReply *r = NULL;
    if (redisGetReply(R(f)->rc, (void **)&r) != REDIS_OK || !r) {
        tally__sync_set_error(f, R(f)->rc->errstr, strlen(R(f)->rc->errstr));
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
        tally__sync_set_error(f, shape, sizeof(shape) - 1);
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
        tally__sync_store_remote(f, x, totals[i] > x->acked ? totals[i] - x->acked : 0);
        b->items[n] = b->items[i];
        totals[n++] = totals[i];
    }
    tally__sync_deliver_deltas(f, b->items, totals, n);
    return rc == REPLY_REFUSED ? REPLY_PARTLY : REPLY_OK;
}

/* "<prefix><policy>:flag:<hash tag>:<32 hex digest>": a flag shared by every
   engine with the same hash */
static int flag_key(struct tally__flusher *f, uint32_t policy, tally__digest d, char *buf, size_t len)
{
    tally__policy *p = tally__policy_get(f->e, policy);
    return snprintf(buf, len, "%s%s:flag:%s:%016" PRIx64 "%016" PRIx64, R(f)->prefix, p->name,
                    tally__hasher_tag(&f->e->hasher), d.hi, d.lo);
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
            uint64_t end = tally__sync_window_end(&p->limits[n->limit], n->win), now = tally_now_ns();
            if (p->limits[n->limit].spec.algo == TALLY_GCRA)
                end = now + p->limits[n->limit].spec.period_ns;
            snprintf(ttl, sizeof(ttl), "%" PRIu64, (end > now ? (end - now) / TALLY__NS_PER_MS : 0) + 1);
            const char *argv[] = { "SET", key, "1", "NX", "PX", ttl };
            size_t argl[] = { 3, (size_t)len, 1, 2, 2, strlen(ttl) };
            rc = redisAppendCommandArgv(R(f)->rc, 6, argv, argl);
        } else if (n->kind == TALLY__NOTE_FLAG) {
            len = flag_key(f, n->policy, n->digest, key, sizeof(key));
            int vl = snprintf(val, sizeof(val), "%" PRIu64 ":%" PRIu64, n->win, n->delta);
            const char *argv[] = { "SET", key, val, "NX" };
            size_t argl[] = { 3, (size_t)len, (size_t)vl, 2 };
            rc = redisAppendCommandArgv(R(f)->rc, 4, argv, argl);
        } else {
            len = flag_key(f, n->policy, n->digest, key, sizeof(key));
            const char *argv[] = { "DEL", key };
            size_t argl[] = { 3, (size_t)len };
            rc = redisAppendCommandArgv(R(f)->rc, 2, argv, argl);
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
        if (redisGetReply(R(f)->rc, (void **)&r) != REDIS_OK || !r) {
            tally__sync_set_error(f, R(f)->rc->errstr, strlen(R(f)->rc->errstr));
            return TALLY_EIO;
        }
        event *ev = *pp;
        if (r->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, r);
            rc = TALLY_EIO;                   /* keep it for the next flush */
            pp = &ev->next;
        } else {
            if (r->type == REDIS_REPLY_STATUS)
                tally__sync_deliver_note(f, ev->note);    /* OK: this process is the first to tell */
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
            if (x->limit != 0 || !atomic_load_explicit(&p->table.watch, memory_order_relaxed))   /* only whether one exists */
                continue;
            char key[700];
            int len = flag_key(f, x->policy, x->digest, key, sizeof(key));
            const char *argv[] = { "GET", key };
            size_t argl[] = { 3, (size_t)len };
            if (redisAppendCommandArgv(R(f)->rc, 2, argv, argl) != REDIS_OK)
                return;
            asked++;
        }
    for (const batch *b = first; b && asked; b = b->next)
        for (size_t i = 0; i < b->n && asked; i++) {
            const entry *x = b->items[i].e;
            tally__policy *p = tally__policy_get(f->e, x->policy);
            if (x->limit != 0 || !atomic_load_explicit(&p->table.watch, memory_order_relaxed))   /* only whether one exists */
                continue;
            redisReply *r = NULL;
            asked--;
            if (redisGetReply(R(f)->rc, (void **)&r) != REDIS_OK || !r) {
                redis_drop(f);
                return;
            }
            uint64_t at, amount;
            if (r->type == REDIS_REPLY_STRING && sscanf(r->str, "%" SCNu64 ":%" SCNu64, &at, &amount) == 2)
                tally__watch_import(f->e, x->policy, x->digest, at, amount);
            freeReplyObject(r);
        }
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
        char *text = malloc(n * KEY_MAX);
        int rc = argv && argl && text ? REDIS_OK : REDIS_ERR;
        if (rc == REDIS_OK) {
            argv[0] = "MGET";
            argl[0] = 4;
            for (size_t i = 0; i < n; i++) {
                const refresh *q = &f->refresh[from + i];
                entry tmp = { .policy = q->policy, .limit = q->limit, .digest = q->digest, .win = q->win };
                argv[i + 1] = text + i * KEY_MAX;
                argl[i + 1] = (size_t)count_key(f, &tmp, text + i * KEY_MAX, KEY_MAX);
            }
            rc = redisAppendCommandArgv(R(f)->rc, (int)n + 1, argv, argl);
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
        if (redisGetReply(R(f)->rc, (void **)&r) != REDIS_OK || !r) {
            tally__sync_set_error(f, R(f)->rc->errstr, strlen(R(f)->rc->errstr));
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
                entry *x = tally__sync_find(f, q->policy, q->limit, q->digest, q->win);
                /* a batch of unknown outcome may be in the total or not: wait
                   for its reply; a reply of this flush already told the total */
                if (x && (x->inflight || x->acked_seq == f->seq))
                    continue;
                uint64_t mine = x ? x->acked : 0;
                entry tmp = { .policy = q->policy, .limit = q->limit, .digest = q->digest, .win = q->win };
                if (total > mine)
                    tally__sync_store_remote(f, &tmp, total - mine);
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
static int redis_push(tally__sink *s, struct tally__flusher *f)
{
    (void)s;                                  /* the flusher's own sink: R(f) */
    if (!redis_ready(f))
        return TALLY_EIO;
    batch **fresh = f->inflight_tail;          /* batches formed now start here */
    bool held_back;
    int rc = tally__sync_form_batches(f, &held_back);
    if (!rc && *fresh) {
        import_flags(f, *fresh);
        if (!R(f)->rc)
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
    if (ping && redisAppendCommand(R(f)->rc, "PING") != REDIS_OK)
        rc = TALLY_EIO;
    if (rc) {
        redis_drop(f);
        return rc;
    }
    if (ping) {
        redisReply *r = NULL;
        rc = redisGetReply(R(f)->rc, (void **)&r) == REDIS_OK && r && r->type != REDIS_REPLY_ERROR
            ? 0 : TALLY_EIO;
        if (r && r->type == REDIS_REPLY_ERROR)
            refused_unapplied(f, r);
        else if (!r)
            tally__sync_set_error(f, R(f)->rc->errstr, strlen(R(f)->rc->errstr));
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
            tally__sync_dissolve(b);
        if (r != REPLY_OK)
            rc = TALLY_EIO;
        *pp = b->next;
        free(b);
    }
    f->inflight_tail = pp;
    while (*f->inflight_tail)
        f->inflight_tail = &(*f->inflight_tail)->next;
    int er = read_events_redis(f, (size_t)sent);
    if (er == TALLY_EIO && R(f)->rc->err) {
        redis_drop(f);
        return TALLY_EIO;
    }
    /* the read-back only freshens the view: its failure is counted and kept
       as the last error, but every cost may still have been acknowledged */
    if (read_refresh(f, (size_t)chunks) && R(f)->rc->err) {
        redis_drop(f);
        return TALLY_EIO;
    }
    /* cost held back while batches of unknown outcome waited is not in Redis yet */
    if (!rc && held_back)
        rc = TALLY_EIO;
    return rc ? rc : er;
}

static void redis_destroy(tally__sink *s)
{
    redis_sink *r = (redis_sink *)s;
    if (r->rc)
        redisFree(r->rc);
    free(r->host);
    free(r->unix_path);
    free(r->password);
    free(r->prefix);
    free(r);
}

static const tally__sink_ops redis_ops = { .push = redis_push, .destroy = redis_destroy };

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

int tally__sink_redis_new(const tally_redis_options *ro, tally__sink **out)
{
    redis_sink *r = calloc(1, sizeof(*r));
    if (!r)
        return TALLY_ENOMEM;
    r->base.ops = &redis_ops;
    r->ro = *ro;
    r->host = dup_or_null(ro->host);
    r->unix_path = dup_or_null(ro->unix_path);
    r->password = dup_or_null(ro->password);
    r->prefix = strdup(ro->key_prefix ? ro->key_prefix : "tally:");
    if (!r->ro.connect_timeout_ms)
        r->ro.connect_timeout_ms = 1000;
    if (!r->ro.command_timeout_ms)
        r->ro.command_timeout_ms = 1000;
    if ((ro->host && !r->host) || (ro->unix_path && !r->unix_path)
        || (ro->password && !r->password) || !r->prefix) {
        redis_destroy(&r->base);
        return TALLY_ENOMEM;
    }
    *out = &r->base;
    return 0;
}
