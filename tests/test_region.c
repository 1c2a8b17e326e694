/*
 * Regions (src/core/region.c): laid out once, handed out aligned and
 * zeroed, and refused with a reason when a process maps something else:
 * too small, not a region, another version or build, another address or
 * length, corrupt, or not ready.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test.h"
#include "tally.h"
#include "core/region.h"

#define LAYOUT UINT64_C(0x1234)
#define LEN    (64 * 1024)

static void *map(size_t len)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(m, MAP_FAILED);
    return m;
}

static tally__region *ready_region(void *m, size_t len)
{
    tally__region *r;
    cr_assert_eq(tally__region_format(m, len, LAYOUT, &r), 0);
    cr_assert_not_null(tally__region_alloc(r, 100, 64));
    tally__region_ready(r);
    return r;
}

static void refused(const void *m, size_t len, uint64_t layout, const char *reason)
{
    const char *why = NULL;
    cr_assert_eq(tally__region_check(m, len, layout, &why), TALLY_EINVAL, "accepted, expected: %s", reason);
    cr_assert_not_null(why);
    cr_assert(strstr(why, reason) != NULL, "refused as \"%s\", expected \"%s\"", why, reason);
}

Test(region, a_ready_region_passes_its_check_here_and_in_a_child)
{
    void *m = map(LEN);
    ready_region(m, LEN);
    const char *why = "unset";
    cr_assert_eq(tally__region_check(m, LEN, LAYOUT, &why), 0);
    cr_assert_null(why);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(tally__region_check(m, LEN, LAYOUT, NULL) == 0 ? 0 : 1);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

Test(region, memory_is_handed_out_aligned_zeroed_and_never_past_the_end)
{
    unsigned char *m = map(LEN);
    memset(m, 0xab, LEN);
    tally__region *r;
    cr_assert_eq(tally__region_format(m, LEN, LAYOUT, &r), 0);
    unsigned char *a = tally__region_alloc(r, 3, 1);
    unsigned char *b = tally__region_alloc(r, 200, 256);
    cr_assert(a && b);
    cr_assert_geq(a, m + sizeof(tally__region));
    cr_assert_eq((uintptr_t)b % 256, 0);
    cr_assert_geq(b, a + 3);
    for (int i = 0; i < 200; i++)
        cr_assert_eq(b[i], 0);
    cr_assert_null(tally__region_alloc(r, 8, 3), "a non-power-of-two alignment");
    cr_assert_null(tally__region_alloc(r, 8, 8192), "an alignment above a page");
    size_t left = LEN - (size_t)(b + 200 - m);
    cr_assert_null(tally__region_alloc(r, left + 1, 1));
    cr_assert_null(tally__region_alloc(r, SIZE_MAX, 1));
    unsigned char *c = tally__region_alloc(r, left, 1);
    cr_assert_eq(c + left, m + LEN, "the last byte was not handed out");
    cr_assert_null(tally__region_alloc(r, 1, 1));
}

Test(region, format_refuses_what_cannot_hold_a_region)
{
    tally__region *r = NULL;
    unsigned char *m = map(LEN);
    cr_assert_eq(tally__region_format(NULL, LEN, LAYOUT, &r), TALLY_EINVAL);
    cr_assert_eq(tally__region_format(m, sizeof(tally__region) - 1, LAYOUT, &r), TALLY_EINVAL);
    cr_assert_eq(tally__region_format(m + 8, LEN - 8, LAYOUT, &r), TALLY_EINVAL);
    cr_assert_null(r);
}

Test(region, a_mapping_of_something_else_is_refused_with_its_reason)
{
    unsigned char *m = map(LEN);
    tally__region *r = ready_region(m, LEN);

    refused(NULL, LEN, LAYOUT, "too small");
    refused(m, sizeof(tally__region) - 1, LAYOUT, "too small");
    refused(m, LEN, LAYOUT + 1, "other struct sizes");
    refused(m, LEN - 4096, LAYOUT, "another length");

    /* the same bytes at another address */
    unsigned char *copy = map(LEN);
    memcpy(copy, m, LEN);
    refused(copy, LEN, LAYOUT, "another address");

    r->size--;
    refused(m, LEN, LAYOUT, "corrupt");
    r->size++;
    cr_assert_eq(tally__region_check(m, LEN, LAYOUT, NULL), 0);

    r->version++;
    refused(m, LEN, LAYOUT, "another version");
    r->version--;

    m[0] ^= 1;
    refused(m, LEN, LAYOUT, "not a tally region");
    m[0] ^= 1;

    unsigned char *zero = map(LEN);
    refused(zero, LEN, LAYOUT, "not a tally region");

    tally__region *half;
    unsigned char *fresh = map(LEN);
    cr_assert_eq(tally__region_format(fresh, LEN, LAYOUT, &half), 0);
    refused(fresh, LEN, LAYOUT, "not ready");
}
