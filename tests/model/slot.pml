/*
 * slot.pml: slot claim, twin resolution and reclaim across an RCU grace
 * period (src/engine/table.c, and apply()/acquire_slot() of src/engine/hit.c).
 *
 * A table of NS = 3 slots, one probe window, home slot 0 for every key.
 * Slot 0 starts LIVE with key B (one hit counted), slots 1 and 2 EMPTY.
 * A digest word is {status, key}; a digest load is one step (seq_cst; a torn
 * pair can only make the earlier of two claimants skip the later claim,
 * which the later claimant's scan covers). The limit-0 state is the used
 * count, DEADST is {0, UINT64_MAX}; every state counts as expired for the
 * reclaimer. The live-count reservation is left out (capacity is never hit).
 *
 * Processes, each an RCU reader:
 *   H1  hits B, then (in a new read-side section) hits A;
 *   H2  hits A: two hitters race to insert the same new key;
 *   R   one reclaim pass over the table: kill LIVE slots (state CAS to
 *       DEAD, then digest LIVE -> DEAD), take DEAD ones (-> ZOMBIE), leave
 *       its section, wait for a grace period, zero them and mark them FREE.
 * A hit: find_fast; else acquire (claim EMPTY/FREE -> PENDING, resolution
 * scan, promote LIVE or kill its own claim, help any PENDING twin it meets);
 * then the state CAS; on DEADST help the kill and start over.
 * RCU: synchronize_rcu samples which readers are inside a section and waits
 * until each of them has left that section.
 *
 * Asserted: never two LIVE slots of one key (checked at each promotion);
 * every access through a slot pointer a reader holds finds the slot still
 * holding the reader's key, or ZOMBIE (never FREE, never another key);
 * at the end, for each key, the counts of its LIVE slots plus what kills
 * took equal its hits (none lost, none counted twice).
 * Twins:
 *   BUG       the reclaim frees its slots without waiting for a grace period.
 *   BUG_SCAN  a claim is promoted without the resolution scan.
 */
#define NS      3
#define NONE    255
#define DEADST  255

#define EMPTY   0
#define FREE    1
#define ZOMBIE  2
#define PENDING 3
#define LIVE    4
#define DEAD    5

#define KA 1
#define KB 2

byte dstat[NS];            /* digest word: status */
byte dkey[NS];             /* digest word: key, 0 when EMPTY, FREE, ZOMBIE */
byte st[NS];               /* limit-0 state: used count, or DEADST */

bit  rin[3];               /* reader inside a read-side section */
bit  gpw[3];               /* the grace period in progress waits for this reader */

/* ghost */
byte hits[3];              /* successful state CASes, per key */
byte killed[3];            /* counts taken by kills, per key */
byte finished;

inline rcu_lock()   { rin[me] = 1 }
inline rcu_unlock() { atomic { rin[me] = 0; gpw[me] = 0 } }

/* Wait for every reader that is inside a section now to leave it. */
inline synchronize_rcu()
{
	atomic { gpw[0] = rin[0]; gpw[1] = rin[1]; gpw[2] = rin[2] };
	(gpw[0] == 0 && gpw[1] == 0 && gpw[2] == 0)
}

/* A pointer held inside a read-side section still points at its key. */
#define HOLDS(s, k) (dkey[s] == (k) || dstat[s] == ZOMBIE)

inline load_digest(i) { atomic { ls = dstat[i]; lk = dkey[i] } }

/* kill_pending(): CAS PENDING(k) -> DEAD(k) */
inline kill_pending(i, k, ok)
{
	atomic {
		if
		:: dstat[i] == PENDING && dkey[i] == k -> dstat[i] = DEAD; ok = 1
		:: else -> ok = 0
		fi
	}
}

/* tally__table_help_kill() for one limit: digest LIVE -> DEAD */
inline help_kill(i)
{
	load_digest(i);
	atomic {
		if
		:: ls == LIVE && dstat[i] == LIVE && dkey[i] == lk -> dstat[i] = DEAD
		:: else
		fi
	}
}

/* resolve(): the claim at position `me_k` of key k; result: LIVE slot or NONE */
inline resolve(k)
{
	j = 0;
res_again:
#ifndef BUG_SCAN
	do
	:: j == me_k -> j++
	:: j < NS && j != me_k ->
		load_digest(j);
		if
		:: ls == EMPTY ->
			break                      /* a later twin will see our claim */
		:: ls == LIVE && lk == k ->
			kill_pending(me_k, k, ok);
			result = j;
			goto res_done
		:: ls == PENDING && lk == k && j < me_k ->
			kill_pending(me_k, k, ok);
			me_k = j;
			j = 0;
			goto res_again
		:: ls == PENDING && lk == k && j > me_k ->
			kill_pending(j, k, ok);
			if
			:: !ok -> j = 0; goto res_again    /* promoted or killed meanwhile */
			:: else
			fi
		:: else
		fi;
		j++
	:: j >= NS -> break
	od;
#endif
	atomic {
		if
		:: dstat[me_k] == PENDING && dkey[me_k] == k ->
			dstat[me_k] = LIVE;
			assert(!((0 != me_k && dstat[0] == LIVE && dkey[0] == k)
			      || (1 != me_k && dstat[1] == LIVE && dkey[1] == k)
			      || (2 != me_k && dstat[2] == LIVE && dkey[2] == k)));
			result = me_k
		:: else ->
			result = NONE
		fi
	};
	if
	:: result == NONE ->
		/* another thread promoted or killed the claim meanwhile */
		load_digest(me_k);
		result = ((ls == LIVE && lk == k) -> me_k : NONE)
	:: else
	fi;
res_done:
	skip
}

