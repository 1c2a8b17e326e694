/*
 * tally-gate: a small HTTP/1.1 gateway that embeds the engine the way a proxy
 * would. Worker threads each run their own epoll loop on their own listening
 * socket, all bound to one port with SO_REUSEPORT, so the kernel spreads the
 * connections and the workers share nothing but the engine. Each request is
 * one tally_hit; the answer is 200 (or the upstream's answer) or 429, with
 * the RateLimit-* headers. Usage and exit codes: --help, docs/TOOLS.md "tally-gate".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tally.h"
#include "redis-address.h"

enum { EXIT_FAIL = 1, EXIT_USAGE = 2 };

#define MAX_REQUEST   (64 * 1024)    /* headers and body of one request */
#define MAX_UPSTREAM  (16 << 20)     /* one upstream response */
#define MAX_DRAIN     (1 << 20)      /* read and dropped after a closing answer */
#define SEC           UINT64_C(1000000000)
/* A closing answer lingers: the gate shuts its write side and reads until the
   client's EOF, because closing with the client's bytes unread (or still on
   the way) resets the connection, and the reset destroys the answer the client
   has not read yet. It lingers at most LINGER_S seconds from the answer,
   whatever the client sends meanwhile, so that a client that never closes its
   side cannot hold the connection's fd. */
#define LINGER_S      2
/* The default --upstream-timeout-ms: an upstream that accepts and never
   answers would otherwise hold the client, and the fd, for good. */
#define UPSTREAM_TIMEOUT_MS 10000
#define STR_(x)       #x
#define STR(x)        STR_(x)
#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

static const char usage_text[] =
"usage: tally-gate -p SPEC [options]\n"
"An HTTP gateway that rate-limits every request with the policy SPEC and\n"
"answers 200 (or forwards to an upstream) or 429, with RateLimit-Limit,\n"
"RateLimit-Remaining, RateLimit-Reset and, on 429, Retry-After headers.\n"
"GET /metrics answers the counters in the Prometheus format (not limited).\n"
"\n"
"  -p, --policy SPEC       the policy, e.g. 'api: 10/s burst 20 gcra' (docs/TOOLS.md)\n"
"      --policy-file FILE  read the policy from FILE (its first line that is not\n"
"                          empty or a # comment) instead; SIGHUP reads it again\n"
"                          and updates the policy of the same name, keeping every\n"
"                          key's usage; a file that cannot be read, parsed or\n"
"                          applied changes nothing and is logged\n"
"      --delay-max DURATION\n"
"                          GCRA policies: delay a request that conforms within\n"
"                          DURATION (e.g. 500ms, 2s) instead of answering 429;\n"
"                          each request is decided when it arrives, and its\n"
"                          answer waits in the event loop: the worker's other\n"
"                          connections go on, the connection's next requests\n"
"                          wait their turn\n"
"  -l, --listen ADDR:PORT  where to listen (default 127.0.0.1:8080; port 0 picks\n"
"                          a free one)\n"
"  -t, --threads N         worker threads, each with its own event loop (default 2)\n"
"  -H, --key-header NAME   take the key from this request header (default: the\n"
"                          client address; also when the header is missing);\n"
"                          a request whose header is empty or longer than 256\n"
"                          bytes (the engine's max_key_len) is answered 400\n"
"  -u, --upstream H:PORT   forward allowed requests to this HTTP server\n"
"      --upstream-timeout-ms N\n"
"                          answer 504 when the upstream has not answered N ms\n"
"                          after the request was forwarded (default "
                          STR(UPSTREAM_TIMEOUT_MS) ")\n"
"  -r, --redis ADDR        share the counters through Redis (the flusher); ADDR is\n"
"                          H:PORT, cluster:H:PORT[,H:PORT]... (seed nodes of a\n"
"                          Redis Cluster) or sentinel:NAME@H:PORT[,H:PORT]...\n"
"                          (the sentinels of the master NAME)\n"
"      --redis-prefix P    Redis key prefix (default tally:)\n"
"      --redis-wait N      a flush counts only once N replicas have it (WAIT)\n"
"      --flush-ms N        flush interval in ms (default 1000)\n"
"      --hash-key HEX      the engine's hash key, 32 hex digits (keep it secret);\n"
"                          Redis names keys by their keyed digest, so gates\n"
"                          share counts only under the same key (default: a\n"
"                          random one, this gate's alone)\n"
"      --capacity N        most keys tracked at once (default 1048576)\n"
"      --port-file FILE    write the port listened on to FILE once ready\n"
"  -h, --help              this text\n"
"\n"
"A request is answered 400 without being counted when it is malformed, over\n"
"64 KiB, or framed ambiguously (RFC 9112 section 6.3): more than one\n"
"Content-Length, one that is not a number, or Content-Length together with\n"
"Transfer-Encoding; the connection is then closed. Transfer-Encoding alone\n"
"(chunked bodies) is answered 501. The body of a 400 names the problem.\n"
"After a closing answer (these, a 501, or one to Connection: close) the gate\n"
"reads and drops what the client still sends, up to 1 MiB, until the client\n"
"closes its side, so that the client reads the answer rather than a reset;\n"
"it closes the connection anyway at most " STR(LINGER_S) " s after the answer.\n"
"\n"
"With -u, each allowed request goes to the upstream on a connection of its\n"
"own; a slow upstream holds up only the client connection that waits for it\n"
"(whose next requests wait their turn), not the worker's other connections.\n"
"The response ends at its Content-Length or when the upstream closes. A\n"
"refused connection, or an upstream that closes without a response, is\n"
"answered 502; no response within --upstream-timeout-ms, 504.\n"
"\n"
"A policy with a concurrent limit (N concurrent lease D) counts requests in\n"
"flight per key: each allowed request holds its key until its answer is\n"
"produced (with -u, until the upstream exchange ends).\n"
"\n"
"SIGTERM or SIGINT stops it cleanly: the workers close their connections, the\n"
"flusher pushes what is pending, and it exits 0.\n"
"Exit status: 0 stopped by a signal; 1 it could not start (address in use,\n"
"engine or flusher error) or a final flush failed; 2 bad arguments or spec.\n";

struct counters {                   /* one per worker; summed by /metrics */
    _Atomic uint64_t allowed, denied, errors, upstream_errors, connections;
    char pad[64];
};

struct gate {
    tally_engine *engine;
    uint32_t policy;
    tally_policy pol;               /* as started; a reload changes the maxes below */
    _Atomic uint64_t limit_max[TALLY_MAX_LIMITS];   /* RateLimit-Limit of each limit */
    const char *policy_file;
    uint64_t delay_max_ns;          /* --delay-max: reserve instead of hit */
    bool holds;                     /* the policy has a concurrent limit: release */
    const char *key_header;
    size_t key_header_len;
    size_t max_key_len;             /* the engine's: a longer key header is refused */
    struct sockaddr_storage upstream;
    socklen_t upstream_len;
    bool has_upstream;
    uint64_t upstream_timeout_ns;
    int stop_fd;                    /* eventfd, readable once shutdown begins */
    unsigned n_workers;
    struct counters *counters;
};

