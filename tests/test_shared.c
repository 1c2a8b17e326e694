/*
 * Shared engines (include/tally/shared.h) in one process: sizes, creation,
 * the checks that refuse a region, and the calls a shared engine refuses.
 * Several processes on one engine: tests/stress/test_shared_stress.c.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "test.h"
#include "tally.h"

#define SEC UINT64_C(1000000000)
#define T0  (UINT64_C(1700000000) * SEC)

static tally_options digest_opts(size_t capacity)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = true;
    return o;
}

static const tally_policy POLICIES[2] = {
    { .name = "api", .n_limits = 1,
      .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 60 * SEC } } },
    { .name = "burst", .n_limits = 2, .flags = TALLY_EVICT_LRU,
      .limits = { { .algo = TALLY_GCRA, .max = 5, .period_ns = SEC },
                  { .algo = TALLY_SLIDING_WINDOW, .max = 100, .period_ns = 60 * SEC } } },
};

/* An anonymous shared mapping of @len bytes. */
static void *map(size_t len)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(m, MAP_FAILED);
    return m;
}

/* A shared engine of POLICIES in a mapping of its own size (in *len). */
static tally_engine *create(void **mem, size_t *len)
{
    tally_options o = digest_opts(1000);
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 8, len), 0);
    *mem = map(*len);
    tally_engine *e = NULL;
    cr_assert_eq(tally_shared_create(*mem, *len, &o, POLICIES, 2, 8, &e), 0);
    cr_assert_not_null(e);
    return e;
}

Test(shared, size_refuses_what_create_would)
{
    tally_options o = digest_opts(1000);
    size_t n = 0;
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 0, &n), 0);
    cr_assert_gt(n, 1000 * 48, "a slot a key at least");
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 0, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_shared_size(&o, NULL, 2, 0, &n), TALLY_EINVAL);
    cr_assert_eq(tally_shared_size(&o, POLICIES, 0, 0, &n), TALLY_EINVAL);
    cr_assert_eq(tally_shared_size(&o, POLICIES, TALLY_MAX_POLICIES + 1, 0, &n), TALLY_EINVAL);
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 65537, &n), TALLY_EINVAL);

    tally_options keys = o;
    keys.digest_only = false;
    cr_assert_eq(tally_shared_size(&keys, POLICIES, 2, 0, &n), TALLY_EINVAL, "key copies are per process");
    cr_assert_eq(tally_shared_size(NULL, POLICIES, 2, 0, &n), TALLY_EINVAL, "the defaults keep keys");
    tally_options big = o;
    big.capacity = 0;
    cr_assert_eq(tally_shared_size(&big, POLICIES, 2, 0, &n), TALLY_EINVAL);

    tally_policy twice[2] = { POLICIES[0], POLICIES[0] };
    cr_assert_eq(tally_shared_size(&o, twice, 2, 0, &n), TALLY_EINVAL, "one name, two policies");
    tally_policy bad = POLICIES[0];
    bad.limits[0].max = 0;
    cr_assert_eq(tally_shared_size(&o, &bad, 1, 0, &n), TALLY_EINVAL);
    bad = POLICIES[0];
    bad.name = "";
    cr_assert_eq(tally_shared_size(&o, &bad, 1, 0, &n), TALLY_EINVAL);
    bad = POLICIES[0];
    bad.flags = 1u << 20;
    cr_assert_eq(tally_shared_size(&o, &bad, 1, 0, &n), TALLY_EINVAL);

    /* more keys, more threads: more bytes */
    size_t more;
    tally_options o2 = digest_opts(4000);
    cr_assert_eq(tally_shared_size(&o2, POLICIES, 2, 0, &more), 0);
    cr_assert_gt(more, n);
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 1024, &more), 0);
    cr_assert_gt(more, n);
}

Test(shared, create_needs_the_size_it_was_told)
{
    tally_options o = digest_opts(1000);
    size_t n;
    cr_assert_eq(tally_shared_size(&o, POLICIES, 2, 8, &n), 0);
    unsigned char *m = map(n + 64);
    tally_engine *e = NULL;
    cr_assert_eq(tally_shared_create(m, n - 1, &o, POLICIES, 2, 8, &e), TALLY_EINVAL);
    cr_assert_eq(tally_shared_create(m + 8, n, &o, POLICIES, 2, 8, &e), TALLY_EINVAL, "not aligned");
    cr_assert_eq(tally_shared_create(NULL, n, &o, POLICIES, 2, 8, &e), TALLY_EINVAL);
    cr_assert_eq(tally_shared_create(m, n, &o, POLICIES, 2, 8, NULL), TALLY_EINVAL);
    cr_assert_null(e, "a refused creation leaves *out alone");
    cr_assert_neq(tally_shared_check(m, n, NULL), 0, "nor makes a region");
    cr_assert_eq(tally_shared_create(m, n, &o, POLICIES, 2, 8, &e), 0);
    cr_assert_eq(tally_shared_check(m, n, NULL), 0);
    munmap(m, n + 64);
}