/* tally__table_acquire(): s = the LIVE slot of k, or NONE (table full) */
inline acquire(k)
{
	s = NONE;
acq_again:
	free_k = NONE; me_k = NONE; i = 0;
	do
	:: i < NS ->
		load_digest(i);
		if
		:: ls == EMPTY || ls == FREE ->
			if
			:: free_k == NONE -> free_k = i; free_st = ls
			:: else
			fi;
			if
			:: ls == EMPTY -> break         /* nothing of ours past here */
			:: else
			fi
		:: ls == LIVE && lk == k ->
			s = i;
			goto acq_done
		:: ls == PENDING && lk == k ->
			me_k = i;                       /* help the claim we met */
			break
		:: else
		fi;
		i++
	:: else -> break
	od;
	if
	:: me_k != NONE
	:: me_k == NONE && free_k == NONE ->
		goto acq_done                   /* TALLY_EFULL */
	:: else ->
		atomic {
			if
			:: dstat[free_k] == free_st && dkey[free_k] == 0 ->
				dstat[free_k] = PENDING; dkey[free_k] = k
			:: else -> goto acq_again
			fi
		};
		me_k = free_k
	fi;
	resolve(k);
	if
	:: result == NONE -> goto acq_again     /* lost a race: scan again */
	:: else -> s = result
	fi;
acq_done:
	skip
}

/* tally_hit() on key k with cost 1, one read-side section */
inline hit(k)
{
	rcu_lock();
restart:
	/* tally__table_find_fast() */
	s = NONE; i = 0;
	do
	:: i < NS ->
		load_digest(i);
		if
		:: ls == EMPTY -> break
		:: ls == LIVE && lk == k -> s = i; break
		:: else -> i++
		fi
	:: else -> break
	od;
	if
	:: s == NONE -> acquire(k)
	:: else
	fi;
	if
	:: s == NONE -> goto hit_done             /* full: nothing consumed */
	:: else
	fi;
apply:
	atomic {
		assert(HOLDS(s, k)); cur = st[s];
		/* dead locals, cleared to keep the state space small */
		i = 0; j = 0; me_k = 0; result = 0; free_k = 0; free_st = 0; ls = 0; lk = 0; ok = 0
	};
	if
	:: cur == DEADST ->
		help_kill(s);
		goto restart
	:: else
	fi;
	atomic {
		assert(HOLDS(s, k));
		if
		:: st[s] == cur -> st[s] = cur + 1; hits[k]++
		:: else -> goto apply
		fi
	};
hit_done:
	atomic { rcu_unlock(); s = 0; cur = 0 }
}

inline check_end()
{
	atomic {
		finished++;
		if
		:: finished == 3 ->
			for (i : 1 .. 2) {
				n = killed[i];
				for (j : 0 .. NS - 1) {
					n = n + ((dstat[j] == LIVE && dkey[j] == i) -> st[j] : 0)
				}
				assert(n == hits[i] + (i == KB -> 1 : 0))
			}
		:: else
		fi
	}
}

proctype hitter(byte me; byte k1; byte k2)
{
	byte k = k1, i, j, s, me_k, result, free_k, free_st, ls, lk, cur, n;
	bit ok;

	do
	:: k != 0 ->
		hit(k);
		k = (k == k1 -> k2 : 0)
	:: else -> break
	od;
	check_end()
}

proctype reclaimer(byte me)
{
	byte i, j, ls, lk, first, n;
	bit batch[NS];

	rcu_lock();
	for (i : 0 .. NS - 1) {
		/* consider() */
		load_digest(i);
		if
		:: ls == LIVE ->
			/* kill_expired(): every window expired */
			first = st[i];
			if
			:: first != DEADST ->
				atomic {
					if
					:: st[i] == first ->
						assert(dstat[i] == LIVE && dkey[i] == lk);
						st[i] = DEADST; killed[lk] = killed[lk] + first
					:: else -> goto next
					fi
				}
			:: else
			fi;
			help_kill(i)
		:: ls == DEAD
		:: else -> goto next
		fi;
		/* take_dead(): DEAD -> ZOMBIE, owned by this reclaim */
		load_digest(i);
		atomic {
			if
			:: ls == DEAD && dstat[i] == DEAD && dkey[i] == lk ->
				dstat[i] = ZOMBIE; dkey[i] = 0; batch[i] = 1
			:: else
			fi
		};
next:
		atomic { ls = 0; lk = 0; first = 0 }
	}
	rcu_unlock();
#ifndef BUG
	synchronize_rcu();
#endif
	/* tally__table_reclaim_free() */
	for (i : 0 .. NS - 1) {
		if
		:: batch[i] ->
			st[i] = 0;
			dstat[i] = FREE
		:: else
		fi
	}
	check_end()
}

init
{
	atomic {
		dstat[0] = LIVE; dkey[0] = KB; st[0] = 1;
		run hitter(0, KB, KA);
		run hitter(1, KA, 0);
		run reclaimer(2)
	}
}
