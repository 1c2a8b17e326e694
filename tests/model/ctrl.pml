/*
 * ctrl.pml: the control bytes of the key table and the probes that read
 * them (guarantee 8 of src/engine/table.c: ctrl_claim(), ctrl_set(),
 * ctrl_group() in tally__table_find_fast(), tally__table_find(),
 * tally__table_acquire(), resolve(), kill_pending(), tally__table_reclaim_free()).
 *
 * A table of NS = 4 slots in NG = 2 groups of GS = 2, one probe window from
 * group 0, the home group of every key. Each slot has a control byte ctrl[i]
 * (a key's tag, CEMPTY, CFREE or CDEAD) and a digest word {status, key}. A
 * probe reads a group's bytes in one step (a group of the code is two 64-bit
 * loads; a group here is one of them), then the digest of each slot whose
 * byte is its key's tag, one step each, in slot order; it stops after a
 * group that holds an EMPTY byte. Keys A and B have distinct tags; slot 0
 * starts DEAD (key E, byte CDEAD), slot 1 LIVE (key C), the others EMPTY. Memory is sequentially
 * consistent: the byte words are read and written by seq_cst atomics and
 * the digest by seq_cst loads and full-barrier CASes. The overflow counts
 * (overflow.pml) and the capacity reservation (reserve.pml) are left out:
 * the window is the whole table, and a probe that finds no slot to claim
 * looks the key up once more and returns TALLY_EFULL.
 *
 * Processes, each in one RCU read-side section:
 *   A1, A2  insert the same new key A (twins), B inserts key B:
 *           tally__table_acquire(): scan for the key and a claimable byte
 *           (any one of the first group where it reads one: the code takes
 *           the key's preferred slot or the first), help a PENDING claim of
 *           the key met; claim: the
 *           byte's CAS to the tag, then the digest CAS to PENDING (asserted
 *           to succeed), then resolve() as in slot.pml: a lost claim is
 *           killed (digest CAS to DEAD, then the byte to CDEAD);
 *   R       one reclaim pass: takes every DEAD slot it sees (-> ZOMBIE),
 *           waits for a grace period, then stores FREE in the digest and
 *           then moves the byte from CDEAD to CFREE.
 * A byte write that moves a byte "from" a value (ctrl_set()) is an XOR of
 * the word with from ^ to, as in the code, and asserts that the byte held
 * "from".
 *
 * Asserted:
 *   - whenever a probe reads a byte, a slot whose digest is PENDING(k) or
 *     LIVE(k) has the byte TAG(k);
 *   - a probe that reads an EMPTY byte in a group finds no PENDING or LIVE
 *     slot of its key in a later group (checked in the step that reads it);
 *   - never two LIVE slots of one key (checked at each promotion); the
 *     digest CAS after a won byte CAS finds the digest the byte said;
 *   - at the end no slot is ZOMBIE, exactly one slot of A is LIVE, held by
 *     each twin that did not get EFULL, and B holds its LIVE slot or EFULL.
 * Twins:
 *   BUG           the reclaim moves the byte to CFREE before it stores FREE
 *                 in the digest: a claim that wins the byte then finds the
 *                 digest still ZOMBIE (in the code the slot would be lost:
 *                 a tag over a FREE digest, never claimable again).
 *   BUG_STORE     the tag is stored, not CASed, before the digest CAS, and
 *                 the digest CAS alone claims: B's store can land on A's
 *                 claim and hide it from A's twin.
 *   BUG_DEADFIRST kill_pending() writes CDEAD before its digest CAS, which
 *                 may fail because the claim went LIVE meanwhile: a LIVE
 *                 slot behind a DEAD byte, and a second LIVE slot of A.
 *   BUG_FREESTOP  a FREE byte ends a probe as an EMPTY one does (one value
 *                 for both, as in tables without overflow counts): A's
 *                 twin misses A's claim past a slot freed under it.
 */
#define NS      4
#define GS      2
#define NG      2
#define NONE    255
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
#define KE 4

/* control bytes: a tag is 0x00-0x7f */
#define CEMPTY  128
#define CFREE   129
#define CDEAD   130
#define TAG(k)  (10 + (k))
#define CLAIMABLE(c) ((c) == CEMPTY || (c) == CFREE)

byte ctrl[NS];
byte dstat[NS];                /* digest word: status */
byte dkey[NS];                 /* digest word: key, 0 when EMPTY, FREE, ZOMBIE */

bit  rin[3];                   /* claimant inside a read-side section */
bit  gpw[3];                   /* the grace period in progress waits for it */

/* ghost */
byte got[3];                   /* each claimant's result: its slot, or EFULL */
byte finished;

#define HELD(i, k) ((dstat[i] == PENDING || dstat[i] == LIVE) && dkey[i] == (k))
#define IS_LIVE(i, k) (dstat[i] == LIVE && dkey[i] == (k))
#define NLIVE_K(k) \
	((IS_LIVE(0, k) -> 1 : 0) + (IS_LIVE(1, k) -> 1 : 0) \
	 + (IS_LIVE(2, k) -> 1 : 0) + (IS_LIVE(3, k) -> 1 : 0))
