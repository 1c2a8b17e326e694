/*
 * The Prometheus text appender and label escaper (src/core/prom.h), and the
 * snprintf contract of the library's writers built on them:
 * tally_stats_prometheus (tally/flusher.h) and tally_coalesce_prometheus
 * (tally/coalesce.h), cut at every length.
 */
#include "test.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#include "tally.h"
#include "core/prom.h"

#define SEC UINT64_C(1000000000)

/* Three pieces, so that cuts fall inside pieces and between them. */
static const char SMALL[] = "# TYPE a counter\na{x=\"1\"} 42\nb 7\n";

static void put_small(tally__prom *w)
{
    tally__prom_put(w, "# TYPE %s counter\n", "a");
    tally__prom_put(w, "a{x=\"%d\"} %llu\n", 1, 42ull);
    tally__prom_put(w, "b %u\n", 7u);
}

/* ---- The appender ----------------------------------------------------------- */

Test(prom, exact_text_and_its_length)
{
    char buf[128];
    memset(buf, 'x', sizeof(buf));
    tally__prom w = { .buf = buf, .len = sizeof(buf) };
    put_small(&w);
    cr_assert_eq(w.written, strlen(SMALL));
    cr_assert_eq(tally__prom_end(&w), strlen(SMALL));
    cr_assert_str_eq(buf, SMALL);

    /* a text of no pieces is the empty text, terminated */
    memset(buf, 'x', sizeof(buf));
    tally__prom e = { .buf = buf, .len = sizeof(buf) };
    cr_assert_eq(tally__prom_end(&e), 0);
    cr_assert_eq(buf[0], '\0');
    e = (tally__prom){ .buf = buf, .len = sizeof(buf) };
    cr_assert_eq(tally__prom_end_int(&e), 0);
}

Test(prom, size_query_without_a_buffer)
{
    tally__prom w = { .buf = NULL, .len = 0 };
    put_small(&w);
    cr_assert_eq(tally__prom_end(&w), strlen(SMALL));

    /* a NULL buf with a length is a size query too (tally_coalesce_prometheus) */
    w = (tally__prom){ .buf = NULL, .len = 64 };
    put_small(&w);
    cr_assert_eq(tally__prom_end(&w), strlen(SMALL));
    w = (tally__prom){ .buf = NULL, .len = 0 };
    put_small(&w);
    cr_assert_eq(tally__prom_end_int(&w), (int)strlen(SMALL));
}

/* The text cut to @len: the whole length returned, the prefix that fits
   terminated, nothing written at or past @len. */
static void check_cut(const char *full, size_t n, size_t len, const char *buf, size_t got)
{
    cr_assert_eq(got, n, "len %zu: returned %zu, not the whole length %zu", len, got, n);
    if (len == 0) {
        cr_assert_eq(buf[0], 'x', "len 0 wrote into buf");
        return;
    }
    size_t keep = len - 1 < n ? len - 1 : n;
    cr_assert_eq(strnlen(buf, len), keep, "len %zu: %zu bytes kept, not %zu", len,
                 strnlen(buf, len), keep);
    cr_assert_eq(memcmp(buf, full, keep), 0, "len %zu: the kept bytes are not the text's", len);
    cr_assert_eq(buf[len], 'x', "len %zu: a byte written past the end", len);
}

Test(prom, truncation_at_every_length)
{
    size_t n = strlen(SMALL);
    char buf[sizeof(SMALL) + 8];
    for (size_t len = 0; len <= n + 2; len++) {
        memset(buf, 'x', sizeof(buf));
        tally__prom w = { .buf = buf, .len = len };
        put_small(&w);
        check_cut(SMALL, n, len, buf, tally__prom_end(&w));

        memset(buf, 'x', sizeof(buf));
        w = (tally__prom){ .buf = buf, .len = len };
        put_small(&w);
        int r = tally__prom_end_int(&w);
        cr_assert_geq(r, 0);
        check_cut(SMALL, n, len, buf, (size_t)r);
    }
}

/* tally_stats_prometheus hands the ops layer the same buf and the length so
   far: a second writer that starts at `written` goes on with one text. */
