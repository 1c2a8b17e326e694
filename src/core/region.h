/*
 * A region: memory that several processes map at one address (a mapping
 * made before fork, or a shared file mapped at the address it records),
 * laid out once by its creator and checked by every process that attaches.
 * Private to src/.
 *
 *   struct tally__region {            at the region's first byte
 *       magic      "tally-rg"
 *       version    of this layout and of what is laid out in it: another
 *                  version of the library refuses the region
 *       layout     sizes of the structs laid out in it (a build whose
 *                  structs differ refuses it too)
 *       size       bytes of the region
 *       base       the address it was laid out at: pointers into it are
 *                  valid only there
 *       used       bytes handed out so far, from the first byte
 *       ready      0 while its creator lays it out, 1 once it may be used
 *       check      a checksum of the fields above but ready
 *   }
 *   ... what tally__region_alloc() handed out, each aligned as asked
 *
 * Memory is handed out only while the region is laid out, by its creator,
 * before it is ready (tally__region_ready); a region is never grown.
 */
#ifndef TALLY_CORE_REGION_H
#define TALLY_CORE_REGION_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define TALLY__REGION_VERSION 1

typedef struct tally__region {
    char             magic[8];
    uint32_t         version;
    uint32_t         pad;
    uint64_t         layout;
    uint64_t         size;
    uint64_t         base;
    uint64_t         used;
    uint64_t         check;
    _Atomic uint32_t ready;
} tally__region;

/* Lay out a region header in @mem (@len bytes), for structs whose sizes
   give @layout. Return 0, or TALLY_EINVAL (NULL @mem, @len too small for
   the header, @mem not aligned to 64 bytes). */
int tally__region_format(void *mem, size_t len, uint64_t layout, tally__region **out);

/* @size bytes aligned to @align (a power of two, at most 4096), zeroed, or
   NULL when the region has no room. Creator only, before ready. */
void *tally__region_alloc(tally__region *r, size_t size, size_t align);

/* The region is laid out: seal the checksum, then publish it. */
void tally__region_ready(tally__region *r);

/* Check that @mem (@len bytes mapped here) holds a ready region of this
   version and @layout, laid out at this address, of @len bytes. Return 0,
   or TALLY_EINVAL with a reason in @why (a static string): not a region, of
   another version or build, mapped at another address or with another
   length, corrupt, or not ready. */
int tally__region_check(const void *mem, size_t len, uint64_t layout, const char **why);
/* The same checks but the address's: a first look at a region mapped
   anywhere, to learn where it must be mapped (its base). */
int tally__region_check_anywhere(const void *mem, size_t len, uint64_t layout, const char **why);

#endif /* TALLY_CORE_REGION_H */
