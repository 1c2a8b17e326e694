/*
 * The Redis sink: links to Redis (TCP or a unix socket, AUTH, SELECT,
 * timeouts, reconnects with a capped backoff; one link in STANDALONE and
 * SENTINEL mode, one per master in CLUSTER mode: sync/redis-internal.h),
 * over which each flush is one pipeline per link of batch transactions
 * (MULTI ... EXEC), event and flag commands, the MGET read-back of the live
 * keys that no batch tells the total of and, with wait_replicas, a WAIT;
 * between flushes, the same read-back alone for keys new to the engine. A
 * pipeline is written while it is built (past WRITE_AHEAD bytes), so that
 * Redis runs the first transactions while the next are formed, and read once
 * all of it is written. It keeps guarantees 3 and 6 of sync/flusher.c:
 *
 *  3. Each batch carries the next sequence number of its bucket. Its first
 *     send is one transaction of plain commands: an INCRBY per key (their
 *     replies are the totals), a PEXPIRE NX with the INCRBY of a key this
 *     engine has no acknowledged cost of in the window, and the write of the
 *     number into the engine instance's record of the bucket (a string of
 *     TALLY__SEQ_WINDOW 32-bit slots, slot seq % TALLY__SEQ_WINDOW holding
 *     the last number of that slot applied). Redis applies a transaction
 *     wholly or not at all, and runs no other client's command inside it. A
 *     batch whose outcome is unknown is never sent again blind: every
 *     connection dropped with a batch unanswered is closed by CLIENT KILL ID
 *     on the next one before anything else, so nothing it carried can still
 *     run (not even bytes waiting in Redis's input buffer, or in a proxy
 *     that keeps one server connection per client connection; a proxy that
 *     multiplexes clients onto shared connections defeats the fence),
 *     and then one transaction reads the batch's slot and the totals of its
 *     keys: the slot holds the number, the batch ran and the totals are its
 *     reply; else it is sent again as a first send. The flusher never has a
 *     batch outstanding TALLY__SEQ_WINDOW numbers behind the newest of its
 *     bucket, so a slot's number is never an older batch's of the same
 *     slot. The record lives next to the counts it guards (the same slot in
 *     a cluster), written by the same transaction, so a replica that takes
 *     over holds both as of one moment. One record per engine instance and
 *     bucket, refreshed on use, expiring a day after the last: the
 *     bookkeeping stays a fixed number of keys whatever the number of
 *     batches. A count an INCRBY created without a PEXPIRE in its batch (a
 *     key deleted since this engine's last acknowledged cost) gets its
 *     PEXPIRE NX in the next round, so no count is left without a TTL.
 *  6. Every reply is paired with the command it answers, in pipeline order.
 *     An error reply by which Redis refused a batch before running it (an
 *     EXECABORT: a command refused when queued, BUSY, OOM, LOADING, READONLY,
 *     MOVED, CROSSSLOT, ...: see refused_unapplied) puts its deltas back into
 *     their entries, merged per key and window, to be sent in a later batch
 *     under a new number. A batch whose outcome is unknown (its reply was
 *     lost, or an unexpected error; with wait_replicas, a WAIT that did not
 *     confirm enough replicas) is kept with its number and checked as
 *     above; a refusal of a check keeps it too. In a cluster, a MOVED or ASK
 *     keeps the batch as it is and sends it to the node named, in the same
 *     push. A key Redis refused inside the transaction (WRONGTYPE, overflow)
 *     is answered with its error in its place and goes back to its entry
 *     alone. While MAX_KEPT_BATCHES or more kept batches of a bucket wait,
 *     the bucket forms no new batch, so what is sent per flush is bounded by
 *     the pending keys whatever Redis answers.
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
#define ROUNDS          4              /* pipelines per push: the first, then checks' resends,
                                          redirections, re-reads and TTLs owed */
#define WRITE_AHEAD     (256 * 1024)   /* bytes appended to a pipeline before it is written */


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
enum { EX_FENCE, EX_BATCH, EX_CHECK, EX_ASKING, EX_EVENT, EX_FLAG, EX_MGET, EX_TTL, EX_WAIT,
       EX_PING };