Test(prom, a_writer_resumed_at_written_continues_the_text)
{
    size_t n = strlen(SMALL);
    char buf[sizeof(SMALL) + 8];
    for (size_t len = 0; len <= n + 2; len++) {
        memset(buf, 'x', sizeof(buf));
        tally__prom w = { .buf = buf, .len = len };
        tally__prom_put(&w, "# TYPE %s counter\n", "a");
        tally__prom v = { .buf = buf, .len = len, .written = w.written };
        tally__prom_put(&v, "a{x=\"%d\"} %llu\n", 1, 42ull);
        tally__prom_put(&v, "b %u\n", 7u);
        check_cut(SMALL, n, len, buf, tally__prom_end(&v));
    }
}

/*
 * The one vsnprintf failure C defines for a valid call: an encoding error,
 * here a lone UTF-16 surrogate through %ls, which is no character in any
 * encoding. (A text longer than INT_MAX fails too, but takes seconds to count.)
 */
Test(prom, a_piece_that_cannot_be_formatted_fails_the_text)
{
    static const wchar_t bad[] = { 0xD800, 0 };
    cr_assert_lt(snprintf(NULL, 0, "%ls", bad), 0, "the C library formats a lone surrogate");

    char buf[64];
    memset(buf, 'x', sizeof(buf));
    tally__prom w = { .buf = buf, .len = sizeof(buf) };
    tally__prom_put(&w, "ok %d\n", 1);
    tally__prom_put(&w, "bad %ls\n", bad);
    cr_assert(w.failed);
    cr_assert_eq(w.written, 5, "the failed piece counted %zu bytes", w.written - 5);
    tally__prom_put(&w, "later\n");
    cr_assert_eq(w.written, 5, "a piece after the failure was appended");
    cr_assert_eq(tally__prom_end(&w), 0);
    cr_assert_eq(buf[0], '\0', "a failed text left \"%.5s\" in buf", buf);

    memset(buf, 'x', sizeof(buf));
    w = (tally__prom){ .buf = buf, .len = sizeof(buf) };
    tally__prom_put(&w, "ok\n");
    tally__prom_put(&w, "%ls", bad);
    cr_assert_eq(tally__prom_end_int(&w), TALLY_EINVAL);
    cr_assert_eq(buf[0], '\0');

    /* a size query fails the same way */
    w = (tally__prom){ .buf = NULL, .len = 0 };
    tally__prom_put(&w, "ok\n");
    tally__prom_put(&w, "%ls", bad);
    cr_assert_eq(tally__prom_end(&w), 0);
}

Test(prom, an_int_writer_longer_than_int_max_fails)
{
    char buf[16] = "kept";
    tally__prom w = { .buf = buf, .len = sizeof(buf), .written = (size_t)INT_MAX + 1 };
    cr_assert_eq(tally__prom_end_int(&w), TALLY_EINVAL);
    cr_assert_eq(buf[0], '\0');
    w = (tally__prom){ .buf = buf, .len = sizeof(buf), .written = INT_MAX };
    cr_assert_eq(tally__prom_end_int(&w), INT_MAX);
}

/* ---- The label escaper ------------------------------------------------------ */

Test(prom, label_escaping)
{
    char dst[64];
    cr_assert_eq(tally__prom_escape(dst, sizeof(dst), "a\\b\"c\nd"), 10);
    cr_assert_str_eq(dst, "a\\\\b\\\"c\\nd");
    cr_assert_eq(tally__prom_escape(dst, sizeof(dst), "plain text {x=1}"), 16);
    cr_assert_str_eq(dst, "plain text {x=1}");
    cr_assert_eq(tally__prom_escape(dst, sizeof(dst), "\n\n"), 4);
    cr_assert_str_eq(dst, "\\n\\n");
    memset(dst, 'x', sizeof(dst));
    cr_assert_eq(tally__prom_escape(dst, sizeof(dst), NULL), 0);
    cr_assert_eq(dst[0], '\0');
    cr_assert_eq(tally__prom_escape(dst, sizeof(dst), ""), 0);
    cr_assert_eq(dst[0], '\0');
}

Test(prom, label_escaping_cut_at_every_length_keeps_whole_escapes)
{
    static const char src[] = "a\\b\"c\nd";
    static const char full[] = "a\\\\b\\\"c\\nd";
    /* where the escaped text may end: after each whole source character */
    static const size_t ends[] = { 0, 1, 3, 4, 6, 7, 9, 10 };
    size_t n = strlen(full);
    char dst[sizeof(full) + 8];
    for (size_t cap = 0; cap <= n + 2; cap++) {
        memset(dst, 'x', sizeof(dst));
        cr_assert_eq(tally__prom_escape(dst, cap, src), n, "cap %zu", cap);
        cr_assert_eq(dst[cap], 'x', "cap %zu: a byte written past the end", cap);
        if (cap == 0)
            continue;
        size_t keep = 0;
        for (size_t i = 0; i < sizeof(ends) / sizeof(ends[0]); i++)
            if (ends[i] < cap)
                keep = ends[i];
        cr_assert_eq(strnlen(dst, cap), keep, "cap %zu: %zu bytes kept, not %zu", cap,
                     strnlen(dst, cap), keep);
        cr_assert_eq(memcmp(dst, full, keep), 0, "cap %zu", cap);
    }
}

