/* A region laid out once and checked by every process that maps it (core/region.h). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tally.h"
#include "core/region.h"

static const char MAGIC[8] = { 't', 'a', 'l', 'l', 'y', '-', 'r', 'g' };

/* FNV-1a over the header's fields but ready and check. */
static uint64_t checksum(const tally__region *r)
{
    const unsigned char *p = (const unsigned char *)r;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < offsetof(tally__region, check); i++)
        h = (h ^ p[i]) * UINT64_C(0x100000001b3);
    return h;
}

int tally__region_format(void *mem, size_t len, uint64_t layout, tally__region **out)
{
    if (!mem || !out || len < sizeof(tally__region) || ((uintptr_t)mem & 63))
        return TALLY_EINVAL;
    tally__region *r = mem;
    memset(r, 0, sizeof(*r));
    memcpy(r->magic, MAGIC, sizeof(MAGIC));
    r->version = TALLY__REGION_VERSION;
    r->layout = layout;
    r->size = len;
    r->base = (uint64_t)(uintptr_t)mem;
    r->used = sizeof(*r);
    *out = r;
    return 0;
}

void *tally__region_alloc(tally__region *r, size_t size, size_t align)
{
    if (align == 0 || align > 4096 || (align & (align - 1)) || size > PTRDIFF_MAX)
        return NULL;
    uint64_t at = (r->used + align - 1) & ~(uint64_t)(align - 1);
    if (at < r->used || at > r->size || size > r->size - at)
        return NULL;
    r->used = at + size;
    void *p = (unsigned char *)(uintptr_t)r->base + at;
    memset(p, 0, size);
    return p;
}

void tally__region_ready(tally__region *r)
{
    r->check = checksum(r);
    /* release: everything laid out before the region is seen ready; paired
       with the acquire load of tally__region_check() */
    atomic_store_explicit(&r->ready, 1, memory_order_release);
}

static int check(const void *mem, size_t len, uint64_t layout, bool here, const char **why)
{
    const tally__region *r = mem;
    const char *bad = NULL;

    if (!mem || len < sizeof(tally__region))
        bad = "too small to hold a region";
    else if (memcmp(r->magic, MAGIC, sizeof(MAGIC)) != 0)
        bad = "not a tally region";
    else if (r->version != TALLY__REGION_VERSION)
        bad = "laid out by another version of the library";
    /* acquire: paired with the release store of tally__region_ready() */
    else if (!atomic_load_explicit(&((tally__region *)r)->ready, memory_order_acquire))
        bad = "not ready: its creator has not finished laying it out";
    else if (r->check != checksum(r))
        bad = "corrupt: its header does not match its checksum";
    else if (r->layout != layout)
        bad = "laid out by a build of the library with other struct sizes";
    else if (here && r->base != (uint64_t)(uintptr_t)mem)
        bad = "mapped at another address than it was laid out at";
    else if (r->size != len)
        bad = "mapped with another length than it was laid out with";
    else if (r->used > r->size)
        bad = "corrupt: more memory handed out than it holds";
    if (why)
        *why = bad;
    return bad ? TALLY_EINVAL : 0;
}

int tally__region_check(const void *mem, size_t len, uint64_t layout, const char **why)
{
    return check(mem, len, layout, true, why);
}

int tally__region_check_anywhere(const void *mem, size_t len, uint64_t layout, const char **why)
{
    return check(mem, len, layout, false, why);
}
