/*
 * The Redis sink's private declarations, shared by sync/redis.c (the sink:
 * connections, pipelines, the batch transactions) and sync/cluster.c (the slot map
 * of a Redis Cluster). Not installed.
 *
 * The sink talks to its store over links, one connection each: one link in
 * STANDALONE and SENTINEL mode (SENTINEL finds its address before each
 * connect), one per master in CLUSTER mode. Every command is routed to a link
 * by the bucket of its key's digest: in a cluster, a bucket is a hash tag,
 * so a bucket's keys share a slot, and the slot's master is its link.
 */
#ifndef TALLY_SYNC_REDIS_INTERNAL_H
#define TALLY_SYNC_REDIS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "sync/sentinel.h"
#include "sync/sync-internal.h"

#define TALLY__CLUSTER_SLOTS   16384
#define TALLY__CLUSTER_BUCKETS 1024    /* hash tags "{0}".."{1023}": keys over every master */
#define TALLY__LINKS_MAX       64      /* masters of a cluster the sink can talk to */
#define TALLY__FENCES_MAX      16      /* old connections of a link to close before a resend */

/* A reply the pipeline of a link waits for, in order. A transaction
   (MULTI ... EXEC) waits for nrep replies: MULTI's, one a queued command,
   EXEC's; r is EXEC's. */
typedef struct tally__expect {
    int         kind;                  /* EX_* of sync/redis.c */
    void       *p;                     /* the batch, event or entry it answers */
    size_t      from, n;               /* a read-back: its range of f->refresh; a fence: the id */
    size_t      nrep;                  /* replies it waits for */
    redisReply *r;                     /* the (last) reply once read; NULL: none came */
    redisReply *err;                   /* a transaction: the first error before EXEC's */
    bool        multi_failed;          /* a transaction: MULTI itself was refused */
    uint64_t    ttl[(CHUNK_KEYS + 63) / 64];   /* a batch: its items sent with a PEXPIRE */
} tally__expect;

/* A count created without a TTL (its INCRBY's total was its delta, and no
   PEXPIRE went with it): a PEXPIRE NX is due. */
typedef struct tally__ttl_due {
    uint32_t      policy;
    unsigned      limit;
    tally__digest digest;
    uint64_t      win, end_ns;
    bool          done;
} tally__ttl_due;

/* A connection to close before a resend: client ids are a server process's
   own, so a fence names the process too. */
typedef struct tally__fence {
    long long id;
    char      run_id[41];
} tally__fence;

typedef struct tally__link {
    char           host[TALLY__NODE_HOST_MAX + 1];
    int            port;
    redisContext  *rc;
    bool           ever_connected;
    uint64_t       next_connect_ns;
    uint32_t       backoff_ms;
    tally__expect *ex;                 /* this round's replies to read */
    size_t         nex, cap;
    bool           waits;              /* a WAIT ends this round's pipeline */
    bool           wait_lost;          /* a WAIT was due but could not be appended */
    bool           acked_by_wait;      /* it confirmed wait_replicas replicas */
    size_t         unwritten;          /* bytes appended since the pipeline was last written */
    long long      client_id;          /* CLIENT ID of the connection */
    char           run_id[41];         /* the run_id of the server process it is connected to */
    bool           carried;            /* this round's pipeline holds a batch or a check */
    tally__fence   fence[TALLY__FENCES_MAX];   /* connections dropped with batches unanswered */
    int            n_fence;
} tally__link;

/* A key of a flush's read-back (f->refresh). */
typedef struct tally__readback {
    entry *x;                          /* its entry, or NULL */
    bool   held;                       /* in a batch of this push: the batch's reply tells the total */
} tally__readback;

typedef struct tally__redis_sink {
    tally__sink          base;
    tally_redis_options  ro;
    char                *host, *unix_path, *password, *prefix, *master_name, *nodes;
    tally__link          links[TALLY__LINKS_MAX];
    int                  n_links;
    /* CLUSTER */
    tally__node          seeds[TALLY__NODES_MAX];
    int                  n_seeds;
    int16_t              owner[TALLY__CLUSTER_SLOTS];   /* link of each slot's master; -1: none */
    uint16_t             bucket_slot[TALLY__CLUSTER_BUCKETS];
    bool                 map_stale;    /* refresh the slot map before the next round */
    uint64_t             next_map_ns;  /* not before then: a refresh that failed backs off */
    /* a push's read-back: one per f->refresh, and the ones this round reads */
    tally__readback     *rk;
    size_t              *rb;
    size_t               rk_n, rk_cap, rb_n;
    char                *cmd;          /* a command in the Redis protocol, being built */
    size_t               cmd_cap;
    tally__ttl_due      *due;          /* PEXPIREs owed to counts created without a TTL */
    size_t               due_n, due_cap;
} tally__redis_sink;

/* CRC16-CCITT (XMODEM) as the cluster specification defines it, and the slot
   of a key name: of the first "{...}" with something inside, or of the whole
   name (sync/crc16.c). */
uint16_t tally__crc16(const void *buf, size_t len);
unsigned tally__key_slot(const char *key, size_t len);

/* The link for @host:@port, added when new; -1 when the table is full. */
int  tally__redis_link(tally__redis_sink *r, const char *host, int port);
/* Connect @l if it is not (AUTH, SELECT, SENTINEL discovery, with backoff):
   true when it can take commands. */
bool tally__redis_link_ready(struct tally__flusher *f, tally__link *l);
void tally__redis_link_drop(tally__link *l);

/* CLUSTER: the slot map from CLUSTER SLOTS of the first seed or known
   master that answers; 0, or TALLY_EIO or TALLY_ENOMEM (the old map stays). */
int  tally__cluster_refresh(struct tally__flusher *f, tally__redis_sink *r);
/* A MOVED or ASK reply: the link it names (added when new, the slot's owner
   updated for MOVED), or -1 when it is neither or cannot be parsed. @from
   answers for an empty host. */
int  tally__cluster_redirect(tally__redis_sink *r, const redisReply *e, const tally__link *from,
                             bool *ask);
void tally__cluster_init(tally__redis_sink *r);

#endif /* TALLY_SYNC_REDIS_INTERNAL_H */
