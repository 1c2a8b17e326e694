/*
 * A minimal stand-in for the subset of Criterion the tests use, for builds
 * where Criterion cannot run: under ThreadSanitizer, Criterion's runner aborts
 * at start ("Could not initialize inheritable arena", Criterion issue #274:
 * its BoxFort arena wants a fixed mapping that collides with TSan's shadow
 * memory). Tests include "test.h", which picks Criterion or this file.
 *
 * Tests run one after another in one process; a failed assertion ends its
 * test (longjmp from the test's own thread, exit(1) from any other thread).
 * The run ends with the line "N passed, N failed".
 */
#ifndef TALLY_TEST_HARNESS_H
#define TALLY_TEST_HARNESS_H

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct harness_suite {
    const char *name;
    void (*init)(void);
    void (*fini)(void);
    struct harness_suite *next;
};

struct harness_test {
    const char *suite, *name;
    void (*fn)(void);
    struct harness_test *next;
};

struct harness_opts {          /* Criterion's test and suite options we accept */
    void (*init)(void);
    void (*fini)(void);
    double timeout;
};

static struct harness_test *harness_tests, **harness_tail = &harness_tests;
static struct harness_suite *harness_suites;
static jmp_buf harness_jmp;
static pthread_t harness_main;
static int harness_failed_now;

static void harness_add_test(struct harness_test *t)
{
    *harness_tail = t;
    harness_tail = &t->next;
}

static inline void harness_fail(const char *file, int line, const char *expr, const char *fmt, ...)
{
    char msg[512] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "  %s:%d: assertion failed: %s%s%s\n", file, line, expr, msg[0] ? ": " : "", msg);
    if (!pthread_equal(pthread_self(), harness_main)) {
        fprintf(stderr, "  (from a worker thread: aborting the run)\n");
        exit(1);
    }
    harness_failed_now = 1;
    longjmp(harness_jmp, 1);
}

#define HARNESS_CHECK_(cond, expr, ...) \
    do { if (!(cond)) harness_fail(__FILE__, __LINE__, expr, "" __VA_ARGS__); } while (0)

#define cr_assert(c, ...)          HARNESS_CHECK_((c), #c, __VA_ARGS__)
#define cr_assert_not(c, ...)      HARNESS_CHECK_(!(c), "!(" #c ")", __VA_ARGS__)
#define cr_assert_eq(a, b, ...)    HARNESS_CHECK_((a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...)   HARNESS_CHECK_((a) != (b), #a " != " #b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...)    HARNESS_CHECK_((a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...)   HARNESS_CHECK_((a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...)    HARNESS_CHECK_((a) > (b), #a " > " #b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...)   HARNESS_CHECK_((a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_assert_null(p, ...)     HARNESS_CHECK_((p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) HARNESS_CHECK_((p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...)  HARNESS_CHECK_(strcmp((a), (b)) == 0, #a " == " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) HARNESS_CHECK_(strcmp((a), (b)) != 0, #a " != " #b, __VA_ARGS__)
#define cr_assert_fail(...)        HARNESS_CHECK_(0, "failure", __VA_ARGS__)

#define TestSuite(suite, ...)                                                     \
    static struct harness_opts harness_sopts_##suite = { __VA_ARGS__ };            \
    static struct harness_suite harness_suite_##suite;                             \
    __attribute__((constructor)) static void harness_reg_suite_##suite(void)       \
    {                                                                              \
        harness_suite_##suite.name = #suite;                                       \
        harness_suite_##suite.init = harness_sopts_##suite.init;                   \
        harness_suite_##suite.fini = harness_sopts_##suite.fini;                   \
        harness_suite_##suite.next = harness_suites;                               \
        harness_suites = &harness_suite_##suite;                                   \
    }

#define Test(suite, name, ...)                                                     \
    static void harness_fn_##suite##_##name(void);                                 \
    static struct harness_test harness_t_##suite##_##name = {                      \
        #suite, #name, harness_fn_##suite##_##name, NULL };                        \
    __attribute__((constructor)) static void harness_reg_##suite##_##name(void)    \
    {                                                                              \
        harness_add_test(&harness_t_##suite##_##name);                             \
    }                                                                              \
    static void harness_fn_##suite##_##name(void)

static const struct harness_suite *harness_find_suite(const char *name)
{
    for (struct harness_suite *s = harness_suites; s; s = s->next)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;
    const char *filter = argc > 1 ? argv[1] : NULL;   /* optional "suite/name" prefix */
    harness_main = pthread_self();
    for (struct harness_test *t = harness_tests; t; t = t->next) {
        char full[256];
        snprintf(full, sizeof(full), "%s/%s", t->suite, t->name);
        if (filter && strncmp(full, filter, strlen(filter)) != 0)
            continue;
        const struct harness_suite *s = harness_find_suite(t->suite);
        harness_failed_now = 0;
        if (setjmp(harness_jmp) == 0) {
            if (s && s->init)
                s->init();
            t->fn();
        }
        if (s && s->fini)
            s->fini();
        printf("[%s] %s\n", harness_failed_now ? "FAIL" : "PASS", full);
        if (harness_failed_now)
            failed++;
        else
            passed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

#endif /* TALLY_TEST_HARNESS_H */
