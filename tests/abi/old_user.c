/*
 * A program as it was built against the 0.1 headers, run against the
 * installed library: it binds tally_options_init@TALLY_0.1,
 * tally_open@TALLY_0.1, tally_flusher_start@TALLY_0.1 and
 * tally_stats_read@TALLY_0.1 and passes the 0.1 tally_options,
 * tally_redis_options and tally_stats, structs without the fields added
 * since (include/tally/export.h, "Growing structs").
 * tools/abi-check builds and runs it. The struct ends where a page ends and
 * the next page is inaccessible, so a library that reads or writes the
 * current, larger struct through an old entry point faults; the struct's
 * tail padding holds 0xff bytes, so one that takes a new field from there
 * (hash, mode) gets an invalid value and the open or the start fails.
 */
#define _DEFAULT_SOURCE         /* MAP_ANONYMOUS */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <tally.h>

/* tally_options as the 0.1 header declared it */
struct options_0_1 {
    size_t  capacity;
    size_t  max_key_len;
    bool    digest_only;
    uint8_t hash_key[16];
};

/* tally_redis_options as the 0.1 and 0.2 headers declared it */
struct redis_options_0_1 {
    const char *host; int port; const char *unix_path;
    const char *password; int db;
    const char *key_prefix;
    uint32_t connect_timeout_ms, command_timeout_ms;
};

/* tally_stats as the 0.1 and 0.2 headers declared it */
struct stats_0_1 {
    uint64_t hits, denials, shadow_denials, evictions, full_refusals;
    uint64_t pending_deltas, pending_cost, flush_batches, flush_failures, redis_reconnects;
    uint64_t last_flush_ok_ns, events, lost_cost, redis_errors, redis_permanent_errors;
};

void options_init_0_1(struct options_0_1 *opts);
int  stats_read_0_1(tally_engine *e, struct stats_0_1 *out);
__asm__(".symver stats_read_0_1, tally_stats_read@TALLY_0.1");
int  flusher_start_0_1(tally_engine *e, const tally_flusher_options *o);
__asm__(".symver flusher_start_0_1, tally_flusher_start@TALLY_0.1");
int  open_0_1(const struct options_0_1 *opts, tally_engine **out);
__asm__(".symver options_init_0_1, tally_options_init@TALLY_0.1");
__asm__(".symver open_0_1, tally_open@TALLY_0.1");

static int failures;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "old_user.c:%d: check failed: %s\n", __LINE__, #cond);  \
            failures++;                                                             \
        }                                                                           \
    } while (0)

/* Memory of @size bytes that ends where an inaccessible page begins. */
static void *before_guard_page(size_t size)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *mem = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || mprotect(mem + page, page, PROT_NONE) != 0) {
        perror("old_user: mmap");
        return NULL;
    }
    return mem + page - size;
}

/* A flusher with the 0.1 Redis options starts and stops. Nothing listens on
   the port: the start must not need the server, only read the options. */
static void start_flusher_with_0_1_redis_options(tally_engine *e)
{
    struct redis_options_0_1 *ro = before_guard_page(sizeof(*ro));
    if (!ro) {
        failures++;
        return;
    }
    memset(ro, 0xff, sizeof(*ro));
    ro->host = "127.0.0.1";
    ro->port = 1;
    ro->unix_path = NULL;
    ro->password = NULL;
    ro->db = 0;
    ro->key_prefix = NULL;
    ro->connect_timeout_ms = 100;
    ro->command_timeout_ms = 100;

    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.redis = (const tally_redis_options *)(const void *)ro;
    CHECK(flusher_start_0_1(e, &fo) == 0);
    tally_flusher_stop(e);
}

int main(void)
{
    struct options_0_1 *o = before_guard_page(sizeof(struct options_0_1));
    if (!o)
        return 1;
    size_t used = offsetof(struct options_0_1, hash_key) + sizeof(o->hash_key);

    memset(o, 0xff, sizeof(*o));
    options_init_0_1(o);
    CHECK(o->capacity == 65536);
    CHECK(o->max_key_len == 256);
    CHECK(!o->digest_only);
    o->capacity = 64;
    /* what a compiler may leave in the padding of a struct the program filled */
    memset((unsigned char *)o + used, 0xff, sizeof(*o) - used);

    tally_engine *e = NULL;
    CHECK(open_0_1(o, &e) == 0);
    if (e == NULL)
        return 1;
    tally_policy p = {
        .name = "api", .n_limits = 1,
        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = UINT64_C(60000000000) } },
    };
    uint32_t api = UINT32_MAX;
    CHECK(tally_policy_add(e, &p, &api) == 0);
    tally_result r;
    uint64_t now = tally_now_ns();
    for (int i = 0; i < 3; i++) {
        CHECK(tally_hit_at(e, api, "user-1", 6, NULL, now, &r) == 0);
        CHECK(r.allowed == (i < 2));
    }
    /* the 0.1 statistics end where the page does: a library that wrote the
       current struct through the old entry point would fault */
    struct stats_0_1 *st = before_guard_page(sizeof(*st));
    if (!st)
        return 1;
    memset(st, 0xff, sizeof(*st));
    CHECK(stats_read_0_1(e, st) == 0);
    CHECK(st->hits == 3);
    CHECK(st->denials == 1);
    CHECK(st->evictions == 0 && st->full_refusals == 0 && st->redis_permanent_errors == 0);
    start_flusher_with_0_1_redis_options(e);
    tally_close(e);

    /* NULL options still mean the defaults */
    e = NULL;
    CHECK(open_0_1(NULL, &e) == 0 && e != NULL);
    tally_close(e);

    printf("abi old-user program: 0.1 options and statistics against the %s library, %d failed check(s)\n",
           TALLY_VERSION_STRING, failures);
    return failures != 0;
}
