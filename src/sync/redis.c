/*
 * The Redis sink: links to Redis (TCP or a unix socket, AUTH, SELECT,
 * timeouts, reconnects with a capped backoff; one link in STANDALONE and
 * SENTINEL mode, one per master in CLUSTER mode: sync/redis-internal.h),
 * over which each flush is one pipeline per link of Lua batch scripts, event
 * and flag commands, the MGET read-back of the live keys that no batch
 * tells the total of and, with wait_replicas, a WAIT; between flushes, the
 * same read-back alone for keys new to the engine. A pipeline is written
 * while it is built (past WRITE_AHEAD bytes), so that Redis runs the first
 * scripts while the next are formed, and read once all of it is written.
 * It keeps guarantees 3 and 6 of sync/flusher.c:
 *
 *  3. Each batch carries the next sequence number of its bucket. The script
 *     checks it against the engine instance's record for that bucket (a
 *     string: the highest sequence applied, then a bitmap of the last
 *     TALLY__SEQ_WINDOW), sets its bit, and only then runs the INCRBYs: a
 *     batch whose reply was lost is sent again with the same number and
 *     content, and Redis applies it once, even after later batches ran. The
 *     record lives next to the counts it guards (the same slot in a cluster),
 *     so a replica that takes over holds both as of one moment, and answers
 *     a resend for what it holds. One record per engine instance and bucket,
 *     refreshed on use, expiring a day after the last: the bookkeeping stays
 *     a fixed number of keys whatever the number of batches. The script runs
 *     atomically: a batch is applied wholly, but for keys Redis refuses
 *     inside it (guarantee 6).
 *  6. Every reply is paired with the command it answers, in pipeline order.
 *     An error reply by which Redis refused a batch before running it (BUSY,
 *     OOM, LOADING, READONLY, MOVED, CROSSSLOT, ...: see refused_unapplied)
 *     puts its deltas back into their entries, merged per key and window,
 *     to be sent in a later batch under a new number. A batch whose outcome
 *     is unknown (its reply was lost, or an unexpected error; with
 *     wait_replicas, a WAIT that did not confirm enough replicas) is kept
 *     with its number and resent as it was; a refusal of a resend keeps it
 *     too, since an earlier send may have run. In a cluster, a MOVED or ASK
 *     keeps the batch as it is and sends it to the node named, in the same
 *     push. The script never stops half-way: a key Redis refused inside it
 *     (WRONGTYPE, overflow, an ACL) is answered with its error and goes back
 *     to its entry alone. While MAX_KEPT_BATCHES or more kept batches of a
 *     bucket wait, the bucket forms no new batch, so what is sent per flush
 *     is bounded by the pending keys whatever Redis answers.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "core/clock.h"
#include "core/rcu.h"
#include "sync/redis-internal.h"

#define RECORD_TTL_MS   "86400000"     /* a record outlives any retry of its batches */
#define BACKOFF_MIN_MS  50
#define BACKOFF_MAX_MS  5000
#define TTL_SLACK_MS    60000          /* late deltas (retries) still find their key */
#define KEY_MAX         640            /* bytes of one Redis key name, prefix included */
#define ROUNDS          3              /* pipelines per push: the first, then redirections */
#define WRITE_AHEAD     (256 * 1024)   /* bytes appended to a pipeline before it is written */

#define STR_(x) #x
#define STR(x)  STR_(x)

typedef tally__redis_sink redis_sink;
typedef tally__link       rlink;

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

/* What a reply of a link's pipeline answers. */
enum { EX_BATCH, EX_ASKING, EX_EVENT, EX_FLAG, EX_MGET, EX_WAIT, EX_PING };

/*
 * One batch. KEYS[1] is the record, KEYS[2] the keys of the record's batches
 * that Redis refused inside the script, KEYS[3..] the counts; ARGV[1] is the
 * sequence number, ARGV[2] the record's TTL, then a delta and a TTL a count.
 * The record is the first write (BITFIELD), so a refusal of the script by
 * OOM or READONLY, raised at the first write only, comes before anything
 * changed. A sequence number above the highest clears the bits of the
 * numbers it skips (their window is over) and forgets their refused keys; one
 * inside the window is new when its bit is clear; one below the window is
 * never sent (tally__sync_form_batches). The record's TTL is set on every
 * run, a write even for a resend, so that a WAIT after a resend waits for
 * what its first run wrote. After the record nothing can stop the script
 * half-way: each INCRBY runs under pcall, and a key Redis refused (WRONGTYPE,
 * overflow, an ACL) is answered with its error in its place and kept in
 * KEYS[2], so that a resend answers that key with an error again rather
 * than with a total that does not hold its cost.
 *
 * A count gets its TTL from the INCRBY that creates it: the one whose total
 * is its own delta (deltas are never 0). Every other INCRBY finds a key that
 * already has one, so the script makes one call per count, not two. NX keeps
 * a TTL the key has: a total that only equals the delta in floating point
 * (above 2^53) costs a PEXPIRE that changes nothing.
 */