/* the byte of a slot holding a claim or a key is that key's tag */
#define TAGGED(i) (!(dstat[i] == PENDING || dstat[i] == LIVE) || ctrl[i] == TAG(dkey[i]))
/* a PENDING or LIVE slot of k in a group after group g */
#define HELD_PAST(g, k) ((g) == 0 && (HELD(2, k) || HELD(3, k)))

inline rcu_lock()   { rin[me] = 1 }
inline rcu_unlock() { atomic { rin[me] = 0; gpw[me] = 0 } }

inline synchronize_rcu()
{
	atomic { gpw[0] = rin[0]; gpw[1] = rin[1]; gpw[2] = rin[2] };
	(gpw[0] == 0 && gpw[1] == 0 && gpw[2] == 0)
}

/* ctrl_set(): the byte holds from; XOR it with from ^ to */
inline ctrl_set(i, from, to)
{
	atomic {
		assert(ctrl[i] == from);
		ctrl[i] = ctrl[i] ^ (from ^ to)
	}
}

/*
 * ctrl_group(): read group g's bytes into c0, c1 (e: the first EMPTY
 * byte's slot, or NONE), asserting what a probe of key k relies on.
 */
inline read_group(g, k)
{
	atomic {
		c0 = ctrl[g * GS]; c1 = ctrl[g * GS + 1];
		assert(TAGGED(g * GS) && TAGGED(g * GS + 1));
#ifdef BUG_FREESTOP
		e = (CLAIMABLE(c0) -> g * GS : (CLAIMABLE(c1) -> g * GS + 1 : NONE));
#else
		e = (c0 == CEMPTY -> g * GS : (c1 == CEMPTY -> g * GS + 1 : NONE));
#endif
		assert(e == NONE || !HELD_PAST(g, k))
	}
}

/* kill_pending(): CAS PENDING(k) -> DEAD(k), then the byte */
inline kill_pending(i, k, ok)
{
#ifdef BUG_DEADFIRST
	atomic { ctrl[i] = CDEAD };
#endif
	atomic {
		if
		:: dstat[i] == PENDING && dkey[i] == k -> dstat[i] = DEAD; ok = 1
		:: else -> ok = 0
		fi
	};
#ifndef BUG_DEADFIRST
	if
	:: ok -> ctrl_set(i, TAG(k), CDEAD)
	:: else
	fi
#endif
}

/* tally__table_find(): s = the LIVE slot of k, or NONE */
inline lookup(k)
{
	s = NONE; g = 0;
	do
	:: g < NG ->
		read_group(g, k);
		for (i : g * GS .. g * GS + GS - 1) {
			if
			:: s == NONE && (i == g * GS -> c0 : c1) == TAG(k) ->
				atomic { s = (IS_LIVE(i, k) -> i : NONE) }
			:: else
			fi
		}
		if
		:: s != NONE || e != NONE -> break
		:: else -> g++
		fi
	:: else -> break
	od;
	atomic { g = 0; i = 0; c0 = 0; c1 = 0; e = 0 }
}

/* resolve(): the claim at me_k of key k; result: a LIVE slot of k, or NONE (scan again) */
inline resolve(k)
{
	g = 0;
res_again:
	g = 0;
	do
	:: g < NG ->
		read_group(g, k);
		i = g * GS;
		do
		:: i < g * GS + GS ->
			if
			:: i != me_k && (i == g * GS -> c0 : c1) == TAG(k) ->
				atomic { ls = (dkey[i] == k -> dstat[i] : 0) };
				if
				:: ls == LIVE ->
					ls = 0;
					kill_pending(me_k, k, ok);
					atomic { ok = 0; result = i; g = 0; i = 0; c0 = 0; c1 = 0; e = 0 };
					goto res_done
				:: ls == PENDING && i < me_k ->
					ls = 0;
					kill_pending(me_k, k, ok);
					atomic { ok = 0; me_k = i };
					goto res_again
				:: ls == PENDING && i > me_k ->
					ls = 0;
					kill_pending(i, k, ok);
					if
					:: !ok -> goto res_again       /* promoted or killed meanwhile */
					:: else -> ok = 0
					fi
				:: else -> ls = 0
				fi
			:: else
			fi;
			i++
		:: else -> break
		od;
		if
		:: e != NONE -> break                  /* a later twin will see our claim */
		:: else -> g++
		fi
	:: else -> break
	od;
	atomic {
		g = 0; i = 0; c0 = 0; c1 = 0; e = 0;
		if
		:: dstat[me_k] == PENDING && dkey[me_k] == k ->
			dstat[me_k] = LIVE;
			assert(NLIVE_K(k) == 1);
			result = me_k
		:: else ->
			result = (IS_LIVE(me_k, k) -> me_k : NONE)
		fi
	};
res_done:
	skip
}

