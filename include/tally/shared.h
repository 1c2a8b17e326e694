/*
 * tally/shared.h - one engine for several processes on one host.
 *
 * A shared engine keeps everything a call touches (its tables, policies,
 * read-side sections and statistics) in a region of memory that the
 * caller maps at one address in every process: a MAP_SHARED mapping made
 * before fork (nginx's shared zones), or a shared file that unrelated
 * processes map at the address its creator used. Counts are exact across
 * processes, as across threads: exactly max admitted, one first_exceeded
 * and one reset winner per window, whichever processes call.
 *
 * What a shared engine has, and has not:
 *  - its policies are those it was created with (ids 0, 1, ... in the order
 *    given); tally_policy_add() and tally_policy_update() get TALLY_ESTATE;
 *  - it keeps only digests of keys (digest_only must be set);
 *  - it has no flusher (tally_flusher_start() gets TALLY_ESTATE) and no
 *    rejection watch (tally_watch_set() gets TALLY_ESTATE);
 *  - every other call of tally.h works on it, from any thread of any
 *    process that attached it.
 * A process killed at any instruction, SIGKILL included: a thread that
 * waits for the grace period a slot's reuse needs gives up on the dead
 * process's read-side sections, the slots its reclaims held are freed by
 * the others, and a reset lock it held is taken over. What it was doing is
 * lost with it: a hit it had not finished counts or not, and a new key it
 * was placing may keep one slot and one unit of capacity out of use. If it
 * died in the few instructions of a promotion, a table at its capacity
 * makes every new key wait 1 s before it refuses (or evicts for) it, for
 * the life of the region (docs/DESIGN.md, "Shared engines"). Processes of
 * one PID namespace only: one of another is refused the region.
 */
#ifndef TALLY_SHARED_H
#define TALLY_SHARED_H

#include "tally.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Threads of all processes that may be in calls on one shared engine at
   once, when tally_shared_size() is given 0. */
#define TALLY_SHARED_THREADS 256

/*
 * tally_shared_size - bytes of the region a shared engine needs.
 * @opts:        options, as for tally_open(); digest_only must be set.
 * @policies:    the engine's policies, @n_policies of them (at least one,
 *               at most TALLY_MAX_POLICIES), validated as tally_policy_add()
 *               validates one.
 * @max_threads: threads, across every process, that may use the engine
 *               (0: TALLY_SHARED_THREADS): a thread holds one of them from
 *               its first call until it exits or its process detaches (a
 *               thread that uses more than 4 shared engines in turn gives
 *               back its oldest one's as it goes); a call of a thread
 *               beyond them gets TALLY_EBUSY.
 * @bytes:       receives the size.
 * Return 0 or TALLY_EINVAL (NULL @bytes or @policies, options or a policy
 * refused as tally_open() and tally_policy_add() refuse them, digest_only
 * not set, two policies of one name, @max_threads above 65536).
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT int tally_shared_size(const tally_options *opts, const tally_policy *policies,
                                   size_t n_policies, uint32_t max_threads, size_t *bytes);

/*
 * tally_shared_create - lay out a shared engine in @mem.
 * @mem:  the region: @len bytes, aligned to 64 bytes, mapped MAP_SHARED at
 *        the address every process will map it at. Its contents are
 *        overwritten.
 * @len:  at least what tally_shared_size() gave for the same arguments.
 * @opts, @policies, @n_policies, @max_threads: as for tally_shared_size().
 *        An all-zero hash key is drawn at random here, once for every
 *        process.
 * @out:  receives this process's handle on the engine.
 * Return 0, TALLY_EINVAL (as tally_shared_size(); NULL @mem or @out, @mem
 * not aligned, @len below the size needed) or TALLY_ENOMEM (no random hash
 * key).
 * Any thread may call it, once per region, before any process attaches;
 * processes forked after it returns use *@out as it is (a fork keeps the
 * mapping at its address). It does not block.
 * On failure *@out is untouched and the region is not usable.
 */
TALLY_EXPORT int tally_shared_create(void *mem, size_t len, const tally_options *opts,
                                     const tally_policy *policies, size_t n_policies,
                                     uint32_t max_threads, tally_engine **out);

/*
 * tally_shared_check - whether @mem holds a shared engine this library can
 * attach.
 * @mem, @len: the region as mapped in this process.
 * @why:  NULL, or receives a static sentence saying why not (NULL when it can).
 * Return 0 or TALLY_EINVAL: too small, not a shared engine, made by another
 * version or build of the library, not finished by its creator, a header
 * that does not match its checksum, mapped at another address or with
 * another length than it was created with.
 * Any thread may call it. It never blocks, and it reads only the region's
 * header: a region whose header is right but whose body was overwritten is
 * not detected.
 */
TALLY_EXPORT int tally_shared_check(const void *mem, size_t len, const char **why);

/*
 * tally_shared_address - where a shared engine's region must be mapped.
 * @mem, @len: the region mapped anywhere in this process (a first look at
 *        a shared file, for a process that did not create it).
 * @addr: receives the address it was created at.
 * Return 0, or TALLY_EINVAL when @mem holds no shared engine's header
 * (tally_shared_check() says why, ignoring the address).
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT int tally_shared_address(const void *mem, size_t len, void **addr);

/*
 * tally_shared_attach - this process's handle on the shared engine in @mem.
 * @mem, @len: the region, mapped at the address it was created at.
 * @out:  receives the handle (the same pointer in every process).
 * Return 0, or TALLY_EINVAL for a region tally_shared_check() refuses.
 * Any thread may call it. It never blocks. On failure *@out is untouched.
 */
TALLY_EXPORT int tally_shared_attach(void *mem, size_t len, tally_engine **out);

/*
 * tally_shared_detach - this process is done with a shared engine: the
 * read-side sections its threads held are given back. The engine and its
 * counts stay, for the other processes and for a later attach. NULL is a
 * no-op; so is an engine that is not shared.
 * What the caller must ensure: no thread of this process is in a call on
 * @e, and none will start one, until it attaches again. Unmap the region
 * only after this.
 * tally_close() on a shared engine does the same.
 * Any thread may call it. It does not block.
 */
TALLY_EXPORT void tally_shared_detach(tally_engine *e);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_SHARED_H */
