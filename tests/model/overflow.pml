/*
 * overflow.pml: the group overflow counts of the key table and the probes
 * that stop on them (guarantee 1 of src/engine/table.c: pass_groups(),
 * ends_probe(), ends_probe_seq_cst(), tally__table_find_fast(),
 * tally__table_acquire(), resolve(), tally__table_reclaim_free()).
 *
 * A table of NS = 4 slots in NG = 2 groups of GS = 2; the probe window is
 * the whole table and wraps. ovf[g] counts the claims, not yet made FREE
 * again, that passed group g: a claimant adds one to every group from its
 * home's group to the one before its slot's, before its claim CAS, and takes
 * them back if the CAS fails; the reclaim that frees a slot takes them back
 * (home from the key it took) before it publishes FREE. A probe that ends a
 * group whose count is 0 stops there: acquire's scan then looks for its key
 * no further, but goes on for a slot to claim.
 *
 * Keys A, B, C, E have their home at slot 0, key D at slot 2 (group 1).
 * init picks one layout:
 *   L1  0 LIVE B, 1 DEAD E, 2 and 3 EMPTY; ovf = {0, 0}. A twin can claim
 *       slot 2 (group 1) while slot 1 is DEAD or ZOMBIE; once the reclaim
 *       frees slot 1, a FREE slot stands in group 0 in front of that claim,
 *       and the other twin's scan must go past it.
 *   L2  0 LIVE B, 1 DEAD D (wrapped from its home 2), 2 FREE, 3 DEAD C;
 *       ovf = {1, 1}, C's count and D's, which the reclaim takes back
 *       while a claim of A in slot 2 is being counted in ovf[0].
 * A digest word is {status, key}; a digest load, with what the thread
 * decides from it, is one step, and so is each load, add and subtract of a
 * count. take_dead()'s load and CAS are one step: only the reclaim moves a
 * DEAD slot. Memory is sequentially consistent: the seq_cst adds of
 * pass_groups(), the claim CAS and the seq_cst loads of the resolution scan
 * are what that stands for; the relaxed subtracts are ordered by the failed
 * claim CAS before them, or by the grace period before them and the release
 * of FREE after; the acquire loads of ends_probe() are taken as seq_cst.
 * The claim CAS here stands for the claim of the code, the control byte's
 * CAS and the digest CAS after it, and an EMPTY slot for an EMPTY byte;
 * probes read slot by slot (ctrl.pml models the bytes and the group reads).
 * The capacity reservation and the kill of a LIVE slot are left out
 * (reserve.pml, slot.pml): a slot dies here only as a lost claim. A twin
 * that finds no EMPTY or FREE slot in the window (in L2, while R holds
 * slots 1 and 3) gets TALLY_EFULL, as tally__table_acquire() returns.
 *
 * Processes:
 *   A1, A2  insert the same new key A (twins): tally__table_acquire(), each
 *           in one RCU read-side section: claim the first EMPTY or FREE
 *           slot, resolve the claim as in slot.pml, help a PENDING twin met;
 *   F       looks A up once (tally__table_find_fast());
 *   R       one reclaim pass: takes every DEAD slot it sees (-> ZOMBIE),
 *           waits for a grace period, then takes back each key's counts and
 *           marks the slot FREE.
 *
 * Asserted:
 *   - never two LIVE slots of A (checked at each promotion);
 *   - a lookup that stops at the end of a group whose count is 0, or at an
 *     EMPTY slot, finds A LIVE in no later slot of the window (checked in
 *     the step that reads the count or the slot);
 *   - at the end, ovf[g] is the number of slots, neither EMPTY nor FREE,
 *     whose claim passed group g (none leaked or lost), no slot is ZOMBIE,
 *     exactly one slot of A is LIVE, and each twin got it or TALLY_EFULL.
 * Twins:
 *   BUG         the claimant adds its counts after its claim CAS: a twin
 *               that meets the claim promotes it before they are added, and
 *               the reclaim of C's slot takes ovf[0] to 0 under a LIVE A in
 *               group 1, which a lookup then misses.
 *   BUG_NODEC   a failed claim CAS keeps its counts: they leak. (A reclaim
 *               that takes the counts back after publishing FREE is no bug
 *               to seed: a count too high only makes probes longer.)
 */
#define NS      4
#define GS      2              /* TALLY__GROUP */
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
#define KD 4
#define KE 5

#define HOME(k)  ((k) == KD -> 2 : 0)
#define GROUP(i) ((i) / GS)

byte dstat[NS];                /* digest word: status */
byte dkey[NS];                 /* digest word: key, 0 when EMPTY, FREE, ZOMBIE */
byte ovf[NG];