/*
 * A batch's first send, one transaction:
 *   MULTI
 *   INCRBY <count> <delta> [PEXPIRE <count> <ms> NX]   per item
 *   BITFIELD <record> SET u32 #<seq % W> <seq>
 *   PEXPIRE <record> 86400000
 *   EXEC
 * A count gets a PEXPIRE when this engine has no acknowledged cost of it in
 * the window: it may be the INCRBY that creates it. Any other count existed
 * when this engine's last batch of it ran, with the TTL the creating
 * transaction gave it; should it have gone since (deleted), the INCRBY's
 * total is its own delta (deltas are never 0) and the count is owed a
 * PEXPIRE NX (settle_batch). NX keeps a TTL the key has.
 *
 * A kept batch's check, one transaction after the fences (guarantee 3):
 *   MULTI
 *   PEXPIRE <record> 86400000
 *   BITFIELD <record> GET u32 #<seq % W>
 *   MGET <count>...
 *   EXEC
 * The PEXPIRE is a write, so that a WAIT after the check also waits for
 * the replication of what the first run wrote.
 */
static const char MULTI_CMD[] = "*1\r\n$5\r\nMULTI\r\n";
static const char EXEC_CMD[] = "*1\r\n$4\r\nEXEC\r\n";

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
 * runs (inside a transaction, when it is queued, which aborts the EXEC). Any
 * other error may come from a command that wrote: its outcome is unknown.
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

/* A connection dropped in the middle of a round that carried a batch or a
   check may still have them waiting in Redis (in its input buffer, or on the
   way): it is fenced, closed by the next connection before a resend. */
