/*
 * Entry points kept for programs built against older headers
 * (include/tally/export.h, "Growing structs"). Each function that takes a
 * struct which grew has one definition per symbol version: the newest is the
 * default (name@@VERSION) that new programs and libtally.a bind to; an older
 * one (name@VERSION) reads and writes the struct exactly as it was in that
 * release and hands the library a current struct whose new fields are zero.
 *
 *   TALLY_0.1  tally_options without hash (keys digested with SipHash)
 *   TALLY_0.2  tally_options with hash
 *   TALLY_0.3  tally_redis_options with mode, nodes, master_name,
 *              wait_replicas and wait_timeout_ms (tally_flusher_start);
 *              tally_stats with lru_evictions (tally_stats_read)
 */
#include <stddef.h>
#include <string.h>

#include "engine/engine-internal.h"
#include "sync/sync-internal.h"

/* Bind definition @impl to the exported @name ("tally_x@TALLY_0.1", or
   "tally_x@@TALLY_0.2" for the default). GCC's attribute survives LTO; clang
   takes the assembler directive. */
#if defined(__clang__)
#define SYMVER(impl, name) __asm__(".symver " #impl ", " name);
#define SYMVER_ATTR(name)
#else
#define SYMVER(impl, name)
#define SYMVER_ATTR(name) __attribute__((symver(name)))
#endif

/* ---- tally_options, as of TALLY_0.1 --------------------------------------- */

typedef struct options_0_1 {
    size_t  capacity;
    size_t  max_key_len;
    bool    digest_only;
    uint8_t hash_key[16];
} options_0_1;

/* The old fields keep their places in the current struct. */
_Static_assert(offsetof(tally_options, capacity) == offsetof(options_0_1, capacity), "capacity moved");
_Static_assert(offsetof(tally_options, max_key_len) == offsetof(options_0_1, max_key_len), "max_key_len moved");
_Static_assert(offsetof(tally_options, digest_only) == offsetof(options_0_1, digest_only), "digest_only moved");
_Static_assert(offsetof(tally_options, hash_key) == offsetof(options_0_1, hash_key), "hash_key moved");
_Static_assert(sizeof(tally_options) >= sizeof(options_0_1), "tally_options shrank");

static void options_from_0_1(tally_options *o, const options_0_1 *old)
{
    memset(o, 0, sizeof(*o));
    o->capacity = old->capacity;
    o->max_key_len = old->max_key_len;
    o->digest_only = old->digest_only;
    memcpy(o->hash_key, old->hash_key, sizeof(o->hash_key));
    /* 0.1 named keys with SipHash: the same digests (on_deltas and events
       of a digest_only engine hand them out) */
    o->hash = TALLY_HASH_SIPHASH;
}

SYMVER_ATTR("tally_options_init@TALLY_0.1") TALLY_EXPORT
void tally__options_init_0_1(options_0_1 *opts);
SYMVER(tally__options_init_0_1, "tally_options_init@TALLY_0.1")
void tally__options_init_0_1(options_0_1 *opts)
{
    tally_options o;

    if (!opts)
        return;
    tally__options_init(&o);
    memset(opts, 0, sizeof(*opts));
    opts->capacity = o.capacity;
    opts->max_key_len = o.max_key_len;
    opts->digest_only = o.digest_only;
    memcpy(opts->hash_key, o.hash_key, sizeof(opts->hash_key));
}

SYMVER_ATTR("tally_open@TALLY_0.1") TALLY_EXPORT
int tally__open_0_1(const options_0_1 *opts, tally_engine **out);
SYMVER(tally__open_0_1, "tally_open@TALLY_0.1")
int tally__open_0_1(const options_0_1 *opts, tally_engine **out)
{
    tally_options o;

    if (opts) {
        options_from_0_1(&o, opts);
    } else {
        tally__options_init(&o);
        o.hash = TALLY_HASH_SIPHASH;  /* as options_from_0_1() */
    }
    return tally__open(&o, out);
}

/* ---- The current structs (TALLY_0.2) --------------------------------------- */

