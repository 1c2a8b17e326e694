/*
 * reserve.pml: the capacity reservation of a claim's promotion, and the
 * decision that the table is full (reserve(), resolve() and
 * tally__table_acquire() of src/engine/table.c).
 *
 * The word res packs two counts that one atomic step reads or changes
 * together: live, the reservations (LIVE slots, and reservations held by
 * threads that are promoting a claim), and holders, the threads holding a
 * reservation whose outcome they do not know yet. reserve() is one CAS:
 * {live + 1, holders + 1} if live < cap, else it fails, deciding from the
 * word it saw. A promotion CAS PENDING -> LIVE is followed by one atomic add,
 * {holders - 1} if it succeeded, {live - 1, holders - 1} if it failed. A
 * failed reserve() that saw holders > 0 met a transient reservation: the
 * thread looks at its claim again (LIVE: done; killed: scan again) and
 * retries. One that saw holders == 0 saw live count only LIVE slots: the
 * table is full, the thread kills its claim and returns TALLY_EFULL. Before
 * it claims, acquire() decides the same way from one load of res: with
 * live >= cap it scans again while holders > 0, else looks for its key once
 * more (tally__table_find(): a twin may have gone LIVE behind its scan) and
 * returns TALLY_EFULL; so does a window with no EMPTY or FREE slot.
 *
 * A table of NS = 3 slots, one probe window, home slot 0. init picks one of:
 * slot 0 LIVE with key B and cap = 2, so that one reservation is left and
 * the inserters race for it; or slot 0 ZOMBIE, made FREE by init at any
 * moment (the reclaim's free after its grace period), and cap = 1 or 2: a
 * twin can then claim slot 0 after the other's scan passed it, so twins
 * meet at two slots and the resolution scan kills one claim, which may hold
 * a reservation, and with cap = 2 both twins can hold one while C needs
 * one. Slots 1 and 2 start EMPTY. A digest word is {status, key}; a digest
 * load is one step (seq_cst, like the CAS and the adds on res). No LIVE slot
 * dies (slot.pml models kills and reclaim), so the LIVE slots never become
 * fewer.
 *
 * Processes: A1 and A2 insert the same new key A (twins), C inserts key C.
 * Each scans the window: a LIVE slot of its key: done; a PENDING one: resolve
 * it (help); else claim the first EMPTY or FREE slot and resolve the claim.
 *
 * Asserted:
 *   - never more than cap LIVE slots, never two LIVE slots of one key
 *     (checked at each promotion);
 *   - a thread decides the table is full only when cap slots are LIVE,
 *     counted in the step that decides it, and returns TALLY_EFULL only
 *     while no LIVE slot holds its key;
 *   - at the end, each thread that did not get TALLY_EFULL holds the one
 *     LIVE slot of its key, and if one did, cap slots are LIVE; live is the
 *     number of LIVE slots, holders is 0.
 * Twins:
 *   BUG        no holders count: a thread whose reserve() fails retries TURNS
 *              times, then takes the table for full; a reservation about to
 *              be promoted, or given back by a twin that lost the promotion,
 *              makes it return TALLY_EFULL with a slot to spare.
 *   BUG_EARLY  holders drops before the promotion CAS: a thread that sees
 *              holders == 0 takes for LIVE a reservation still in flight.
 */
#define NS      3
#define NONE    255            /* no slot; from resolve(): lost, scan again */
#define EFULL   254

#define EMPTY   0
#define FREE    1
#define ZOMBIE  2
#define PENDING 3
#define LIVE    4
#define DEAD    5

#define KA 1
#define KB 2
#define KC 3

byte dstat[NS];                /* digest word: status */
byte dkey[NS];                 /* digest word: key, 0 when EMPTY, FREE, ZOMBIE */
byte live, holders;            /* the word res */
byte cap;                      /* the table's capacity */

/* ghost */
byte pkey[3];                  /* each inserter's key */
byte got[3];                   /* each inserter's result: its slot, or EFULL */
byte finished;

#define IS_LIVE(i, k) (dstat[i] == LIVE && dkey[i] == (k))
#define NLIVE \
	((dstat[0] == LIVE -> 1 : 0) + (dstat[1] == LIVE -> 1 : 0) + (dstat[2] == LIVE -> 1 : 0))
#define NLIVE_K(k) \
	((IS_LIVE(0, k) -> 1 : 0) + (IS_LIVE(1, k) -> 1 : 0) + (IS_LIVE(2, k) -> 1 : 0))

/* whether a failed reserve(), or acquire()'s load of res, finds the table full */
#ifdef BUG
#define TURNS 1
#define SEEN_FULL (tries == TURNS)
#define TURN tries++
#else
#define SEEN_FULL (holders == 0)
#define TURN skip
#endif

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

/* After the claim moved on without us: its LIVE slot, or NONE if killed */
inline outcome(k)
{
	load_digest(me_k);
	result = ((ls == LIVE && lk == k) -> me_k : NONE)
}

