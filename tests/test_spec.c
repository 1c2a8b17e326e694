/*
 * Policy specs: every form of the grammar gives the policy it documents, the
 * result is accepted by tally_policy_add, and bad text is refused with the
 * offset of the fault and a message naming it, leaving the outputs untouched.
 */
#include "test.h"
#include <string.h>

#include "tally.h"

#define SEC UINT64_C(1000000000)

static tally_policy pol;
static char name[64];
static tally_spec_error err;

static int parse(const char *text)
{
    memset(&pol, 0, sizeof pol);
    memset(&err, 0, sizeof err);
    return tally_policy_parse(text, &pol, name, sizeof name, &err);
}

/* Refused at @offset with a message containing @needle. */
static void refused(const char *text, size_t offset, const char *needle)
{
    cr_assert_eq(parse(text), TALLY_EINVAL, "accepted: %s", text);
    cr_assert_eq(err.offset, offset, "%s: offset %zu, message %s", text, err.offset, err.message);
    cr_assert_not_null(strstr(err.message, needle), "%s: message '%s' lacks '%s'", text,
                       err.message, needle);
}

Test(spec, fixed_window)
{
    cr_assert_eq(parse("requests: 100 per 1m fixed"), 0, "%s", err.message);
    cr_assert_str_eq(pol.name, "requests");
    cr_assert_eq(pol.name, name);
    cr_assert_eq(pol.n_limits, 1);
    cr_assert_eq(pol.limits[0].algo, TALLY_FIXED_WINDOW);
    cr_assert_eq(pol.limits[0].max, 100);
    cr_assert_eq(pol.limits[0].period_ns, 60 * SEC);
    cr_assert_eq(pol.flags, 0);
}

Test(spec, units_and_slash_form)
{
    static const struct { const char *text; uint64_t ns; } cases[] = {
        { "a: 5 per 500ms fixed", SEC / 2 },
        { "a: 5 per 10s sliding", 10 * SEC },
        { "a: 5 per 10 seconds fixed", 10 * SEC },
        { "a: 5 per minute fixed", 60 * SEC },
        { "a: 5 per 2h fixed", 7200 * SEC },
        { "a: 5 per day fixed", 86400 * SEC },
        { "a: 5 per 1w fixed", 604800 * SEC },
        { "a: 5/s fixed", SEC },
        { "a:5/1m fixed", 60 * SEC },
        { "  a :\t5 /  hour   FIXED  ", 3600 * SEC },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cr_assert_eq(parse(cases[i].text), 0, "%s: %s", cases[i].text, err.message);
        cr_assert_eq(pol.limits[0].period_ns, cases[i].ns, "%s", cases[i].text);
        cr_assert_eq(pol.limits[0].max, 5);
    }
    cr_assert_eq(parse("a: 5 per 10s sliding"), 0);
    cr_assert_eq(pol.limits[0].algo, TALLY_SLIDING_WINDOW);
}

Test(spec, calendar_with_offset)
{
    cr_assert_eq(parse("tokens: 100000 per day calendar utc+02:00"), 0, "%s", err.message);
    cr_assert_eq(pol.limits[0].algo, TALLY_CALENDAR_WINDOW);
    cr_assert_eq(pol.limits[0].unit, TALLY_DAY);
    cr_assert_eq(pol.limits[0].utc_offset_s, 7200);
    cr_assert_eq(pol.limits[0].max, 100000);
    cr_assert_eq(parse("t: 1 per 1h calendar utc-05:30"), 0, "%s", err.message);
    cr_assert_eq(pol.limits[0].unit, TALLY_HOUR);
    cr_assert_eq(pol.limits[0].utc_offset_s, -(5 * 3600 + 30 * 60));
    cr_assert_eq(parse("t: 1 per week calendar utc"), 0);
    cr_assert_eq(pol.limits[0].unit, TALLY_WEEK);
    cr_assert_eq(pol.limits[0].utc_offset_s, 0);
    cr_assert_eq(parse("t: 1 per minute calendar utc+18"), 0);
    cr_assert_eq(pol.limits[0].utc_offset_s, 18 * 3600);
}

Test(spec, month_and_shadow)
{
    cr_assert_eq(parse("spend: 5000000 per month calendar; shadow"), 0, "%s", err.message);
    cr_assert_eq(pol.limits[0].unit, TALLY_MONTH);
    cr_assert_eq(pol.flags, TALLY_SHADOW);
    cr_assert_eq(parse("s: 1 per 1m fixed; shadow; count-rejected ;aligned"), 0, "%s", err.message);
    cr_assert_eq(pol.flags, TALLY_SHADOW | TALLY_COUNT_REJECTED | TALLY_ALIGNED);
}