Test(shared, hits_of_a_shared_engine_count_as_an_engines_do)
{
    void *m;
    size_t n;
    tally_engine *e = create(&m, &n);
    tally_result r;
    unsigned first = 0;
    for (int i = 0; i < 15; i++) {
        cr_assert_eq(tally_hit_at(e, 0, "user-1", 6, NULL, T0 + (uint64_t)i, &r), 0);
        cr_assert_eq(r.allowed, i < 10, "hit %d", i);
        first += r.first_exceeded != 0;
    }
    cr_assert_eq(first, 1);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, 0, "user-1", 6, &s), 0);
    cr_assert_eq(s.c[0].used, 10);
    cr_assert_eq(tally_reset_if(e, 0, "user-1", 6, &s, NULL), 0);
    cr_assert_eq(tally_reset_if(e, 0, "user-1", 6, &s, NULL), TALLY_ECONFLICT, "one reset of a snapshot");
    cr_assert_eq(tally_hit_at(e, 0, "user-1", 6, NULL, T0 + 100, &r), 0);
    cr_assert(r.allowed);

    /* the second policy: two limits and LRU eviction, ids in the order given */
    for (int i = 0; i < 3000; i++) {
        char k[16];
        int len = snprintf(k, sizeof(k), "k%d", i);
        cr_assert_eq(tally_hit_at(e, 1, k, (size_t)len, NULL, T0 + (uint64_t)i * 1000000, &r), 0,
                     "key %d: a full LRU table evicts", i);
    }
    tally_stats st;
    cr_assert_eq(tally_stats_read(e, &st), 0);
    cr_assert_eq(st.hits, 15 + 1 + 3000);
    cr_assert_geq(st.lru_evictions, 2000);
    tally_close(e);                    /* a detach: the engine stays */
    cr_assert_eq(tally_shared_attach(m, n, &e), 0);
    cr_assert_eq(tally_read(e, 0, "user-1", 6, &s), 0, "the counts stay with the region");
    cr_assert_eq(s.c[0].used, 1);
    tally_shared_detach(e);
    munmap(m, n);
}

Test(shared, calls_that_would_point_out_of_the_region_are_refused)
{
    void *m;
    size_t n;
    tally_engine *e = create(&m, &n);
    uint32_t id = 0;
    tally_policy p = POLICIES[0];
    p.name = "other";
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_ESTATE);
    cr_assert_eq(tally_policy_update(e, 0, &POLICIES[0]), TALLY_ESTATE);
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    cr_assert_eq(tally_flusher_start(e, &fo), TALLY_ESTATE);
    tally_watch w = { .threshold = 5, .window_ns = SEC };
    cr_assert_eq(tally_watch_set(e, 0, &w), TALLY_ESTATE);
    tally_result r;
    cr_assert_eq(tally_hit_at(e, 0, "k", 1, NULL, T0, &r), 0, "and the engine goes on");
    cr_assert_eq(tally_hit_at(e, 2, "k", 1, NULL, T0, &r), TALLY_EINVAL, "two policies, ids 0 and 1");
    tally_shared_detach(e);
    munmap(m, n);
}