struct buf {
    char *p;
    size_t len, off, cap;           /* off: how much of it is sent */
};

/* What an epoll event's data.ptr points at, when not the listener or the stop
   eventfd: a client connection, or the exchange it has with the upstream.
   Both structs start with this tag, so the event loop can read it first. */
enum source { SRC_CLIENT, SRC_UPSTREAM };

/* Where an exchange stands: still waiting, or ended (up_end) with a response,
   a failure (502) or the timeout (504). */
enum up_step { UP_WAIT, UP_DONE, UP_FAIL, UP_TIMEOUT };

/* The exchange for the request a client connection waits on: one at a time,
   because the answers go back in the order of the requests. */
struct upstream {
    enum source src;                /* SRC_UPSTREAM */
    int fd;                         /* -1: no exchange in flight */
    bool connected;
    bool keep_alive;                /* what the client asked for */
    bool bodiless;                  /* a HEAD: the response is its head alone */
    size_t resp_end;                /* 0: head not in yet; SIZE_MAX: ends at EOF */
    struct buf req, resp;
    char rl[256];                   /* our RateLimit-* headers for the answer */
};

struct conn;

/* Connections waiting for one kind of deadline, in deadline order, so that the
   first is always the next to expire. The linger and upstream lists set one
   delay for all, so they only ever append; --delay-max sets each its own. */
struct timeouts {
    struct conn *first, *last;
    uint64_t delay;                 /* ns */
};

struct conn {
    enum source src;                /* SRC_CLIENT */
    int fd;                         /* -1: closed, freed after this batch of events */
    uint32_t events;                /* the epoll interest set for fd */
    char peer[INET6_ADDRSTRLEN];
    char *in;
    size_t in_len;
    struct buf out;
    bool close_after;               /* close once out is written */
    bool draining;                  /* answered and shut for writing: reading to EOF */
    size_t drained;                 /* bytes dropped while draining */
    struct upstream up;
    char held[257];                 /* the key a concurrent limit holds for the exchange */
    size_t held_len;                /* 0: none held */
    bool delayed;                   /* the answer waits for its --delay-max deadline */
    /* On the worker's delayed list while delayed, then on its upstream list
       while up.fd is open, on its linger list while draining: one at a time,
       the linger starts after the last answer. */
    struct timeouts *timer;
    uint64_t deadline;              /* CLOCK_MONOTONIC ns */
    struct conn *tprev, *tnext;
    struct conn *prev, *next;       /* the worker's connections; next: its closed list */
};

struct worker {
    struct gate *g;
    unsigned id;
    int listen_fd, ep;
    struct conn *conns;
    struct conn *closed;            /* closed in this batch of events, to free */
    struct timeouts linger, upstream, delayed;
    pthread_t thread;
};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("tally-gate: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(EXIT_FAIL);
}

/* ---- output buffer ----------------------------------------------------- */