static const char LUA_BATCH[] =
    "local W = " STR(TALLY__SEQ_WINDOW) "\n"
    "local rec, refused, seq = KEYS[1], KEYS[2], tonumber(ARGV[1])\n"
    "local call, try, tonumber, type = redis.call, redis.pcall, tonumber, type\n"
    "local hi = call('BITFIELD', rec, 'GET', 'i64', 0)[1]\n"
    "local new\n"
    "if seq > hi then\n"
    "  if seq - hi >= W then\n"
    "    call('SETRANGE', rec, 8, string.rep('\\0', W / 8))\n"
    "    call('DEL', refused)\n"
    "  else\n"
    "    for s = hi + 1, seq - 1 do call('SETBIT', rec, 64 + s % W, 0) end\n"
    "    if call('EXISTS', refused) == 1 then\n"
    "      for s = hi + 1 - W, seq - W do call('HDEL', refused, s) end\n"
    "    end\n"
    "  end\n"
    "  call('BITFIELD', rec, 'SET', 'i64', 0, ARGV[1])\n"
    "  call('SETBIT', rec, 64 + seq % W, 1)\n"
    "  new = true\n"
    "elseif hi - seq < W then\n"
    "  new = call('SETBIT', rec, 64 + seq % W, 1) == 0\n"
    "else\n"
    "  return redis.error_reply('STALE batch below the record window')\n"
    "end\n"
    "call('PEXPIRE', rec, ARGV[2])\n"
    "local out = {}\n"
    "if new then\n"
    "  local failed = {}\n"
    "  for i = 1, #KEYS - 2 do\n"
    "    local k, d = KEYS[i + 2], ARGV[2 * i + 1]\n"
    "    local r = try('INCRBY', k, d)\n"
    "    out[i] = r\n"
    "    if r == tonumber(d) then\n"
    "      try('PEXPIRE', k, ARGV[2 * i + 2], 'NX')\n"
    "    elseif type(r) == 'table' then\n"
    "      failed[#failed + 1] = i\n"
    "    end\n"
    "  end\n"
    "  if #failed > 0 then\n"
    "    try('HSET', refused, ARGV[1], table.concat(failed, ','))\n"
    "    try('PEXPIRE', refused, ARGV[2])\n"
    "  end\n"
    "else\n"
    "  local failed = {}\n"
    "  for i in string.gmatch(call('HGET', refused, ARGV[1]) or '', '%d+') do\n"
    "    failed[tonumber(i)] = true\n"
    "  end\n"
    "  for i = 1, #KEYS - 2 do\n"
    "    if failed[i] then\n"
    "      out[i] = redis.error_reply('REFUSED by Redis when the batch first ran')\n"
    "    else\n"
    "      local v = try('GET', KEYS[i + 2])\n"
    "      out[i] = type(v) == 'string' and tonumber(v) or 0\n"
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

static bool reply_is(const redisReply *r, const char *code)
{
    return r && r->type == REDIS_REPLY_ERROR && r->str && code_is(r->str, r->len, code);
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
    /* in a cluster MOVED and ASK are routing, which the sink follows */
    if (R(f)->ro.mode == TALLY_REDIS_CLUSTER && (code_is(str, len, "MOVED") || code_is(str, len, "ASK")))
        return REPLY_REFUSED;
    atomic_fetch_add_explicit(&f->e->redis_permanent_errors, 1, memory_order_relaxed);
    for (size_t i = 0; i < sizeof(permanent) / sizeof(permanent[0]); i++)
        if (code_is(str, len, permanent[i]))
            return REPLY_REFUSED;
    return REPLY_UNKNOWN;
}

/* ---- Links --------------------------------------------------------------- */

int tally__redis_link(redis_sink *r, const char *host, int port)
{
    for (int i = 0; i < r->n_links; i++)
        if (r->links[i].port == port && strcmp(r->links[i].host, host) == 0)
            return i;
    if (r->n_links == TALLY__LINKS_MAX || strlen(host) > TALLY__NODE_HOST_MAX)
        return -1;
    rlink *l = &r->links[r->n_links];
    memset(l, 0, sizeof(*l));
    strcpy(l->host, host);
    l->port = port;
    return r->n_links++;
}

