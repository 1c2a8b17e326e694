/*
 * flushdelta.pml: the unflushed cost of one slot's limit, the {win, delta}
 * pair, between the hot path (delta_add() in src/engine/hit.c), the flusher
 * (collect_range() in src/sync/flusher.c) and a reclaim of the slot
 * (kill_expired() and tally__table_reclaim_free() in src/engine/table.c).
 *
 * A hit whose state CAS found the slot LIVE adds its cost to the pair: it
 * reads win and delta with two loads and CASes {W, d} -> {W, d + cost}, or,
 * when the pair holds a delta of another window, {W, d} -> {win, cost} and
 * then pushes {W, d} on the note stack (a spill). The flusher, inside a
 * read-side section and only for a LIVE slot with a delta, takes {W, d} ->
 * {W, 0} by CAS and keeps d. The reclaim kills the slot only when its delta
 * is 0, leaves its section, waits for a grace period, then spills whatever
 * delta a late hit added and zeroes the pair.
 *
 * Processes: H1 hits twice; H2 hits once, then reclaims the slot; F collects
 * twice. Every hit is in window 1 or 2, cost 1.
 * Asserted at the end, per window: cost kept by the flusher + cost spilled +
 * the delta left in the pair == cost added (none lost, none doubled).
 * Twins:
 *   BUG       the flusher takes the delta with a load and a plain store of
 *             0: a hit's CAS in between is lost.
 *   BUG_NOGP  the reclaim spills and zeroes without waiting for a grace
 *             period: a late hit's add between its load and store is lost.
 */
byte pw;                   /* win of the pair */
byte pd;                   /* delta of the pair */
bit  live = 1;             /* the slot's digest is LIVE */

bit  rin[3];               /* reader inside a read-side section */
bit  gpw[3];               /* the grace period in progress waits for this reader */

/* ghost, indexed by window */
byte added[3], kept[3], spilled[3];
byte finished;

inline rcu_lock()   { rin[me] = 1 }
inline rcu_unlock() { atomic { rin[me] = 0; gpw[me] = 0 } }

inline synchronize_rcu()
{
	atomic { gpw[0] = rin[0]; gpw[1] = rin[1]; gpw[2] = rin[2] };
	(gpw[0] == 0 && gpw[1] == 0 && gpw[2] == 0)
}

inline check_end()
{
	atomic {
		finished++;
		if
		:: finished == 3 ->
			assert(kept[1] + spilled[1] + (pw == 1 -> pd : 0) == added[1]);
			assert(kept[2] + spilled[2] + (pw == 2 -> pd : 0) == added[2])
		:: else
		fi
	}
}

/* one hit of cost 1 in window 1 or 2: the state CAS, then delta_add() */
inline hit()
{
	rcu_lock();
	if
	:: win = 1
	:: win = 2
	fi;
	atomic {
		if
		:: live -> added[win]++           /* the hit's state CAS */
		:: else -> goto hit_done          /* DEAD: it goes to a fresh slot */
		fi
	};
add_again:
	cw = pw;                              /* tally__state_load: two loads */
	cd = pd;
	other = (cd != 0 && cw != win);
	atomic {
		if
		:: pw == cw && pd == cd ->
			pw = win;
			pd = (other -> 1 : cd + 1)
		:: else -> goto add_again
		fi
	};
	if
	:: other -> spilled[cw] = spilled[cw] + cd   /* tally__spill() */
	:: else
	fi;
hit_done:
	atomic { rcu_unlock(); win = 0; cw = 0; cd = 0; other = 0 }
}

proctype hitter(byte me; byte n)
{
	byte win, cw, cd, d, w;
	bit other;

	do
	:: n > 0 ->
		hit();
		n--
	:: else -> break
	od;
	if
	:: me == 1 ->
		/* reclaim: kill_expired() keeps a slot whose delta is not 0 */
		rcu_lock();
		if
		:: pd == 0 -> live = 0            /* the state CAS to DEAD, then the digest */
		:: else
		fi;
		rcu_unlock();
#ifndef BUG_NOGP
		synchronize_rcu();
#endif
		if
		:: !live ->
			/* tally__table_reclaim_free() */
			d = pd;
			if
			:: d != 0 ->
				w = pw;
				spilled[w] = spilled[w] + d
			:: else
			fi;
			pw = 0;
			pd = 0
		:: else
		fi
	:: else
	fi;
	check_end()
}

proctype flusher(byte me)
{
	byte round, cw, cd;

	do
	:: round < 2 ->
		rcu_lock();
		/* collect_range(): a delta, a LIVE digest, then take from the pair */
		if
		:: pd != 0 ->
			if
			:: live ->
				cw = pw;
				cd = pd;
				do
				:: cd == 0 -> break
#ifdef BUG
				:: cd != 0 ->
					pd = 0;
					break
#else
				:: cd != 0 ->
					atomic {
						if
						:: pw == cw && pd == cd ->
							pd = 0;
							break
						:: else
						fi
					};
					cw = pw;
					cd = pd
#endif
				od;
				kept[cw] = kept[cw] + cd  /* keep() */
			:: else                       /* being reclaimed: the reclaim spills it */
			fi
		:: else
		fi;
		atomic { rcu_unlock(); cw = 0; cd = 0 };
		round++
	:: else -> break
	od;
	check_end()
}

init
{
	atomic {
		run hitter(0, 2);
		run hitter(1, 1);
		run flusher(2)
	}
}
