/*
 * Shared engines (tally/shared.h): an engine laid out whole in a region that
 * several processes map at one address, so that every pointer in it is good
 * in each of them.
 *
 * Layout (core/region.h gives the header; every part aligned to 64 bytes):
 *
 *   struct {
 *       tally__region  header;     magic, version, layout, base, size
 *       tally__shared  root;       what attach finds: magic, the engine
 *       tally_engine   engine;     as tally_open() makes one, but for:
 *                                    epoch   -> the domain below
 *                                    region  -> the header
 *                                    locks   process-shared and robust
 *       tally__epoch   epoch;      max_threads readers (core/epoch.h)
 *       per policy:    tally__cfg, tally__policy, its table's arrays
 *   }
 *
 * Nothing in it points outside it: no function pointer (the hash is chosen
 * by kind, core/hash.h), no key copy (digest_only), no note (no flusher, no
 * watch: the calls that would make them refuse a shared engine), and the
 * policies never change after creation. Process-private memory a call uses
 * (a reclaim's batch, a scan's chunk) lives only for that call.
 */
#include <string.h>
#include <sys/stat.h>

#include "tally/shared.h"
#include "core/epoch.h"
#include "core/region.h"
#include "engine/engine-internal.h"
#include "engine/section.h"

__thread tally__epoch_reader *tally__sec_reader __attribute__((tls_model("initial-exec")));

#define ROOT_MAGIC  UINT64_C(0x6e652d796c6c6174)    /* "tally-en" */
#define MAX_THREADS 65536
#define ALIGN       64

typedef struct tally__shared {
    uint64_t      magic;
    uint64_t      pidns_dev, pidns_ino;   /* the creator's PID namespace */
    tally_engine *engine;
} tally__shared;

/* This process's PID namespace: process identities (core/proc.h), which
   tell a dead reader or reclaim from a live one, name processes of one
   namespace only. */
static void pid_namespace(uint64_t *dev, uint64_t *ino)
{
    struct stat st;
    if (stat("/proc/self/ns/pid", &st) == 0) {
        *dev = (uint64_t)st.st_dev;
        *ino = (uint64_t)st.st_ino;
    } else {
        *dev = *ino = 0;
    }
}

/* Sizes a build lays out with: a region of another build is refused. */
static uint64_t layout_of(void)
{
    uint64_t sizes[] = { sizeof(tally__shared), sizeof(tally_engine), sizeof(tally__policy),
                         sizeof(tally__table), sizeof(tally__cfg), sizeof(tally__epoch_reader),
                         sizeof(tally__epoch), sizeof(pthread_mutex_t), sizeof(tally_options),
                         TALLY__STAT_SHARDS, TALLY_MAX_POLICIES, TALLY_MAX_LIMITS };
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        h = (h ^ sizes[i]) * UINT64_C(0x100000001b3);
    return h;
}

static size_t aligned(size_t n)
{
    return (n + ALIGN - 1) / ALIGN * ALIGN;
}

/* The checks of tally_shared_size(), with the options resolved (but for a
   random hash key, drawn only by a creation) and the bytes needed. */
static int plan(const tally_options *opts, const tally_policy *policies, size_t n_policies,
                uint32_t max_threads, tally_options *o, tally__hasher *h, size_t *bytes)
{
    if (!policies || n_policies == 0 || n_policies > TALLY_MAX_POLICIES || max_threads > MAX_THREADS)
        return TALLY_EINVAL;
    tally_options cur;
    if (opts)
        cur = *opts;
    else
        tally__options_init(&cur);
    if (!cur.digest_only)
        return TALLY_EINVAL;
    /* the key stays as given: a zero key is drawn only by the creation */
    static const uint8_t probe_key[16] = { 1 };
    bool zero = tally__all_zero(cur.hash_key, sizeof(cur.hash_key));
    if (zero)
        memcpy(cur.hash_key, probe_key, sizeof(cur.hash_key));
    int rc = tally__options_resolve(&cur, o, h);
    if (rc)
        return rc;
    if (zero)
        memset(o->hash_key, 0, sizeof(o->hash_key));
    size_t n = sizeof(tally__region) + ALIGN + aligned(sizeof(tally__shared))
             + aligned(sizeof(tally_engine))
             + aligned(tally__epoch_size(max_threads ? max_threads : TALLY_SHARED_THREADS));
    for (size_t i = 0; i < n_policies; i++) {
        const tally_policy *p = &policies[i];
        if ((rc = tally__policy_check(p)) != 0)
            return rc;
        for (size_t j = 0; j < i; j++)
            if (strcmp(policies[j].name, p->name) == 0)
                return TALLY_EINVAL;
        n += aligned(sizeof(tally__cfg)) + aligned(sizeof(tally__policy))
           + tally__table_region_bytes(o->capacity, p->n_limits, (p->flags & TALLY_EVICT_LRU) != 0);
    }
    *bytes = n;
    return 0;
}