SYMVER_ATTR("tally_options_init@@TALLY_0.2") TALLY_EXPORT
void tally__options_init_0_2(tally_options *opts);
SYMVER(tally__options_init_0_2, "tally_options_init@@TALLY_0.2")
void tally__options_init_0_2(tally_options *opts)
{
    tally__options_init(opts);
}

SYMVER_ATTR("tally_open@@TALLY_0.2") TALLY_EXPORT
int tally__open_0_2(const tally_options *opts, tally_engine **out);
SYMVER(tally__open_0_2, "tally_open@@TALLY_0.2")
int tally__open_0_2(const tally_options *opts, tally_engine **out)
{
    return tally__open(opts, out);
}

/* ---- tally_redis_options, as of TALLY_0.1 and TALLY_0.2 -------------------- */

typedef struct redis_options_0_1 {
    const char *host; int port; const char *unix_path;
    const char *password; int db;
    const char *key_prefix;
    uint32_t connect_timeout_ms, command_timeout_ms;
} redis_options_0_1;

_Static_assert(offsetof(tally_redis_options, command_timeout_ms)
               == offsetof(redis_options_0_1, command_timeout_ms), "command_timeout_ms moved");
_Static_assert(sizeof(tally_redis_options) > sizeof(redis_options_0_1), "tally_redis_options shrank");

/* The flusher options did not change; the Redis options they point at did.
   A 0.1 (or 0.2) program's o->redis is read as the struct it had. */
SYMVER_ATTR("tally_flusher_start@TALLY_0.1") TALLY_EXPORT
int tally__flusher_start_0_1(tally_engine *e, const tally_flusher_options *o);
SYMVER(tally__flusher_start_0_1, "tally_flusher_start@TALLY_0.1")
int tally__flusher_start_0_1(tally_engine *e, const tally_flusher_options *o)
{
    tally_flusher_options cur;
    tally_redis_options ro;

    if (!o || !o->redis)
        return tally__flusher_start(e, o);
    memset(&ro, 0, sizeof(ro));
    memcpy(&ro, o->redis, sizeof(redis_options_0_1));
    cur = *o;
    cur.redis = &ro;
    /* the strings are copied by the start: &ro need not outlive it */
    return tally__flusher_start(e, &cur);
}

SYMVER_ATTR("tally_flusher_start@@TALLY_0.3") TALLY_EXPORT
int tally__flusher_start_0_3(tally_engine *e, const tally_flusher_options *o);
SYMVER(tally__flusher_start_0_3, "tally_flusher_start@@TALLY_0.3")
int tally__flusher_start_0_3(tally_engine *e, const tally_flusher_options *o)
{
    return tally__flusher_start(e, o);
}

/* ---- tally_stats, as of TALLY_0.1 and TALLY_0.2 ----------------------------- */

/* The 0.1 struct is the current one up to redis_permanent_errors. */
#define STATS_0_1_SIZE (offsetof(tally_stats, redis_permanent_errors) + sizeof(uint64_t))
_Static_assert(offsetof(tally_stats, lru_evictions) == STATS_0_1_SIZE, "lru_evictions moved");

SYMVER_ATTR("tally_stats_read@TALLY_0.1") TALLY_EXPORT
int tally__stats_read_0_1(tally_engine *e, void *out);
SYMVER(tally__stats_read_0_1, "tally_stats_read@TALLY_0.1")
int tally__stats_read_0_1(tally_engine *e, void *out)
{
    tally_stats s;

    if (!out)
        return TALLY_EINVAL;
    int rc = tally__stats_read(e, &s);
    if (!rc)
        memcpy(out, &s, STATS_0_1_SIZE);
    return rc;
}

SYMVER_ATTR("tally_stats_read@@TALLY_0.3") TALLY_EXPORT
int tally__stats_read_0_3(tally_engine *e, tally_stats *out);
SYMVER(tally__stats_read_0_3, "tally_stats_read@@TALLY_0.3")
int tally__stats_read_0_3(tally_engine *e, tally_stats *out)
{
    return tally__stats_read(e, out);
}