/* tally__table_acquire(): s = the LIVE slot of k, or EFULL */
inline acquire(k)
{
	s = NONE;
acq_again:
	atomic { free_k = NONE; me_k = NONE; result = 0; g = 0 };
	do
	:: g < NG ->
		read_group(g, k);
		i = g * GS;
		do
		:: i < g * GS + GS ->
			if
			:: (i == g * GS -> c0 : c1) == TAG(k) ->
				atomic {
					if
					:: IS_LIVE(i, k) -> s = i
					:: dstat[i] == PENDING && dkey[i] == k -> me_k = i
					:: else
					fi
				}
			:: else
			fi;
			if
			:: s != NONE -> goto acq_done
			:: me_k != NONE -> break             /* help the claim we met */
			:: free_k == NONE && CLAIMABLE(i == g * GS -> c0 : c1) -> free_k = i
			/* or another claimable byte of that group (the key's preferred slot) */
			:: free_k != NONE && free_k / GS == g && CLAIMABLE(i == g * GS -> c0 : c1) -> free_k = i
			:: free_k != NONE && free_k / GS == g && CLAIMABLE(i == g * GS -> c0 : c1)
			:: else
			fi;
			i++
		:: else -> break
		od;
		if
		:: me_k != NONE || e != NONE -> break    /* nothing of ours past an EMPTY byte */
		:: else -> g++
		fi
	:: else -> break
	od;
	atomic { g = 0; i = 0; c0 = 0; c1 = 0; e = 0 };
	if
	:: me_k != NONE
	:: me_k == NONE && free_k == NONE ->
		lookup(k);                           /* a twin may have gone LIVE since */
		s = (s == NONE -> EFULL : s);
		goto acq_done
	:: else ->
#ifdef BUG_STORE
		/* the tag stored, then the digest CAS alone claims the slot */
		atomic { ctrl[free_k] = TAG(k) };
		atomic {
			if
			:: dstat[free_k] == EMPTY || dstat[free_k] == FREE ->
				dstat[free_k] = PENDING; dkey[free_k] = k; ok = 1
			:: else -> ok = 0
			fi
		};
		if
		:: !ok -> goto acq_again
		:: else -> ok = 0
		fi;
#else
		/* ctrl_claim(): the byte's CAS from EMPTY or FREE to the tag */
		atomic {
			if
			:: CLAIMABLE(ctrl[free_k]) -> was = ctrl[free_k]; ctrl[free_k] = TAG(k)
			:: else -> was = 0
			fi
		};
		if
		:: was == 0 -> goto acq_again        /* another claim took it */
		:: else
		fi;
		/* the digest CAS, which cannot fail */
		atomic {
			assert(dstat[free_k] == (was == CEMPTY -> EMPTY : FREE) && dkey[free_k] == 0);
			dstat[free_k] = PENDING; dkey[free_k] = k; was = 0
		};
#endif
		me_k = free_k
	fi;
	free_k = 0;
	resolve(k);
	if
	:: result == NONE -> goto acq_again      /* lost a race: scan again */
	:: else -> s = result
	fi;
acq_done:
	skip
}

inline check_end()
{
	atomic {
		finished++;
		if
		:: finished == 4 ->
			for (i : 0 .. NS - 1) {
				assert(dstat[i] != ZOMBIE)
			}
			assert(NLIVE_K(KA) == 1);
			assert(got[0] == EFULL || IS_LIVE(got[0], KA));
			assert(got[1] == EFULL || IS_LIVE(got[1], KA));
			assert(got[2] == EFULL || IS_LIVE(got[2], KB) && NLIVE_K(KB) == 1)
		:: else
		fi
	}
}

proctype claimant(byte me; byte k)
{
	byte i, g, e, c0, c1, s, me_k, free_k, was, result, ls;
	bit ok;

	rcu_lock();
	acquire(k);
	atomic {
		got[me] = s;
		rcu_unlock();
		/* dead locals, cleared to keep the state space small */
		s = 0; me_k = 0; free_k = 0; result = 0
	};
	check_end()
}

proctype reclaimer()
{
	byte i;
	bit took[NS];              /* the slots taken */

	for (i : 0 .. NS - 1) {
		/* consider(), take_dead(): DEAD -> ZOMBIE, owned by this reclaim */
		atomic {
			if
			:: dstat[i] == DEAD -> took[i] = 1; dstat[i] = ZOMBIE; dkey[i] = 0
			:: else
			fi
		}
	}
	synchronize_rcu();
	/* tally__table_reclaim_free(): the digest, then the byte */
	for (i : 0 .. NS - 1) {
		if
		:: took[i] ->
#ifdef BUG
			ctrl_set(i, CDEAD, CFREE);
			atomic { dstat[i] = FREE };
#else
			atomic { dstat[i] = FREE };
			ctrl_set(i, CDEAD, CFREE);
#endif
			took[i] = 0
		:: else
		fi
	}
	check_end()
}

init
{
	atomic {
		ctrl[0] = CDEAD; dstat[0] = DEAD; dkey[0] = KE;
		ctrl[1] = TAG(KC); dstat[1] = LIVE; dkey[1] = KC;
		ctrl[2] = CEMPTY; ctrl[3] = CEMPTY;
		run claimant(0, KA);
		run claimant(1, KA);
		run claimant(2, KB);
		run reclaimer()
	}
}