int tally_shared_size(const tally_options *opts, const tally_policy *policies, size_t n_policies,
                      uint32_t max_threads, size_t *bytes)
{
    tally_options o;
    tally__hasher h;
    size_t n;
    if (!bytes)
        return TALLY_EINVAL;
    int rc = plan(opts, policies, n_policies, max_threads, &o, &h, &n);
    if (!rc)
        *bytes = n;
    return rc;
}

int tally_shared_create(void *mem, size_t len, const tally_options *opts,
                        const tally_policy *policies, size_t n_policies, uint32_t max_threads,
                        tally_engine **out)
{
    tally_options o;
    tally__hasher h;
    tally__region *r;
    size_t need;

    if (!mem || !out || ((uintptr_t)mem & (ALIGN - 1)))
        return TALLY_EINVAL;
    int rc = plan(opts, policies, n_policies, max_threads, &o, &h, &need);
    if (rc)
        return rc;
    if (len < need)
        return TALLY_EINVAL;
    /* the creation's own key, once for every process */
    if ((rc = tally__options_resolve(&o, &o, &h)) != 0)
        return rc;
    if (!max_threads)
        max_threads = TALLY_SHARED_THREADS;
    if ((rc = tally__region_format(mem, len, layout_of(), &r)) != 0)
        return rc;
    /* plan() counted every part with its alignment: none of these fails */
    tally__shared *root = tally__region_alloc(r, sizeof(*root), ALIGN);
    tally_engine *e = tally__region_alloc(r, sizeof(*e), ALIGN);
    tally__epoch *d = tally__region_alloc(r, tally__epoch_size(max_threads), ALIGN);
    if (!root || !e || !d)
        return TALLY_EINVAL;
    tally__epoch_init(d, max_threads);
    tally__engine_init(e, &o, &h, r);
    for (size_t i = 0; i < n_policies && !rc; i++) {
        uint32_t id;
        rc = tally__policy_add(e, &policies[i], &id);
    }
    if (rc)
        return rc == TALLY_ENOMEM ? TALLY_EINVAL : rc;
    /* from here on calls take the region's sections */
    e->epoch = d;
    root->magic = ROOT_MAGIC;
    pid_namespace(&root->pidns_dev, &root->pidns_ino);
    root->engine = e;
    tally__region_ready(r);
    *out = e;
    return 0;
}

/* The root of the region at @mem (its first part, after the header). */
static const tally__shared *root_of(const void *mem)
{
    return (const tally__shared *)((const unsigned char *)mem + aligned(sizeof(tally__region)));
}

int tally_shared_check(const void *mem, size_t len, const char **why)
{
    const char *bad = NULL;
    int rc = tally__region_check(mem, len, layout_of(), &bad);
    if (!rc) {
        const tally__shared *root = root_of(mem);
        const unsigned char *lo = mem, *hi = lo + len;
        const unsigned char *eng = (const unsigned char *)root->engine;
        uint64_t dev, ino;
        pid_namespace(&dev, &ino);
        if (root->magic != ROOT_MAGIC)
            bad = "not a shared engine: a region of another kind";
        else if (root->pidns_dev != dev || root->pidns_ino != ino)
            bad = "made in another PID namespace, whose processes this one cannot tell dead or alive";
        else if (eng < lo || eng > hi - sizeof(tally_engine) || root->engine->region != mem
                 || root->engine->epoch == NULL)
            bad = "corrupt: its engine is not where its header says";
        rc = bad ? TALLY_EINVAL : 0;
    }
    if (why)
        *why = bad;
    return rc;
}

int tally_shared_address(const void *mem, size_t len, void **addr)
{
    if (!addr || tally__region_check_anywhere(mem, len, layout_of(), NULL) != 0)
        return TALLY_EINVAL;
    *addr = (void *)(uintptr_t)((const tally__region *)mem)->base;
    return 0;
}

int tally_shared_attach(void *mem, size_t len, tally_engine **out)
{
    if (!out || tally_shared_check(mem, len, NULL) != 0)
        return TALLY_EINVAL;
    *out = root_of(mem)->engine;
    return 0;
}

void tally_shared_detach(tally_engine *e)
{
    if (e && e->epoch)
        tally__epoch_forget(e->epoch);
}

int tally__sec_enter_shared(tally_engine *e)
{
    tally__epoch_reader *r = tally__epoch_reader_get(e->epoch);
    if (TALLY__UNLIKELY(!r))
        return TALLY_EBUSY;
    tally__sec_reader = r;
    tally__epoch_enter(e->epoch, r);
    return 0;
}