void tally__redis_link_drop(rlink *l)
{
    if (l->rc)
        redisFree(l->rc);
    l->rc = NULL;
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

static void set_error_text(struct tally__flusher *f, const char *text)
{
    tally__sync_set_error(f, text, strlen(text));
}

/* SENTINEL: the master's address, asked before each connect. */
static bool discover(struct tally__flusher *f, rlink *l)
{
    char err[ERRSTR_LEN];
    int rc = tally__sentinel_master(R(f)->nodes, R(f)->master_name, R(f)->ro.connect_timeout_ms,
                                    l->host, sizeof(l->host), &l->port, err, sizeof(err));
    if (rc)
        set_error_text(f, err[0] ? err : "no sentinel answered");
    return rc == 0;
}

bool tally__redis_link_ready(struct tally__flusher *f, rlink *l)
{
    redis_sink *r = R(f);
    if (l->rc)
        return true;
    /* Dropped in the middle of a round: the replies it waits for were lost
       with the connection, and a new one must not answer for them. */
    if (l->nex)
        return false;
    uint64_t now = tally_now_ns();
    if (now < l->next_connect_ns)
        return false;
    bool sentinel = r->ro.mode == TALLY_REDIS_SENTINEL;
    bool ok = !sentinel || discover(f, l);
    redisContext *c = NULL;
    if (ok) {
        struct timeval ct = ms_tv(r->ro.connect_timeout_ms);
        bool unix_socket = r->ro.mode == TALLY_REDIS_STANDALONE && r->unix_path;
        c = unix_socket ? redisConnectUnixWithTimeout(r->unix_path, ct)
                        : redisConnectWithTimeout(l->host, l->port, ct);
        /* a WAIT may hold its reply for its own timeout on top of the command's */
        uint32_t timeout = r->ro.command_timeout_ms + (r->ro.wait_replicas ? r->ro.wait_timeout_ms : 0);
        ok = c && !c->err && redisSetTimeout(c, ms_tv(timeout)) == REDIS_OK;
        if (!ok)
            set_error_text(f, c ? c->errstr : "cannot allocate a Redis context");
    }
    if (ok && r->password) {
        const char *argv[] = { "AUTH", r->password };
        ok = redis_simple(f, c, 2, argv);
    }
    if (ok && r->ro.db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", r->ro.db);
        const char *argv[] = { "SELECT", db };
        ok = redis_simple(f, c, 2, argv);
    }
    /* the sentinels' answer can be stale: never write to a demoted master */
    if (ok && sentinel && tally__redis_is_master(c) != 1) {
        set_error_text(f, "the address the sentinels gave is not a master");
        ok = false;
    }
    if (!ok) {
        if (c)
            redisFree(c);
        l->backoff_ms = l->backoff_ms ? l->backoff_ms * 2 : BACKOFF_MIN_MS;
        if (l->backoff_ms > BACKOFF_MAX_MS)
            l->backoff_ms = BACKOFF_MAX_MS;
        l->next_connect_ns = now + (uint64_t)l->backoff_ms * TALLY__NS_PER_MS;
        if (r->ro.mode == TALLY_REDIS_CLUSTER)
            r->map_stale = true;          /* its slots may have a new master by now */
        return false;
    }
    if (l->ever_connected)
        atomic_fetch_add_explicit(&f->e->redis_reconnects, 1, memory_order_relaxed);
    l->ever_connected = true;
    l->backoff_ms = 0;
    l->rc = c;
    return true;
}

/* The link of a bucket's commands, or -1 when no node serves it now. */
static int route(redis_sink *r, unsigned bucket)
{
    if (r->ro.mode != TALLY_REDIS_CLUSTER)
        return 0;
    return r->owner[r->bucket_slot[bucket]];
}

/* The link @bucket's commands go to, connected, or NULL. */
static rlink *link_for(struct tally__flusher *f, unsigned bucket)
{
    int i = route(R(f), bucket);
    if (i < 0)
        return NULL;
    rlink *l = &R(f)->links[i];
    return tally__redis_link_ready(f, l) ? l : NULL;
}

/* Write what @l's pipeline holds. A link that fails is dropped: the replies
   of what it carried stay NULL (their outcome is unknown). */
static bool write_out(struct tally__flusher *f, rlink *l)
{
    int done = 0;
    while (!done) {
        if (redisBufferWrite(l->rc, &done) == REDIS_ERR) {
            set_error_text(f, l->rc->errstr);
            tally__redis_link_drop(l);
            return false;
        }
    }
    l->unwritten = 0;
    return true;
}

/* Room for one more reply to wait for on @l, which must still be connected
   (a write of this round may have dropped it). Past WRITE_AHEAD bytes the
   pipeline is written first, so that Redis runs the first commands while
   the next ones are built; Redis keeps its replies until they are read. */
static bool room(struct tally__flusher *f, rlink *l)
{
    if (!l->rc || (l->unwritten >= WRITE_AHEAD && !write_out(f, l)))
        return false;
    if (l->nex == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        tally__expect *ex = realloc(l->ex, cap * sizeof(*ex));
        if (!ex)
            return false;
        l->ex = ex;
        l->cap = cap;
    }
    return true;
}

/* Append a command to @l with the reply it waits for. A failed append (out
   of memory, or the link lost) leaves neither in the pipeline. */
static bool send_cmd(struct tally__flusher *f, rlink *l, int kind, void *p, int argc, const char **argv,
                     const size_t *argl)
{
    if (!room(f, l) || redisAppendCommandArgv(l->rc, argc, argv, argl) != REDIS_OK)
        return false;
    l->ex[l->nex++] = (tally__expect){ .kind = kind, .p = p };
    return true;
}

/* The same for a command already in the Redis protocol (R(f)->cmd). */
static bool send_built(struct tally__flusher *f, rlink *l, int kind, void *p, size_t from, size_t n,
                       size_t len)
{
    if (!room(f, l) || redisAppendFormattedCommand(l->rc, R(f)->cmd, len) != REDIS_OK)
        return false;
    l->unwritten += len;
    l->ex[l->nex++] = (tally__expect){ .kind = kind, .p = p, .from = from, .n = n };
    return true;
}

/* ---- Key names and commands ---------------------------------------------- */

/* The text writers below write at @w and return the end; the callers size
   the buffer (KEY_MAX holds any name: the prefix, at most 256 bytes, a
   policy name, at most TALLY_MAX_POLICY_NAME, and fixed-width fields). */
static char *put(char *w, const char *s, size_t n)
{
    memcpy(w, s, n);
    return w + n;
}

static char *put_u64(char *w, uint64_t v)
{
    char d[20];
    int n = 0;
    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *w++ = d[--n];
    return w;
}

static char *put_hex64(char *w, uint64_t v)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4)
        w[i] = hex[v & 15];
    return w + 16;
}

/* "<prefix><slot tag>": in a cluster the tag "{<bucket>}" comes right after
   the prefix, the first braces of the name (check_options refuses braces in
   the prefix), so a bucket's keys share a slot. No tag in the other modes. */
static char *put_head(struct tally__flusher *f, unsigned bucket, char *w)
{
    w = put(w, R(f)->prefix, strlen(R(f)->prefix));
    if (R(f)->ro.mode == TALLY_REDIS_CLUSTER) {
        *w++ = '{';
        w = put_u64(w, bucket);
        *w++ = '}';
    }
    return w;
}

/* "<policy>:<kind>:<hash tag>:<32 hex digest>", the digest's high word
   first; the hash tag ("s1", "a1": core/hash.h) keeps digests of different
   hashes apart. */
static char *put_key(struct tally__flusher *f, const tally__policy *p, const char *kind, size_t kind_len,
                     tally__digest d, char *w)
{
    const char *tag = tally__hasher_tag(&f->e->hasher);
    w = put(w, p->name, strlen(p->name));
    *w++ = ':';
    w = put(w, kind, kind_len);
    *w++ = ':';
    w = put(w, tag, strlen(tag));
    *w++ = ':';
    w = put_hex64(w, d.hi);
    return put_hex64(w, d.lo);
}