bit  rin[2];                   /* twin inside a read-side section */
bit  gpw[2];                   /* the grace period in progress waits for this twin */

/* ghost */
byte got[2];                   /* each twin's result: its slot, or EFULL */
byte finished;

#define IS_LIVE(i, k) (dstat[i] == LIVE && dkey[i] == (k))
#define NLIVE_K(k) \
	((IS_LIVE(0, k) -> 1 : 0) + (IS_LIVE(1, k) -> 1 : 0) \
	 + (IS_LIVE(2, k) -> 1 : 0) + (IS_LIVE(3, k) -> 1 : 0))
/* A LIVE in a slot of the window after position i (home slot 0) */
#define LIVE_AFTER(i) \
	(i < 1 && IS_LIVE(1, KA) || i < 2 && IS_LIVE(2, KA) || i < 3 && IS_LIVE(3, KA))
/* the claim of slot s of a key with home group h passed group g */
#define PASSES(h, s, g) (((g) + NG - (h)) % NG < (GROUP(s) + NG - (h)) % NG)

inline rcu_lock()   { rin[me] = 1 }
inline rcu_unlock() { atomic { rin[me] = 0; gpw[me] = 0 } }

/* Wait for every twin that is inside a section now to leave it. */
inline synchronize_rcu()
{
	atomic { gpw[0] = rin[0]; gpw[1] = rin[1] };
	(gpw[0] == 0 && gpw[1] == 0)
}

/* pass_groups(): one add (or subtract) per group from k's home's to slot i's */
inline pass_up(i, k)
{
	g = GROUP(HOME(k));
	do
	:: g != GROUP(i) -> atomic { ovf[g]++; g = (g + 1) % NG }
	:: else -> break
	od;
	g = 0
}

inline pass_down(i, k)
{
	g = GROUP(HOME(k));
	do
	:: g != GROUP(i) -> atomic { ovf[g]--; g = (g + 1) % NG }
	:: else -> break
	od;
	g = 0
}

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

/*
 * tally__table_find_fast() (and tally__table_find(), the same steps) from
 * home slot 0: s = the LIVE slot of k, or NONE. A stop asserts that no LIVE
 * slot of A lies past it.
 */
inline lookup(k)
{
	s = NONE; i = 0;
	do
	:: i < NS ->
		atomic {
			if
			:: IS_LIVE(i, k) -> s = i; break
			:: dstat[i] == EMPTY -> assert(!LIVE_AFTER(i)); break
			:: else
			fi
		};
		/* ends_probe() */
		atomic {
			if
			:: i % GS == GS - 1 && ovf[GROUP(i)] == 0 ->
				assert(!LIVE_AFTER(i));
				break
			:: else -> i++
			fi
		}
	:: else -> break
	od;
	i = 0
}

/* resolve(): the claim at me_k of key k; result: a LIVE slot of k, or NONE (scan again) */
inline resolve(k)
{
	j = 0;
res_again:
	do
	:: j < NS ->
		if
		:: j != me_k ->
			atomic {
				if
				:: dstat[j] == EMPTY -> break  /* a later twin will see our claim */
				:: else -> ls = (dkey[j] == k -> dstat[j] : 0)
				fi
			};
			if
			:: ls == LIVE ->
				ls = 0;
				kill_pending(me_k, k, ok);
				atomic { ok = 0; result = j; j = 0 };
				goto res_done
			:: ls == PENDING && j < me_k ->
				ls = 0;
				kill_pending(me_k, k, ok);
				atomic { ok = 0; me_k = j; j = 0 };
				goto res_again
			:: ls == PENDING && j > me_k ->
				ls = 0;
				kill_pending(j, k, ok);
				if
				:: !ok -> j = 0; goto res_again    /* promoted or killed meanwhile */
				:: else -> ok = 0
				fi
			:: else -> ls = 0
			fi
		:: else
		fi;
		/* ends_probe_seq_cst(): a later twin will see our claim */
		if
		:: j % GS == GS - 1 && ovf[GROUP(j)] == 0 -> break
		:: else -> j++
		fi
	:: else -> break
	od;
	atomic {
		j = 0; ls = 0; ok = 0;
		if
		:: dstat[me_k] == PENDING && dkey[me_k] == k ->
			dstat[me_k] = LIVE;
			assert(NLIVE_K(k) == 1);
			result = me_k
		:: else ->
			result = NONE
		fi
	};
	if
	:: result == NONE ->
		/* another thread promoted or killed the claim meanwhile */
		result = (IS_LIVE(me_k, k) -> me_k : NONE)
	:: else
	fi;
res_done:
	skip
}

