/*
 * Epochs in shared memory: read-side sections and grace periods across the
 * processes that map one region, where liburcu's registry (one per process)
 * cannot see the other processes' readers. Private to src/.
 *
 * Layout, all inside the caller's region (no pointer out of it):
 *
 *   struct tally__epoch {
 *       now                         the current epoch, from 1
 *       n_readers
 *       readers[n_readers] {        one cache line each
 *           epoch                   0 outside a section, else the epoch read
 *                                   when the section began
 *           owner                   0 free, RECOVERING, else the owning
 *                                   process's identity (core/proc.h), so that
 *                                   a reused pid is not mistaken for the
 *                                   process that died
 *           tid                     the owning thread
 *       }
 *   }
 *
 * Each thread that enters a section takes a reader of its own on first use
 * (tally__epoch_reader_get) and keeps it in a thread-local cache of 4
 * domains (a thread of more gives back the reader it took longest ago, and
 * takes one again when it returns to that domain). It gives it back when it
 * exits; tally__epoch_forget gives back all of a process's
 * readers of a domain, and the other domains' entries of every thread's
 * cache stay good (checked against a record of the last 64 forgets; one
 * older than that is dropped, and its reader found again by owner and tid).
 * A fork's child owns none of its parent's readers.
 *
 * Ordering and progress guarantees:
 *  1. A section announces its epoch, then runs a seq_cst fence, before it
 *     reads anything it protects; tally__epoch_wait advances now, runs a
 *     seq_cst fence, then reads every reader's epoch. Of a section and a
 *     wait that overlap, either the section sees what the waiter's caller
 *     unlinked before the wait, or the waiter sees the section's epoch
 *     (fences paired Dekker style).
 *  2. tally__epoch_wait returns only when every section that began before it
 *     advanced now has ended: it waits for each reader whose epoch is
 *     nonzero and older than the epoch it advanced to. A section that
 *     announced the new epoch read it with acquire from the advance, so it
 *     sees everything unlinked before it (guarantee 1 covers the rest).
 *  3. A section's end is a release store of 0 (and the next announcement a
 *     release store): the waiter's acquire load that sees either orders the
 *     section's reads before what the waiter's caller does next (free).
 *  4. A reader whose owner process died (SIGKILL at any instruction) does
 *     not stall waits forever: a waiter that has waited on it for a while
 *     checks that its pid still runs (and is not a zombie) with the same
 *     start time, and if not, recovers the reader. Recovery is claimed by
 *     one CAS of owner from the dead identity to RECOVERING, so that two
 *     recoverers, or a recoverer and a thread taking the freed reader, never
 *     both write it; a reader is taken only by a CAS from 0.
 *  5. Sections do not nest; a wait must not run inside a section of its own
 *     domain (it would wait for itself).
 */
#ifndef TALLY_CORE_EPOCH_H
#define TALLY_CORE_EPOCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/atomics.h"

typedef struct tally__epoch_reader {
    _Alignas(TALLY__CACHE_LINE) _Atomic uint64_t epoch;
    _Atomic uint64_t owner;
    _Atomic uint32_t tid;          /* the owning thread (gettid), among the owner's threads */
} tally__epoch_reader;

typedef struct tally__epoch {
    _Alignas(TALLY__CACHE_LINE) _Atomic uint64_t now;
    uint32_t n_readers;
    tally__epoch_reader readers[];
} tally__epoch;

_Static_assert(sizeof(tally__epoch_reader) == TALLY__CACHE_LINE, "one reader a cache line");

/* Bytes of a domain of @n_readers readers (one per thread that may enter). */
size_t tally__epoch_size(uint32_t n_readers);
/* Make @d, of tally__epoch_size(@n_readers) bytes, a domain with no reader. */
void tally__epoch_init(tally__epoch *d, uint32_t n_readers);

/* The calling thread's reader of @d, taken on first use; NULL when every
   reader is owned by a live thread (TALLY_EBUSY for the call). */
tally__epoch_reader *tally__epoch_reader_get(tally__epoch *d);

static inline void tally__epoch_enter(tally__epoch *d, tally__epoch_reader *r)
{
    /* acquire: paired with the advance of tally__epoch_wait(), guarantee 2 */
    uint64_t e = atomic_load_explicit(&d->now, memory_order_acquire);
    /* release: the end of the thread's previous section stays before this;
       paired with the acquire loads of tally__epoch_wait(), guarantee 3 */
    atomic_store_explicit(&r->epoch, e, memory_order_release);
    /* seq_cst: the announcement before the section's reads; paired with the
       fence of tally__epoch_wait(), guarantee 1 */
    atomic_thread_fence(memory_order_seq_cst);
}

static inline void tally__epoch_exit(tally__epoch_reader *r)
{
    /* release: the section's reads before its end; paired with the acquire
       loads of tally__epoch_wait(), guarantee 3 */
    atomic_store_explicit(&r->epoch, 0, memory_order_release);
}

/* Wait for a grace period of @d: every section begun before has ended, or
   its process has died. Blocks; never inside a section of @d. */
void tally__epoch_wait(tally__epoch *d);

/* Give back every reader of @d that this process owns, before the region is
   unmapped: no thread of the process may be inside a section of @d, nor
   enter one afterwards. */
void tally__epoch_forget(tally__epoch *d);

#endif /* TALLY_CORE_EPOCH_H */