/* "<prefix><slot tag><policy>:<limit>:<hash tag>:<32 hex digest>:<window start ns>" */
static int count_key(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                     uint64_t win, char *buf)
{
    char lim[20];
    size_t lim_len = (size_t)(put_u64(lim, limit) - lim);
    char *w = put_head(f, tally__sync_bucket(f->sink, d), buf);
    w = put_key(f, tally__policy_get(f->e, policy), lim, lim_len, d, w);
    *w++ = ':';
    return (int)(put_u64(w, win) - buf);
}

/* "<prefix><slot tag><policy>:flag:<hash tag>:<32 hex digest>": a flag shared
   by every engine with the same hash */
static int flag_key(struct tally__flusher *f, uint32_t policy, tally__digest d, char *buf)
{
    char *w = put_head(f, tally__sync_bucket(f->sink, d), buf);
    return (int)(put_key(f, tally__policy_get(f->e, policy), "flag", 4, d, w) - buf);
}

/* "<prefix><slot tag>seen:<instance>", the record of a bucket's batches,
   then @suffix. */
static int record_key(struct tally__flusher *f, unsigned bucket, const char *suffix, char *buf)
{
    char *w = put(put_head(f, bucket, buf), "seen:", 5);
    w = put_hex64(w, f->instance);
    return (int)(put(w, suffix, strlen(suffix)) - buf);
}

/* Commands are built in the Redis protocol ("*<argc>" then "$<len>" and the
   bytes of each argument) in R(f)->cmd, sized first by cmd_room. */
static bool cmd_room(struct tally__flusher *f, size_t len)
{
    redis_sink *r = R(f);
    if (len <= r->cmd_cap)
        return true;
    char *c = realloc(r->cmd, len);
    if (!c)
        return false;
    r->cmd = c;
    r->cmd_cap = len;
    return true;
}

#define ARG_MAX_HEAD 24                /* "$<length>\r\n" and the "\r\n" after the bytes */

static char *put_count(char *w, char kind, size_t n)
{
    *w++ = kind;
    w = put_u64(w, n);
    return put(w, "\r\n", 2);
}

static char *put_arg(char *w, const char *s, size_t n)
{
    return put(put(put_count(w, '$', n), s, n), "\r\n", 2);
}

static char *put_arg_u64(char *w, uint64_t v)
{
    char d[20];
    return put_arg(w, d, (size_t)(put_u64(d, v) - d));
}

/* ---- Appending ----------------------------------------------------------- */

/* EVAL script numkeys record refused count... seq record-ttl (delta ttl)... */
static bool append_batch(struct tally__flusher *f, rlink *l, batch *b)
{
    if (!cmd_room(f, 128 + sizeof(LUA_BATCH) + (b->n + 2) * (KEY_MAX + ARG_MAX_HEAD)
                         + (2 * b->n + 2) * (20 + ARG_MAX_HEAD)))
        return false;
    char key[KEY_MAX];
    char *w = put_count(R(f)->cmd, '*', 7 + 3 * b->n);
    w = put_arg(w, "EVAL", 4);
    w = put_arg(w, LUA_BATCH, sizeof(LUA_BATCH) - 1);
    w = put_arg_u64(w, b->n + 2);
    w = put_arg(w, key, (size_t)record_key(f, b->bucket, "", key));
    w = put_arg(w, key, (size_t)record_key(f, b->bucket, ":refused", key));
    for (size_t i = 0; i < b->n; i++) {
        const entry *x = b->items[i].e;
        w = put_arg(w, key, (size_t)count_key(f, x->policy, x->limit, x->digest, x->win, key));
    }
    w = put_arg_u64(w, b->seq);
    w = put_arg(w, RECORD_TTL_MS, sizeof(RECORD_TTL_MS) - 1);
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < b->n; i++) {
        const entry *x = b->items[i].e;
        w = put_arg_u64(w, b->items[i].delta);
        w = put_arg_u64(w, (x->end_ns > now ? (x->end_ns - now) / TALLY__NS_PER_MS : 0) + TTL_SLACK_MS);
    }
    if (b->ask >= 0) {
        const char *asking[] = { "ASKING" };
        if (!send_cmd(f, l, EX_ASKING, NULL, 1, asking, NULL))
            return false;
    }
    if (!send_built(f, l, EX_BATCH, b, 0, 0, (size_t)(w - R(f)->cmd)))
        return false;
    b->sends++;
    b->ask = -1;
    l->waits = R(f)->ro.wait_replicas > 0;
    return true;
}

/* Events: "<count key>:notified" SET NX with the window's TTL. Flags: SET NX
   without TTL (an operator clears them); clearings: DEL. */
static bool append_event(struct tally__flusher *f, rlink *l, event *ev)
{
    const tally__note *n = ev->note;
    tally__policy *p = tally__policy_get(f->e, n->policy);
    char key[KEY_MAX], val[48], ttl[24];
    int len;
    bool ok;
    if (n->kind == TALLY__NOTE_EVENT) {
        len = count_key(f, n->policy, n->limit, n->digest, n->win, key);
        len = (int)(put(key + len, ":notified", 9) - key);
        uint64_t end = tally__sync_window_end(&p->limits[n->limit], n->win), now = tally_now_ns();
        /* GCRA and concurrency limits have no window: an episode's mark
           lasts a period from now */
        if (p->limits[n->limit].spec.algo == TALLY_GCRA || p->limits[n->limit].spec.algo == TALLY_CONCURRENCY)
            end = now + p->limits[n->limit].spec.period_ns;
        snprintf(ttl, sizeof(ttl), "%" PRIu64, (end > now ? (end - now) / TALLY__NS_PER_MS : 0) + 1);
        const char *argv[] = { "SET", key, "1", "NX", "PX", ttl };
        size_t argl[] = { 3, (size_t)len, 1, 2, 2, strlen(ttl) };
        ok = send_cmd(f, l, EX_EVENT, ev, 6, argv, argl);
    } else if (n->kind == TALLY__NOTE_FLAG) {
        len = flag_key(f, n->policy, n->digest, key);
        int vl = snprintf(val, sizeof(val), "%" PRIu64 ":%" PRIu64, n->win, n->delta);
        const char *argv[] = { "SET", key, val, "NX" };
        size_t argl[] = { 3, (size_t)len, (size_t)vl, 2 };
        ok = send_cmd(f, l, EX_EVENT, ev, 4, argv, argl);
    } else {
        len = flag_key(f, n->policy, n->digest, key);
        const char *argv[] = { "DEL", key };
        size_t argl[] = { 3, (size_t)len };
        ok = send_cmd(f, l, EX_EVENT, ev, 2, argv, argl);
    }
    if (ok)
        l->waits = R(f)->ro.wait_replicas > 0;
    return ok;
}

