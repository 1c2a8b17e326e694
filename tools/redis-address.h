/*
 * The --redis address of tally-gate and tally-replay, one form for both:
 *   HOST:PORT                               a standalone server
 *   cluster:HOST:PORT[,HOST:PORT]...        seed nodes of a Redis Cluster
 *   sentinel:NAME@HOST:PORT[,HOST:PORT]...  the sentinels of the master NAME
 * The node lists go to the library as they are: tally_flusher_start() checks
 * them (TALLY_EINVAL), before anything starts.
 */
#ifndef TALLY_TOOLS_REDIS_ADDRESS_H
#define TALLY_TOOLS_REDIS_ADDRESS_H

#include <stdbool.h>
#include <string.h>

#include <tally.h>

#define REDIS_FORMS "H:PORT, cluster:H:PORT[,H:PORT]... or sentinel:NAME@H:PORT[,H:PORT]..."

/* A decimal port 1..65535 of the whole string @s. */
static bool redis_port(const char *s, int *port)
{
    long v = 0;
    if (!*s || strlen(s) > 5)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (*s - '0');
    }
    if (v < 1 || v > 65535)
        return false;
    *port = (int)v;
    return true;
}

/* @arg into @ro (@buf, of @len bytes, keeps a host or a master name). */
static bool redis_option(const char *arg, tally_redis_options *ro, char *buf, size_t len)
{
    const char *at, *colon;
    if (strncmp(arg, "cluster:", 8) == 0) {
        ro->mode = TALLY_REDIS_CLUSTER;
        ro->nodes = arg + 8;
        return true;
    }
    if (strncmp(arg, "sentinel:", 9) == 0) {
        arg += 9;
        if (!(at = strchr(arg, '@')) || at == arg || (size_t)(at - arg) >= len)
            return false;
        memcpy(buf, arg, (size_t)(at - arg));
        buf[at - arg] = '\0';
        ro->mode = TALLY_REDIS_SENTINEL;
        ro->master_name = buf;
        ro->nodes = at + 1;
        return true;
    }
    if (!(colon = strrchr(arg, ':')) || colon == arg || (size_t)(colon - arg) >= len
        || !redis_port(colon + 1, &ro->port))
        return false;
    memcpy(buf, arg, (size_t)(colon - arg));
    buf[colon - arg] = '\0';
    ro->host = buf;
    return true;
}

#endif /* TALLY_TOOLS_REDIS_ADDRESS_H */
