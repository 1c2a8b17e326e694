/*
 * Bad input: every entry point answers with a clear error code and changes
 * nothing. Each test checks the code and then that the state is untouched.
 */
#include "test.h"
#include <string.h>

#include "tally.h"

#define SEC UINT64_C(1000000000)
#define T0  (UINT64_C(1700000000) * SEC)

static tally_engine *e;
static uint32_t pol;

static void setup(void)
{
    tally_options o;
    tally_options_init(&o);
    o.capacity = 16;
    o.max_key_len = 8;
    cr_assert_eq(tally_open(&o, &e), 0);
    tally_policy p = { .name = "p", .n_limits = 1,
                       .limits = { { .algo = TALLY_FIXED_WINDOW, .max = 5, .period_ns = SEC } } };
    cr_assert_eq(tally_policy_add(e, &p, &pol), 0);
    tally_result r;
    cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, T0, &r), 0);
}

static void teardown(void)
{
    tally_close(e);
}

static void assert_untouched(void)
{
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 1);
}

TestSuite(input, .init = setup, .fini = teardown);

Test(input, open_rejects_bad_options)
{
    tally_options o;
    tally_engine *x = (tally_engine *)0x1;
    tally_options_init(&o);
    cr_assert_eq(tally_open(&o, NULL), TALLY_EINVAL);
    o.capacity = 0;
    cr_assert_eq(tally_open(&o, &x), TALLY_EINVAL);
    o.capacity = TALLY_MAX_CAPACITY + 1;
    cr_assert_eq(tally_open(&o, &x), TALLY_EINVAL);
    tally_options_init(&o);
    o.max_key_len = 0;
    cr_assert_eq(tally_open(&o, &x), TALLY_EINVAL);
    o.max_key_len = TALLY_MAX_KEY_LEN + 1;
    cr_assert_eq(tally_open(&o, &x), TALLY_EINVAL);
    cr_assert_eq(x, (tally_engine *)0x1, "the out parameter is untouched on failure");
    tally_options_init(NULL);
}

static int add_limit(tally_limit l)
{
    tally_policy p = { .name = "bad", .n_limits = 1, .limits = { l } };
    uint32_t id = 77;
    int rc = tally_policy_add(e, &p, &id);
    if (rc)
        cr_assert_eq(id, 77);
    return rc;
}

Test(input, policy_add_rejects_bad_limits)
{
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_FIXED_WINDOW, .max = 0, .period_ns = SEC }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = 0 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_FIXED_WINDOW, .max = 1, .period_ns = TALLY_MAX_PERIOD_NS + 1 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_FIXED_WINDOW, .max = UINT64_MAX, .period_ns = SEC }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_SLIDING_WINDOW, .max = TALLY_SLIDING_MAX_COUNT + 1, .period_ns = SEC }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_GCRA, .max = 10, .period_ns = 9 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_CALENDAR_WINDOW, .max = 1, .unit = (tally_calendar_unit)5 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_CALENDAR_WINDOW, .max = 1, .unit = (tally_calendar_unit)-1 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_CALENDAR_WINDOW, .max = 1, .unit = TALLY_DAY, .utc_offset_s = 18 * 3600 + 1 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_CALENDAR_WINDOW, .max = 1, .unit = TALLY_DAY, .utc_offset_s = -18 * 3600 - 1 }), TALLY_EINVAL);
    cr_assert_eq(add_limit((tally_limit){ .algo = (tally_algo)9, .max = 1, .period_ns = SEC }), TALLY_EINVAL);
    /* a valid limit is accepted, so the rejections above were about the limit */
    cr_assert_eq(add_limit((tally_limit){ .algo = TALLY_CALENDAR_WINDOW, .max = 1, .unit = TALLY_MONTH, .utc_offset_s = -18 * 3600 }), 0);
}