void tally__redis_link_drop(rlink *l)
{
    if (l->rc) {
        if (l->nex && l->carried) {
            tally__fence *x = &l->fence[l->n_fence++];   /* room: append_batch */
            x->id = l->client_id;
            memcpy(x->run_id, l->run_id, sizeof(x->run_id));
        }
        redisFree(l->rc);
    }
    l->rc = NULL;
    l->carried = false;
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

static bool append_fences(struct tally__flusher *f, rlink *l);

/* A connected link starts each round's pipeline with its fences. */
bool tally__redis_link_ready(struct tally__flusher *f, rlink *l)
{
    redis_sink *r = R(f);
    if (l->rc)
        return l->nex || append_fences(f, l);
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
    /* the name a later connection fences this one by: its id in the
       server process of that run_id */
    if (ok) {
        redisReply *id = redisCommand(c, "CLIENT ID");
        redisReply *info = id ? redisCommand(c, "INFO server") : NULL;
        const char *run = info && info->type == REDIS_REPLY_STRING ? strstr(info->str, "run_id:") : NULL;
        ok = id && id->type == REDIS_REPLY_INTEGER && id->integer > 0 && run
             && strspn(run + 7, "0123456789abcdef") == sizeof(l->run_id) - 1;
        if (ok) {
            l->client_id = id->integer;
            memcpy(l->run_id, run + 7, sizeof(l->run_id) - 1);
            l->run_id[sizeof(l->run_id) - 1] = 0;
        } else if (id && id->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, id);
        } else if (info && info->type == REDIS_REPLY_ERROR) {
            refused_unapplied(f, info);
        } else {
            set_error_text(f, !id || !info ? c->errstr : "no CLIENT ID or run_id");
        }
        if (id)
            freeReplyObject(id);
        if (info)
            freeReplyObject(info);
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
    return append_fences(f, l);
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
    l->ex[l->nex++] = (tally__expect){ .kind = kind, .p = p, .nrep = 1 };
    return true;
}

/* The same for a command already in the Redis protocol (R(f)->cmd). */
static bool send_built(struct tally__flusher *f, rlink *l, int kind, void *p, size_t from, size_t n,
                       size_t len)
{
    if (!room(f, l) || redisAppendFormattedCommand(l->rc, R(f)->cmd, len) != REDIS_OK)
        return false;
    l->unwritten += len;
    l->ex[l->nex++] = (tally__expect){ .kind = kind, .p = p, .from = from, .n = n, .nrep = 1 };
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

/* "<prefix><slot tag>seen:<instance>", the record of a bucket's batches. */
static int record_key(struct tally__flusher *f, unsigned bucket, char *buf)
{
    char *w = put(put_head(f, bucket, buf), "seen:", 5);
    return (int)(put_hex64(w, f->instance) - buf);
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

/* "BITFIELD <record> <op> u32 #<slot>" and the value of a SET: the head of
   a record command. */
static char *put_record_op(struct tally__flusher *f, const batch *b, char *w, bool set)
{
    char key[KEY_MAX], at[24];
    at[0] = '#';
    size_t at_len = (size_t)(put_u64(at + 1, b->seq % TALLY__SEQ_WINDOW) - at);
    w = put_count(w, '*', set ? 6 : 5);
    w = put_arg(w, "BITFIELD", 8);
    w = put_arg(w, key, (size_t)record_key(f, b->bucket, key));
    w = put_arg(w, set ? "SET" : "GET", 3);
    w = put_arg(w, "u32", 3);
    w = put_arg(w, at, at_len);
    return set ? put_arg_u64(w, b->seq & UINT32_MAX) : w;
}

static char *put_record_ttl(struct tally__flusher *f, const batch *b, char *w)
{
    char key[KEY_MAX];
    w = put_count(w, '*', 3);
    w = put_arg(w, "PEXPIRE", 7);
    w = put_arg(w, key, (size_t)record_key(f, b->bucket, key));
    return put_arg(w, RECORD_TTL_MS, sizeof(RECORD_TTL_MS) - 1);
}

static uint64_t ttl_ms(uint64_t end_ns, uint64_t now)
{
    return (end_ns > now ? (end_ns - now) / TALLY__NS_PER_MS : 0) + TTL_SLACK_MS;
}

/* A batch: its first send (b->sends == 0: nothing of it can run any more)
   or its check; either as one transaction (see MULTI_CMD). */
static bool append_batch(struct tally__flusher *f, rlink *l, batch *b)
{
    bool check = b->sends > 0;
    /* a connection that carried it must find room among the fences */
    if (l->n_fence >= TALLY__FENCES_MAX
        || !cmd_room(f, 512 + 3 * KEY_MAX + b->n * (2 * KEY_MAX + 8 * ARG_MAX_HEAD + 80)))
        return false;
    char key[KEY_MAX];
    uint64_t ttl[(CHUNK_KEYS + 63) / 64] = { 0 };
    size_t queued;
    char *w = put(R(f)->cmd, MULTI_CMD, sizeof(MULTI_CMD) - 1);
    if (check) {
        w = put_record_ttl(f, b, w);
        w = put_record_op(f, b, w, false);
        w = put_arg(put_count(w, '*', b->n + 1), "MGET", 4);
        for (size_t i = 0; i < b->n; i++) {
            const entry *x = b->items[i].e;
            w = put_arg(w, key, (size_t)count_key(f, x->policy, x->limit, x->digest, x->win, key));
        }
        queued = 3;
    } else {
        uint64_t now = tally_now_ns();
        queued = b->n + 2;
        for (size_t i = 0; i < b->n; i++) {
            const entry *x = b->items[i].e;
            size_t len = (size_t)count_key(f, x->policy, x->limit, x->digest, x->win, key);
            w = put_arg(put_count(w, '*', 3), "INCRBY", 6);
            w = put_arg_u64(put_arg(w, key, len), b->items[i].delta);
            if (x->acked)
                continue;
            w = put_arg(put_count(w, '*', 4), "PEXPIRE", 7);
            w = put_arg(put_arg_u64(put_arg(w, key, len), ttl_ms(x->end_ns, now)), "NX", 2);
            ttl[i / 64] |= UINT64_C(1) << (i % 64);
            queued++;
        }
        w = put_record_op(f, b, w, true);
        w = put_record_ttl(f, b, w);
    }
    w = put(w, EXEC_CMD, sizeof(EXEC_CMD) - 1);
    if (b->ask >= 0) {
        const char *asking[] = { "ASKING" };
        if (!send_cmd(f, l, EX_ASKING, NULL, 1, asking, NULL))
            return false;
    }
    if (!send_built(f, l, check ? EX_CHECK : EX_BATCH, b, 0, 0, (size_t)(w - R(f)->cmd)))
        return false;
    tally__expect *x = &l->ex[l->nex - 1];
    x->nrep = queued + 2;
    memcpy(x->ttl, ttl, sizeof(ttl));
    b->sends++;
    b->ask = -1;
    l->carried = true;
    l->waits = R(f)->ro.wait_replicas > 0;
    return true;
}

/* CLIENT KILL ID of every connection of @l dropped with a batch or a check
   unanswered, first in its pipeline: what those carried either ran before
   the kill or never will. A fence of another server process is let go
   unsent: its id may name another client here, and the connection went
   with its process (a restart) or writes to another data set (a failover:
   what a deposed master runs late is never replicated to the new one). */
static bool append_fences(struct tally__flusher *f, rlink *l)
{
    for (int i = 0; i < l->n_fence;) {
        if (strcmp(l->fence[i].run_id, l->run_id) != 0) {
            l->fence[i] = l->fence[--l->n_fence];
            continue;
        }
        char id[24];
        snprintf(id, sizeof(id), "%lld", l->fence[i].id);
        const char *argv[] = { "CLIENT", "KILL", "ID", id };
        if (!send_cmd(f, l, EX_FENCE, NULL, 4, argv, NULL))
            return false;
        l->ex[l->nex - 1].from = (size_t)l->fence[i].id;
        i++;
    }
    return true;
}

/* The PEXPIREs owed to counts created without a TTL. */
static bool append_ttl_due(struct tally__flusher *f)
{
    redis_sink *r = R(f);
    bool ok = true;
    uint64_t now = tally_now_ns();
    for (size_t i = 0; i < r->due_n; i++) {
        const tally__ttl_due *d = &r->due[i];
        rlink *l = link_for(f, tally__sync_bucket(f->sink, d->digest));
        char key[KEY_MAX], ms[24];
        if (!l) {
            ok = false;
            continue;
        }
        int len = count_key(f, d->policy, d->limit, d->digest, d->win, key);
        snprintf(ms, sizeof(ms), "%" PRIu64, ttl_ms(d->end_ns, now));
        const char *argv[] = { "PEXPIRE", key, ms, "NX" };
        size_t argl[] = { 7, (size_t)len, strlen(ms), 2 };
        if (!send_cmd(f, l, EX_TTL, NULL, 4, argv, argl)) {
            ok = false;
            continue;
        }
        l->ex[l->nex - 1].from = i;
        l->waits = r->ro.wait_replicas > 0;
    }
    return ok;
}

/* A count of @x is owed a PEXPIRE. False when out of memory. */
static bool owe_ttl(struct tally__flusher *f, const entry *x)
{
    redis_sink *r = R(f);
    if (r->due_n == r->due_cap) {
        size_t cap = r->due_cap ? 2 * r->due_cap : 64;
        tally__ttl_due *d = realloc(r->due, cap * sizeof(*d));
        if (!d)
            return false;
        r->due = d;
        r->due_cap = cap;
    }
    r->due[r->due_n++] = (tally__ttl_due){ .policy = x->policy, .limit = x->limit, .digest = x->digest,
                                           .win = x->win, .end_ns = x->end_ns };
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
            tally__expect *x = &l->ex[k];
            /* a transaction's +QUEUED replies are read and let go; the
               first error before EXEC's reply tells why EXEC aborted */
            for (size_t i = 0; i < x->nrep && l->rc; i++) {
                redisReply *rep = NULL;
                if (redisGetReply(l->rc, (void **)&rep) != REDIS_OK || !rep) {
                    set_error_text(f, l->rc->errstr);
                    tally__redis_link_drop(l);
                    if (r->ro.mode == TALLY_REDIS_CLUSTER)
                        r->map_stale = true;
                    break;
                }
                if (i + 1 == x->nrep) {
                    x->r = rep;
                } else if (rep->type == REDIS_REPLY_ERROR && !x->err) {
                    x->err = rep;
                    x->multi_failed = i == 0;
                } else {
                    freeReplyObject(rep);
                }
            }
        }
        /* a demoted master: ask the sentinels again before the next write */
        for (size_t k = 0; k < l->nex && l->rc && r->ro.mode == TALLY_REDIS_SENTINEL; k++)
            if (reply_is(l->ex[k].r, "READONLY") || reply_is(l->ex[k].err, "READONLY"))
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

/* The error that refused a transaction, if one did; *unrun: it proves that
   nothing of the transaction ran (an EXECABORT, whose cause is the first
   command refused when queued or, since Redis 7.0, the text after "because
   of: "). A MULTI refused leaves its commands to run one by one: their
   outcome is unknown. */
static const redisReply *txn_error(const tally__expect *x, redisReply *tmp, bool *unrun)
{
    static const char because[] = "because of: ";
    const redisReply *r = x->r;
    *unrun = false;
    if (x->multi_failed)
        return x->err;
    if (r->type != REDIS_REPLY_ERROR)
        return NULL;
    if (!reply_is(r, "EXECABORT"))
        return r;
    *unrun = true;
    if (x->err)
        return x->err;
    const char *at = r->str ? strstr(r->str, because) : NULL;
    if (!at)
        return r;
    *tmp = *r;
    tmp->str = (char *)at + sizeof(because) - 1;
    tmp->len = r->len - (size_t)(tmp->str - r->str);
    return tmp;
}

/* A batch or a check refused with @e. */
static int refused_batch(struct tally__flusher *f, rlink *l, batch *b, const redisReply *e, bool unrun)
{
    redis_sink *rs = R(f);
    int kind = refused_unapplied(f, e);
    if (unrun)
        kind = REPLY_REFUSED;
    if (rs->ro.mode == TALLY_REDIS_CLUSTER) {
        bool ask = false;
        int to = tally__cluster_redirect(rs, e, l, &ask);
        if (to >= 0) {
            /* not run by this node; to be sent to the one named, as a first
               send when this was the only one */
            if (b->sends == 1)
                b->sends = 0;
            b->ask = ask ? to : -1;
            b->redirected = true;
            rs->map_stale |= !ask;
            return REPLY_UNKNOWN;
        }
        if (reply_is(e, "READONLY") || reply_is(e, "CLUSTERDOWN") || reply_is(e, "MASTERDOWN"))
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

/* Acknowledge item @i of @b with the key's @total (an INCRBY's reply, or
   a read after it), or put it back (@refused: Redis refused its INCRBY). */
static void settle_item(struct tally__flusher *f, batch *b, size_t i, const redisReply *refused,
                        uint64_t total, uint64_t *totals, size_t *n)
{
    entry *x = b->items[i].e;
    x->inflight--;
    if (refused) {
        refused_unapplied(f, refused);
        x->fresh += b->items[i].delta;         /* sent again, under a new number */
        return;
    }
    x->acked += b->items[i].delta;
    x->acked_seq = f->seq;
    tally__sync_store_remote(f, x, total > x->acked ? total - x->acked : 0);
    b->items[*n] = b->items[i];
    totals[(*n)++] = total;
}

/* The reply to a batch's first send: one of the REPLY_ values. @acked:
   WAIT confirmed it (or none was asked for). Settled batches leave the
   list afterwards. */
static int settle_batch(struct tally__flusher *f, rlink *l, batch *b, const tally__expect *ex, bool acked)
{
    const redisReply *r = ex->r, *e;
    redisReply tmp;
    bool unrun;
    if (!r)
        return REPLY_UNKNOWN;                  /* no reply: it may have run */
    if ((e = txn_error(ex, &tmp, &unrun)))
        return refused_batch(f, l, b, e, unrun);
    size_t queued = b->n + 2;
    for (size_t i = 0; i < b->n; i++)
        queued += ex->ttl[i / 64] >> (i % 64) & 1;
    bool shape = r->type == REDIS_REPLY_ARRAY && r->elements == queued;
    for (size_t i = 0, at = 0; i < b->n && shape; i++) {
        const redisReply *v = r->element[at];
        shape = v->type == REDIS_REPLY_ERROR || (v->type == REDIS_REPLY_INTEGER && v->integer >= 0);
        at += 1 + (ex->ttl[i / 64] >> (i % 64) & 1);
    }
    if (!shape) {
        set_error_text(f, "unexpected reply to a batch transaction");
        return REPLY_UNKNOWN;
    }
    if (!acked)
        return REPLY_UNKNOWN;                  /* run, but maybe on this master alone */
    uint64_t totals[CHUNK_KEYS];
    size_t n = 0;
    int rc = REPLY_OK;
    for (size_t i = 0, at = 0; i < b->n; i++) {
        const redisReply *v = r->element[at];
        bool ttl = ex->ttl[i / 64] >> (i % 64) & 1;
        at += 1 + ttl;
        if (v->type == REDIS_REPLY_ERROR) {
            settle_item(f, b, i, v, 0, totals, &n);
            rc = REPLY_PARTLY;
            continue;
        }
        /* created by this INCRBY, and no PEXPIRE went with it */
        if ((uint64_t)v->integer == b->items[i].delta && !ttl && !owe_ttl(f, b->items[i].e))
            set_error_text(f, "out of memory for the TTL of a new count");
        settle_item(f, b, i, NULL, (uint64_t)v->integer, totals, &n);
    }
    tally__sync_deliver_deltas(f, b->items, totals, n);
    b->settled = true;
    return rc;
}

/* The reply to a kept batch's check: its record slot and the totals of its
   keys. The slot holds its number: it ran, and the totals tell what its
   reply would have. Else, with every fence of the link acknowledged before
   it, nothing of the batch can run any more: it goes again as a first send,
   in the next round. */
static int settle_check(struct tally__flusher *f, rlink *l, batch *b, const tally__expect *ex, bool acked)
{
    const redisReply *r = ex->r, *e;
    redisReply tmp;
    bool unrun;
    if (!r)
        return REPLY_UNKNOWN;
    if ((e = txn_error(ex, &tmp, &unrun)))
        return refused_batch(f, l, b, e, false);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 || r->element[1]->type != REDIS_REPLY_ARRAY
        || r->element[1]->elements != 1 || r->element[1]->element[0]->type != REDIS_REPLY_INTEGER
        || r->element[2]->type != REDIS_REPLY_ARRAY || r->element[2]->elements != b->n) {
        set_error_text(f, "unexpected reply to a batch check");
        return REPLY_UNKNOWN;
    }
    if (l->n_fence) {
        set_error_text(f, "an earlier connection could not be closed (CLIENT KILL)");
        return REPLY_UNKNOWN;
    }
    if ((uint64_t)r->element[1]->element[0]->integer != (b->seq & UINT32_MAX)) {
        b->sends = 0;
        b->redirected = true;
        return REPLY_UNKNOWN;
    }
    if (!acked)
        return REPLY_UNKNOWN;
    uint64_t totals[CHUNK_KEYS];
    size_t n = 0;
    int rc = REPLY_OK;
    for (size_t i = 0; i < b->n; i++) {
        const redisReply *v = r->element[2]->element[i];
        uint64_t total = 0;
        char *end = NULL;
        if (v->type == REDIS_REPLY_STRING)
            total = strtoull(v->str, &end, 10);
        /* not an integer: the INCRBY was refused ("not an integer"); nil:
           the count went since, or is no string (WRONGTYPE), which a read
           cannot tell apart: taken as gone */
        if (end && (end == v->str || *end)) {
            redisReply refused = { .type = REDIS_REPLY_ERROR, .str = (char *)"ERR value is not an integer",
                                   .len = 27 };
            settle_item(f, b, i, &refused, 0, totals, &n);
            rc = REPLY_PARTLY;
            continue;
        }
        /* whether the first run created the count without a TTL is not
           known: NX makes the PEXPIRE a no-op where it has one */
        if (!owe_ttl(f, b->items[i].e))
            set_error_text(f, "out of memory for the TTL of a new count");
        settle_item(f, b, i, NULL, total, totals, &n);
    }
    tally__sync_deliver_deltas(f, b->items, totals, n);
    b->settled = true;
    return rc;
}

static void settle_fence(struct tally__flusher *f, rlink *l, const tally__expect *x)
{
    if (!x->r || x->r->type != REDIS_REPLY_INTEGER) {
        if (x->r && x->r->type == REDIS_REPLY_ERROR)
            refused_unapplied(f, x->r);
        return;
    }
    for (int i = 0; i < l->n_fence; i++)
        if ((size_t)l->fence[i].id == x->from) {
            l->fence[i] = l->fence[--l->n_fence];
            break;
        }
}

static void settle_ttl(struct tally__flusher *f, const tally__expect *x)
{
    if (x->r && x->r->type == REDIS_REPLY_INTEGER)
        R(f)->due[x->from].done = true;
    else if (x->r && x->r->type == REDIS_REPLY_ERROR)
        refused_unapplied(f, x->r);
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
    case EX_BATCH:
    case EX_CHECK: {
        batch *b = x->p;
        int rc = x->kind == EX_BATCH ? settle_batch(f, l, b, x, l->acked_by_wait)
                                     : settle_check(f, l, b, x, l->acked_by_wait);
        *redirected |= b->redirected;
        return rc == REPLY_OK || b->redirected;
    }
    case EX_FENCE:
        settle_fence(f, l, x);
        return true;
    case EX_TTL:
        settle_ttl(f, x);
        return true;
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

/* The pass of settle() a reply belongs to. */
static int settle_pass(int kind)
{
    return kind == EX_FENCE ? 0 : kind == EX_BATCH || kind == EX_CHECK ? 1 : 2;
}

/* Settle every reply of the round: the fences first (a check counts only
   after every fence of its link), then the batches (a read-back skips the
   keys whose totals they told); true when all of it was acknowledged. */
static bool settle(struct tally__flusher *f, bool *redirected)
{
    redis_sink *r = R(f);
    bool ok = true;
    for (int pass = 0; pass < 3; pass++)
        for (int i = 0; i < r->n_links; i++) {
            rlink *l = &r->links[i];
            for (size_t k = 0; k < l->nex; k++)
                if (settle_pass(l->ex[k].kind) == pass)
                    ok &= settle_one(f, l, &l->ex[k], redirected);
        }
    for (int i = 0; i < r->n_links; i++) {
        rlink *l = &r->links[i];
        for (size_t k = 0; k < l->nex; k++) {
            if (l->ex[k].r)
                freeReplyObject(l->ex[k].r);
            if (l->ex[k].err)
                freeReplyObject(l->ex[k].err);
        }
        l->nex = 0;
        l->carried = false;
        l->waits = false;
        l->wait_lost = false;
    }
    /* TTLs set, or owed to counts whose keys have expired anyway */
    uint64_t now = tally_now_ns();
    size_t n = 0;
    for (size_t i = 0; i < r->due_n; i++)
        if (!r->due[i].done && r->due[i].end_ns + TTL_SLACK_MS * TALLY__NS_PER_MS > now)
            r->due[n++] = r->due[i];
    r->due_n = n;
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
    if (R(f)->due_n) {
        ok &= append_ttl_due(f);
        any = true;
    }
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
        if (!redirected && !r->rb_n && !r->due_n)
            break;
    }
    return ok && !f->inflight_head && !f->events && !r->due_n ? 0 : TALLY_EIO;
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
    free(r->due);
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
