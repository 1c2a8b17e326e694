/*
 * The fault proxy (fault_proxy.h): one thread, one poll loop, non-blocking
 * sockets. Each connection keeps its commands in arrival order as slots; a
 * slot gets its reply either at once (FAULT_ERROR) or from Redis, whose
 * replies arrive in the order the forwarded commands were written, and the
 * slots leave for the client strictly from the head, so a fault never moves a
 * reply out of its place in a pipeline. An EXEC answered with an error is
 * forwarded as DISCARD, whose reply goes to a hidden slot, so that Redis
 * leaves the transaction as it would have after refusing the EXEC.
 */
#include "fault_proxy.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_RULES   16
#define MAX_NAMES   32
#define MAX_CONNS   32
#define MAX_DEPTH   16          /* RESP nesting the parser accepts */
#define NAME_LEN    16
#define TEXT_LEN    256
#define READ_CHUNK  65536

typedef struct buf {
    char  *p;
    size_t len, cap;
} buf;

typedef struct rule {
    char         command[NAME_LEN];
    fault_action action;
    int          skip, count;
    unsigned     ms;
    char         text[TEXT_LEN];
    uint64_t     fired;
} rule;

typedef struct slot {
    struct slot *next;
    bool         hidden;        /* the reply is the proxy's own: never sent to the client */
    bool         faulted;       /* action applies */
    fault_action action;
    unsigned     ms;
    bool         ready;         /* reply complete */
    uint64_t     release_ns;    /* FAULT_DELAY: not before */
    buf          reply;
    size_t       sent;          /* FAULT_SPLIT: bytes already written */
} slot;

typedef struct conn {
    int      cfd, ufd;
    buf      cin, uin, uout, cout;
    slot    *head, **tail;
    slot    *await;             /* oldest forwarded slot still without its reply */
    bool     dead;              /* close at the end of this round */
    bool     dying;             /* a reply was dropped or cut: send nothing more */
    bool     close_when_flushed;
    bool     split_blocked;     /* a piece met a full socket: wait for POLLOUT */
    uint64_t close_ns;          /* dying: when to close; 0: not timed */
    uint64_t hold_ns;           /* FAULT_HOLD: nothing goes to Redis before; 0: no hold */
    bool     client_gone;       /* the client left during a hold: Redis still gets it all */
    uint64_t piece_ns;          /* FAULT_SPLIT: the next piece not before */
} conn;

typedef struct name_count {
    char              name[NAME_LEN];
    fault_proxy_count c;
} name_count;

struct fault_proxy_state {
    int             upstream_port;
    int             listen_fd;
    int             wake[2];
    pthread_t       thread;
    uint64_t        rnd;        /* the thread's own */
    conn           *conns[MAX_CONNS];

