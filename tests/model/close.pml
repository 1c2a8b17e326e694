/*
 * close.pml: tally_close() racing calls in flight (enter(), acquire_slot()
 * and tally_close() in src/tally.c and src/engine/engine.c).
 *
 * A call's first action is rcu_read_lock(), before it reads anything of the
 * engine; it then reads e->closing and returns TALLY_ESTATE if set, else
 * goes on reading engine memory, and unlocks. A call on the reclaim path
 * counts itself in e->reclaimers inside its section, leaves the section,
 * waits for a grace period, frees its batch (table memory), re-enters, reads
 * closing, uncounts itself and returns TALLY_ESTATE if closing was set.
 * Close: closing = true; synchronize_rcu(); wait until reclaimers == 0;
 * free (freed = true).
 *
 * tally_close()'s contract (include/tally.h) is free()'s: no call runs or
 * starts when it is called. The model checks what the mechanism still gives
 * a call that races it, and which calls that covers: exactly those whose
 * read-side section began before close's grace period began (before
 * synchronize_rcu() looked at the readers). Such a call either sees closing
 * and touches nothing more, or is waited for by the grace period, or (the
 * reclaim path) is counted in reclaimers before the grace period ends. A
 * call whose first action comes later reads e->closing in freed memory. The
 * model lets each of C1, C2 start at any moment before the grace period
 * begins, or not at all.
 *
 * Processes: C1, C2 (each a hit, on the reclaim path or not), the closer.
 * Asserted: no access to engine memory once it is freed.
 * Twins:
 *   BUG             a call reads engine memory (opts.max_key_len) before its
 *                   read lock, so its section can begin after the grace
 *                   period did: a use after free.
 *   BUG_RECLAIMERS  close does not wait for reclaimers == 0: a call back from
 *                   its grace period frees its batch in freed memory.
 */
bit  closing, freed;
bit  gp_started;           /* ghost: close's grace period has begun */
byte reclaimers;

bit  rin[3];               /* reader inside a read-side section */
bit  gpw[9];               /* gpw[3 * s + r]: the grace period of s waits for reader r */

#define TOUCH assert(!freed)   /* an access to engine memory */

inline rcu_lock()   { rin[me] = 1 }
inline rcu_unlock() { atomic { rin[me] = 0; gpw[me] = 0; gpw[3 + me] = 0; gpw[6 + me] = 0 } }

/* Wait for every reader that is inside a section now to leave it. */
inline synchronize_rcu()
{
	atomic { gpw[3 * me] = rin[0]; gpw[3 * me + 1] = rin[1]; gpw[3 * me + 2] = rin[2] };
	(gpw[3 * me] == 0 && gpw[3 * me + 1] == 0 && gpw[3 * me + 2] == 0)
}

proctype caller(byte me)
{
	bit c;

	/* the call starts before close's grace period begins, or never */
	if
#ifdef BUG
	:: atomic { !gp_started -> TOUCH };  /* key_len > e->opts.max_key_len */
	   rcu_lock()
#else
	:: atomic { !gp_started -> rcu_lock() }
#endif
	:: atomic { gp_started -> goto done }
	fi;
	atomic { TOUCH; c = closing };
	if
	:: c -> rcu_unlock(); goto done     /* TALLY_ESTATE */
	:: else
	fi;
	TOUCH;                               /* the policy, its table */
	if
	:: skip
	:: /* acquire_slot(): a reclaim that waits for a grace period */
		atomic { TOUCH; reclaimers++ };
		rcu_unlock();
		synchronize_rcu();
		TOUCH;                           /* tally__table_reclaim_free() */
		rcu_lock();
		atomic { TOUCH; c = closing };
		atomic { TOUCH; reclaimers-- };
		if
		:: c -> rcu_unlock(); goto done /* TALLY_ESTATE */
		:: else
		fi;
		TOUCH
	fi;
	TOUCH;                               /* the state CAS */
	rcu_unlock();
done:
	skip
}

proctype closer(byte me)
{
	atomic { TOUCH; closing = 1 };
	atomic {
		gp_started = 1;
		gpw[3 * me] = rin[0]; gpw[3 * me + 1] = rin[1]; gpw[3 * me + 2] = rin[2]
	};
	(gpw[3 * me] == 0 && gpw[3 * me + 1] == 0 && gpw[3 * me + 2] == 0);
#ifndef BUG_RECLAIMERS
	(reclaimers == 0);
#endif
	freed = 1
}

init
{
	atomic {
		run caller(0);
		run caller(1);
		run closer(2)
	}
}
