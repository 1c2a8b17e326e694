/*
 * reset.pml: tally_reset_if() conditioned on a snapshot from tally_read()
 * (read_instance() and tally_reset_if() in src/engine/hit.c; table.c
 * guarantee 6): each slot has an instance number `gen` beside its 16-byte
 * state words.
 *
 * The state is abstracted to the used count of one window (0 is EMPTY): a
 * hit CASes it from n to n + 1, so after a reset hits rebuild exactly the bit
 * pattern a snapshot saw before it. gen is even when stable; only resetters
 * write it, one at a time under the policy's reset lock:
 *   lock; g = gen; if g == snap.gen: gen = g | 1; unless snap.st is EMPTY,
 *   CAS state snap.st -> EMPTY; gen = (CAS won) ? a fresh even number from
 *   the table's counter : g; unlock. Otherwise a conflict.
 * read_instance() is a seqlock read: g1 = gen; the state; fence; g2 = gen;
 * done if g1 == g2 and even, else retry; when the tries run out (TRIES here,
 * READ_TRIES in the code) the snapshot carries g1, or g2 | 1 if they differ:
 * an odd gen, from which every reset conflicts.
 *
 * Processes: R1 takes a snapshot, publishes it, and later resets from it;
 * R2 resets from R1's snapshot or from its own; H hits twice. The key starts
 * with one hit in its window.
 * Asserted, at each successful reset: no hit and no other reset happened
 * since the snapshot's state was read (no reset erases a hit it did not
 * see); of two resetters of one snapshot at most one wins; under the lock
 * gen is even; a snapshot with an even gen holds a state of that instance.
 * Twin BUG: reset_if without the instance, a bare CAS on the bit pattern
 * (R2 resets, H rebuilds the pattern, R1's stale reset erases H's hit).
 */
#define TRIES 1            /* retries of the seqlock read */
#define UNNAMED 255        /* ghost: reset, new generation not yet stored */

typedef snap {
	byte g;                /* generation */
	byte st;               /* state */
	byte hits;             /* ghost: hits when the state was read */
	byte resets;           /* ghost: successful resets then */
	byte lg;               /* ghost: generation the state belonged to */
};

byte st = 1;               /* the limit's state word */
byte gen;                  /* the slot's generation word */
byte gen_next = 2;         /* table-wide source of new generations */
bit  reset_lock;

snap s0;                   /* R1's snapshot, shared with R2 */
bit  s0_ready;

/* ghost */
byte hits, resets;
byte lgen;                 /* the generation the state belongs to */

inline take_snapshot(sn)
{
	tries = 0;
again:
	g1 = gen;                                  /* load_acquire */
	atomic { sn.st = st; sn.hits = hits; sn.resets = resets; sn.lg = lgen };
	g2 = gen;                                  /* after a fence */
	if
	:: (g1 == g2 && !(g1 & 1)) || tries == TRIES ->
		sn.g = (g1 == g2 -> g1 : g2 | 1)
	:: else ->
		tries++;
		goto again
	fi;
	assert((sn.g & 1) || sn.g == sn.lg);
	g1 = 0; g2 = 0; tries = 0
}

inline reset_if(sn, won)
{
	atomic { reset_lock == 0 -> reset_lock = 1 };
	won = 0;
#ifdef BUG
	if
	:: sn.st != 0 ->
		atomic {
			if
			:: st == sn.st ->
				assert(hits == sn.hits && resets == sn.resets);
				st = 0; resets++; won = 1
			:: else
			fi
		}
	:: else
	fi;
#else
	g = gen;
	assert((g & 1) == 0);
	if
	:: g == sn.g ->
		gen = g | 1;
		if
		:: sn.st != 0 ->                   /* an empty state has nothing to reset */
			atomic {
				if
				:: st == sn.st ->
					assert(hits == sn.hits && resets == sn.resets);
					st = 0; resets++; lgen = UNNAMED; won = 1
				:: else
				fi
			}
		:: else
		fi;
		if
		:: won ->
			atomic { ng = gen_next; gen_next = gen_next + 2 };  /* tally__table_gen_fresh() */
			atomic { gen = ng; lgen = ng }           /* store release */
		:: else ->
			gen = g
		fi
	:: else
	fi;
	g = 0; ng = 0;
#endif
	reset_lock = 0
}

byte s0_wins;

active proctype R1()
{
	snap sn;
	byte tries, g, g1, g2, ng;
	bit won;

	take_snapshot(sn);
	atomic { s0.g = sn.g; s0.st = sn.st; s0.hits = sn.hits; s0.resets = sn.resets;
	         s0.lg = sn.lg; s0_ready = 1 };
	reset_if(sn, won);
	s0_wins = s0_wins + won;
	assert(s0_wins <= 1)
}

active proctype R2()
{
	snap sn;
	byte tries, g, g1, g2, ng;
	bit won, shared;

	if
	:: atomic { s0_ready -> sn.g = s0.g; sn.st = s0.st; sn.hits = s0.hits;
	            sn.resets = s0.resets; sn.lg = s0.lg; shared = 1 }
	:: take_snapshot(sn)
	fi;
	reset_if(sn, won);
	if
	:: shared ->
		s0_wins = s0_wins + won;
		assert(s0_wins <= 1)
	:: else
	fi
}

active proctype H()
{
	byte n, cur;

	do
	:: n < 2 ->
		cur = st;
		atomic {
			if
			:: st == cur ->
				st = cur + 1; hits++; n++
			:: else
			fi
		}
	:: else ->
		break
	od
}