Test(shared, regions_that_cannot_be_attached_say_why)
{
    void *m;
    size_t n;
    tally_engine *e = create(&m, &n);
    tally_result r;
    cr_assert_eq(tally_hit_at(e, 0, "k", 1, NULL, T0, &r), 0);
    const char *why = "unset";
    cr_assert_eq(tally_shared_check(m, n, &why), 0);
    cr_assert_null(why);

    tally_engine *a = NULL;
    cr_assert_eq(tally_shared_check(m, n - 64, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "length"), "%s", why);
    cr_assert_eq(tally_shared_attach(m, n - 64, &a), TALLY_EINVAL);
    cr_assert_null(a);
    cr_assert_eq(tally_shared_check(m, 16, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "too small"), "%s", why);
    cr_assert_eq(tally_shared_check(NULL, n, &why), TALLY_EINVAL);

    /* a copy elsewhere: every pointer in it names the original */
    unsigned char *c = map(n);
    memcpy(c, m, n);
    cr_assert_eq(tally_shared_check(c, n, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "address"), "%s", why);
    void *at = NULL;
    cr_assert_eq(tally_shared_address(c, n, &at), 0);
    cr_assert_eq(at, m, "where it must be mapped");

    /* each byte of the header that the checksum covers (all but ready),
       changed: refused (magic, version, layout, size, base, used) */
    for (size_t i = 0; i < 56; i++) {
        memcpy(c, m, n);
        c[i] ^= 0x40;
        cr_assert_eq(tally_shared_address(c, n, &at), TALLY_EINVAL, "byte %zu changed", i);
    }
    memcpy(c, m, n);
    memcpy(c, "tally-xx", 8);
    cr_assert_eq(tally_shared_check(c, n, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "not a tally region"), "%s", why);
    memcpy(c, m, n);
    c[8] ^= 1;                           /* the version */
    cr_assert_eq(tally_shared_check(c, n, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "version"), "%s", why);
    memset(c, 0, n);
    cr_assert_eq(tally_shared_check(c, n, &why), TALLY_EINVAL);
    cr_assert_eq(tally_shared_address(c, n, &at), TALLY_EINVAL);
    munmap(c, n);

    /* a region of another kind: the header is right, the root is not */
    unsigned char *root = (unsigned char *)m + 64;
    root[0] ^= 1;
    cr_assert_eq(tally_shared_check(m, n, &why), TALLY_EINVAL);
    cr_assert_not_null(strstr(why, "not a shared engine"), "%s", why);
    root[0] ^= 1;
    cr_assert_eq(tally_shared_attach(m, n, &a), 0);
    cr_assert_eq(a, e, "one handle, the same in every process");
    tally_shared_detach(e);
    tally_shared_detach(NULL);
    munmap(m, n);
}

typedef struct busy_arg {
    tally_engine *e;
    int rc;
} busy_arg;

static void *hit_once(void *arg)
{
    busy_arg *a = arg;
    tally_result r;
    a->rc = tally_hit_at(a->e, 0, "k", 1, NULL, T0, &r);
    return NULL;
}

static int hit_in_a_thread(tally_engine *e)
{
    busy_arg a = { e, 1 };
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hit_once, &a), 0);
    pthread_join(t, NULL);
    return a.rc;
}

Test(shared, a_thread_beyond_max_threads_is_told_busy, .timeout = 30)
{
    tally_options o = digest_opts(100);
    size_t n;
    cr_assert_eq(tally_shared_size(&o, POLICIES, 1, 1, &n), 0);
    void *m = map(n);
    tally_engine *e;
    cr_assert_eq(tally_shared_create(m, n, &o, POLICIES, 1, 1, &e), 0);
    tally_result r;
    cr_assert_eq(tally_hit_at(e, 0, "k", 1, NULL, T0, &r), 0, "the one reader: this thread's");
    cr_assert_eq(hit_in_a_thread(e), TALLY_EBUSY, "a second thread at once");
    tally_shared_detach(e);              /* gives ours back */
    cr_assert_eq(hit_in_a_thread(e), 0, "free again after a detach");
    cr_assert_eq(hit_in_a_thread(e), 0, "and after that thread's exit");
    tally_snapshot s;
    cr_assert_eq(hit_in_a_thread(e), 0);
    cr_assert_eq(tally_read(e, 0, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 4);
    tally_shared_detach(e);
    munmap(m, n);
}

/* A thread of more shared engines than its cache of readers holds: each call
   still gets a reader (one given back for another), and the counts stay. */
Test(shared, one_thread_uses_six_shared_engines_in_turn)
{
    enum { N = 6 };
    tally_options o = digest_opts(100);
    size_t n;
    cr_assert_eq(tally_shared_size(&o, POLICIES, 1, 2, &n), 0);
    void *m[N];
    tally_engine *e[N];
    for (int i = 0; i < N; i++) {
        m[i] = map(n);
        cr_assert_eq(tally_shared_create(m[i], n, &o, POLICIES, 1, 2, &e[i]), 0);
    }
    tally_result r;
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < N; i++)
            cr_assert_eq(tally_hit_at(e[i], 0, "k", 1, NULL, T0, &r), 0, "round %d, engine %d", round, i);
    for (int i = 0; i < N; i++) {
        tally_snapshot s;
        cr_assert_eq(tally_read(e[i], 0, "k", 1, &s), 0);
        cr_assert_eq(s.c[0].used, 3, "engine %d", i);
        /* two readers each: one given back for another, never held twice */
        cr_assert_eq(hit_in_a_thread(e[i]), 0, "engine %d has a reader for another thread", i);
        tally_shared_detach(e[i]);
        munmap(m[i], n);
    }
}
