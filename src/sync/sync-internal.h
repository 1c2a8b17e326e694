/*
 * The sync layer's private declarations: the flusher's bookkeeping, which the
 * store adapters (sinks) settle, and the sink interface. Not installed.
 *
 * A sink is a store the flusher pushes deltas to. Its one operation, push,
 * runs one exchange: it forms batches from the fresh cost of the entries
 * (tally__sync_form_batches), sends them with the waiting events and the
 * read-back of f->refresh, and settles each reply with the helpers below:
 * an acknowledged item adds to its entry's acked and gives the others' count
 * (tally__sync_store_remote), a refused one goes back to its entry
 * (tally__sync_dissolve). A batch left in the in-flight list is kept with
 * its sequence number, to be sent again as it is. push returns 0 when
 * everything taken was acknowledged. Between flushes, prefetch reads the
 * totals of keys new to the engine the same way, with no batch. The flusher
 * knows no store; a store knows no thread.
 */
#ifndef TALLY_SYNC_INTERNAL_H
#define TALLY_SYNC_INTERNAL_H

#include <pthread.h>
#include <semaphore.h>

#include "engine/engine-internal.h"
#include "ops/ops-internal.h"

#define CHUNK_KEYS       500           /* keys per batch */
#define MAX_KEPT_BATCHES 8             /* batches of unknown outcome, per bucket, before forming stops */
#define ERRSTR_LEN       256
/* Sequence numbers a store's record of applied batches tells apart, per
   bucket: a batch of unknown outcome must be resent before its bucket forms
   a batch this much younger (sync/redis.c, guarantee 3). */
#define TALLY__SEQ_WINDOW 1024

struct tally__flusher;
struct tally__sink;

typedef struct tally__sink_ops {
    int  (*push)(struct tally__sink *s, struct tally__flusher *f);
    /* Read the store's totals of f->refresh alone, in one exchange, into
       the slots; write nothing. NULL: the store tells no totals. */
    void (*prefetch)(struct tally__sink *s, struct tally__flusher *f);
    void (*destroy)(struct tally__sink *s);
} tally__sink_ops;

/* A store spreads keys over @buckets buckets by digest (tally__sync_bucket);
   a batch holds keys of one bucket and takes the next sequence number of its
   bucket. */
typedef struct tally__sink {
    const tally__sink_ops *ops;
    unsigned               buckets;
} tally__sink;

/* tally_flusher_start with the current tally_redis_options (src/abi.c binds
   the exported versions to it). */
int tally__flusher_start(tally_engine *e, const tally_flusher_options *o);

/* The Redis sink (sync/redis.c). Return 0, TALLY_ENOMEM, or TALLY_EINVAL when
   the library was built without Redis. */
int tally__sink_redis_new(const tally_redis_options *ro, tally__sink **out);
/* No store: everything taken is acknowledged at once (sync/flusher.c). */
extern tally__sink tally__sink_local;

/* A (policy, limit, key, window) with cost taken from the engine. */
typedef struct entry {
    struct entry *next;            /* hash chain */
    uint32_t      policy;
    unsigned      limit;
    tally__digest digest;
    uint64_t      win;
    uint64_t      fresh;           /* taken, not yet in a Redis batch */
    uint64_t      acked;           /* cost of this engine that Redis acknowledged */
    uint64_t      forgot;          /* counts of this engine's evicted slots of the key:
                                      others' cost to every later slot of it */
    uint64_t      others;          /* the others' count last written, forgot aside */
    bool          told;            /* others holds a count learnt from the store */
    uint64_t      local_total;     /* the key's local count in the window when last taken */
    uint64_t      end_ns;          /* when the window stops counting */
    uint64_t      acked_seq;       /* the flush that last learnt the total from a reply */
    unsigned      inflight;        /* batch items not yet acknowledged */
    size_t        key_len;
    unsigned char *key;            /* key bytes, or the digest when digest_only */
} entry;

typedef struct item {
    entry   *e;
    uint64_t delta;
} item;

