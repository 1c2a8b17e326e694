/*
 * Node lists and Redis Sentinel discovery (sync/sentinel.h): the parser of
 * "host:port,..." lists, SENTINEL MASTER over blocking hiredis contexts with
 * timeouts, and the ROLE check that confirms a master before the sink
 * writes to it.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "tally.h"
#include "sync/sentinel.h"

#define PORT_DIGITS_MAX 5

/* One entry, [b, e): "host:port" or "[v6 host]:port". */
static bool parse_node(const char *b, const char *e, tally__node *n)
{
    const char *colon = NULL;
    for (const char *p = b; p < e; p++)
        if (*p == ':')
            colon = p;
    if (!colon)
        return false;
    const char *hb = b, *he = colon;
    if (*b == '[') {
        /* only the brackets may enclose colons, and they enclose the whole host */
        if (he - hb < 2 || he[-1] != ']')
            return false;
        hb++;
        he--;
        for (const char *p = hb; p < he; p++)
            if (*p == '[' || *p == ']')
                return false;
    } else {
        for (const char *p = hb; p < he; p++)
            if (*p == ':' || *p == '[' || *p == ']')
                return false;
    }
    size_t hl = (size_t)(he - hb);
    size_t pl = (size_t)(e - colon - 1);
    if (hl == 0 || hl > TALLY__NODE_HOST_MAX || pl == 0 || pl > PORT_DIGITS_MAX)
        return false;
    long port = 0;
    for (const char *p = colon + 1; p < e; p++) {
        if (*p < '0' || *p > '9')
            return false;
        port = port * 10 + (*p - '0');
    }
    if (port < 1 || port > 65535)
        return false;
    memcpy(n->host, hb, hl);
    n->host[hl] = '\0';
    n->port = (int)port;
    return true;
}

int tally__parse_nodes(const char *nodes, tally__node out[TALLY__NODES_MAX])
{
    if (!nodes || !*nodes)
        return TALLY_EINVAL;
    for (const char *p = nodes; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return TALLY_EINVAL;
    /* parsed aside first: on a refusal @out is left as it was */
    tally__node tmp[TALLY__NODES_MAX];
    int n = 0;
    const char *b = nodes;
    for (;;) {
        const char *e = strchr(b, ',');
        if (!e)
            e = b + strlen(b);
        if (n == TALLY__NODES_MAX || !parse_node(b, e, &tmp[n]))
            return TALLY_EINVAL;
        n++;
        if (!*e)
            break;
        b = e + 1;
    }
    if (out)
        memcpy(out, tmp, (size_t)n * sizeof(*tmp));
    return n;
}

/* Append to the NUL-terminated @err, truncating at @len. */
__attribute__((format(printf, 3, 4)))
static void err_add(char *err, size_t len, const char *fmt, ...)
{
    if (len == 0)
        return;
    size_t used = strnlen(err, len - 1);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + used, len - used, fmt, ap);
    va_end(ap);
}

static struct timeval ms_tv(uint32_t ms)
{
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };
    return tv;
}

/* The value of @field in a flat field/value array reply; NULL when absent. */
static const redisReply *field(const redisReply *r, const char *field)
{
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *k = r->element[i];
        if (k->type == REDIS_REPLY_STRING && strcmp(k->str, field) == 0)
            return r->element[i + 1];
    }
    return NULL;
}

/* A decimal integer reply field in [lo, hi]. */
static bool field_num(const redisReply *r, const char *name, long long lo, long long hi,
                      long long *out)
{
    const redisReply *v = field(r, name);
    if (!v || v->type != REDIS_REPLY_STRING || v->len == 0)
        return false;
    char *end;
    long long x = strtoll(v->str, &end, 10);
    if (*end || x < lo || x > hi)
        return false;
    *out = x;
    return true;
}

int tally__sentinel_master(const char *nodes, const char *master_name, uint32_t timeout_ms,
                           char *host, size_t host_len, int *port, char *err, size_t err_len)
{
    tally__node sent[TALLY__NODES_MAX];
    int n = tally__parse_nodes(nodes, sent);
    if (n < 0 || !master_name || !*master_name || timeout_ms == 0 || !host || host_len == 0 ||
        !port || (!err && err_len > 0))
        return TALLY_EINVAL;
    if (err_len)
        err[0] = '\0';
    long long best_epoch = -1;
    for (int i = 0; i < n; i++) {
        const tally__node *s = &sent[i];
        redisContext *c = redisConnectWithTimeout(s->host, s->port, ms_tv(timeout_ms));
        if (!c || c->err || redisSetTimeout(c, ms_tv(timeout_ms)) != REDIS_OK) {
            err_add(err, err_len, "%s%s:%d: %s", err_len && err[0] ? "; " : "", s->host, s->port,
                    c ? c->errstr : "out of memory");
            redisFree(c);
            continue;
        }
        const char *argv[] = { "SENTINEL", "MASTER", master_name };
        size_t argl[] = { 8, 6, strlen(master_name) };
        redisReply *r = redisCommandArgv(c, 3, argv, argl);
        const char *why = NULL;
        long long epoch, p;
        const redisReply *ip = NULL;
        if (!r)
            why = c->errstr;
        else if (r->type == REDIS_REPLY_ERROR)
            why = r->str;
        else if (r->type != REDIS_REPLY_ARRAY || !(ip = field(r, "ip")) ||
                 ip->type != REDIS_REPLY_STRING || ip->len == 0 ||
                 !field_num(r, "port", 1, 65535, &p) ||
                 !field_num(r, "config-epoch", 0, INT64_MAX, &epoch))
            why = "no master address in the reply";
        else if (ip->len >= host_len)
            why = "master host name too long";
        else if (epoch > best_epoch) {
            /* strictly greater: on a tie the sentinel listed first keeps its answer */
            best_epoch = epoch;
            memcpy(host, ip->str, ip->len);
            host[ip->len] = '\0';
            *port = (int)p;
        }
        if (why)
            err_add(err, err_len, "%s%s:%d: %s", err_len && err[0] ? "; " : "", s->host, s->port,
                    why);
        freeReplyObject(r);
        redisFree(c);
    }
    return best_epoch >= 0 ? 0 : TALLY_EIO;
}

int tally__redis_is_master(redisContext *c)
{
    if (!c)
        return TALLY_EIO;
    redisReply *r = redisCommand(c, "ROLE");
    int rc = TALLY_EIO;
    /* ROLE: ["master", offset, replicas] or ["slave", ...] or ["sentinel", ...] */
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
        r->element[0]->type == REDIS_REPLY_STRING)
        rc = strcmp(r->element[0]->str, "master") == 0;
    freeReplyObject(r);
    return rc;
}
