/*
 * A program as a user of the shared library writes it: compiled against the
 * installed headers and linked through `pkg-config --cflags --libs tally`, so
 * it can bind only to what libtally.so.0 exports. tools/abi-check builds and
 * runs it: a public function whose declaration lost TALLY_EXPORT fails the
 * link, a broken call fails the checks below.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <tally.h>

#define SEC UINT64_C(1000000000)

static int failures;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "user.c:%d: check failed: %s\n", __LINE__, #cond);      \
            failures++;                                                             \
        }                                                                           \
    } while (0)

int main(void)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 64;
    tally_engine *e = NULL;
    CHECK(tally_open(&o, &e) == 0);
    if (e == NULL)
        return 1;

    tally_policy p = {
        .name = "api", .n_limits = 1,
        .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = 60 * SEC } },
    };
    uint32_t api = UINT32_MAX;
    CHECK(tally_policy_add(e, &p, &api) == 0);

    /* Three hits within one window of two: the third is denied. */
    uint64_t now = tally_now_ns();
    tally_result r;
    for (int i = 0; i < 3; i++) {
        CHECK(tally_hit_at(e, api, "user-1", 6, NULL, now, &r) == 0);
        CHECK(r.allowed == (i < 2));
    }
    CHECK(r.retry_after_ns > 0 && r.retry_after_ns <= 60 * SEC);

    tally_snapshot s;
    CHECK(tally_read(e, api, "user-1", 6, &s) == 0);
    CHECK(s.n_limits == 1 && s.c[0].used == 2);

    /* a new key in a full table of an evict-lru policy takes a live key's
       place: the statistics of 0.3 count it in their last field */
    tally_policy lp = p;
    lp.name = "lru";
    lp.flags = TALLY_EVICT_LRU;
    uint32_t lru = UINT32_MAX;
    CHECK(tally_policy_add(e, &lp, &lru) == 0);
    for (int i = 0; i <= 64; i++) {
        char key[16];
        int len = snprintf(key, sizeof(key), "k%d", i);
        CHECK(tally_hit_at(e, lru, key, (size_t)len, NULL, now + (uint64_t)i * SEC / 1000, &r) == 0);
    }

    tally_stats st;
    memset(&st, 0xff, sizeof(st));
    CHECK(tally_stats_read(e, &st) == 0);
    CHECK(st.hits == 3 + 65);
    CHECK(st.denials == 1);
    CHECK(st.lru_evictions == 1);

    CHECK(strcmp(tally_strerror(TALLY_ENOENT), "key not tracked") == 0);
    tally_close(e);

    printf("abi user program: tally %s headers, %d failed check(s)\n", TALLY_VERSION_STRING,
           failures);
    return failures != 0;
}