/* Flags other engines stored: GET the flag of every watched key pushed now. */
static bool append_flag_get(struct tally__flusher *f, rlink *l, entry *x)
{
    char key[KEY_MAX];
    int len = flag_key(f, x->policy, x->digest, key);
    const char *argv[] = { "GET", key };
    size_t argl[] = { 3, (size_t)len };
    return send_cmd(f, l, EX_FLAG, x, 2, argv, argl);
}

/* The global count of the read-back's keys rb[from, from + n), of one
   bucket (guarantee 7). */
static bool append_mget(struct tally__flusher *f, rlink *l, size_t from, size_t n)
{
    redis_sink *r = R(f);
    if (!cmd_room(f, 32 + n * (KEY_MAX + ARG_MAX_HEAD)))
        return false;
    char key[KEY_MAX];
    char *w = put_arg(put_count(r->cmd, '*', n + 1), "MGET", 4);
    for (size_t i = 0; i < n; i++) {
        const refresh *q = &f->refresh[r->rb[from + i]];
        w = put_arg(w, key, (size_t)count_key(f, q->policy, q->limit, q->digest, q->win, key));
    }
    return send_built(f, l, EX_MGET, NULL, from, n, (size_t)(w - r->cmd));
}

static bool append_simple(struct tally__flusher *f, rlink *l, int kind, int argc, const char **argv)
{
    return send_cmd(f, l, kind, NULL, argc, argv, NULL);
}

/* ---- Reading and settling ------------------------------------------------ */

/* Write the rest of every link's pipeline before reading any, so that the
   masters of a cluster work at once; then read each link's replies in order.
   A link that fails leaves the rest of its replies NULL and is dropped. */
static void exchange(struct tally__flusher *f)
{
    redis_sink *r = R(f);
    for (int i = 0; i < r->n_links; i++)
        if (r->links[i].nex && r->links[i].rc)
            write_out(f, &r->links[i]);
    for (int i = 0; i < r->n_links; i++) {
        rlink *l = &r->links[i];
        for (size_t k = 0; k < l->nex && l->rc; k++) {
            redisReply *rep = NULL;
            if (redisGetReply(l->rc, (void **)&rep) != REDIS_OK || !rep) {
                set_error_text(f, l->rc->errstr);
                tally__redis_link_drop(l);
                if (r->ro.mode == TALLY_REDIS_CLUSTER)
                    r->map_stale = true;
                break;
            }
            l->ex[k].r = rep;
        }
        /* a demoted master: ask the sentinels again before the next write */
        for (size_t k = 0; k < l->nex && l->rc && r->ro.mode == TALLY_REDIS_SENTINEL; k++)
            if (reply_is(l->ex[k].r, "READONLY"))
                tally__redis_link_drop(l);
        /* wait_replicas asked for a WAIT the pipeline could not carry (out
           of memory): nothing confirms its batches this round */
        l->acked_by_wait = !l->wait_lost;
        if (l->waits) {
            /* the WAIT is the last command of the pipeline */
            const redisReply *w = l->ex[l->nex - 1].r;
            l->acked_by_wait = w && w->type == REDIS_REPLY_INTEGER
                               && (unsigned long long)w->integer >= r->ro.wait_replicas;
            if (w && w->type == REDIS_REPLY_ERROR)
                refused_unapplied(f, w);
            else if (w && !l->acked_by_wait) {
                char text[96];
                snprintf(text, sizeof(text), "WAIT: %lld of %u replicas acknowledged",
                         w->type == REDIS_REPLY_INTEGER ? w->integer : -1LL, r->ro.wait_replicas);
                set_error_text(f, text);
            }
        }
    }
}

/* The reply to a batch: one of the REPLY_ values. @acked: WAIT confirmed it
   (or none was asked for). Settled batches leave the list afterwards. */
