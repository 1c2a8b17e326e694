/*
 * window.pml: the CAS loop of apply() (src/engine/hit.c) running step_window()
 * (src/engine/algo-step.h) on a fixed window of MAX 2: three hits on one key, each
 * at time 1 or 2 with cost 1 or 2; the key is new, or its window 1 is
 * already full and marked.
 *
 * The state is {mark | used, start}: w0 holds the exceeded mark (bit 63) and
 * the cost used in the window, w1 the window start; {0, 0} is empty. Time is
 * counted in periods, so a window is its start, 1 or 2. A hit reads w0 and w1
 * with two loads (tally__state_load), computes the step, and stores it with a
 * 16-byte CAS from exactly the pair it read. A step that changes nothing
 * (a denial in a window already marked) returns without a CAS; the model
 * decides it only from a pair that held at one instant (a 16-byte load equal
 * to the pair read). apply() decides it from the two loads as they are,
 * which is twin BUG_TORN.
 *
 * Asserted:
 *   - per window, the admitted cost is at most MAX;
 *   - every admitted cost is in the window's used exactly once
 *     (the used the window had when the state left it, or has at the end);
 *   - a hit is denied only when its cost does not fit the window's used;
 *   - a window that denied a hit has exactly one first_exceeded.
 * Twins:
 *   BUG       the CAS compares w0 only: a stale step rolls the window back
 *             over a newer one and an increment is lost.
 *   BUG_TORN  a step that changes nothing is trusted without checking that
 *             w0 and w1 held together: w0 of a full, marked window paired
 *             with w1 of the window that replaced it denies a hit that fits.
 */
#define MAX 2

byte used;                 /* w0: cost used in the window */
bit  mark;                 /* w0 bit 63: exceeded in this window */
byte start;                /* w1: window start, 0 when empty */

/* ghost state, indexed by window */
byte admitted[3];          /* cost admitted in the window */
byte closed[3];            /* used of the window when the state left it */
byte firsts[3];            /* calls that got first_exceeded */
bit  denied[3];            /* some call was denied */
byte finished;

#ifdef BUG
#define SAME_W1(s) true
#else
#define SAME_W1(s) (start == (s))
#endif

init
{
	atomic {
		/* a new key, or one whose window 1 earlier hits filled and marked,
		   so that a denial that changes nothing races the roll-over to 2 */
		if
		:: skip
		:: used = MAX; mark = 1; start = 1;
		   admitted[1] = MAX; firsts[1] = 1; denied[1] = 1
		fi;
		run hitter(); run hitter(); run hitter()
	}
}

proctype hitter()
{
	byte now, cost, cu, cs, t, s, u, nu;
	bit cm, m, fits, first, changed;

	if
	:: now = 1
	:: now = 2
	fi;
	if
	:: cost = 1
	:: cost = 2
	fi;
retry:
	atomic { cu = used; cm = mark }            /* load w0 */
	cs = start;                                /* load w1 */
	d_step {
		/* step_window(): time never runs backwards in a key */
		t = ((cs != 0 && now < cs) -> cs : now);
		if
		:: (cu != 0 || cm != 0 || cs != 0) && t == cs ->
			s = cs; u = cu; m = cm
		:: else ->
			s = t; u = 0; m = 0
		fi;
		fits = (u + cost <= MAX);
		nu = (fits -> u + cost : u);
		first = (!fits && !m);
		changed = (nu != u || first)
	}
	if
	:: changed ->
		atomic {
			if
			:: used == cu && mark == cm && SAME_W1(cs) ->
				if
				:: start != 0 && start != s -> closed[start] = used
				:: else
				fi;
				used = nu; mark = m | first; start = s;
				admitted[s] = admitted[s] + nu - u;
				denied[s] = denied[s] | !fits;
				if
				:: first ->
					firsts[s]++;
					assert(firsts[s] == 1)
				:: else
				fi
			:: else ->
				goto retry
			fi
		}
	:: else ->
		atomic {
#ifdef BUG_TORN
			if
			:: true ->
#else
			if
			:: used == cu && mark == cm && start == cs ->
#endif
				/* denied, the window already marked: is there truly no room? */
				assert(admitted[s] + cost > MAX);
				denied[s] = 1
			:: else ->
				goto retry
			fi
		}
	fi;

	atomic {
		finished++;
		if
		:: finished == 3 ->
			closed[start] = used;
			assert(admitted[1] <= MAX && admitted[2] <= MAX);
			assert(closed[1] == admitted[1] && closed[2] == admitted[2]);
			assert(firsts[1] == denied[1] && firsts[2] == denied[2])
		:: else
		fi
	}
}
