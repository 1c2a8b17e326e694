/*
 * The --redis address of tally-gate and tally-replay, one form for both:
 *   HOST:PORT                               a standalone server
 *   cluster:HOST:PORT[,HOST:PORT]...        seed nodes of a Redis Cluster
 *   sentinel:NAME@HOST:PORT[,HOST:PORT]...  the sentinels of the master NAME
 * The node lists go to the library as they are: tally_flusher_start() checks
 * them (TALLY_EINVAL), before anything starts. Also the --hash-key both tools
 * take, which engines that share Redis counts must agree on.
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

static int hex_digit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* --hash-key: 32 hex digits, not all zero (all zero asks the engine for a
   random key, which no other engine shares). The value is a secret: the
   caller's message about a bad one never repeats it. */
static bool redis_hash_key(const char *arg, uint8_t key[16])
{
    uint8_t any = 0;
    bool ok = strlen(arg) == 32;
    for (size_t i = 0; ok && i < 16; i++) {
        int hi = hex_digit(arg[2 * i]), lo = hex_digit(arg[2 * i + 1]);
        ok = hi >= 0 && lo >= 0;
        key[i] = ok ? (uint8_t)(hi << 4 | lo) : 0;
        any |= key[i];
    }
    return ok && any;
}

#endif /* TALLY_TOOLS_REDIS_ADDRESS_H */
