/* Clocks and deadlines (clock.h). */
#include "core/clock.h"
#include "core/atomics.h"
#include "tally.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static uint64_t clock_base_real, clock_base_mono;
/* Written only at load and by tally__clock_restart(), with no reader running. */
static int clock_source;

static uint64_t read_clock(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * TALLY__NS_PER_S + (uint64_t)ts.tv_nsec;
}

uint64_t tally__clock_ref_ns(uint64_t mono_ns)
{
    return clock_base_real + (mono_ns - clock_base_mono);
}

#if defined(__x86_64__)

#define CLOCK_PERIOD_NS    (UINT64_C(1) << 28)   /* a line: ~268 ms */
#define CLOCK_FIRST_NS     TALLY__NS_PER_MS      /* the first line; each next one twice as long */
#define CLOCK_CALIBRATE_NS UINT64_C(20000)       /* the first rate, measured over this at load */
#define CLOCK_WAIT_NS      UINT64_C(20000)       /* see clock_advance() */

/*
 * One parameter set: two consecutive lines of the chain (clock.h) and the
 * counter range they cover. Line a runs from a_tsc to b_tsc, line b from
 * b_tsc to hi; a reader clamps the counter into [a_tsc, hi], so a set only
 * ever yields values of its own lines. Each next set starts with the line the
 * one before ended with, and both bounds only grow from set to set.
 *
 * Why no call returns less than one before it, in the same thread or in
 * another one ordered after it: every set is a piece of one chain C,
 * nondecreasing in the counter, and a reader of set g returns
 * C(clamp(tsc, a_tsc_g, hi_g)). The later call reads a gen no older (its load
 * of gen comes after whatever ordered it), and a counter no smaller (rdtscp
 * waits for those loads, and the kernel keeps "tsc" as its clocksource only
 * while the CPUs' counters agree); both bounds grow with gen. A reader held
 * up between its set and its counter is thus safe, however long it sleeps:
 * the next line never starts before hi, where the old set stops.
 */
struct clock_set {
    _Atomic uint64_t a_tsc, a_ns, a_mult;
    _Atomic uint64_t b_tsc, b_ns, b_mult;
    _Atomic uint64_t hi;
    _Atomic uint64_t trig;   /* from here on, readers fix the next line */
};

/*
 * The sets are a latch: an index into two sets, not a seqlock. The current
 * set is set[gen & 1]; the next is written into the other one and then named
 * by gen + 1. Readers therefore never wait for a writer that is half done
 * (a preempted writer stalls nobody); a reader retries only when gen moved
 * while it read, which happens once a line.
 */
static struct {
    _Alignas(64) _Atomic uint64_t gen;
    _Alignas(64) struct clock_set set[2];
} clk;

_Static_assert(sizeof(struct clock_set) == 64, "a set fills one cache line");

/* The writer's own state, behind busy. */
static struct {
    _Alignas(64) atomic_bool busy;
    uint64_t tsc, ref;       /* the last sample */
    uint64_t rate;           /* ns per tick << TALLY__CLOCK_SHIFT, between the last two samples */
    uint64_t period, period_max;
} anchor;

struct clock_view {
    uint64_t a_tsc, a_ns, a_mult, b_tsc, b_ns, b_mult, hi, trig;
};

/* rdtscp waits until every earlier load has its value: the counter is read
   after the set, and after whatever ordered this call after another thread's.
   "memory": the compiler keeps it there too. */
static inline uint64_t tsc_read(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtscp" : "=a"(lo), "=d"(hi) : : "rcx", "memory");
    return (uint64_t)hi << 32 | lo;
}

static inline uint64_t scale(uint64_t ticks, uint64_t mult)
{
    return (uint64_t)(((unsigned __int128)ticks * mult) >> TALLY__CLOCK_SHIFT);
}

static inline uint64_t view_at(const struct clock_view *v, uint64_t tsc)
{
    if (tsc < v->b_tsc)
        return v->a_ns + scale(tsc > v->a_tsc ? tsc - v->a_tsc : 0, v->a_mult);
    return v->b_ns + scale((tsc < v->hi ? tsc : v->hi) - v->b_tsc, v->b_mult);
}

/* acquire: pairs with the release stores in clock_publish(); a value of the
   writer that reuses @s brings along the store of gen that retired it */