/* Room for n more bytes. */
static bool buf_reserve(struct buf *b, size_t n)
{
    if (b->len + n <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return false;
    b->p = p;
    b->cap = cap;
    return true;
}

static bool buf_put(struct buf *b, const char *s, size_t n)
{
    if (!buf_reserve(b, n))
        return false;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return true;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    *b = (struct buf){ 0 };
}

static bool out_put(struct conn *c, const char *s, size_t n)
{
    return buf_put(&c->out, s, n);
}

static bool out_printf(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool out_printf(struct conn *c, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < sizeof buf && out_put(c, buf, (size_t)n);
}

static void simple_response(struct conn *c, int status, const char *reason, const char *extra,
                            const char *body)
{
    out_printf(c, "HTTP/1.1 %d %s\r\n%sContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
               status, reason, extra, strlen(body), c->close_after ? "Connection: close\r\n" : "");
    out_put(c, body, strlen(body));
}

/* ---- request parsing --------------------------------------------------- */

struct request {
    const char *method, *target;
    size_t method_len, target_len;
    const char *headers;            /* first header line */
    size_t head_len;                /* request line and headers, with the blank line */
    size_t body_len;
    const char *key;                /* value of the key header, if present */
    size_t key_len;
    bool keep_alive, chunked, has_length;
    const char *bad;                /* why the request is refused (parse_request -1) */
};

/* Case-insensitive header match at the start of a line: "Name:". */
static const char *header_value(const char *line, const char *end, const char *name, size_t len,
                                size_t *vlen)
{
    if ((size_t)(end - line) <= len || line[len] != ':' || strncasecmp(line, name, len) != 0)
        return NULL;
    const char *v = line + len + 1;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    const char *e = end;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    *vlen = (size_t)(e - v);
    return v;
}

/* 1: a whole request is in the buffer; 0: need more; -1: refused, r->bad says why.
   A refused request's framing is unknown: the connection cannot go on. */
static int parse_request(const struct gate *g, const char *buf, size_t len, struct request *r)
{
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) {
        if (len < MAX_REQUEST)
            return 0;
        r->bad = "request too large";
        return -1;
    }
    *r = (struct request){ .head_len = (size_t)(end - buf) + 4, .bad = "malformed request line" };
    const char *eol = memmem(buf, (size_t)(end - buf) + 2, "\r\n", 2);
    const char *sp1 = memchr(buf, ' ', (size_t)(eol - buf));
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (!sp2 || sp1 == buf || sp2 == sp1 + 1 || eol - sp2 < 9 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0)
        return -1;
    r->method = buf;
    r->method_len = (size_t)(sp1 - buf);
    r->target = sp1 + 1;
    r->target_len = (size_t)(sp2 - sp1 - 1);
    r->keep_alive = sp2[8] == '1';
    r->headers = eol + 2;
    for (const char *line = eol + 2; line < end + 2;) {
        const char *le = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        size_t vl;
        const char *v;
        if (g->key_header && (v = header_value(line, le, g->key_header, g->key_header_len, &vl))) {
            r->key = v;
            r->key_len = vl;
        } else if ((v = header_value(line, le, "Connection", 10, &vl))) {
            if (vl == 5 && strncasecmp(v, "close", 5) == 0)
                r->keep_alive = false;
            else if (vl == 10 && strncasecmp(v, "keep-alive", 10) == 0)
                r->keep_alive = true;
        } else if ((v = header_value(line, le, "Content-Length", 14, &vl))) {
            /* RFC 9112 6.3: a second length, even an equal one, makes the body's end
               a guess that a proxy behind us may guess otherwise (smuggling) */
            if (r->has_length) {
                r->bad = "more than one Content-Length";
                return -1;
            }
            r->has_length = true;
            bool digits = vl > 0;
            size_t n = 0;
            for (size_t i = 0; i < vl; i++) {
                digits &= v[i] >= '0' && v[i] <= '9';
                if (n <= MAX_REQUEST)         /* beyond, refused as too large: no wrap */
                    n = n * 10 + (size_t)(v[i] - '0');
            }
            if (!digits) {
                r->bad = "invalid Content-Length";
                return -1;
            }
            r->body_len = n;
        } else if ((v = header_value(line, le, "Transfer-Encoding", 17, &vl))) {
            r->chunked = true;
        }
        line = le + 2;
    }
    /* Without chunked support the body's end would be Content-Length's guess. */
    if (r->chunked && r->has_length) {
        r->bad = "Content-Length with Transfer-Encoding";
        return -1;
    }
    if (r->head_len + r->body_len > MAX_REQUEST) {
        r->bad = "request too large";
        return -1;
    }
    return len >= r->head_len + r->body_len ? 1 : 0;
}

/* ---- deadlines and epoll interest -------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * SEC + (uint64_t)ts.tv_nsec;
}

/* Inserts from the end: a list of one delay appends at once. */
static void timer_at(struct timeouts *t, struct conn *c, uint64_t deadline)
{
    struct conn *before = t->last;
    while (before && before->deadline > deadline)
        before = before->tprev;
    c->timer = t;
    c->deadline = deadline;
    c->tprev = before;
    c->tnext = before ? before->tnext : t->first;
    if (c->tnext)
        c->tnext->tprev = c;
    else
        t->last = c;
    if (before)
        before->tnext = c;
    else
        t->first = c;
}

static void timer_add(struct timeouts *t, struct conn *c)
{
    timer_at(t, c, now_ns() + t->delay);
}

static void timer_del(struct conn *c)
{
    struct timeouts *t = c->timer;
    if (!t)
        return;
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        t->first = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    else
        t->last = c->tprev;
    c->timer = NULL;
}

/* The client's fd waits for room while answers are unwritten; for nothing while
   the upstream or a delay owes the next answer, so that the requests behind it
   stay in the socket (and hold the client back) rather than pile up here; else
   for requests. EPOLLERR and EPOLLHUP come whatever the interest: a client that
   resets its connection meanwhile is still seen. */
static void conn_watch(struct worker *w, struct conn *c)
{
    uint32_t events = c->out.off < c->out.len ? EPOLLOUT
                    : c->up.fd >= 0 || c->delayed ? 0 : EPOLLIN;
    if (events == c->events)
        return;
    struct epoll_event ev = { .events = events, .data.ptr = c };
    epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

/* ---- upstream: one non-blocking exchange per allowed request ----------- */

static bool has_header(const char *head, size_t len, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = head; p && p < head + len;) {
        const char *le = memmem(p, (size_t)(head + len - p), "\r\n", 2);
        if (!le)
            break;
        if ((size_t)(le - p) > n && p[n] == ':' && strncasecmp(p, name, n) == 0)
            return true;
        p = le + 2;
    }
    return false;
}

/* The request line and headers minus Connection, then ours: one request per
   upstream connection, so that the upstream's close can end a response. */
static bool up_request(struct buf *b, const char *req, const struct request *r)
{
    bool ok = buf_put(b, req, (size_t)(r->headers - req));
    for (const char *line = r->headers; ok && line < req + r->head_len - 2;) {
        const char *le = memmem(line, (size_t)(req + r->head_len - line), "\r\n", 2);
        size_t vl;
        if (!header_value(line, le, "Connection", 10, &vl))
            ok = buf_put(b, line, (size_t)(le + 2 - line));
        line = le + 2;
    }
    return ok && buf_put(b, "Connection: close\r\n\r\n", 21) &&
           buf_put(b, req + r->head_len, r->body_len);
}

/* Where the response ends, once its head (head_len bytes) is in: RFC 9112
   section 6.3. SIZE_MAX when only the upstream's close can tell: no length or
   several, Transfer-Encoding, or an interim 1xx that the final answer follows. */
static size_t response_end(const char *resp, size_t head_len, bool bodiless)
{
    /* 16: the shortest head, "HTTP/1.1 200\r\n\r\n" */
    if (head_len < 16 || memcmp(resp, "HTTP/1.", 7) != 0 || resp[9] == '1')
        return SIZE_MAX;
    if (bodiless || memcmp(resp + 9, "204", 3) == 0 || memcmp(resp + 9, "304", 3) == 0)
        return head_len;
    const char *line = (const char *)memmem(resp, head_len, "\r\n", 2) + 2;
    const char *end = resp + head_len - 2;
    size_t body = SIZE_MAX;
    while (line < end) {
        const char *le = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        size_t vl;
        const char *v = header_value(line, le, "Content-Length", 14, &vl);
        if (v) {
            if (body != SIZE_MAX || vl == 0 || vl > 9)   /* over 9 digits: over MAX_UPSTREAM */
                return SIZE_MAX;
            body = 0;
            for (size_t i = 0; i < vl; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return SIZE_MAX;
                body = body * 10 + (size_t)(v[i] - '0');
            }
        } else if (header_value(line, le, "Transfer-Encoding", 17, &vl)) {
            return SIZE_MAX;
        }
        line = le + 2;
    }
    return body == SIZE_MAX ? SIZE_MAX : head_len + body;
}

/* Appends the upstream's response to the client's answers, our RateLimit-*
   headers after its status line. false: it is not an HTTP response. */
static bool relay(struct conn *c)
{
    const char *resp = c->up.resp.p;
    size_t len = c->up.resp.len;
    const char *eol = len >= 12 ? memmem(resp, len, "\r\n", 2) : NULL;
    const char *hend = eol ? memmem(resp, len, "\r\n\r\n", 4) : NULL;
    if (!hend || memcmp(resp, "HTTP/1.", 7) != 0)
        return false;
    /* Without a length the body ends when the connection does. */
    if (!has_header(eol + 2, (size_t)(hend + 4 - eol - 2), "Content-Length") &&
        !has_header(eol + 2, (size_t)(hend + 4 - eol - 2), "Transfer-Encoding"))
        c->close_after = true;
    out_put(c, resp, (size_t)(eol + 2 - resp));
    out_put(c, c->up.rl, strlen(c->up.rl));
    if (c->close_after && c->up.keep_alive)
        out_put(c, "Connection: close\r\n", 19);
    out_put(c, eol + 2, len - (size_t)(eol + 2 - resp));
    return true;
}

static void up_error(struct worker *w, struct conn *c, bool timeout, const char *rl)
{
    atomic_fetch_add_explicit(&w->g->counters[w->id].upstream_errors, 1, memory_order_relaxed);
    if (timeout)
        simple_response(c, 504, "Gateway Timeout", rl, "upstream timed out\n");
    else
        simple_response(c, 502, "Bad Gateway", rl, "upstream failed\n");
}

/* Ends the exchange: its fd, its deadline, its buffers, the hold of its key. */
static void up_close(struct worker *w, struct conn *c)
{
    struct upstream *u = &c->up;
    if (c->held_len) {
        tally_release(w->g->engine, w->g->policy, c->held, c->held_len, NULL);
        c->held_len = 0;
    }
    if (u->fd >= 0) {
        epoll_ctl(w->ep, EPOLL_CTL_DEL, u->fd, NULL);
        close(u->fd);
        u->fd = -1;
    }
    timer_del(c);
    buf_free(&u->req);
    buf_free(&u->resp);
}

/* The exchange for an allowed request, ready to start: the request is copied
   out of the client's buffer, which moves on to the next requests meanwhile. */
static bool up_prepare(struct conn *c, const char *req, const struct request *r, const char *rl)
{
    struct upstream *u = &c->up;
    *u = (struct upstream){
        .src = SRC_UPSTREAM, .fd = -1, .keep_alive = r->keep_alive,
        .bodiless = r->method_len == 4 && memcmp(r->method, "HEAD", 4) == 0,
    };
    snprintf(u->rl, sizeof u->rl, "%s", rl);
    return up_request(&u->req, req, r);
}

/* Starts the prepared exchange; the worker's loop drives it (up_event) and its
   deadline (timeouts_run). false: it could not start. */
static bool up_start(struct worker *w, struct conn *c)
{
    const struct gate *g = w->g;
    struct upstream *u = &c->up;
    u->fd = socket(g->upstream.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    /* A non-blocking connect: the first EPOLLOUT says how it went (up_send). */
    struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = u };
    if (u->fd < 0 ||
        (connect(u->fd, (const struct sockaddr *)&g->upstream, g->upstream_len) != 0 &&
         errno != EINPROGRESS) ||
        epoll_ctl(w->ep, EPOLL_CTL_ADD, u->fd, &ev) != 0) {
        up_close(w, c);
        return false;
    }
    timer_add(&w->upstream, c);
    return true;
}

/* Connects (the first EPOLLOUT ends a non-blocking connect), then writes the
   request; once it is all out, waits for the response. */
static enum up_step up_send(struct worker *w, struct upstream *u)
{
    if (!u->connected) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
            return UP_FAIL;
        u->connected = true;
    }
    while (u->req.off < u->req.len) {
        ssize_t n = send(u->fd, u->req.p + u->req.off, u->req.len - u->req.off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return UP_WAIT;
        if (n <= 0)
            return UP_FAIL;
        u->req.off += (size_t)n;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = u };
    return epoll_ctl(w->ep, EPOLL_CTL_MOD, u->fd, &ev) == 0 ? UP_WAIT : UP_FAIL;
}

/* Reads the response until its end (response_end) or the upstream's close. */
static enum up_step up_recv(struct upstream *u)
{
    struct buf *b = &u->resp;
    for (;;) {
        if (!buf_reserve(b, 16384))
            return UP_FAIL;
        ssize_t n = recv(u->fd, b->p + b->len, b->cap - b->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return UP_WAIT;
        if (n < 0)
            return UP_FAIL;
        if (n == 0)
            return UP_DONE;
        /* The head's end may straddle two reads: look again from 3 bytes back. */
        size_t from = b->len > 3 ? b->len - 3 : 0;
        b->len += (size_t)n;
        if (b->len > MAX_UPSTREAM)
            return UP_FAIL;
        const char *hend = u->resp_end ? NULL : memmem(b->p + from, b->len - from, "\r\n\r\n", 4);
        if (hend)
            u->resp_end = response_end(b->p, (size_t)(hend + 4 - b->p), u->bodiless);
        /* Bytes past the end are not part of the answer: the upstream was
           asked for one response only. */
        if (u->resp_end && u->resp_end != SIZE_MAX && b->len >= u->resp_end) {
            b->len = u->resp_end;
            return UP_DONE;
        }
    }
}

/* ---- one request ------------------------------------------------------- */

static void metrics(struct gate *g, struct conn *c)
{
    uint64_t allowed = 0, denied = 0, errors = 0, uerr = 0, conns = 0;
    for (unsigned i = 0; i < g->n_workers; i++) {
        allowed += atomic_load_explicit(&g->counters[i].allowed, memory_order_relaxed);
        denied += atomic_load_explicit(&g->counters[i].denied, memory_order_relaxed);
        errors += atomic_load_explicit(&g->counters[i].errors, memory_order_relaxed);
        uerr += atomic_load_explicit(&g->counters[i].upstream_errors, memory_order_relaxed);
        conns += atomic_load_explicit(&g->counters[i].connections, memory_order_relaxed);
    }
    char head[1024];
    int hn = snprintf(head, sizeof head,
        "# HELP tally_gate_requests_total Rate-limited requests answered, by decision.\n"
        "# TYPE tally_gate_requests_total counter\n"
        "tally_gate_requests_total{decision=\"allowed\"} %" PRIu64 "\n"
        "tally_gate_requests_total{decision=\"denied\"} %" PRIu64 "\n"
        "# HELP tally_gate_engine_errors_total Requests the engine refused (answered 503).\n"
        "# TYPE tally_gate_engine_errors_total counter\n"
        "tally_gate_engine_errors_total %" PRIu64 "\n"
        "# HELP tally_gate_upstream_errors_total Allowed requests the upstream failed (502, 504).\n"
        "# TYPE tally_gate_upstream_errors_total counter\n"
        "tally_gate_upstream_errors_total %" PRIu64 "\n"
        "# HELP tally_gate_connections_total Connections accepted.\n"
        "# TYPE tally_gate_connections_total counter\n"
        "tally_gate_connections_total %" PRIu64 "\n",
        allowed, denied, errors, uerr, conns);
    /* Room to spare: the counters may have grown a digit since the first call. */
    int need = tally_stats_prometheus(g->engine, NULL, 0);
    size_t room = need >= 0 ? (size_t)need + 256 : 0;
    char *body = need >= 0 ? malloc((size_t)hn + room) : NULL;
    if (!body) {
        simple_response(c, 500, "Internal Server Error", "", "no memory\n");
        return;
    }
    memcpy(body, head, (size_t)hn);
    need = tally_stats_prometheus(g->engine, body + hn, room);
    if (need < 0 || (size_t)need >= room)
        need = (int)room - 1;
    out_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                  "Content-Length: %d\r\n%s\r\n", hn + need,
               c->close_after ? "Connection: close\r\n" : "");
    out_put(c, body, (size_t)(hn + need));
    free(body);
}

/* An allowed request's answer, at once or at its --delay-max deadline: 200, or
   the upstream's once the exchange ends. */
static void answer(struct worker *w, struct conn *c)
{
    if (!w->g->has_upstream)
        simple_response(c, 200, "OK", c->up.rl, "ok\n");
    else if (!up_start(w, c))
        up_error(w, c, false, c->up.rl);
}

static uint64_t ceil_s(uint64_t ns)
{
    return ns / SEC + (ns % SEC != 0);
}

static void handle(struct worker *w, struct conn *c, const char *req, const struct request *r)
{
    struct gate *g = w->g;
    struct counters *k = &g->counters[w->id];
    c->close_after = !r->keep_alive;
    if (r->chunked) {
        c->close_after = true;
        simple_response(c, 501, "Not Implemented", "", "chunked request bodies are not supported\n");
        return;
    }
    if (r->method_len == 3 && memcmp(r->method, "GET", 3) == 0 && r->target_len == 8 &&
        memcmp(r->target, "/metrics", 8) == 0) {
        metrics(g, c);
        return;
    }
    /* A key the engine would refuse is the client's error, not ours (503). */
    if (r->key && (r->key_len == 0 || r->key_len > g->max_key_len)) {
        char body[300];
        if (r->key_len == 0)
            snprintf(body, sizeof body, "empty %s header\n", g->key_header);
        else
            snprintf(body, sizeof body, "%s header longer than %zu bytes\n", g->key_header,
                     g->max_key_len);
        simple_response(c, 400, "Bad Request", "", body);
        return;
    }
    const char *key = r->key ? r->key : c->peer;
    size_t key_len = r->key ? r->key_len : strlen(c->peer);
    tally_result res;
    uint64_t delay = 0;
    int rc = !key_len ? TALLY_EINVAL
        : g->delay_max_ns ? tally_reserve_at(g->engine, g->policy, key, key_len, NULL, tally_now_ns(),
                                             g->delay_max_ns, &delay, &res)
        : tally_hit(g->engine, g->policy, key, key_len, NULL, &res);
    if (rc != 0) {
        atomic_fetch_add_explicit(&k->errors, 1, memory_order_relaxed);
        char body[128];
        snprintf(body, sizeof body, "%s\n", tally_strerror(rc));
        simple_response(c, 503, "Service Unavailable", "", body);
        return;
    }
    /* The limit that binds: the first one over when denied, else the first. */
    unsigned bind = res.exceeded ? (unsigned)__builtin_ctz(res.exceeded) : 0;
    char rl[256];
    int n = snprintf(rl, sizeof rl, "RateLimit-Limit: %" PRIu64 "\r\nRateLimit-Remaining: %" PRIu64
                     "\r\nRateLimit-Reset: %" PRIu64 "\r\n",
                     atomic_load_explicit(&g->limit_max[bind], memory_order_relaxed), res.remaining,
                     ceil_s(res.reset_after_ns));
    if (!res.allowed) {
        atomic_fetch_add_explicit(&k->denied, 1, memory_order_relaxed);
        if (res.retry_after_ns != TALLY_NEVER)
            snprintf(rl + n, sizeof rl - (size_t)n, "Retry-After: %" PRIu64 "\r\n",
                     ceil_s(res.retry_after_ns) ? ceil_s(res.retry_after_ns) : 1);
        simple_response(c, 429, "Too Many Requests", rl, "rate limited\n");
        return;
    }
    atomic_fetch_add_explicit(&k->allowed, 1, memory_order_relaxed);
    if (!g->has_upstream) {
        snprintf(c->up.rl, sizeof c->up.rl, "%s", rl);
    } else {
        if (g->holds) {
            memcpy(c->held, key, key_len);    /* at most max_key_len (256) bytes */
            c->held_len = key_len;
        }
        if (!up_prepare(c, req, r, rl)) {
            up_close(w, c);
            up_error(w, c, false, rl);
            return;
        }
    }
    /* The answer waits in the event loop (timeouts_run), not in a sleep of the
       worker: its other connections go on, and their requests are decided when
       they arrive, so that none of them waits longer than --delay-max. */
    if (delay) {
        c->delayed = true;
        timer_at(&w->delayed, c, now_ns() + delay);
        return;
    }
    answer(w, c);
    if (!g->has_upstream && g->holds)
        tally_release(g->engine, g->policy, key, key_len, NULL);
}

/* ---- the event loop ---------------------------------------------------- */

/* Closes the connection, and its upstream exchange with it. The memory waits
   for conns_reap: events of the batch being handled may still point at it. */
static void conn_close(struct worker *w, struct conn *c)
{
    up_close(w, c);
    timer_del(c);
    epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = w->closed;
    w->closed = c;
}

static void conns_reap(struct worker *w)
{
    while (w->closed) {
        struct conn *c = w->closed;
        w->closed = c->next;
        free(c->in);
        free(c->out.p);
        free(c);
    }
}

/* Writes what it can. false: the connection is finished (error or closed). */
static bool conn_flush(struct worker *w, struct conn *c)
{
    while (c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0)
            return false;
        c->out.off += (size_t)n;
    }
    if (c->out.off == c->out.len)
        c->out.off = c->out.len = 0;
    /* Linger rather than close (LINGER_S says why, timeouts_run ends it), once
       the last answer is written: not while the upstream or a delay owes it. */
    if (c->close_after && !c->draining && c->out.len == 0 && c->up.fd < 0 && !c->delayed) {
        if (shutdown(c->fd, SHUT_WR) != 0)
            return false;
        c->draining = true;
        timer_add(&w->linger, c);
    }
    conn_watch(w, c);
    return true;
}