static int settle_batch(struct tally__flusher *f, rlink *l, batch *b, const redisReply *r, bool acked)
{
    redis_sink *rs = R(f);
    if (!r)
        return REPLY_UNKNOWN;                  /* no reply: it may have run */
    if (r->type == REDIS_REPLY_ERROR) {
        int kind = refused_unapplied(f, r);
        if (rs->ro.mode == TALLY_REDIS_CLUSTER) {
            bool ask = false;
            int to = tally__cluster_redirect(rs, r, l, &ask);
            if (to >= 0) {
                /* not run by this node; to be sent as it is to the one named */
                b->ask = ask ? to : -1;
                b->redirected = true;
                rs->map_stale |= !ask;
                return REPLY_UNKNOWN;
            }
            if (reply_is(r, "READONLY") || reply_is(r, "CLUSTERDOWN") || reply_is(r, "MASTERDOWN"))
                rs->map_stale = true;
        }
        /* A refusal proves only that this send did not run: a batch sent
           before may have run then, so it keeps its number. */
        if (kind == REPLY_REFUSED && b->sends == 1) {
            tally__sync_dissolve(b);
            b->settled = true;
            return REPLY_REFUSED;
        }
        return REPLY_UNKNOWN;
    }
    bool shape = r->type == REDIS_REPLY_ARRAY && r->elements == b->n;
    for (size_t i = 0; i < b->n && shape; i++) {
        const redisReply *v = r->element[i];
        shape = v->type == REDIS_REPLY_ERROR || (v->type == REDIS_REPLY_INTEGER && v->integer >= 0);
    }
    if (!shape) {
        set_error_text(f, "unexpected reply to a batch script");
        return REPLY_UNKNOWN;
    }
    if (!acked)
        return REPLY_UNKNOWN;                  /* run, but maybe on this master alone */
    uint64_t totals[CHUNK_KEYS];
    size_t n = 0;
    int rc = REPLY_OK;
    for (size_t i = 0; i < b->n; i++) {
        entry *x = b->items[i].e;
        const redisReply *v = r->element[i];
        x->inflight--;
        if (v->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, v);           /* the key's INCRBY did not run */
            x->fresh += b->items[i].delta;     /* sent again, under a new number */
            rc = REPLY_PARTLY;
            continue;
        }
        uint64_t total = (uint64_t)v->integer;
        x->acked += b->items[i].delta;
        x->acked_seq = f->seq;
        tally__sync_store_remote(f, x, total > x->acked ? total - x->acked : 0);
        b->items[n] = b->items[i];
        totals[n++] = total;
    }
    tally__sync_deliver_deltas(f, b->items, totals, n);
    b->settled = true;
    return rc;
}

/* An error reply to an event or a read-back: in a cluster, a redirect or a
   cluster error means the slot map moved on, whether or not a batch of the
   same slot tells it too. */
static void refused_other(struct tally__flusher *f, const redisReply *r)
{
    refused_unapplied(f, r);
    if (R(f)->ro.mode == TALLY_REDIS_CLUSTER
        && (reply_is(r, "MOVED") || reply_is(r, "ASK") || reply_is(r, "CLUSTERDOWN")))
        R(f)->map_stale = true;
}

/* An event's reply: OK means this process is the first to tell. */
static bool settle_event(struct tally__flusher *f, event *ev, const redisReply *r)
{
    if (!r)
        return false;
    if (r->type == REDIS_REPLY_ERROR) {
        refused_other(f, r);
        return false;                          /* kept for the next flush */
    }
    if (r->type == REDIS_REPLY_STATUS)
        tally__sync_deliver_note(f, ev->note);
    ev->settled = true;
    return true;
}

static void settle_flag(struct tally__flusher *f, const entry *x, const redisReply *r)
{
    uint64_t at, amount;
    if (r && r->type == REDIS_REPLY_STRING && sscanf(r->str, "%" SCNu64 ":%" SCNu64, &at, &amount) == 2)
        tally__watch_import(f->e, x->policy, x->digest, at, amount);
}

/* The read-back only freshens the view: an error is counted and kept as the
   last error, but every cost may still have been acknowledged. */
static void settle_mget(struct tally__flusher *f, size_t from, size_t n, const redisReply *r)
{
    if (!r)
        return;
    if (r->type == REDIS_REPLY_ERROR) {
        refused_other(f, r);
        return;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != n)
        return;
    for (size_t i = 0; i < n; i++) {
        size_t j = R(f)->rb[from + i];
        const refresh *q = &f->refresh[j];
        const redisReply *v = r->element[i];
        if (v->type != REDIS_REPLY_STRING)
            continue;                         /* nil: nobody counted in this window yet */
        uint64_t total = strtoull(v->str, NULL, 10);
        entry *x = R(f)->rk[j].x;
        /* a batch of unknown outcome may be in the total or not: wait for
           its reply; a reply of this flush already told the total */
        if (x && (x->inflight || x->acked_seq == f->seq))
            continue;
        uint64_t mine = x ? x->acked : 0;
        entry tmp = { .policy = q->policy, .limit = q->limit, .digest = q->digest, .win = q->win };
        if (total > mine)
            tally__sync_store_remote(f, &tmp, total - mine);
    }
}

static bool settle_one(struct tally__flusher *f, rlink *l, tally__expect *x, bool *redirected)
{
    switch (x->kind) {
    case EX_BATCH: {
        batch *b = x->p;
        int rc = settle_batch(f, l, b, x->r, l->acked_by_wait);
        *redirected |= b->redirected;
        return rc == REPLY_OK || b->redirected;
    }
    case EX_EVENT:
        return settle_event(f, x->p, x->r);
    case EX_FLAG:
        settle_flag(f, x->p, x->r);
        return true;
    case EX_MGET:
        settle_mget(f, x->from, x->n, x->r);
        return true;
    case EX_PING:
        if (x->r && x->r->type == REDIS_REPLY_ERROR)
            refused_unapplied(f, x->r);
        return x->r && x->r->type != REDIS_REPLY_ERROR;
    default:                                  /* ASKING, WAIT: read in exchange() */
        return true;
    }
}

/* Settle every reply of the round, the batches first (a read-back skips the
   keys whose totals they told); true when all of it was acknowledged. */
static bool settle(struct tally__flusher *f, bool *redirected)
{
    redis_sink *r = R(f);
    bool ok = true;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < r->n_links; i++) {
            rlink *l = &r->links[i];
            for (size_t k = 0; k < l->nex; k++)
                if ((l->ex[k].kind == EX_BATCH) == (pass == 0))
                    ok &= settle_one(f, l, &l->ex[k], redirected);
        }
    for (int i = 0; i < r->n_links; i++) {
        rlink *l = &r->links[i];
        for (size_t k = 0; k < l->nex; k++)
            if (l->ex[k].r)
                freeReplyObject(l->ex[k].r);
        l->nex = 0;
        l->waits = false;
        l->wait_lost = false;
    }
    return ok;
}