static inline void set_load(struct clock_set *s, struct clock_view *v)
{
    v->a_tsc = atomic_load_explicit(&s->a_tsc, memory_order_acquire);
    v->a_ns = atomic_load_explicit(&s->a_ns, memory_order_acquire);
    v->a_mult = atomic_load_explicit(&s->a_mult, memory_order_acquire);
    v->b_tsc = atomic_load_explicit(&s->b_tsc, memory_order_acquire);
    v->b_ns = atomic_load_explicit(&s->b_ns, memory_order_acquire);
    v->b_mult = atomic_load_explicit(&s->b_mult, memory_order_acquire);
    v->hi = atomic_load_explicit(&s->hi, memory_order_acquire);
    v->trig = atomic_load_explicit(&s->trig, memory_order_acquire);
}

/* A set and a counter read after it, into @v, @tsc and @gen. False when gen
   moved meanwhile: the set may then be part old, part new. */
static inline bool view_read(struct clock_view *v, uint64_t *tsc, uint64_t *gen)
{
    /* acquire: pairs with the release store of gen in clock_publish(), so
       the set it names is complete */
    uint64_t g = atomic_load_explicit(&clk.gen, memory_order_acquire);
    set_load(&clk.set[g & 1], v);
    *tsc = tsc_read();
    *gen = g;
    /* relaxed: the acquire loads of set_load() keep it after them */
    return atomic_load_explicit(&clk.gen, memory_order_relaxed) == g;
}

/* Writer only (busy held, or no reader yet): @v becomes set gen + 1. */
static void clock_publish(uint64_t gen, const struct clock_view *v)
{
    struct clock_set *s = &clk.set[(gen + 1) & 1];
    /* release: pairs with the acquire loads of set_load(); they carry the
       store of gen that retired this set to a reader still on it */
    atomic_store_explicit(&s->a_tsc, v->a_tsc, memory_order_release);
    atomic_store_explicit(&s->a_ns, v->a_ns, memory_order_release);
    atomic_store_explicit(&s->a_mult, v->a_mult, memory_order_release);
    atomic_store_explicit(&s->b_tsc, v->b_tsc, memory_order_release);
    atomic_store_explicit(&s->b_ns, v->b_ns, memory_order_release);
    atomic_store_explicit(&s->b_mult, v->b_mult, memory_order_release);
    atomic_store_explicit(&s->hi, v->hi, memory_order_release);
    atomic_store_explicit(&s->trig, v->trig, memory_order_release);
    /* release: pairs with the first acquire load of gen in view_read() */
    atomic_store_explicit(&clk.gen, gen + 1, memory_order_release);
}

/* A (tsc, reference) pair from the tightest of a few brackets: a bracket a
   preemption widened says little about when the reference was read. */
static void clock_sample(uint64_t *tsc, uint64_t *ref)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < 4; i++) {
        uint64_t t0 = tsc_read();
        uint64_t m = tally__mono_ns();
        uint64_t t1 = tsc_read();
        if (t1 - t0 < best) {
            best = t1 - t0;
            *tsc = t0 + best / 2;
            *ref = tally__clock_ref_ns(m);
        }
    }
}

static uint64_t ticks_of(uint64_t ns, uint64_t rate)
{
    unsigned __int128 t = ((unsigned __int128)ns << TALLY__CLOCK_SHIFT) / rate;
    return t ? (uint64_t)t : 1;
}

/* A new sample measures the rate since the last one. */
static void anchor_take(uint64_t tsc, uint64_t ref)
{
    if (tsc > anchor.tsc && ref > anchor.ref)
        anchor.rate = (uint64_t)(((unsigned __int128)(ref - anchor.ref) << TALLY__CLOCK_SHIFT) /
                                 (tsc - anchor.tsc));
    anchor.tsc = tsc;
    anchor.ref = ref;
}

/*
 * Fix the line after set @g (@v), busy held. It starts at v->hi at the value
 * set g gives there, so no reader of set g got more than it gives; it ends one
 * period on, from v->hi or from now if the clock sat idle past v->hi (readers
 * meanwhile were held at v->hi), aimed at where the reference will be then.
 * Its slope stays within half and twice the measured rate: a large error is
 * taken out over several lines, and the clock always moves forward.
 */