/* After the last answer: discard what the client still sends, until its EOF
   or the end of the linger. One that sends more than MAX_DRAIN meanwhile is
   reset after all. */
static bool conn_drain(struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, c->in, MAX_REQUEST, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return true;
        if (n <= 0)
            return false;
        c->drained += (size_t)n;
        if (c->drained > MAX_DRAIN)
            return false;
    }
}

/* Answers the whole requests in the buffer in order, up to one that waits
   for the upstream or a delay: the ones behind it wait for its answer (up_end,
   delay_end). */
static void conn_process(struct worker *w, struct conn *c)
{
    size_t off = 0;
    while (!c->close_after && c->up.fd < 0 && !c->delayed) {
        struct request r;
        int p = parse_request(w->g, c->in + off, c->in_len - off, &r);
        if (p == 0)
            break;
        if (p < 0) {
            char body[64];
            snprintf(body, sizeof body, "%s\n", r.bad);
            c->close_after = true;
            simple_response(c, 400, "Bad Request", "", body);
            break;
        }
        handle(w, c, c->in + off, &r);
        off += r.head_len + r.body_len;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
}

/* Reads, answers what it can, writes. */
static bool conn_read(struct worker *w, struct conn *c)
{
    if (c->draining)
        return conn_drain(c);
    while (c->in_len < MAX_REQUEST) {
        ssize_t n = recv(c->fd, c->in + c->in_len, MAX_REQUEST - c->in_len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0)
            return false;
        c->in_len += (size_t)n;
    }
    conn_process(w, c);
    return conn_flush(w, c);
}

/* The client's answer to the exchange that ended, then its next requests. */
static void up_end(struct worker *w, struct conn *c, enum up_step how)
{
    if (how == UP_DONE && !relay(c))
        how = UP_FAIL;
    if (how != UP_DONE)
        up_error(w, c, how == UP_TIMEOUT, c->up.rl);
    up_close(w, c);
    conn_process(w, c);
    if (!conn_flush(w, c))
        conn_close(w, c);
}

/* The delayed answer is due: it, then the connection's next requests. */
static void delay_end(struct worker *w, struct conn *c)
{
    timer_del(c);
    c->delayed = false;
    answer(w, c);
    conn_process(w, c);
    if (!conn_flush(w, c))
        conn_close(w, c);
}

static void up_event(struct worker *w, struct conn *c)
{
    struct upstream *u = &c->up;
    enum up_step step = u->req.off < u->req.len ? up_send(w, u) : up_recv(u);
    if (step != UP_WAIT)
        up_end(w, c, step);
}

static void accept_all(struct worker *w)
{
    for (;;) {
        struct sockaddr_storage sa;
        socklen_t sl = sizeof sa;
        int fd = accept4(w->listen_fd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;            /* EAGAIN, or out of fds: retried on the next event */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        char *in = malloc(MAX_REQUEST);
        if (!c || !in) {
            free(c);
            free(in);
            close(fd);
            continue;
        }
        c->src = SRC_CLIENT;
        c->fd = fd;
        c->in = in;
        c->up = (struct upstream){ .src = SRC_UPSTREAM, .fd = -1 };
        if (sa.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&sa)->sin_addr, c->peer, sizeof c->peer);
        else
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&sa)->sin6_addr, c->peer, sizeof c->peer);
        c->events = EPOLLIN;
        struct epoll_event ev = { .events = c->events, .data.ptr = c };
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            free(c->in);
            free(c);
            close(fd);
            continue;
        }
        c->next = w->conns;
        if (w->conns)
            w->conns->prev = c;
        w->conns = c;
        atomic_fetch_add_explicit(&w->g->counters[w->id].connections, 1, memory_order_relaxed);
    }
}

