/*
 * epoch.pml: grace periods in shared memory across processes that may die
 * at any instruction (src/core/epoch.c, guarantees 1, 2 and 4 of
 * src/core/epoch.h).
 *
 * Two reader slots. Readers R1 and R2 each take a slot (a CAS of owner from
 * 0), announce the epoch they read from now, read the shared pointer and
 * use the node it names, then end the section and give the slot back. R1
 * may be killed at any moment (SIGKILL: it stops where it is, its slot
 * still owned, perhaps mid-section). R3 comes later and, when no slot is
 * free, recovers one whose owner died before taking it, as
 * tally__epoch_reader_get's second pass does. The writer unlinks node 1
 * (ptr = 2), waits for a grace period (advance now; for each slot, wait
 * until its epoch is 0 or not older than the new epoch, recovering it if
 * its owner died), then frees node 1. Promela's interleavings are
 * sequentially consistent: the fences of guarantee 1 are what make the C
 * code behave so.
 *
 * Asserted: no reader uses node 1 after it was freed; a reader's announced
 * epoch stays its own until it ends its section (nobody else writes it);
 * the writer always finishes (a wait blocked for ever on a dead reader is
 * an invalid end state).
 * Twins:
 *   BUG          the wait skips a slot whose epoch is one before the new
 *                one: a section begun just before the advance is not waited for.
 *   BUG_ORDER    a reader reads the pointer before it announces its epoch.
 *   BUG_RECOVER  recovery is not claimed by a CAS of owner: it checks that
 *                the owner died, then clears the slot, while another
 *                recoverer has already freed it and a new reader taken it.
 */
#define NSLOT 2
#define RECOVERING 9

byte now = 1;
byte ptr = 1;
bit  freed1;
byte epoch[NSLOT];
byte owner[NSLOT];          /* 0 free, RECOVERING, else the reader's id */
bit  dead[4];               /* dead[id]: that reader was killed */

/* Give back slot s if its owner o died; claimed by one CAS (guarantee 4). */
inline recover(s, o, ok)
{
	ok = 0;
#ifdef BUG_RECOVER
	o = owner[s];
	if
	:: o != 0 && o != RECOVERING && dead[o] ->
		epoch[s] = 0;
		owner[s] = 0;
		ok = 1
	:: else
	fi
#else
	atomic {
		o = owner[s];
		if
		:: o != 0 && o != RECOVERING && dead[o] -> owner[s] = RECOVERING; ok = 1
		:: else
		fi
	};
	if
	:: ok -> epoch[s] = 0; owner[s] = 0
	:: else
	fi
#endif
}

/* A CAS of owner[i] from 0 to id: slot s taken, or s unchanged. */
inline take(i, id, s)
{
	if
	:: atomic { s == NSLOT && owner[i] == 0 -> owner[i] = id; s = i }
	:: else
	fi
}

/*
 * A reader. R1 may be killed at any instruction: each of its steps runs
 * only while alive[id], checked in the same atomic step, and a killed
 * reader stops (goes to done) with whatever it owns. R3 (may_recover), when
 * no slot is free, recovers one whose owner died, then takes it.
 */
bit alive[4] = 1;

#define STEP(x)  atomic { if :: !alive[id] -> goto done :: else -> x fi }

proctype reader(byte id; bit may_recover)
{
	byte s = NSLOT, i, o, e, p;
	bit ok;

	for (i : 0 .. NSLOT - 1) {
		STEP(take(i, id, s))
	}
	if
	:: s == NSLOT && may_recover ->
		for (i : 0 .. NSLOT - 1) {
			if
			:: s == NSLOT ->
				recover(i, o, ok);
				take(i, id, s)
			:: else
			fi
		}
	:: else
	fi;
	if
	:: s == NSLOT -> goto done
	:: else
	fi;
#ifdef BUG_ORDER
	STEP(p = ptr);
	STEP(e = now);
	STEP(epoch[s] = e);
#else
	STEP(e = now);
	STEP(epoch[s] = e);
	STEP(p = ptr);
#endif
	STEP(assert(!(p == 1 && freed1)));   /* the node it uses is not freed */
	STEP(assert(epoch[s] == e));         /* its announcement is its own */
	STEP(epoch[s] = 0);
	STEP(owner[s] = 0);
done:
	skip
}

proctype killer(byte id)
{
	if
	:: atomic { alive[id] = 0; dead[id] = 1 }
	:: skip
	fi
}

proctype writer()
{
	byte g, i, o;
	bit ok;

	ptr = 2;
	atomic { now = now + 1; g = now };
	for (i : 0 .. NSLOT - 1) {
		do
#ifdef BUG
		:: epoch[i] == 0 || epoch[i] + 1 >= g -> break
#else
		:: epoch[i] == 0 || epoch[i] >= g -> break
#endif
		:: else ->
			recover(i, o, ok);
			if
			:: ok -> break
			:: else
			fi
		od
	}
	freed1 = 1
}

init
{
	atomic {
		run reader(1, 0);
		run killer(1);
		run reader(2, 0);
		run reader(3, 1);
		run writer()
	}
}
