/*
 * Node lists and Redis Sentinel discovery for the Redis sink. Not installed.
 *
 * A node list is "host:port[,host:port]...": the seed nodes of a cluster or
 * the sentinels of a monitored master. tally__parse_nodes is the one parser
 * of it, so every mode accepts and refuses the same strings.
 *
 * Discovery asks every sentinel of the list for the master and takes the
 * answer of the highest configuration epoch: a failover bumps the epoch, and
 * the sentinels that have not heard of it yet (it reaches them with the
 * next hello message, up to 2 s later) answer the old master, which may still
 * be up and still call itself master. Ties go to the sentinel listed first.
 * The caller connects to the answer and confirms it with
 * tally__redis_is_master: an answer can be stale by the time it is used.
 */
#ifndef TALLY_SYNC_SENTINEL_H
#define TALLY_SYNC_SENTINEL_H

#include <stddef.h>
#include <stdint.h>

typedef struct redisContext redisContext;   /* hiredis */

#define TALLY__NODES_MAX    16             /* nodes in one list */
#define TALLY__NODE_HOST_MAX 255           /* bytes of a host name (a DNS name's limit) */

typedef struct tally__node {
    char host[TALLY__NODE_HOST_MAX + 1];
    int  port;
} tally__node;

/*
 * Parse @nodes, "host:port[,host:port]...", into @out (NULL: only check).
 * The port follows the last colon and is 1..65535 in decimal digits; a host
 * with colons (IPv6) is bracketed, "[::1]:6379", and kept without the
 * brackets. Refused (TALLY_EINVAL): a NULL or empty list, an empty entry
 * (",", a leading or trailing comma), a space or control byte anywhere, an
 * empty host, a host over TALLY__NODE_HOST_MAX bytes, a colon in a host
 * outside brackets, a missing, empty, signed or out-of-range port, more
 * than TALLY__NODES_MAX nodes.
 * Return the number of nodes (1..TALLY__NODES_MAX) or TALLY_EINVAL, in which
 * case @out is left as it was.
 */
int tally__parse_nodes(const char *nodes, tally__node out[TALLY__NODES_MAX]);

/*
 * Ask the sentinels in @nodes ("h:p,h:p") for @master_name's address.
 * Each sentinel gets @timeout_ms to connect and as much to answer
 * (SENTINEL MASTER); one that fails, does not know the name or answers
 * without an address is skipped. Of the answers, the highest config-epoch
 * wins, the first listed on a tie.
 * Return 0 with host/port filled, TALLY_EIO (err filled) when none answered,
 * TALLY_EINVAL for unparsable @nodes, an empty @master_name, a @timeout_ms
 * or a @host_len of 0. @err (may be NULL when @err_len is 0) says, per sentinel, why it
 * gave no address (also on success, for the sentinels skipped),
 * NUL-terminated and truncated to @err_len.
 * It blocks: at most 2 x @timeout_ms per sentinel.
 */
int tally__sentinel_master(const char *nodes, const char *master_name, uint32_t timeout_ms,
                           char *host, size_t host_len, int *port, char *err, size_t err_len);

/*
 * 1 when @c's ROLE is master, 0 when it is not, TALLY_EIO on error (no
 * reply, an error reply, a reply that is not ROLE's). Uses @c's own timeout.
 */
int tally__redis_is_master(redisContext *c);

#endif