/* Closes the connections whose linger is over, answers 504 for the exchanges
   whose time is up and the delayed requests that are due; returns epoll_wait's
   timeout for the next deadline, in ms rounded up so that the wait does not
   end before it (-1: none). An exchange or a delay that ends here may start the
   next request's (conn_process): its deadline is later than now, so each loop
   ends. */
static int timeouts_run(struct worker *w)
{
    uint64_t now = now_ns();
    while (w->linger.first && w->linger.first->deadline <= now)
        conn_close(w, w->linger.first);
    while (w->upstream.first && w->upstream.first->deadline <= now)
        up_end(w, w->upstream.first, UP_TIMEOUT);
    while (w->delayed.first && w->delayed.first->deadline <= now)
        delay_end(w, w->delayed.first);
    uint64_t next = UINT64_MAX;
    if (w->linger.first)
        next = w->linger.first->deadline;
    if (w->upstream.first && w->upstream.first->deadline < next)
        next = w->upstream.first->deadline;
    if (w->delayed.first && w->delayed.first->deadline < next)
        next = w->delayed.first->deadline;
    return next == UINT64_MAX ? -1 : (int)((next - now + 999999) / 1000000);
}

static void client_event(struct worker *w, struct conn *c, uint32_t events)
{
    bool alive = (events & EPOLLOUT) ? conn_flush(w, c) : conn_read(w, c);
    if (!alive || (events & (EPOLLERR | EPOLLHUP) && !(events & EPOLLIN)))
        conn_close(w, c);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &w->listen_fd };
    epoll_ctl(w->ep, EPOLL_CTL_ADD, w->listen_fd, &ev);
    ev = (struct epoll_event){ .events = EPOLLIN, .data.ptr = &w->g->stop_fd };
    epoll_ctl(w->ep, EPOLL_CTL_ADD, w->g->stop_fd, &ev);
    bool running = true;
    while (running) {
        int timeout = timeouts_run(w);
        conns_reap(w);          /* no event refers to them any more */
        struct epoll_event evs[64];
        int n = epoll_wait(w->ep, evs, 64, timeout);
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &w->g->stop_fd) {
                running = false;
            } else if (p == &w->listen_fd) {
                accept_all(w);
            } else if (*(enum source *)p == SRC_UPSTREAM) {
                /* Skipped when an earlier event of the batch closed it. */
                struct conn *c = container_of(p, struct conn, up);
                if (c->up.fd >= 0)
                    up_event(w, c);
            } else if (((struct conn *)p)->fd >= 0) {
                client_event(w, p, evs[i].events);
            }
        }
    }
    while (w->conns)
        conn_close(w, w->conns);
    conns_reap(w);
    return NULL;
}