/* A batch sent (or to send) to the store under one sequence number of its bucket. */
typedef struct batch {
    struct batch *next;
    uint64_t      seq;            /* its sequence number in its bucket: 1, 2, ... */
    unsigned      bucket;
    unsigned      sends;          /* times it was sent */
    int           ask;            /* a store's one-off redirection (sync/redis.c); -1: none */
    bool          redirected;     /* to be sent again in this push */
    bool          settled;        /* acknowledged or given back: leaves the list */
    void         *reply;          /* the store's reply, until the batch is settled */
    size_t        n;
    item          items[CHUNK_KEYS];
} batch;

typedef struct event {
    struct event *next;
    tally__note  *note;
    bool          settled;        /* stored, or refused for good: leaves the list */
} event;

/* A live key in its current window, whose global count the flush reads. */
typedef struct refresh {
    uint32_t      policy;
    unsigned      limit;
    tally__digest digest;
    uint64_t      win;
} refresh;

struct tally__flusher {
    tally_engine         *e;
    tally_flusher_options o;
    struct tally__sink   *sink;        /* the store: Redis, or none (sink-local) */
    bool                  redis_on;    /* a store is configured (fail closed applies) */
    pthread_t             thread;

    pthread_mutex_t       lock;        /* guards the request fields below */
    pthread_cond_t        cond;
    sem_t                 wake;        /* posted by requests, stops and prefetches */
    bool                  stop;
    uint64_t              requested, done;   /* flush generations */
    int                   done_rc;

    /* owned by the flusher thread */
    entry               **map;
    size_t                map_size, map_count;
    batch                *inflight_head, **inflight_tail;
    refresh              *refresh;     /* this flush's keys to read back */
    size_t                refresh_n, refresh_cap;
    uint64_t              seq;         /* flushes so far */
    event                *events, **events_tail;
    uint64_t             *bucket_seq;  /* the last sequence number of each bucket */
    uint64_t              instance;
    tally_delta          *cb;          /* on_deltas scratch */
    uint64_t              last_flush_ns;
    size_t                cb_cap;

    pthread_mutex_t       err_lock;    /* guards errstr: tally_flusher_last_error() */
    char                  errstr[ERRSTR_LEN];
    size_t                errlen;
};


/* The bucket of a digest in @s. */
static inline unsigned tally__sync_bucket(const tally__sink *s, tally__digest d)
{
    return s->buckets > 1 ? (unsigned)(d.lo % s->buckets) : 0;
}

/* Helpers for the sinks (sync/flusher.c); flusher thread only. */
entry   *tally__sync_find(struct tally__flusher *f, uint32_t policy, unsigned limit, tally__digest d,
                          uint64_t win);
/* *held_back: fresh cost left unbatched, so the flush cannot be complete:
   its bucket has MAX_KEPT_BATCHES batches of unknown outcome waiting, or
   one that a new batch would leave TALLY__SEQ_WINDOW sequence numbers behind. */
int      tally__sync_form_batches(struct tally__flusher *f, bool *held_back);
void     tally__sync_dissolve(batch *b);
void     tally__sync_deliver_deltas(struct tally__flusher *f, const item *items, const uint64_t *totals,
                                    size_t n);
void     tally__sync_deliver_note(struct tally__flusher *f, const tally__note *n);
/* Write the others' count of (policy, limit, key, window) of @x into its
   slot: @others, the store's total less this engine's acknowledged cost,
   plus the forgot of the key's entry (@x itself, or the entry of its key
   when @x is a bare entry without key bytes, as a read-back names a key). */
void     tally__sync_store_remote(struct tally__flusher *f, entry *x, uint64_t others);
uint64_t tally__sync_window_end(const tally__limit *l, uint64_t win);
/* Keep @text as the sink's last error (tally_flusher_last_error()). Any thread. */
void     tally__sync_set_error(struct tally__flusher *f, const char *text, size_t len);

#endif /* TALLY_SYNC_INTERNAL_H */