/* ---- The library's writers ------------------------------------------------- */

/* Each length from 0 to past the end against the whole text: the whole
   length returned every time, the prefix that fits terminated. */
static void check_every_cut(const char *full, size_t n, int (*write)(void *, char *, size_t),
                            void *arg)
{
    char *buf = malloc(n + 8);
    cr_assert_not_null(buf);
    for (size_t len = 0; len <= n + 2; len++) {
        memset(buf, 'x', n + 8);
        int r = write(arg, len ? buf : NULL, len);
        cr_assert_geq(r, 0, "len %zu", len);
        check_cut(full, n, len, buf, (size_t)r);
    }
    free(buf);
}

static void on_usage(void *ctx, const tally_usage_report *r)
{
    (void)ctx;
    (void)r;
}

static int stats_text(void *e, char *buf, size_t len)
{
    return tally_stats_prometheus(e, buf, len);
}

Test(prom, stats_text_cut_at_every_length)
{
    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = 64;
    cr_assert_eq(tally_open(&o, &e), 0);
    /* a name to escape, so the usage histogram's labels are escaped too */
    tally_policy p = { .name = "a \"b\"\\\n", .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = 3600 * SEC } } };
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    tally_flusher_options fo;
    tally_flusher_options_init(&fo);
    fo.interval_ms = 3600 * 1000;          /* only tally_flush reports */
    fo.on_usage = on_usage;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    tally_result r;
    uint64_t cost = 3;
    cr_assert_eq(tally_hit(e, id, "k", 1, &cost, &r), 0);
    cr_assert_eq(tally_flush(e, 3000), 0);

    static char full[65536];
    int n = tally_stats_prometheus(e, full, sizeof(full));
    cr_assert_gt(n, 0);
    cr_assert_lt((size_t)n, sizeof(full));
    cr_assert_eq(strlen(full), (size_t)n);
    /* the stats part and the ops part are both in it */
    cr_assert_not_null(strstr(full, "\ntally_hits 1\n"));
    cr_assert_not_null(strstr(full, "\ntally_watch_flags 0\n"));
    cr_assert_not_null(strstr(full, "tally_usage_cost_sum{policy=\"a \\\"b\\\"\\\\\\n\",limit=\"0\"} 3\n"));
    cr_assert_eq(tally_stats_prometheus(e, NULL, 0), n);
    cr_assert_eq(tally_stats_prometheus(e, NULL, 1), TALLY_EINVAL);
    check_every_cut(full, (size_t)n, stats_text, e);
    tally_close(e);
}

static int coalesce_text(void *c, char *buf, size_t len)
{
    size_t n = tally_coalesce_prometheus(c, buf, len);
    cr_assert_leq(n, (size_t)INT_MAX);
    return (int)n;
}

Test(prom, coalesce_text_cut_at_every_length)
{
    tally_coalesce_options o;
    tally_coalesce_options_init(&o);
    o.name = "x\"\\\ny";
    o.breaker_failures = 3;
    o.breaker_open_ns = SEC;
    tally_coalesce *c;
    cr_assert_eq(tally_coalesce_open(&o, &c), 0);
    char full[8192];
    size_t n = tally_coalesce_prometheus(c, full, sizeof(full));
    cr_assert_lt(n, sizeof(full));
    cr_assert_eq(strlen(full), n);
    cr_assert_not_null(strstr(full, "\ntally_coalesce_calls_total{name=\"x\\\"\\\\\\ny\"} 0\n"));
    cr_assert_not_null(strstr(full, "\ntally_coalesce_breaker_opened_at_seconds{name=\"x\\\"\\\\\\ny\"} 0.000\n"));
    /* a NULL buf with a size is a size query: nothing is written */
    cr_assert_eq(tally_coalesce_prometheus(c, NULL, 64), n);
    check_every_cut(full, n, coalesce_text, c);
    tally_coalesce_close(c);
}