static void clock_reanchor(uint64_t g, const struct clock_view *v)
{
    uint64_t tsc, ref;
    clock_sample(&tsc, &ref);
    anchor_take(tsc, ref);
    uint64_t rate = anchor.rate;
    anchor.period = anchor.period * 2 < anchor.period_max ? anchor.period * 2 : anchor.period_max;
    uint64_t len = ticks_of(anchor.period, rate);

    uint64_t start = v->hi, start_ns = view_at(v, v->hi);
    uint64_t end = (tsc > start ? tsc : start) + len;
    uint64_t target = ref + scale(end - tsc, rate);
    unsigned __int128 m = target > start_ns
        ? ((unsigned __int128)(target - start_ns) << TALLY__CLOCK_SHIFT) / (end - start) : 0;
    if (m < rate / 2)
        m = rate / 2;
    if (m > (unsigned __int128)rate * 2)
        m = (unsigned __int128)rate * 2;

    struct clock_view n = {
        .a_tsc = v->b_tsc, .a_ns = v->b_ns, .a_mult = v->b_mult,
        .b_tsc = start, .b_ns = start_ns, .b_mult = (uint64_t)m,
        .hi = end, .trig = end - len / 2,
    };
    clock_publish(g, &n);
}

/*
 * A reader at or past trig of set @g. It fixes the next line if no other
 * thread is doing so. Past hi its value would be held at hi; then it waits,
 * CLOCK_WAIT_NS at most, for the set that covers its counter. Returns true
 * when a newer set is there to read again.
 */
static __attribute__((noinline, cold)) bool clock_advance(uint64_t g, uint64_t tsc,
                                                          const struct clock_view *v)
{
    bool held = tsc > v->hi;
    if (!atomic_load_explicit(&anchor.busy, memory_order_relaxed) &&
        /* acquire: pairs with the release store below by the last writer:
           its sample and its gen are seen */
        !atomic_exchange_explicit(&anchor.busy, true, memory_order_acquire)) {
        /* a set newer than @g may have come out since @v was read */
        if (atomic_load_explicit(&clk.gen, memory_order_relaxed) == g)
            clock_reanchor(g, v);
        /* release: pairs with the acquire exchange above by the next writer */
        atomic_store_explicit(&anchor.busy, false, memory_order_release);
        return held;
    }
    if (!held)
        return false;
    /* The writer is between its sample and its publish, normally well under
       a microsecond; if it was preempted there, the clock is held at hi
       rather than stopping this caller. */
    uint64_t wait = ticks_of(CLOCK_WAIT_NS, v->b_mult);
    while (atomic_load_explicit(&clk.gen, memory_order_relaxed) == g && tsc_read() - tsc < wait)
        _mm_pause();
    return atomic_load_explicit(&clk.gen, memory_order_relaxed) != g;
}

/* Past trig, or gen moved: a fresh set and counter, the fast path's reading
   dropped so that nothing of it lives across a call there. */
static __attribute__((noinline, cold)) uint64_t tsc_now_slow(void)
{
    for (;;) {
        struct clock_view v;
        uint64_t tsc, g;
        if (view_read(&v, &tsc, &g) && (tsc < v.trig || !clock_advance(g, tsc, &v)))
            return view_at(&v, tsc);
    }
}

static inline uint64_t tsc_now(void)
{
    struct clock_view v;
    uint64_t tsc, g;
    if (TALLY__LIKELY(view_read(&v, &tsc, &g) && tsc < v.trig))
        return view_at(&v, tsc);
    return tsc_now_slow();
}

/* Set 0 of a fresh clock: one line from a sample, at a rate measured over
   CLOCK_CALIBRATE_NS. */
static void tsc_start(uint64_t period_ns)
{
    uint64_t t0, r0, tsc, ref;
    clock_sample(&t0, &r0);
    do
        clock_sample(&tsc, &ref);
    while (ref - r0 < CLOCK_CALIBRATE_NS || tsc <= t0);
    anchor.tsc = t0;
    anchor.ref = r0;
    anchor_take(tsc, ref);
    anchor.period_max = period_ns;
    anchor.period = CLOCK_FIRST_NS < period_ns ? CLOCK_FIRST_NS : period_ns;
    uint64_t len = ticks_of(anchor.period, anchor.rate);
    struct clock_view n = {
        .a_tsc = tsc, .a_ns = ref, .a_mult = anchor.rate,
        .b_tsc = tsc, .b_ns = ref, .b_mult = anchor.rate,
        .hi = tsc + len, .trig = tsc + len / 2,
    };
    clock_publish(atomic_load_explicit(&clk.gen, memory_order_relaxed), &n);
}

