/*
 * The one portability layer for atomics, and the one file where the
 * compiler's __atomic and __sync builtins appear (tools/atomics-check).
 * Private to src/.
 *
 * One style for every word shared between threads:
 *  - A word that is never half of a 16-byte pair is a C11 _Atomic object,
 *    used with atomic_*_explicit() and the weakest order that is enough.
 *    Plain atomic_*() means seq_cst, and only where a single total order is
 *    meant (a Dekker-style handshake); its comment says so.
 *  - A word that is half of a 16-byte pair (tally__state w0/w1, a slot's
 *    digest d_lo/d_hi, a sync entry's {win, delta}: engine-internal.h) is a
 *    plain uint64_t, touched only through the functions below. The pair CAS
 *    writes both words as one 16-byte object, which two _Atomic members are
 *    not.
 *  - Every acquire, release, acq_rel, every seq_cst access that orders
 *    something and every fence carries, on its line or just above, a comment
 *    naming the other end of the pair and its function (and file, if
 *    another): "acquire: paired with the release store in tally__table_acquire()".
 *
 * Every pair CAS is a full barrier (a locked cmpxchg16b). Callers that rely on
 * it to order other accesses say so where they do.
 *
 * The pair CAS must be lock-free: it is cmpxchg16b, inlined (-mcx16; GCC
 * inlines the __sync builtin but calls libatomic for the __atomic one). The
 * build fails rather than fall back to libatomic's lock.
 *
 * The pair load never writes the cache line where the CPU guarantees that an
 * aligned 16-byte vector load is atomic: processors with AVX from Intel and
 * AMD (both vendors' manuals say so; GCC's libatomic relies on the same
 * guarantee). Elsewhere, and under ThreadSanitizer (which cannot see inline
 * assembly), it is libatomic's load, which may be a cmpxchg16b that writes
 * the line: read-only callers then contend with writers, nothing worse. That
 * load is the one call into libatomic (__atomic_load_16); only readers that
 * report a pair without a CAS (tally__state_load_atomic()) make it.
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

/*
 * One word of a pair. The order is in the name; each caller's comment says
 * what its access is paired with.
 */
static inline uint64_t tally__word_load_relaxed(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline uint64_t tally__word_load_acquire(const uint64_t *p)
{
    /* acquire: paired with the release (or pair CAS) its caller names */
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline uint64_t tally__word_load_seq_cst(const uint64_t *p)
{
    /* seq_cst: paired with the pair CAS or seq_cst load its caller names */
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static inline void tally__word_store_relaxed(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline void tally__word_store_release(uint64_t *p, uint64_t v)
{
    /* release: paired with the acquire (or pair CAS) its caller names */
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/*
 * Replace the pair {lo, hi} at @pair (16-byte aligned, lo first) by
 * {nlo, nhi} if it still holds {elo, ehi}. A full barrier either way.
 */
static inline bool tally__pair_cas(uint64_t *pair, uint64_t elo, uint64_t ehi,
                                   uint64_t nlo, uint64_t nhi)
{
    unsigned __int128 e = ((unsigned __int128)ehi << 64) | elo;
    unsigned __int128 n = ((unsigned __int128)nhi << 64) | nlo;
    return __sync_bool_compare_and_swap((unsigned __int128 *)(void *)pair, e, n);
}

static inline tally__state tally__state_load(tally__state *p)
{
    tally__state s;
    /* Two loads, not one: callers validate the pair with the CAS that follows
       (hit.c apply(): even a step that changes nothing).
       acquire: paired with the pair CAS (tally__state_cas()) that wrote each
       word, so what a step reads after the state is at least as new. */
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
        /* an x86 load is an acquire, paired like the load below; the clobber
           keeps the compiler's order */
        __asm__ __volatile__("vmovdqa %2, %%xmm0\n\t"
                             "vmovq %%xmm0, %0\n\t"
                             "vpextrq $1, %%xmm0, %1"
                             : "=r"(s.w0), "=r"(s.w1) : "m"(*p) : "xmm0", "memory");
        return s;
    }
#endif
    /* acquire: paired with the pair CAS (tally__state_cas()) that wrote it */
    unsigned __int128 v = __atomic_load_n((unsigned __int128 *)p, __ATOMIC_ACQUIRE);
    tally__state s = { (uint64_t)v, (uint64_t)(v >> 64) };
    return s;
}

/* The state's pair CAS: the new state is ordered after everything the caller read. */
static inline bool tally__state_cas(tally__state *p, tally__state expect, tally__state desired)
{
    return tally__pair_cas(&p->w0, expect.w0, expect.w1, desired.w0, desired.w1);
}

#endif /* TALLY_CORE_ATOMICS_H */