Test(spec, gcra_burst_is_max_and_refill_time_is_period)
{
    cr_assert_eq(parse("api: 10/s burst 20 gcra"), 0, "%s", err.message);
    cr_assert_eq(pol.limits[0].algo, TALLY_GCRA);
    cr_assert_eq(pol.limits[0].max, 20);
    cr_assert_eq(pol.limits[0].period_ns, 2 * SEC);
    cr_assert_eq(parse("api: 100 per 1m gcra"), 0, "%s", err.message);
    cr_assert_eq(pol.limits[0].max, 100, "no burst: the burst is the count");
    cr_assert_eq(pol.limits[0].period_ns, 60 * SEC);
    cr_assert_eq(parse("api: 3/s burst 1 gcra"), 0);
    cr_assert_eq(pol.limits[0].period_ns, SEC / 3, "the refill time rounds down");
}

Test(spec, several_limits)
{
    cr_assert_eq(parse("api: 10/s burst 20 gcra, 100000 per day calendar utc+02:00, "
                       "5 per 1s sliding, 7 per 1h fixed"), 0, "%s", err.message);
    cr_assert_eq(pol.n_limits, 4);
    cr_assert_eq(pol.limits[1].algo, TALLY_CALENDAR_WINDOW);
    cr_assert_eq(pol.limits[2].algo, TALLY_SLIDING_WINDOW);
    cr_assert_eq(pol.limits[3].max, 7);
    refused("api: 1/s gcra, 1/s gcra, 1/s gcra, 1/s gcra, 1/s gcra", 45, "more than 4 limits");
}

Test(spec, concurrent_limits_and_evict_lru)
{
    cr_assert_eq(parse("jobs: 10 concurrent lease 30s"), 0, "%s", err.message);
    cr_assert_eq(pol.n_limits, 1);
    cr_assert_eq(pol.limits[0].algo, TALLY_CONCURRENCY);
    cr_assert_eq(pol.limits[0].max, 10);
    cr_assert_eq(pol.limits[0].period_ns, 30 * SEC);
    cr_assert_eq(parse("api: 100/s gcra, 4 CONCURRENT LEASE 2m; shadow"), 0, "%s", err.message);
    cr_assert_eq(pol.n_limits, 2);
    cr_assert_eq(pol.limits[1].algo, TALLY_CONCURRENCY);
    cr_assert_eq(pol.limits[1].period_ns, 120 * SEC);
    cr_assert_eq(pol.flags, TALLY_SHADOW);
    cr_assert_eq(parse("c: 4294967295 concurrent lease 1ms"), 0, "%s", err.message);
    refused("c: 4294967296 concurrent lease 1s", 3, "concurrent holders");
    refused("c: 10 concurrent 30s", 17, "'lease'");
    refused("c: 10 concurrent lease", 22, "time unit");
    refused("c: 10 concurrent lease month", 23, "not a month");
    refused("c: 10 concurrent lease 0s", 23, "longer than 0");
    refused("c: 1 concurrent lease 1s, 1/s gcra, 2 concurrent lease 1s", 36, "at most one");
    refused("c: 10 concurrent lease 1s; shadow; shadow", 35, "twice");
    refused("c: 10 concurrent lease 1s; evict", 27, "evict-lru");
    cr_assert_eq(parse("c: 10 concurrent lease 1s; evict-lru"), 0, "%s", err.message);
    cr_assert_eq(pol.flags, TALLY_EVICT_LRU);
    cr_assert_eq(parse("api: 10/s gcra; Evict-LRU; aligned"), 0, "%s", err.message);
    cr_assert_eq(pol.flags, TALLY_EVICT_LRU | TALLY_ALIGNED);
    refused("api: 10/s gcra; evict-lru; evict-lru", 27, "twice");
}