/* resolve(): the claim at position me_k of key k; result: a LIVE slot of k,
   NONE (lost: scan again) or EFULL */
inline resolve(k)
{
	j = 0;
res_again:
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
res_reserve:
	atomic {
		/* dead locals, cleared to keep the state space small */
		i = 0; j = 0; free_k = 0; free_st = 0; ls = 0; lk = 0; ok = 0;
		if
		:: live < cap ->
			live++; holders++; rsv = 1; nocap = 0
		:: else ->
			rsv = 0;
			nocap = SEEN_FULL;
			assert(!nocap || NLIVE == cap)
		fi
	};
	if
	:: rsv ->
#ifdef BUG_EARLY
		holders--;
#endif
		atomic {
			if
			:: dstat[me_k] == PENDING && dkey[me_k] == k ->
				dstat[me_k] = LIVE; ok = 1;
				assert(NLIVE <= cap && NLIVE_K(k) == 1)
			:: else -> ok = 0
			fi
		};
		if
		:: ok ->
#ifndef BUG_EARLY
			holders--;
#endif
			result = me_k
		:: else ->
#ifdef BUG_EARLY
			live--;
#else
			atomic { live--; holders-- };
#endif
			outcome(k)
		fi
	:: !rsv && !nocap ->
		/* a reservation in flight may be our claim's, or may be given back */
		load_digest(me_k);
		if
		:: ls == PENDING && lk == k -> TURN; goto res_reserve
		:: else -> result = ((ls == LIVE && lk == k) -> me_k : NONE)
		fi
	:: !rsv && nocap ->
		atomic {
			if
			:: dstat[me_k] == PENDING && dkey[me_k] == k ->
				dstat[me_k] = DEAD;
				assert(NLIVE_K(k) == 0);
				result = EFULL
			:: else -> result = NONE
			fi
		};
		if
		:: result == NONE -> outcome(k)   /* a helper promoted or killed it */
		:: else
		fi
	fi;
res_done:
	skip
}

/* tally__table_acquire(): s = the LIVE slot of k, or EFULL */
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
			:: ls == EMPTY -> break          /* nothing of ours past here */
			:: else -> i++
			fi
		:: ls == LIVE && lk == k -> s = i; goto acq_done
		:: ls == PENDING && lk == k -> me_k = i; break
		:: else -> i++
		fi
	:: else -> break
	od;
	if
	:: me_k != NONE                           /* help the claim we met */
	:: me_k == NONE && free_k == NONE ->
		/* three slots hold the three keys: only a full table has none left */
		assert(NLIVE == cap);
		goto acq_find
	:: else ->
		atomic {
			if
			:: live >= cap && !SEEN_FULL -> TURN; goto acq_again
			:: live >= cap && SEEN_FULL ->
				assert(NLIVE == cap);
				goto acq_find
			:: else
			fi
		};
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
	:: result == NONE -> goto acq_again       /* lost a race: scan again */
	:: else -> s = result; goto acq_done
	fi;
acq_find:
	/* tally__table_find(); with cap slots LIVE, none turns LIVE behind it */
	i = 0;
	do
	:: i < NS ->
		load_digest(i);
		if
		:: ls == EMPTY -> break
		:: ls == LIVE && lk == k -> s = i; goto acq_done
		:: else -> i++
		fi
	:: else -> break
	od;
	assert(NLIVE_K(k) == 0);
	s = EFULL;
acq_done:
	skip
}

inline check_end()
{
	atomic {
		finished++;
		if
		:: finished == 3 ->
			assert(live == NLIVE && holders == 0);
			for (i : 0 .. 2) {
				assert(got[i] == EFULL && NLIVE == cap
				    || got[i] != EFULL && IS_LIVE(got[i], pkey[i])
				       && NLIVE_K(pkey[i]) == 1)
			}
		:: else
		fi
	}
}

proctype inserter(byte me; byte k)
{
	byte i, j, s, me_k, free_k, free_st, result, ls, lk;
#ifdef BUG
	byte tries;
#endif
	bit ok, rsv, nocap;

	acquire(k);
	atomic {
		got[me] = s;
		/* dead locals, cleared to keep the state space small */
		i = 0; j = 0; s = 0; me_k = 0; free_k = 0; free_st = 0; result = 0;
		ls = 0; lk = 0; ok = 0; rsv = 0; nocap = 0
	};
	check_end()
}

init
{
	atomic {
		if
		:: dstat[0] = LIVE; dkey[0] = KB; live = 1; cap = 2
		:: dstat[0] = ZOMBIE; cap = 1
		:: dstat[0] = ZOMBIE; cap = 2
		fi;
		pkey[0] = KA; pkey[1] = KA; pkey[2] = KC;
		run inserter(0, KA);
		run inserter(1, KA);
		run inserter(2, KC)
	};
	if
	:: dstat[0] == ZOMBIE ->
		dstat[0] = FREE        /* tally__table_reclaim_free(): its grace period ended */
	:: else
	fi
}