/* ---- start-up ---------------------------------------------------------- */

/* The spec of a policy file: its first line that is not empty or a comment,
   into @buf. NULL and errno, or a message in @why, when there is none. */
static const char *policy_file_spec(const char *path, char *buf, size_t len, const char **why)
{
    FILE *f = fopen(path, "r");
    *why = NULL;
    if (!f)
        return NULL;
    const char *spec = NULL;
    while (!spec && fgets(buf, (int)len, f)) {
        size_t n = strlen(buf);
        if (n == len - 1 && buf[n - 1] != '\n') {
            *why = "a line longer than 4 KiB";
            break;
        }
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
            buf[--n] = '\0';
        char *p = buf + strspn(buf, " \t");
        if (*p && *p != '#')
            spec = p;
    }
    if (!spec && !*why)
        *why = ferror(f) ? "a read error" : "no policy line";
    fclose(f);
    return spec;
}

static void publish_maxes(struct gate *g, const tally_policy *p)
{
    for (unsigned i = 0; i < p->n_limits; i++)
        atomic_store_explicit(&g->limit_max[i], p->limits[i].max, memory_order_relaxed);
}

/* SIGHUP: read the policy file again and update the policy, or log why not. */
static void reload(struct gate *g)
{
    char buf[4096], name[TALLY_MAX_POLICY_NAME + 1];
    const char *why;
    if (!g->policy_file) {
        fputs("tally-gate: SIGHUP: no --policy-file to reload\n", stderr);
        return;
    }
    const char *spec = policy_file_spec(g->policy_file, buf, sizeof buf, &why);
    if (!spec) {
        fprintf(stderr, "tally-gate: reload of %s failed, policy unchanged: %s\n", g->policy_file,
                why ? why : strerror(errno));
        return;
    }
    tally_policy p;
    tally_spec_error err;
    if (tally_policy_parse(spec, &p, name, sizeof name, &err) != 0) {
        fprintf(stderr, "tally-gate: reload of %s failed, policy unchanged: bad spec at offset "
                        "%zu: %s\n", g->policy_file, err.offset, err.message);
        return;
    }
    int rc = tally_policy_update(g->engine, g->policy, &p);
    if (rc != 0) {
        fprintf(stderr, "tally-gate: reload of %s failed, policy unchanged: %s (the name, the "
                        "number of limits and each limit's algorithm must stay)\n",
                g->policy_file, tally_strerror(rc));
        return;
    }
    publish_maxes(g, &p);
    fprintf(stderr, "tally-gate: reloaded %s: %s\n", g->policy_file, spec);
}