Test(spec, parsed_policies_are_accepted_by_the_engine)
{
    static const char *const specs[] = {
        "a: 100 per 1m fixed", "b: 100000 per day calendar utc+02:00", "c: 10/s burst 20 gcra",
        "d: 5000000 per month calendar; shadow", "e: 17592186044415 per 1s sliding",
        "f: 1000000/ms burst 4611686018427387904 gcra",
        "g: 4294967295 concurrent lease 30s, 10/s gcra",
        "h: 100 per 1m fixed; evict-lru",
    };
    tally_engine *e;
    tally_options o;
    tally_options_init(&o);
    o.capacity = 16;
    cr_assert_eq(tally_open(&o, &e), 0);
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        uint32_t id;
        cr_assert_eq(parse(specs[i]), 0, "%s: %s", specs[i], err.message);
        cr_assert_eq(tally_policy_add(e, &pol, &id), 0, "%s", specs[i]);
    }
    tally_close(e);
}

Test(spec, bad_text_names_the_fault_and_its_place)
{
    refused("", 0, "policy name");
    refused("api 10/s gcra", 4, "expected ':'");
    refused("api: ", 5, "count");
    refused("api: 0 per 1s fixed", 5, "at least 1");
    refused("api: 10 by 1s fixed", 8, "'per', '/' or 'concurrent'");
    refused("api: 10 per 1y fixed", 13, "time unit");
    refused("api: 10 per 0s fixed", 12, "longer than 0");
    refused("api: 10 per 1s", 14, "algorithm");
    refused("api: 10 per 1s lru", 15, "algorithm");
    refused("api: 10 per month fixed", 12, "calendar");
    refused("api: 10 per 2d calendar", 12, "calendar window is one");
    refused("api: 10 per 90s calendar", 12, "calendar window is one");
    refused("api: 10 per day calendar utc+19:00", 29, "above 18");
    refused("api: 10 per day calendar utc+18:30", 25, "beyond 18:00");
    refused("api: 10 per day calendar utc+02:60", 32, "above 59");
    refused("api: 10 per day calendar utc+2", 29, "two digits");
    refused("api: 10/s burst gcra", 16, "burst");
    refused("api: 10/s burst 0 gcra", 16, "at least 1");
    refused("api: 10/s burst 5", 17, "'gcra'");
    refused("api: 10 per 1s fixed extra", 21, "expected ','");
    refused("api: 10 per 1s fixed; loud", 22, "flag");
    refused("api: 10 per 1s fixed; shadow; shadow", 30, "twice");
    refused("api: 10 per 1s fixed; shadow x", 29, "';' and a flag");
    refused("api: 10 per 1s fixed,", 21, "count");
}

Test(spec, values_out_of_bounds_are_refused)
{
    refused("a: 18446744073709551616 per 1s fixed", 3, "too large");
    refused("a: 9223372036854775808 per 1s fixed", 3, "above");
    refused("a: 17592186044416 per 1s sliding", 3, "sliding");
    refused("a: 1 per 4611686018427387905ms fixed", 9, "146 years");
    cr_assert_eq(parse("a: 1 per 7000w fixed"), 0, "7000 weeks is about 134 years");
    refused("a: 1 per 8000w fixed", 9, "146 years");
    refused("a: 2/ms burst 9223372036854775807 gcra", 14, "146 years");
    refused("a: 2000000/ms gcra", 3, "one per nanosecond");
}

Test(spec, names_and_failure_leave_outputs_untouched)
{
    char small[4] = "xyz";
    tally_policy p = { .name = "keep", .n_limits = 3 };
    cr_assert_eq(tally_policy_parse("abcd: 1/s gcra", &p, small, sizeof small, &err), TALLY_EINVAL);
    cr_assert_not_null(strstr(err.message, "does not fit"));
    cr_assert_str_eq(small, "xyz");
    cr_assert_str_eq(p.name, "keep");
    cr_assert_eq(p.n_limits, 3);
    cr_assert_eq(tally_policy_parse("abc: 1/s gcra", &p, small, sizeof small, NULL), 0);
    cr_assert_str_eq(p.name, "abc");
    cr_assert_eq(tally_policy_parse("a.b-c_9: 1/s gcra", &p, name, sizeof name, NULL), 0);
    cr_assert_str_eq(p.name, "a.b-c_9");
    char longname[200];
    memset(longname, 'n', 129);
    strcpy(longname + 129, ": 1/s gcra");
    refused(longname, 0, "longer than 128");
    cr_assert_eq(tally_policy_parse(NULL, &p, name, sizeof name, &err), TALLY_EINVAL);
    cr_assert_eq(tally_policy_parse("a: 1/s gcra", NULL, name, sizeof name, &err), TALLY_EINVAL);
    cr_assert_eq(tally_policy_parse("a: 1/s gcra", &p, NULL, 0, &err), TALLY_EINVAL);
}