/* tally__table_acquire() from home slot 0: s = the LIVE slot of k, or EFULL */
inline acquire(k)
{
	s = NONE;
acq_again:
	free_k = NONE; free_st = 0; me_k = NONE; absent = 0; result = 0; i = 0;
	do
	:: i < NS ->
		atomic {
			if
			:: dstat[i] == EMPTY || dstat[i] == FREE ->
				if
				:: free_k == NONE -> free_k = i; free_st = dstat[i]
				:: else
				fi;
				if
				:: dstat[i] == EMPTY -> break   /* nothing of ours past here */
				:: else
				fi
			:: !absent && IS_LIVE(i, k) ->
				s = i;
				goto acq_done
			:: !absent && dstat[i] == PENDING && dkey[i] == k ->
				me_k = i;                   /* help the claim we met */
				break
			:: else
			fi
		};
		/* ends_probe(): the key is in no later slot */
		atomic {
			if
			:: !absent && i % GS == GS - 1 -> absent = (ovf[GROUP(i)] == 0)
			:: else
			fi;
			if
			:: absent && free_k != NONE -> break
			:: else -> i++
			fi
		}
	:: else -> break
	od;
	if
	:: me_k != NONE
	:: me_k == NONE && free_k == NONE ->
		/* a twin may have gone LIVE since our scan passed it */
		lookup(k);
		if
		:: s == NONE -> s = EFULL
		:: else
		fi;
		goto acq_done
	:: else ->
#ifndef BUG
		pass_up(free_k, k);             /* counted before the claim can be seen */
#endif
		atomic {
			if
			:: dstat[free_k] == free_st && dkey[free_k] == 0 ->
				dstat[free_k] = PENDING; dkey[free_k] = k; ok = 1
			:: else -> ok = 0
			fi
		};
		if
		:: !ok ->
#ifndef BUG
#ifndef BUG_NODEC
			pass_down(free_k, k);
#endif
#endif
			goto acq_again
		:: else -> ok = 0
		fi;
#ifdef BUG
		pass_up(free_k, k);
#endif
		me_k = free_k
	fi;
	atomic { free_k = 0; free_st = 0; absent = 0; i = 0 };
	resolve(k);
	if
	:: result == NONE -> goto acq_again     /* lost a race: scan again */
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
			for (g : 0 .. NG - 1) {
				n = 0;
				for (i : 0 .. NS - 1) {
					assert(dstat[i] != ZOMBIE);
					n = n + ((dstat[i] != EMPTY && dstat[i] != FREE
					          && PASSES(GROUP(HOME(dkey[i])), i, g)) -> 1 : 0)
				}
				assert(ovf[g] == n)
			}
			assert(NLIVE_K(KA) == 1);
			assert(got[0] == EFULL || IS_LIVE(got[0], KA));
			assert(got[1] == EFULL || IS_LIVE(got[1], KA))
		:: else
		fi
	}
}

proctype twin(byte me)
{
	byte i, j, g, n, s, me_k, free_k, free_st, result, ls;
	bit ok, absent;

	rcu_lock();
	acquire(KA);
	atomic {
		got[me] = s;
		rcu_unlock();
		/* dead locals, cleared to keep the state space small */
		i = 0; s = 0; me_k = 0; free_k = 0; free_st = 0; result = 0; absent = 0
	};
	check_end()
}

proctype finder()
{
	byte i, g, n, s;

	lookup(KA);
	s = 0;
	check_end()
}

proctype reclaimer()
{
	byte i, g, n;
	byte took[NS];             /* the key of each slot taken, 0 if none */

	for (i : 0 .. NS - 1) {
		/* consider(), take_dead(): DEAD -> ZOMBIE, owned by this reclaim */
		atomic {
			if
			:: dstat[i] == DEAD -> took[i] = dkey[i]; dstat[i] = ZOMBIE; dkey[i] = 0
			:: else
			fi
		}
	}
	synchronize_rcu();
	/* tally__table_reclaim_free() */
	for (i : 0 .. NS - 1) {
		if
		:: took[i] != 0 ->
			pass_down(i, took[i]);
			atomic { dstat[i] = FREE; took[i] = 0 }
		:: else
		fi
	}
	check_end()
}

init
{
	atomic {
		dstat[0] = LIVE; dkey[0] = KB;
		if
		:: dstat[1] = DEAD; dkey[1] = KE
		:: dstat[1] = DEAD; dkey[1] = KD; ovf[1] = 1;
		   dstat[2] = FREE; dstat[3] = DEAD; dkey[3] = KC; ovf[0] = 1
		fi;
		run twin(0);
		run twin(1);
		run finder();
		run reclaimer()
	}
}
