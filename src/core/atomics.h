/*
 * The one portability layer for the 16-byte word pairs that tally changes
 * together (a limit's state, a slot's digest, a {window, delta} pair). Fields
 * of one word are C11 _Atomic or accessed with the __atomic builtins; pairs
 * only through these functions. Private to src/.
 *
 * The pair CAS must be lock-free: it is cmpxchg16b, inlined (-mcx16). The
 * build fails rather than fall back to libatomic's lock.
 *
 * The pair load never writes the cache line where the CPU guarantees that an
 * aligned 16-byte vector load is atomic: processors with AVX from Intel and
 * AMD (both vendors' manuals say so; GCC's libatomic relies on the same
 * guarantee). Elsewhere, and under ThreadSanitizer (which cannot see inline
 * assembly), it is libatomic's load, which may be a cmpxchg16b that writes
 * the line: read-only callers then contend with writers, nothing worse.
 */
#ifndef TALLY_CORE_ATOMICS_H
#define TALLY_CORE_ATOMICS_H

#include <stdbool.h>
#include <stdint.h>

#if !defined(__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16)
#error "tally needs an inline 16-byte compare-and-swap (x86-64: build with -mcx16)"
#endif

/* The cache line that shared structures are aligned and padded to. */
#define TALLY__CACHE_LINE 64

#define TALLY__LIKELY(x)   __builtin_expect(!!(x), 1)
#define TALLY__UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Two 64-bit words changed together by one 16-byte CAS. */
typedef struct tally__state {
    _Alignas(16) uint64_t w0;
    uint64_t w1;
} tally__state;

_Static_assert(sizeof(tally__state) == 16 && _Alignof(tally__state) == 16, "16-byte CAS pair");

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TALLY__ATOMICS_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define TALLY__ATOMICS_TSAN 1
#endif

/* True when aligned 16-byte vector loads are atomic here (set at load). */
extern bool tally__vector_load16;

static inline tally__state tally__state_load(tally__state *p)
{
    tally__state s;
    /* Two plain loads: callers validate the pair with the CAS that follows
       (engine.c apply(): even a step that changes nothing). */
    s.w0 = __atomic_load_n(&p->w0, __ATOMIC_ACQUIRE);
    s.w1 = __atomic_load_n(&p->w1, __ATOMIC_ACQUIRE);
    return s;
}

/* One 16-byte load, for readers that report the pair without a CAS. */
static inline tally__state tally__state_load_atomic(tally__state *p)
{
#if defined(__x86_64__) && !defined(TALLY__ATOMICS_TSAN)
    if (TALLY__LIKELY(tally__vector_load16)) {
        tally__state s;
        /* an x86 load is an acquire; the clobber keeps the compiler's order */
        __asm__ __volatile__("vmovdqa %2, %%xmm0\n\t"
                             "vmovq %%xmm0, %0\n\t"
                             "vpextrq $1, %%xmm0, %1"
                             : "=r"(s.w0), "=r"(s.w1) : "m"(*p) : "xmm0", "memory");
        return s;
    }
#endif
    unsigned __int128 v = __atomic_load_n((unsigned __int128 *)p, __ATOMIC_ACQUIRE);
    tally__state s = { (uint64_t)v, (uint64_t)(v >> 64) };
    return s;
}

static inline bool tally__state_cas(tally__state *p, tally__state expect, tally__state desired)
{
    unsigned __int128 e = ((unsigned __int128)expect.w1 << 64) | expect.w0;
    unsigned __int128 d = ((unsigned __int128)desired.w1 << 64) | desired.w0;
    /* full barrier: the new state is ordered after everything the caller read */
    return __sync_bool_compare_and_swap((unsigned __int128 *)p, e, d);
}

#endif /* TALLY_CORE_ATOMICS_H */