static bool resolve(const char *hostport, int socktype, bool passive, struct sockaddr_storage *ss,
                    socklen_t *len)
{
    const char *colon = strrchr(hostport, ':');
    if (!colon || colon == hostport || colon[1] == '\0')
        return false;
    char host[256];
    size_t hl = (size_t)(colon - hostport);
    if (hl >= sizeof host)
        return false;
    memcpy(host, hostport, hl);
    host[hl] = '\0';
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    struct addrinfo hints = { .ai_socktype = socktype, .ai_flags = passive ? AI_PASSIVE : 0 };
    struct addrinfo *ai;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0)
        return false;
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *len = ai->ai_addrlen;
    freeaddrinfo(ai);
    return true;
}

static int listen_on(const struct sockaddr_storage *ss, socklen_t len)
{
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (const struct sockaddr *)ss, len) != 0 || listen(fd, 1024) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static bool parse_num(const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* A numeric option in 1..hi; false, with a message, when it is not. */
static bool num_option(const char *name, const char *arg, uint64_t hi, uint64_t *out)
{
    if (parse_num(arg, 1, hi, out))
        return true;
    fprintf(stderr, "tally-gate: bad value '%s' for --%s (1..%" PRIu64 ")\n", arg, name, hi);
    return false;
}

/* --hash-key (redis-address.h); the message never repeats the value. */
static bool hash_key_option(const char *arg, uint8_t key[16])
{
    if (redis_hash_key(arg, key))
        return true;
    fprintf(stderr, "tally-gate: bad --hash-key (want 32 hex digits, not all zero)\n");
    return false;
}

/* --delay-max: a number and a unit, ms or s (at most an hour). */
static bool duration_option(const char *arg, uint64_t *ns)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(arg, &end, 10);
    uint64_t unit = strcmp(end, "ms") == 0 ? 1000000 : strcmp(end, "s") == 0 ? SEC : 0;
    if (errno || end == arg || !unit || v == 0 || v > 3600 * SEC / unit) {
        fprintf(stderr, "tally-gate: bad --delay-max '%s' (want N ms or N s, up to 3600 s)\n", arg);
        return false;
    }
    *ns = v * unit;
    return true;
}