/* Drop settled batches and events from their lists. */
static void sweep(struct tally__flusher *f)
{
    batch **pp = &f->inflight_head;
    while (*pp) {
        batch *b = *pp;
        if (b->settled) {
            *pp = b->next;
            free(b);
        } else {
            pp = &b->next;
        }
    }
    f->inflight_tail = pp;
    event **ep = &f->events;
    while (*ep) {
        event *ev = *ep;
        if (ev->settled) {
            *ep = ev->next;
            free(ev->note);
            free(ev);
        } else {
            ep = &ev->next;
        }
    }
    f->events_tail = ep;
}

static int by_bucket(const void *a, const void *b, void *arg)
{
    const tally__sink *s = arg;
    unsigned x = tally__sync_bucket(s, ((const refresh *)a)->digest);
    unsigned y = tally__sync_bucket(s, ((const refresh *)b)->digest);
    return (x > y) - (x < y);
}

/* The read-back of round 0: every noted key but those in a batch of this
   push, whose reply tells the total (settle_mget would skip them anyway
   while the batch's outcome is open). False when out of memory. */
static bool plan_readback(struct tally__flusher *f)
{
    redis_sink *r = R(f);
    r->rb_n = r->rk_n = 0;
    if (f->refresh_n > r->rk_cap) {
        tally__readback *rk = realloc(r->rk, f->refresh_n * sizeof(*rk));
        size_t *rb = rk ? realloc(r->rb, f->refresh_n * sizeof(*rb)) : NULL;
        if (rk)
            r->rk = rk;
        if (rb)
            r->rb = rb;
        if (!rk || !rb)
            return false;
        r->rk_cap = f->refresh_n;
    }
    for (size_t j = 0; j < f->refresh_n; j++) {
        const refresh *q = &f->refresh[j];
        entry *x = tally__sync_find(f, q->policy, q->limit, q->digest, q->win);
        r->rk[j] = (tally__readback){ .x = x, .held = x && x->inflight };
        if (!r->rk[j].held)
            r->rb[r->rb_n++] = j;
    }
    r->rk_n = f->refresh_n;
    return true;
}

/* After a round: the keys whose batch went back to their entries unapplied
   (refused before it ran, or a key refused inside it) told no total; they
   are read in the next round. */
static void plan_rereads(struct tally__flusher *f)
{
    redis_sink *r = R(f);
    r->rb_n = 0;
    for (size_t j = 0; j < r->rk_n; j++) {
        tally__readback *k = &r->rk[j];
        if (k->held && !k->x->inflight && k->x->acked_seq != f->seq) {
            k->held = false;
            r->rb[r->rb_n++] = j;
        }
    }
}

/* MGETs of the read-back planned for this round, one bucket and at most
   CHUNK_KEYS keys each. */
static bool append_readback(struct tally__flusher *f)
{
    redis_sink *r = R(f);
    bool ok = true;
    for (size_t from = 0, n; from < r->rb_n; from += n) {
        unsigned bk = tally__sync_bucket(f->sink, f->refresh[r->rb[from]].digest);
        for (n = 1; n < CHUNK_KEYS && from + n < r->rb_n
                    && tally__sync_bucket(f->sink, f->refresh[r->rb[from + n]].digest) == bk; n++)
            ;
        rlink *l = link_for(f, bk);
        ok &= l && append_mget(f, l, from, n);
    }
    return ok;
}

/* Round 0: flags of the keys pushed now, every batch, the events and the
   read-back; a PING when there is nothing else, so that a flush counts as
   good only if Redis answered. Later rounds: the redirected batches and the
   keys to read again. False when something could not be sent. */
static bool append_round(struct tally__flusher *f, int round, batch *fresh)
{
    redis_sink *r = R(f);
    bool ok = true, any = false;
    if (round == 0) {
        for (batch *b = fresh; b; b = b->next)
            for (size_t i = 0; i < b->n; i++) {
                entry *x = b->items[i].e;
                tally__policy *p = tally__policy_get(f->e, x->policy);
                /* relaxed: only whether a watch exists */
                if (x->limit != 0 || !atomic_load_explicit(&p->table.watch, memory_order_relaxed))
                    continue;
                rlink *l = link_for(f, b->bucket);
                ok &= l && append_flag_get(f, l, x);
            }
    }
    for (batch *b = f->inflight_head; b; b = b->next) {
        if (round > 0 && !b->redirected)
            continue;
        b->redirected = false;
        rlink *l = NULL;
        if (b->ask >= 0 && tally__redis_link_ready(f, &r->links[b->ask]))
            l = &r->links[b->ask];
        else if (b->ask < 0)
            l = link_for(f, b->bucket);
        if (!l || !append_batch(f, l, b)) {
            b->ask = -1;
            ok = false;                        /* kept: sent with a later flush */
            continue;
        }
        any = true;
    }
    if (round == 0) {
        for (event *ev = f->events; ev; ev = ev->next) {
            rlink *l = link_for(f, tally__sync_bucket(f->sink, ev->note->digest));
            ok &= l && append_event(f, l, ev);
            any = true;
        }
        if (r->ro.mode == TALLY_REDIS_CLUSTER && f->refresh_n)
            qsort_r(f->refresh, f->refresh_n, sizeof(*f->refresh), by_bucket, f->sink);
        ok &= plan_readback(f);
        any |= r->rb_n > 0;
    }
    ok &= append_readback(f);
    if (round == 0) {
        if (!any) {
            /* every master that serves a bucket */
            bool pinged[TALLY__LINKS_MAX] = { false };
            for (unsigned bk = 0; bk < f->sink->buckets; bk++) {
                int i = route(r, bk);
                if (i < 0) {
                    ok = false;
                    continue;
                }
                if (pinged[i])
                    continue;
                pinged[i] = true;
                const char *argv[] = { "PING" };
                ok &= tally__redis_link_ready(f, &r->links[i])
                      && append_simple(f, &r->links[i], EX_PING, 1, argv);
            }
        }
    }
    for (int i = 0; i < r->n_links; i++) {
        rlink *l = &r->links[i];
        if (l->waits) {
            char n[16], ms[16];
            snprintf(n, sizeof(n), "%u", r->ro.wait_replicas);
            snprintf(ms, sizeof(ms), "%" PRIu32, r->ro.wait_timeout_ms);
            const char *argv[] = { "WAIT", n, ms };
            if (!append_simple(f, l, EX_WAIT, 3, argv)) {
                l->waits = false;
                l->wait_lost = true;          /* its batches stay unconfirmed */
                ok = false;
            }
        }
    }
    return ok;
}