    pthread_mutex_t lock;       /* guards everything below */
    rule            rules[MAX_RULES];
    int             n_rules;
    name_count      names[MAX_NAMES];
    int             n_names;
    fault_proxy_count all;
    uint64_t        bytes_up, bytes_down, accepted, pieces;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_rnd(struct fault_proxy_state *s)
{
    s->rnd ^= s->rnd << 13;
    s->rnd ^= s->rnd >> 7;
    s->rnd ^= s->rnd << 17;
    return s->rnd;
}

static bool buf_add(buf *b, const void *d, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return false;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return true;
}

static void buf_eat(buf *b, size_t n)
{
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

/* ---- RESP2 ---------------------------------------------------------------- */

/* The length of the line at @p including its CRLF; 0 when not all here. */
static size_t line_len(const char *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n')
            return i + 2;
    return 0;
}

static bool parse_int(const char *p, size_t n, long long *out)
{
    char tmp[24];
    if (n == 0 || n >= sizeof(tmp))
        return false;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    *out = strtoll(tmp, &end, 10);
    return errno == 0 && *end == 0;
}

/* The size of the one RESP2 value at @p: 0 when it is not all here yet, -1
   when it is malformed. Inline commands ("PING\r\n") only at the top of a
   client's stream (@inline_ok). */
static ssize_t resp_value(const char *p, size_t n, int depth, bool inline_ok)
{
    if (n == 0)
        return 0;
    if (depth > MAX_DEPTH)
        return -1;
    size_t l = line_len(p, n);
    if (!l)
        return 0;
    long long v;
    switch (p[0]) {
    case '+': case '-': case ':':
        return (ssize_t)l;
    case '$':
        if (!parse_int(p + 1, l - 3, &v) || v < -1)
            return -1;
        if (v == -1)
            return (ssize_t)l;
        if (n < l + (size_t)v + 2)
            return 0;
        if (p[l + v] != '\r' || p[l + v + 1] != '\n')
            return -1;
        return (ssize_t)(l + (size_t)v + 2);
    case '*': {
        if (!parse_int(p + 1, l - 3, &v) || v < -1)
            return -1;
        size_t off = l;
        for (long long i = 0; i < v; i++) {
            ssize_t e = resp_value(p + off, n - off, depth + 1, false);
            if (e <= 0)
                return e;
            off += (size_t)e;
        }
        return (ssize_t)off;
    }
    default:
        return inline_ok ? (ssize_t)l : -1;
    }
}

/* The command's name, upper case, cut to NAME_LEN - 1 bytes. */
static void command_name(const char *p, size_t n, char *name)
{
    const char *s = p;
    size_t len = 0;
    if (p[0] == '*') {
        size_t l = line_len(p, n);
        if (l < n && p[l] == '$') {
            size_t l2 = line_len(p + l, n - l);
            long long v;
            if (l2 && parse_int(p + l + 1, l2 - 3, &v) && v >= 0) {
                s = p + l + l2;
                len = (size_t)v;
            }
        }
    } else {
        while (len < n && s[len] != ' ' && s[len] != '\r')
            len++;
    }
    if (len > NAME_LEN - 1)
        len = NAME_LEN - 1;
    for (size_t i = 0; i < len; i++)
        name[i] = (char)toupper((unsigned char)s[i]);
    name[len] = 0;
}

/* ---- Rules and counters (under the lock) ---------------------------------- */

static void count_command(struct fault_proxy_state *s, const char *name, size_t bytes)
{
    s->all.commands++;
    s->all.bytes += bytes;
    for (int i = 0; i < s->n_names; i++)
        if (strcmp(s->names[i].name, name) == 0) {
            s->names[i].c.commands++;
            s->names[i].c.bytes += bytes;
            return;
        }
    if (s->n_names < MAX_NAMES) {
        name_count *nc = &s->names[s->n_names++];
        snprintf(nc->name, sizeof(nc->name), "%s", name);
        nc->c.commands = 1;
        nc->c.bytes = bytes;
    }
}

/* Count the command and decide its fault. Every active rule that matches
   counts the command against its own skip; the first one past its skip
   faults it. */
static void decide(struct fault_proxy_state *s, const char *name, size_t bytes, slot *x)
{
    pthread_mutex_lock(&s->lock);
    count_command(s, name, bytes);
    for (int i = 0; i < s->n_rules; i++) {
        rule *r = &s->rules[i];
        if (r->count == 0 || (strcmp(r->command, "*") != 0 && strcmp(r->command, name) != 0))
            continue;
        if (r->skip > 0) {
            r->skip--;
            continue;
        }
        if (x->faulted)
            continue;
        if (r->count > 0)
            r->count--;
        r->fired++;
        x->faulted = true;
        x->action = r->action;
        x->ms = r->ms;
        if (r->action == FAULT_ERROR)
            x->ready = buf_add(&x->reply, "-", 1) && buf_add(&x->reply, r->text, strlen(r->text))
                       && buf_add(&x->reply, "\r\n", 2);
    }
    pthread_mutex_unlock(&s->lock);
}

static void add_bytes(struct fault_proxy_state *s, uint64_t *counter, size_t n)
{
    pthread_mutex_lock(&s->lock);
    *counter += n;
    pthread_mutex_unlock(&s->lock);
}

/* ---- Connections ---------------------------------------------------------- */

static void set_socket(int fd)
{
    int one = 1;
    /* each piece of a split reply leaves as its own segment */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void conn_free(conn *c)
{
    for (slot *x = c->head, *next; x; x = next) {
        next = x->next;
        free(x->reply.p);
        free(x);
    }
    if (c->cfd >= 0)
        close(c->cfd);
    if (c->ufd >= 0)
        close(c->ufd);
    free(c->cin.p);
    free(c->uin.p);
    free(c->uout.p);
    free(c->cout.p);
    free(c);
}

static void accept_one(struct fault_proxy_state *s)
{
    int cfd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (cfd < 0)
        return;
    int slot_i = -1;
    for (int i = 0; i < MAX_CONNS && slot_i < 0; i++)
        if (!s->conns[i])
            slot_i = i;
    int ufd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)s->upstream_port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    conn *c = slot_i >= 0 && ufd >= 0 ? calloc(1, sizeof(*c)) : NULL;
    /* a blocking connect: on loopback it is answered at once, refused or not */
    if (!c || connect(ufd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        free(c);
        close(cfd);
        if (ufd >= 0)
            close(ufd);
        return;
    }
    set_socket(cfd);
    set_socket(ufd);
    c->cfd = cfd;
    c->ufd = ufd;
    c->tail = &c->head;
    s->conns[slot_i] = c;
    add_bytes(s, &s->accepted, 1);
}

/* Cut every complete command from the client's bytes into a slot. */
static void take_commands(struct fault_proxy_state *s, conn *c)
{
    size_t off = 0;
    while (off < c->cin.len) {
        ssize_t n = resp_value(c->cin.p + off, c->cin.len - off, 0, true);
        if (n <= 0) {
            c->dead |= n < 0;
            break;
        }
        char name[NAME_LEN];
        command_name(c->cin.p + off, (size_t)n, name);
        slot *x = calloc(1, sizeof(*x));
        if (!x) {
            c->dead = true;
            break;
        }
        decide(s, name, (size_t)n, x);
        *c->tail = x;
        c->tail = &x->next;
        if (x->faulted && x->action == FAULT_HOLD && !c->hold_ns)
            c->hold_ns = now_ns() + (uint64_t)x->ms * 1000000u;
        if (x->faulted && x->action == FAULT_ERROR && strcmp(name, "EXEC") == 0 && x->ready) {
            static const char discard[] = "*1\r\n$7\r\nDISCARD\r\n";
            slot *h = calloc(1, sizeof(*h));
            if (!h || !buf_add(&c->uout, discard, sizeof(discard) - 1)) {
                free(h);
                c->dead = true;
                break;
            }
            h->hidden = true;
            *c->tail = h;
            c->tail = &h->next;
            if (!c->await)
                c->await = h;
        } else if (!x->faulted || x->action != FAULT_ERROR) {
            if (!buf_add(&c->uout, c->cin.p + off, (size_t)n))
                c->dead = true;
            if (!c->await)
                c->await = x;
        } else if (!x->ready) {
            c->dead = true;                   /* no memory for the error line */
        }
        off += (size_t)n;
    }
    buf_eat(&c->cin, off);
}

/* Give each complete reply from Redis to the slot it answers. */
static void take_replies(conn *c, uint64_t now)
{
    size_t off = 0;
    while (off < c->uin.len) {
        ssize_t n = resp_value(c->uin.p + off, c->uin.len - off, 0, false);
        if (n <= 0 || !c->await) {
            c->dead |= n < 0 || (n > 0 && !c->await);   /* malformed, or unasked for */
            break;
        }
        slot *x = c->await;
        if (!buf_add(&x->reply, c->uin.p + off, (size_t)n)) {
            c->dead = true;
            break;
        }
        x->ready = true;
        if (x->faulted && x->action == FAULT_DELAY)
            x->release_ns = now + (uint64_t)x->ms * 1000000u;
        /* the slots after it are error answers (ready) or forwarded and waiting */
        do
            c->await = c->await->next;
        while (c->await && c->await->ready);
        off += (size_t)n;
    }
    buf_eat(&c->uin, off);
}

static void pop_head(conn *c)
{
    slot *x = c->head;
    c->head = x->next;
    if (!c->head)
        c->tail = &c->head;
    free(x->reply.p);
    free(x);
}

/* Move replies, in order, from the head slots towards the client. */
static void pump(struct fault_proxy_state *s, conn *c, uint64_t now)
{
    while (!c->dying && c->head && c->head->ready) {
        slot *x = c->head;
        if (x->hidden) {
            /* nothing to send */
        } else if (!x->faulted || x->action == FAULT_ERROR || x->action == FAULT_HOLD) {
            c->dead |= !buf_add(&c->cout, x->reply.p, x->reply.len);
        } else if (x->action == FAULT_DELAY) {
            if (now < x->release_ns)
                return;
            c->dead |= !buf_add(&c->cout, x->reply.p, x->reply.len);
        } else if (x->action == FAULT_DROP_REPLY) {
            c->dying = true;
            c->close_ns = now + FAULT_DROP_CLOSE_MS * 1000000u;
            return;
        } else if (x->action == FAULT_CLOSE_MID) {
            c->dead |= !buf_add(&c->cout, x->reply.p, x->reply.len / 2);
            c->dying = true;
            c->close_when_flushed = true;
            return;
        } else {                              /* FAULT_SPLIT: earlier bytes go first */
            if (c->cout.len || now < c->piece_ns)
                return;
            size_t n = 1 + next_rnd(s) % 7;
            if (n > x->reply.len - x->sent)
                n = x->reply.len - x->sent;
            ssize_t w = send(c->cfd, x->reply.p + x->sent, n, MSG_NOSIGNAL);
            if (w < 0) {
                c->split_blocked = errno == EAGAIN || errno == EWOULDBLOCK;
                c->dead |= !c->split_blocked;
                return;
            }
            add_bytes(s, &s->bytes_down, (size_t)w);
            add_bytes(s, &s->pieces, 1);
            x->sent += (size_t)w;
            c->piece_ns = now + (20 + next_rnd(s) % 181) * 1000u;
            if (x->sent < x->reply.len)
                return;
        }
        pop_head(c);
    }
}

/* Write what is queued; false when the peer is gone. */
static bool flush_out(struct fault_proxy_state *s, int fd, buf *b, uint64_t *counter)
{
    while (b->len) {
        ssize_t w = send(fd, b->p, b->len, MSG_NOSIGNAL);
        if (w < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK;
        add_bytes(s, counter, (size_t)w);
        buf_eat(b, (size_t)w);
    }
    return true;
}

/* Read what is there; false on end of stream or error. */
static bool read_in(int fd, buf *b)
{
    char tmp[READ_CHUNK];
    ssize_t n = recv(fd, tmp, sizeof(tmp), 0);
    if (n > 0)
        return buf_add(b, tmp, (size_t)n);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

/* The earliest time a connection needs the loop again without I/O. */
static uint64_t conn_deadline(const conn *c)
{
    uint64_t d = UINT64_MAX;
    if (c->close_ns)
        d = c->close_ns;
    if (c->hold_ns && c->hold_ns < d)
        d = c->hold_ns;
    if (!c->dying && c->head && c->head->ready && c->head->faulted) {
        if (c->head->action == FAULT_DELAY && c->head->release_ns < d)
            d = c->head->release_ns;
        if (c->head->action == FAULT_SPLIT && !c->split_blocked && c->piece_ns < d)
            d = c->piece_ns;
    }
    return d;
}

static void *proxy_main(void *arg)
{
    struct fault_proxy_state *s = arg;
    struct pollfd pf[2 + 2 * MAX_CONNS];
    int who[2 + 2 * MAX_CONNS];
    for (;;) {
        uint64_t now = now_ns(), deadline = now + 100 * 1000000u;
        int n = 0;
        pf[n++] = (struct pollfd){ .fd = s->wake[0], .events = POLLIN };
        pf[n++] = (struct pollfd){ .fd = s->listen_fd, .events = POLLIN };
        for (int i = 0; i < MAX_CONNS; i++) {
            conn *c = s->conns[i];
            if (!c)
                continue;
            short ce = (short)((c->dying ? 0 : POLLIN) | (c->cout.len || c->split_blocked ? POLLOUT : 0));
            who[n] = i;
            pf[n++] = (struct pollfd){ .fd = c->client_gone ? -1 : c->cfd, .events = ce };
            who[n] = i;
            short ue = (short)(POLLIN | (c->uout.len && !c->hold_ns ? POLLOUT : 0));
            pf[n++] = (struct pollfd){ .fd = c->ufd, .events = ue };
            uint64_t d = conn_deadline(c);
            if (d < deadline)
                deadline = d;
        }
        uint64_t wait = deadline > now ? deadline - now : 0;
        struct timespec ts = { (time_t)(wait / 1000000000u), (long)(wait % 1000000000u) };
        if (ppoll(pf, (nfds_t)n, &ts, NULL) < 0 && errno != EINTR)
            break;
        if (pf[0].revents)
            break;
        if (pf[1].revents & POLLIN)
            accept_one(s);
        now = now_ns();
        for (int k = 2; k < n; k++) {
            conn *c = s->conns[who[k]];
            if (!c || c->dead || !pf[k].revents)
                continue;
            bool client = pf[k].fd == c->cfd;
            if (pf[k].revents & POLLOUT) {
                if (client)
                    c->split_blocked = false;
                else if (!flush_out(s, c->ufd, &c->uout, &s->bytes_up))
                    c->dead = true;
            }
            if (pf[k].revents & (POLLIN | POLLHUP | POLLERR)) {
                if (client && !c->dying) {
                    bool in = read_in(c->cfd, &c->cin);
                    take_commands(s, c);
                    /* a client that leaves during a hold leaves its bytes to Redis */
                    c->client_gone = !in && c->hold_ns;
                    c->dead |= !in && !c->hold_ns;
                    if (!c->hold_ns)
                        c->dead |= !flush_out(s, c->ufd, &c->uout, &s->bytes_up);
                } else if (client) {
                    c->dead = true;           /* the client left a dying connection */
                } else {
                    c->dead |= !read_in(c->ufd, &c->uin);
                    take_replies(c, now);
                }
            }
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            conn *c = s->conns[i];
            if (!c)
                continue;
            if (!c->dead && c->hold_ns && now >= c->hold_ns) {
                c->hold_ns = 0;
                c->dead |= !flush_out(s, c->ufd, &c->uout, &s->bytes_up);
            }
            if (!c->dead && c->client_gone) {
                /* Redis's replies have nowhere to go: close once it has had time to run it all */
                if (!c->hold_ns && !c->uout.len && !c->close_ns)
                    c->close_ns = now + FAULT_DROP_CLOSE_MS * 1000000u;
                c->dead |= c->close_ns && now >= c->close_ns;
            } else if (!c->dead) {
                pump(s, c, now);
                c->dead |= !flush_out(s, c->cfd, &c->cout, &s->bytes_down);
                c->dead |= c->close_when_flushed && c->cout.len == 0;
                c->dead |= c->close_ns && now >= c->close_ns;
            }
            if (c->dead) {
                conn_free(c);
                s->conns[i] = NULL;
            }
        }
    }
    for (int i = 0; i < MAX_CONNS; i++)
        if (s->conns[i])
            conn_free(s->conns[i]);
    return NULL;
}

/* ---- The API -------------------------------------------------------------- */

static void state_free(struct fault_proxy_state *s)
{
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    if (s->wake[0] >= 0)
        close(s->wake[0]);
    if (s->wake[1] >= 0)
        close(s->wake[1]);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

fault_proxy *fault_proxy_start(int upstream_port)
{
    fault_proxy *p = calloc(1, sizeof(*p));
    struct fault_proxy_state *s = calloc(1, sizeof(*s));
    if (!p || !s) {
        free(p);
        free(s);
        return NULL;
    }
    s->upstream_port = upstream_port;
    s->wake[0] = s->wake[1] = -1;
    s->rnd = now_ns() | 1;
    pthread_mutex_init(&s->lock, NULL);
    s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    if (s->listen_fd < 0 || bind(s->listen_fd, (struct sockaddr *)&a, sizeof(a)) != 0
        || listen(s->listen_fd, 64) != 0 || getsockname(s->listen_fd, (struct sockaddr *)&a, &len) != 0
        || pipe2(s->wake, O_CLOEXEC) != 0 || pthread_create(&s->thread, NULL, proxy_main, s) != 0) {
        state_free(s);
        free(p);
        return NULL;
    }
    p->port = ntohs(a.sin_port);
    p->s = s;
    return p;
}

int fault_proxy_add(fault_proxy *p, const fault_rule *r)
{
    struct fault_proxy_state *s = p->s;
    if (!r->command || strlen(r->command) >= NAME_LEN || r->count < -1 || r->skip < 0
        || (r->action == FAULT_ERROR && (!r->text || strlen(r->text) >= TEXT_LEN
                                         || strpbrk(r->text, "\r\n"))))
        return -1;
    pthread_mutex_lock(&s->lock);
    int id = s->n_rules < MAX_RULES ? s->n_rules++ : -1;
    if (id >= 0) {
        rule *x = &s->rules[id];
        memset(x, 0, sizeof(*x));
        for (size_t i = 0; r->command[i]; i++)
            x->command[i] = (char)toupper((unsigned char)r->command[i]);
        x->action = r->action;
        x->skip = r->skip;
        x->count = r->count;
        x->ms = r->ms;
        if (r->text)
            snprintf(x->text, sizeof(x->text), "%s", r->text);
    }
    pthread_mutex_unlock(&s->lock);
    return id;
}

void fault_proxy_clear(fault_proxy *p)
{
    pthread_mutex_lock(&p->s->lock);
    p->s->n_rules = 0;
    pthread_mutex_unlock(&p->s->lock);
}

uint64_t fault_proxy_fired(fault_proxy *p, int id)
{
    pthread_mutex_lock(&p->s->lock);
    uint64_t n = id >= 0 && id < p->s->n_rules ? p->s->rules[id].fired : 0;
    pthread_mutex_unlock(&p->s->lock);
    return n;
}

fault_proxy_count fault_proxy_seen(fault_proxy *p, const char *command)
{
    struct fault_proxy_state *s = p->s;
    char name[NAME_LEN];
    size_t len = strlen(command);
    fault_proxy_count c = { 0, 0 };
    if (len >= NAME_LEN)
        return c;
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)toupper((unsigned char)command[i]);
    pthread_mutex_lock(&s->lock);
    if (strcmp(name, "*") == 0)
        c = s->all;
    for (int i = 0; i < s->n_names && !c.commands; i++)
        if (strcmp(s->names[i].name, name) == 0)
            c = s->names[i].c;
    pthread_mutex_unlock(&s->lock);
    return c;
}

static uint64_t read_counter(fault_proxy *p, const uint64_t *counter)
{
    pthread_mutex_lock(&p->s->lock);
    uint64_t v = *counter;
    pthread_mutex_unlock(&p->s->lock);
    return v;
}

uint64_t fault_proxy_bytes_up(fault_proxy *p)
{
    return read_counter(p, &p->s->bytes_up);
}

uint64_t fault_proxy_bytes_down(fault_proxy *p)
{
    return read_counter(p, &p->s->bytes_down);
}

uint64_t fault_proxy_accepted(fault_proxy *p)
{
    return read_counter(p, &p->s->accepted);
}

uint64_t fault_proxy_pieces(fault_proxy *p)
{
    return read_counter(p, &p->s->pieces);
}

void fault_proxy_stop(fault_proxy *p)
{
    if (!p)
        return;
    char one = 1;
    while (write(p->s->wake[1], &one, 1) < 0 && errno == EINTR)
        ;
    pthread_join(p->s->thread, NULL);
    state_free(p->s);
    free(p);
}
