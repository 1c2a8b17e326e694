/*
 * The slot map of a Redis Cluster for the Redis sink (sync/redis.c). hiredis
 * 0.14 knows no cluster: the sink keeps one link per master and routes each
 * command by the slot of its bucket's hash tag. The map comes from CLUSTER
 * SLOTS of any seed or known master, asked again after a MOVED, READONLY,
 * CLUSTERDOWN or a lost master; a MOVED also moves its slot at once, so a
 * redirected batch is resent in the same push.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "core/clock.h"
#include "sync/redis-internal.h"

#define MAP_RETRY_MS 100               /* between refreshes that found no node */

void tally__cluster_init(tally__redis_sink *r)
{
    for (unsigned s = 0; s < TALLY__CLUSTER_SLOTS; s++)
        r->owner[s] = -1;
    for (unsigned b = 0; b < TALLY__CLUSTER_BUCKETS; b++) {
        char tag[16];
        int n = snprintf(tag, sizeof(tag), "%u", b);
        r->bucket_slot[b] = (uint16_t)(tally__crc16(tag, (size_t)n) & (TALLY__CLUSTER_SLOTS - 1));
    }
    r->map_stale = true;
}

static struct timeval ms_tv(uint32_t ms)
{
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };
    return tv;
}

/* CLUSTER SLOTS: [[start, end, [host, port, id...], replicas...]...]. A
   master that does not know its own address answers "" or "?": it is @via. */
static bool read_slots(tally__redis_sink *r, const redisReply *rep, const char *via_host,
                       int16_t *owner)
{
    if (!rep || rep->type != REDIS_REPLY_ARRAY)
        return false;
    for (unsigned s = 0; s < TALLY__CLUSTER_SLOTS; s++)
        owner[s] = -1;
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *e = rep->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 || e->element[0]->type != REDIS_REPLY_INTEGER
            || e->element[1]->type != REDIS_REPLY_INTEGER || e->element[2]->type != REDIS_REPLY_ARRAY
            || e->element[2]->elements < 2 || e->element[2]->element[0]->type != REDIS_REPLY_STRING
            || e->element[2]->element[1]->type != REDIS_REPLY_INTEGER)
            return false;
        long long lo = e->element[0]->integer, hi = e->element[1]->integer;
        const redisReply *m = e->element[2];
        const char *host = m->element[0]->str;
        if (!host[0] || strcmp(host, "?") == 0)
            host = via_host;
        if (lo < 0 || hi >= TALLY__CLUSTER_SLOTS || lo > hi)
            return false;
        int l = tally__redis_link(r, host, (int)m->element[1]->integer);
        if (l < 0)
            return false;
        for (long long s = lo; s <= hi; s++)
            owner[s] = (int16_t)l;
    }
    return true;
}

static bool ask_node(struct tally__flusher *f, tally__redis_sink *r, const char *host, int port,
                     int16_t *owner)
{
    redisContext *c = redisConnectWithTimeout(host, port, ms_tv(r->ro.connect_timeout_ms));
    bool ok = c && !c->err && redisSetTimeout(c, ms_tv(r->ro.command_timeout_ms)) == REDIS_OK;
    if (ok && r->password) {
        redisReply *a = redisCommand(c, "AUTH %s", r->password);
        ok = a && a->type != REDIS_REPLY_ERROR;
        freeReplyObject(a);
    }
    if (ok) {
        redisReply *rep = redisCommand(c, "CLUSTER SLOTS");
        ok = read_slots(r, rep, host, owner);
        if (rep && rep->type == REDIS_REPLY_ERROR)
            tally__sync_set_error(f, rep->str, rep->len);
        freeReplyObject(rep);
    } else if (c) {
        tally__sync_set_error(f, c->errstr, strlen(c->errstr));
    }
    if (c)
        redisFree(c);
    return ok;
}

int tally__cluster_refresh(struct tally__flusher *f, tally__redis_sink *r)
{
    uint64_t now = tally_now_ns();
    if (now < r->next_map_ns)
        return TALLY_EIO;
    int16_t *owner = malloc(sizeof(r->owner));
    if (!owner)
        return TALLY_ENOMEM;
    /* masters still connected first, then the seeds, then the rest: after
       a failover the node gone may be a seed, and connecting to it can take
       the whole connect timeout */
    bool ok = false;
    for (int pass = 0; pass < 3 && !ok; pass++) {
        if (pass == 1) {
            for (int i = 0; i < r->n_seeds && !ok; i++)
                ok = ask_node(f, r, r->seeds[i].host, r->seeds[i].port, owner);
            continue;
        }
        for (int i = 0; i < r->n_links && !ok; i++) {
            if ((r->links[i].rc != NULL) != (pass == 0))
                continue;
            char host[TALLY__NODE_HOST_MAX + 1];
            memcpy(host, r->links[i].host, sizeof(host));
            ok = ask_node(f, r, host, r->links[i].port, owner);
        }
    }
    if (ok) {
        memcpy(r->owner, owner, sizeof(r->owner));
        r->map_stale = false;
    } else {
        r->next_map_ns = now + (uint64_t)MAP_RETRY_MS * TALLY__NS_PER_MS;
    }
    free(owner);
    return ok ? 0 : TALLY_EIO;
}

/* "MOVED <slot> <host>:<port>" or "ASK <slot> <host>:<port>"; the host may be
   empty: the node that answered. */
int tally__cluster_redirect(tally__redis_sink *r, const redisReply *e, const tally__link *from,
                            bool *ask)
{
    if (!e || e->type != REDIS_REPLY_ERROR || !e->str)
        return -1;
    const char *s = e->str;
    if (strncmp(s, "MOVED ", 6) == 0)
        *ask = false;
    else if (strncmp(s, "ASK ", 4) == 0)
        *ask = true;
    else
        return -1;
    s = strchr(s, ' ') + 1;
    char *end;
    long slot = strtol(s, &end, 10);
    if (end == s || *end != ' ' || slot < 0 || slot >= TALLY__CLUSTER_SLOTS)
        return -1;
    const char *addr = end + 1, *colon = strrchr(addr, ':');
    if (!colon)
        return -1;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || port < 1 || port > 65535)
        return -1;
    char host[TALLY__NODE_HOST_MAX + 1];
    size_t hl = (size_t)(colon - addr);
    if (hl > TALLY__NODE_HOST_MAX)
        return -1;
    if (hl == 0) {
        memcpy(host, from->host, sizeof(host));
    } else {
        memcpy(host, addr, hl);
        host[hl] = 0;
    }
    int l = tally__redis_link(r, host, (int)port);
    if (l >= 0 && !*ask)
        r->owner[slot] = (int16_t)l;
    return l;
}