/* Push everything in flight to Redis, one pipeline per link, then read the
   global counts of the live keys back. */
static int redis_push(tally__sink *s, struct tally__flusher *f)
{
    redis_sink *r = (redis_sink *)s;
    if (r->ro.mode == TALLY_REDIS_CLUSTER && r->map_stale)
        tally__cluster_refresh(f, r);
    batch **fresh = f->inflight_tail;         /* batches formed now start here */
    bool held_back;
    int rc = tally__sync_form_batches(f, &held_back);
    if (rc)
        return rc;
    bool ok = !held_back;                     /* held-back cost is not in Redis yet */
    batch *first = *fresh;
    for (int round = 0; round < ROUNDS; round++) {
        if (round > 0 && r->ro.mode == TALLY_REDIS_CLUSTER && r->map_stale)
            tally__cluster_refresh(f, r);
        ok &= append_round(f, round, first);
        exchange(f);
        bool redirected = false;
        ok &= settle(f, &redirected);
        sweep(f);
        plan_rereads(f);
        if (!redirected && !r->rb_n)
            break;
    }
    return ok && !f->inflight_head && !f->events ? 0 : TALLY_EIO;
}

/* The read-back of the keys new to the engine (sync/flusher.c, guarantee 9):
   MGETs alone, one pipeline per link, no batch, event or WAIT. */
static void redis_prefetch(tally__sink *s, struct tally__flusher *f)
{
    redis_sink *r = (redis_sink *)s;
    if (r->ro.mode == TALLY_REDIS_CLUSTER) {
        if (r->map_stale)
            tally__cluster_refresh(f, r);
        qsort_r(f->refresh, f->refresh_n, sizeof(*f->refresh), by_bucket, f->sink);
    }
    if (!plan_readback(f))
        return;                               /* the keys learn their counts at the next flush */
    append_readback(f);
    exchange(f);
    bool redirected = false;
    settle(f, &redirected);
}

static void redis_destroy(tally__sink *s)
{
    redis_sink *r = (redis_sink *)s;
    for (int i = 0; i < r->n_links; i++) {
        tally__redis_link_drop(&r->links[i]);
        free(r->links[i].ex);
    }
    free(r->rk);
    free(r->rb);
    free(r->cmd);
    free(r->host);
    free(r->unix_path);
    free(r->password);
    free(r->prefix);
    free(r->nodes);
    free(r->master_name);
    free(r);
}

static const tally__sink_ops redis_ops = { .push = redis_push, .prefetch = redis_prefetch,
                                           .destroy = redis_destroy };

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

int tally__sink_redis_new(const tally_redis_options *ro, tally__sink **out)
{
    tally__node seeds[TALLY__NODES_MAX];
    int n_seeds = 0;
    if (ro->mode != TALLY_REDIS_STANDALONE && (n_seeds = tally__parse_nodes(ro->nodes, seeds)) < 0)
        return TALLY_EINVAL;
    redis_sink *r = calloc(1, sizeof(*r));
    if (!r)
        return TALLY_ENOMEM;
    r->base.ops = &redis_ops;
    r->base.buckets = ro->mode == TALLY_REDIS_CLUSTER ? TALLY__CLUSTER_BUCKETS : 1;
    r->ro = *ro;
    r->host = dup_or_null(ro->host);
    r->unix_path = dup_or_null(ro->unix_path);
    r->password = dup_or_null(ro->password);
    r->prefix = strdup(ro->key_prefix ? ro->key_prefix : "tally:");
    r->nodes = dup_or_null(ro->nodes);
    r->master_name = dup_or_null(ro->master_name);
    r->ro.host = r->ro.unix_path = r->ro.password = r->ro.key_prefix = NULL;
    r->ro.nodes = r->ro.master_name = NULL;   /* the copies above are the sink's */
    if (!r->ro.connect_timeout_ms)
        r->ro.connect_timeout_ms = 1000;
    if (!r->ro.command_timeout_ms)
        r->ro.command_timeout_ms = 1000;
    if (!r->ro.wait_timeout_ms)
        r->ro.wait_timeout_ms = 100;
    if ((ro->host && !r->host) || (ro->unix_path && !r->unix_path) || (ro->password && !r->password)
        || !r->prefix || (ro->nodes && !r->nodes) || (ro->master_name && !r->master_name)) {
        redis_destroy(&r->base);
        return TALLY_ENOMEM;
    }
    memcpy(r->seeds, seeds, (size_t)n_seeds * sizeof(*seeds));
    r->n_seeds = n_seeds;
    if (ro->mode == TALLY_REDIS_CLUSTER) {
        tally__cluster_init(r);
    } else if (tally__redis_link(r, ro->host && ro->mode == TALLY_REDIS_STANDALONE ? ro->host : "",
                                 ro->port) < 0) {
        redis_destroy(&r->base);
        return TALLY_EINVAL;                  /* a host name longer than any DNS name */
    }
    *out = &r->base;
    return 0;
}