Test(input, policy_add_rejects_bad_policies)
{
    uint32_t id = 77;
    tally_policy p = { .name = "q", .n_limits = 1,
                       .limits = { { .algo = TALLY_GCRA, .max = 10, .period_ns = SEC } } };
    cr_assert_eq(tally_policy_add(NULL, &p, &id), TALLY_EINVAL);
    cr_assert_eq(tally_policy_add(e, NULL, &id), TALLY_EINVAL);
    cr_assert_eq(tally_policy_add(e, &p, NULL), TALLY_EINVAL);
    p.n_limits = 0;
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    p.n_limits = TALLY_MAX_LIMITS + 1;
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    p.n_limits = 1;
    p.flags = 1u << 7;
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    p.flags = 0;
    p.name = NULL;
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    p.name = "";
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    char long_name[TALLY_MAX_POLICY_NAME + 2];
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = 0;
    p.name = long_name;
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL);
    p.name = "p";
    cr_assert_eq(tally_policy_add(e, &p, &id), TALLY_EINVAL, "names are unique");
    cr_assert_eq(id, 77);
    p.name = "q";
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    cr_assert_eq(id, pol + 1);
}

Test(input, hit_rejects_bad_arguments_and_changes_nothing)
{
    tally_result r;
    cr_assert_eq(tally_hit_at(NULL, pol, "k", 1, NULL, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_at(e, pol, NULL, 1, NULL, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, T0, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_hit_at(e, pol, "k", 0, NULL, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_at(e, pol, "123456789", 9, NULL, T0, &r), TALLY_EINVAL, "over max_key_len");
    cr_assert_eq(tally_hit_at(e, pol + 1, "k", 1, NULL, T0, &r), TALLY_EINVAL, "unknown policy");
    cr_assert_eq(tally_hit_at(e, UINT32_MAX, "k", 1, NULL, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit_at(e, pol, "k", 1, NULL, (uint64_t)INT64_MAX + 1, &r), TALLY_EINVAL);
    cr_assert_eq(tally_hit(e, pol, "k", 0, NULL, &r), TALLY_EINVAL);
    assert_untouched();
    cr_assert_eq(tally_hit_at(e, pol, "12345678", 8, NULL, T0, &r), 0, "exactly max_key_len is fine");
}

Test(input, peek_read_reset_reject_bad_arguments)
{
    tally_result r;
    tally_snapshot s;
    uint32_t mask;
    cr_assert_eq(tally_peek_at(NULL, pol, "k", 1, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_peek_at(e, pol, "k", 1, T0, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_peek_at(e, 99, "k", 1, T0, &r), TALLY_EINVAL);
    cr_assert_eq(tally_peek_at(e, pol, "k", 1, UINT64_MAX, &r), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, pol, "k", 1, NULL), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, 99, "k", 1, &s), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, pol, "k", 0, &s), TALLY_EINVAL);
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, NULL, &mask), TALLY_EINVAL);
    tally_snapshot other = s;
    other.policy = pol + 1;
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &other, &mask), TALLY_EINVAL, "snapshot of another policy");
    other = s;
    other.n_limits = 2;
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &other, &mask), TALLY_EINVAL);
    other = s;
    other.c[0].raw[1] = UINT64_MAX;
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &other, &mask), TALLY_ECONFLICT);
    assert_untouched();
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &s, NULL), 0, "reset_mask may be NULL");
}

Test(input, flusher_calls_without_an_engine_or_a_flusher)
{
    char buf[8] = "x";
    cr_assert_eq(tally_flusher_stop(NULL), TALLY_EINVAL, "a NULL engine is bad input");
    cr_assert_eq(tally_flusher_last_error(NULL, buf, sizeof(buf)), TALLY_EINVAL);
    tally_engine *e;
    cr_assert_eq(tally_open(NULL, &e), 0);
    cr_assert_eq(tally_flusher_last_error(e, NULL, 1), TALLY_EINVAL);
    cr_assert_eq(tally_flusher_last_error(e, buf, sizeof(buf)), 0, "no flusher, no error");
    cr_assert_eq(buf[0], 0);
    cr_assert_eq(tally_flusher_last_error(e, NULL, 0), 0);
    cr_assert_eq(tally_flusher_stop(e), 0, "no flusher: stop is a no-op");
    tally_close(e);
}