int main(int argc, char **argv)
{
    const char *spec = NULL, *listen_addr = "127.0.0.1:8080", *upstream = NULL, *redis = NULL;
    const char *redis_prefix = NULL, *port_file = NULL;
    uint64_t threads = 2, flush_ms = 1000, capacity = 1 << 20;
    uint64_t upstream_timeout_ms = UPSTREAM_TIMEOUT_MS, redis_wait = 0;
    uint8_t hash_key[16] = { 0 };
    bool keyed = false;
    struct gate g = { .stop_fd = -1 };
    static const struct option longopts[] = {
        { "policy", required_argument, 0, 'p' },   { "listen", required_argument, 0, 'l' },
        { "threads", required_argument, 0, 't' },  { "key-header", required_argument, 0, 'H' },
        { "upstream", required_argument, 0, 'u' }, { "redis", required_argument, 0, 'r' },
        { "redis-prefix", required_argument, 0, 'P' }, { "flush-ms", required_argument, 0, 'F' },
        { "capacity", required_argument, 0, 'C' }, { "port-file", required_argument, 0, 'W' },
        { "upstream-timeout-ms", required_argument, 0, 'U' },
        { "redis-wait", required_argument, 0, 'R' },
        { "policy-file", required_argument, 0, 'Y' }, { "delay-max", required_argument, 0, 'D' },
        { "hash-key", required_argument, 0, 'K' },
        { "help", no_argument, 0, 'h' },           { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "p:l:t:H:u:r:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'p': spec = optarg; break;
        case 'Y': g.policy_file = optarg; break;
        case 'K':
            if (!hash_key_option(optarg, hash_key))
                return EXIT_USAGE;
            keyed = true;
            break;
        case 'D':
            if (!duration_option(optarg, &g.delay_max_ns))
                return EXIT_USAGE;
            break;
        case 'l': listen_addr = optarg; break;
        case 'H':
            g.key_header = optarg;
            g.key_header_len = strlen(optarg);
            if (g.key_header_len == 0 || strpbrk(optarg, ": \t\r\n")) {
                fprintf(stderr, "tally-gate: bad header name '%s'\n", optarg);
                return EXIT_USAGE;
            }
            break;
        case 'u': upstream = optarg; break;
        case 'r': redis = optarg; break;
        case 'P': redis_prefix = optarg; break;
        case 'W': port_file = optarg; break;
        case 't':
            if (!num_option("threads", optarg, 256, &threads))
                return EXIT_USAGE;
            break;
        case 'F':
            if (!num_option("flush-ms", optarg, 3600000, &flush_ms))
                return EXIT_USAGE;
            break;
        case 'C':
            if (!num_option("capacity", optarg, TALLY_MAX_CAPACITY, &capacity))
                return EXIT_USAGE;
            break;
        case 'U':
            if (!num_option("upstream-timeout-ms", optarg, 3600000, &upstream_timeout_ms))
                return EXIT_USAGE;
            break;
        case 'R':
            if (!num_option("redis-wait", optarg, 1000, &redis_wait))
                return EXIT_USAGE;
            break;
        case 'h':
            /* One write, not stdio's 4 KiB pieces: a reader that stops at what
               it looks for (grep -q) would make the next piece a SIGPIPE. */
            return write(STDOUT_FILENO, usage_text, sizeof usage_text - 1) ==
                   (ssize_t)(sizeof usage_text - 1) ? 0 : EXIT_FAIL;
        default:
            fputs("Try 'tally-gate --help'.\n", stderr);
            return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tally-gate: unexpected argument '%s'\nTry 'tally-gate --help'.\n", argv[optind]);
        return EXIT_USAGE;
    }
    char spec_buf[4096];
    if (spec && g.policy_file) {
        fputs("tally-gate: --policy and --policy-file exclude each other\n", stderr);
        return EXIT_USAGE;
    }
    if (g.policy_file) {
        const char *why;
        if (!(spec = policy_file_spec(g.policy_file, spec_buf, sizeof spec_buf, &why))) {
            fprintf(stderr, "tally-gate: cannot read a policy from %s: %s\n", g.policy_file,
                    why ? why : strerror(errno));
            return EXIT_USAGE;
        }
    }
    if (!spec) {
        fputs("tally-gate: missing --policy SPEC\nTry 'tally-gate --help'.\n", stderr);
        return EXIT_USAGE;
    }
    char name[TALLY_MAX_POLICY_NAME + 1];
    tally_spec_error err;
    if (tally_policy_parse(spec, &g.pol, name, sizeof name, &err) != 0) {
        fprintf(stderr, "tally-gate: bad policy spec at offset %zu: %s\n  %s\n  %*s^\n",
                err.offset, err.message, spec, (int)err.offset, "");
        return EXIT_USAGE;
    }
    for (unsigned i = 0; i < g.pol.n_limits; i++) {
        g.holds |= g.pol.limits[i].algo == TALLY_CONCURRENCY;
        if (g.delay_max_ns && g.pol.limits[i].algo != TALLY_GCRA) {
            fputs("tally-gate: --delay-max needs a policy of GCRA limits only\n", stderr);
            return EXIT_USAGE;
        }
    }
    publish_maxes(&g, &g.pol);
    struct sockaddr_storage laddr;
    socklen_t llen;
    if (!resolve(listen_addr, SOCK_STREAM, true, &laddr, &llen)) {
        fprintf(stderr, "tally-gate: bad --listen address '%s' (want HOST:PORT)\n", listen_addr);
        return EXIT_USAGE;
    }
    if (upstream) {
        if (!resolve(upstream, SOCK_STREAM, false, &g.upstream, &g.upstream_len)) {
            fprintf(stderr, "tally-gate: bad --upstream address '%s' (want HOST:PORT)\n", upstream);
            return EXIT_USAGE;
        }
        g.has_upstream = true;
        g.upstream_timeout_ns = upstream_timeout_ms * 1000000;
    }
    tally_redis_options ro = { 0 };
    char redis_buf[256];
    if (redis) {
        if (!redis_option(redis, &ro, redis_buf, sizeof redis_buf)) {
            fprintf(stderr, "tally-gate: bad --redis address '%s' (want " REDIS_FORMS ")\n", redis);
            return EXIT_USAGE;
        }
        ro.key_prefix = redis_prefix;
        ro.wait_replicas = (unsigned)redis_wait;
    }

    /* Signals are taken by sigwait in this thread only. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    memcpy(o.hash_key, hash_key, sizeof hash_key);
    g.max_key_len = o.max_key_len;
    int rc = tally_open(&o, &g.engine);
    if (rc != 0)
        die("cannot open the engine: %s", tally_strerror(rc));
    if ((rc = tally_policy_add(g.engine, &g.pol, &g.policy)) != 0)
        die("cannot add the policy: %s", tally_strerror(rc));
    if (redis) {
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = (uint32_t)flush_ms;
        fo.redis = &ro;
        /* here only the Redis options can be invalid: a bad node list, or a
           prefix with braces in cluster mode (where the slot's hash tag must
           be the first braces of a key name) */
        if ((rc = tally_flusher_start(g.engine, &fo)) == TALLY_EINVAL) {
            fprintf(stderr, "tally-gate: bad --redis address '%s'%s: the library refused it (want "
                            REDIS_FORMS ", each PORT 1..65535, at most 16 nodes)\n", redis,
                    redis_prefix ? " with this --redis-prefix" : "");
            tally_close(g.engine);
            return EXIT_USAGE;
        }
        if (rc != 0)
            die("cannot start the flusher: %s", tally_strerror(rc));
        if (!keyed)
            fputs("tally-gate: -r without --hash-key: the counts in Redis are this gate's "
                  "alone\n", stderr);
    }

    g.n_workers = (unsigned)threads;
    g.counters = calloc(threads, sizeof *g.counters);
    struct worker *w = calloc(threads, sizeof *w);
    g.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!g.counters || !w || g.stop_fd < 0)
        die("cannot allocate: %s", strerror(errno));
    for (unsigned i = 0; i < threads; i++) {
        w[i] = (struct worker){
            .g = &g, .id = i,
            .linger.delay = LINGER_S * SEC, .upstream.delay = g.upstream_timeout_ns,
        };
        w[i].listen_fd = listen_on(&laddr, llen);
        if (w[i].listen_fd < 0)
            die("cannot listen on %s: %s", listen_addr, strerror(errno));
        if (i == 0) {   /* port 0: the others bind the port the first one got */
            llen = sizeof laddr;
            getsockname(w[0].listen_fd, (struct sockaddr *)&laddr, &llen);
        }
        w[i].ep = epoll_create1(EPOLL_CLOEXEC);
        if (w[i].ep < 0)
            die("epoll_create1: %s", strerror(errno));
    }
    unsigned port = ntohs(laddr.ss_family == AF_INET ? ((struct sockaddr_in *)&laddr)->sin_port
                                                     : ((struct sockaddr_in6 *)&laddr)->sin6_port);
    for (unsigned i = 0; i < threads; i++)
        if ((errno = pthread_create(&w[i].thread, NULL, worker_main, &w[i])) != 0)
            die("cannot start a worker: %s", strerror(errno));
    if (port_file) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
        FILE *f = fopen(tmp, "w");
        if (!f || fprintf(f, "%u\n", port) < 0 || fclose(f) != 0 || rename(tmp, port_file) != 0)
            die("cannot write --port-file %s: %s", port_file, strerror(errno));
    }
    fprintf(stderr, "tally-gate: listening on port %u with %u workers, policy %s\n", port,
            (unsigned)threads, spec);

    int sig;
    while (sigwait(&sigs, &sig) == 0 && sig == SIGHUP)
        reload(&g);
    uint64_t one = 1;
    if (write(g.stop_fd, &one, sizeof one) != sizeof one)
        die("cannot signal the workers: %s", strerror(errno));
    for (unsigned i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        close(w[i].listen_fd);
        close(w[i].ep);
    }
    int status = 0;
    if (redis && (rc = tally_flusher_stop(g.engine)) != 0) {
        fprintf(stderr, "tally-gate: final flush failed: %s\n", tally_strerror(rc));
        status = EXIT_FAIL;
    }
    uint64_t allowed = 0, denied = 0;
    for (unsigned i = 0; i < threads; i++) {
        allowed += atomic_load(&g.counters[i].allowed);
        denied += atomic_load(&g.counters[i].denied);
    }
    fprintf(stderr, "tally-gate: stopped by signal %d: %" PRIu64 " allowed, %" PRIu64 " denied\n",
            sig, allowed, denied);
    tally_close(g.engine);
    close(g.stop_fd);
    free(g.counters);
    free(w);
    return status;
}