static bool has_words(const char *line, const char *const *words, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(words[i]);
        const char *p = line;
        bool found = false;
        while (!found && (p = strstr(p, words[i])) != NULL) {
            found = (p == line || p[-1] == ' ' || p[-1] == '\t') &&
                    (p[len] == ' ' || p[len] == '\n' || p[len] == '\0');
            p += len;
        }
        if (!found)
            return false;
    }
    return true;
}

/* The kernel's word on the counter: invariant, ordered reads, and still its
   own clocksource (it switches away when it finds the CPUs out of step). */
static bool tsc_usable(void)
{
    static const char *const flags[] = { "constant_tsc", "nonstop_tsc", "rdtscp" };
    bool ok = false;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char *line = NULL;
        size_t cap = 0;
        while (getline(&line, &cap, f) > 0) {
            if (strncmp(line, "flags", 5) == 0) {
                ok = has_words(line, flags, sizeof(flags) / sizeof(flags[0]));
                break;
            }
        }
        free(line);
        fclose(f);
    }
    if (!ok)
        return false;
    char cs[32] = "";
    f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (!f)
        return false;
    ok = fgets(cs, sizeof(cs), f) && strcmp(cs, "tsc\n") == 0;
    fclose(f);
    return ok;
}

#endif /* __x86_64__ */

static void clock_start(uint64_t period_ns)
{
    clock_base_real = read_clock(CLOCK_REALTIME);
    clock_base_mono = read_clock(CLOCK_MONOTONIC);
    clock_source = TALLY__CLOCK_GETTIME;
#if defined(__x86_64__)
    const char *env = getenv("TALLY_CLOCK");
    if ((!env || strcmp(env, "gettime") != 0) && tsc_usable()) {
        tsc_start(period_ns ? period_ns : CLOCK_PERIOD_NS);
        clock_source = TALLY__CLOCK_TSC;
    }
#else
    (void)period_ns;
#endif
}

__attribute__((constructor)) static void clock_init(void)
{
    clock_start(0);
}

void tally__clock_restart(uint64_t period_ns)
{
    clock_start(period_ns);
}

int tally__clock_source(void)
{
    return clock_source;
}

uint64_t tally__clock_anchors(void)
{
#if defined(__x86_64__)
    return atomic_load_explicit(&clk.gen, memory_order_relaxed);
#else
    return 0;
#endif
}

uint64_t tally__clock_set_at(unsigned back, uint64_t tsc, uint64_t *lo, uint64_t *hi)
{
#if defined(__x86_64__)
    struct clock_view v;
    /* acquire: pairs with the release store of gen in clock_publish() */
    set_load(&clk.set[(atomic_load_explicit(&clk.gen, memory_order_acquire) - back) & 1], &v);
    *lo = v.a_tsc;
    *hi = v.hi;
    return view_at(&v, tsc);
#else
    (void)back, (void)tsc;
    *lo = *hi = 0;
    return 0;
#endif
}

uint64_t tally_now_ns(void)
{
#if defined(__x86_64__)
    if (TALLY__LIKELY(clock_source == TALLY__CLOCK_TSC))
        return tsc_now();
#endif
    return tally__clock_ref_ns(read_clock(CLOCK_MONOTONIC));
}

uint64_t tally__mono_ns(void)
{
    return read_clock(CLOCK_MONOTONIC);
}

struct timespec tally__deadline(uint64_t timeout_ns)
{
    uint64_t now = tally__mono_ns();
    uint64_t t = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
    return (struct timespec){ .tv_sec = (time_t)(t / TALLY__NS_PER_S),
                              .tv_nsec = (long)(t % TALLY__NS_PER_S) };
}

int tally__cond_init_mono(pthread_cond_t *c)
{
    pthread_condattr_t a;
    int rc = pthread_condattr_init(&a);
    if (rc)
        return rc;
    rc = pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    if (!rc)
        rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc;
}
