/*
 * Engine behaviour through the public API, single-threaded: decisions,
 * several limits, shadow mode, counting rejected hits, first_exceeded,
 * peek, read, reset_if, reclaiming expired slots and refusing when full.
 */
#include "test.h"
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

#include "tally.h"

#define SEC UINT64_C(1000000000)
#define T0  (UINT64_C(1700000000) * SEC)

static tally_engine *open_engine(size_t capacity, bool digest_only)
{
    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = capacity;
    o.digest_only = digest_only;
    cr_assert_eq(tally_open(&o, &e), 0);
    return e;
}

static uint32_t add(tally_engine *e, const char *name, unsigned flags, unsigned n, const tally_limit *l)
{
    tally_policy p = { .name = name, .n_limits = n, .flags = flags };
    memcpy(p.limits, l, n * sizeof(*l));
    uint32_t id;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    return id;
}

static tally_result hit(tally_engine *e, uint32_t pol, const char *key, const uint64_t *costs, uint64_t now)
{
    tally_result r;
    memset(&r, 0xab, sizeof(r));
    cr_assert_eq(tally_hit_at(e, pol, key, strlen(key), costs, now, &r), 0);
    return r;
}

Test(engine, options_defaults)
{
    tally_options o;
    memset(&o, 0x5a, sizeof(o));
    tally_options_init(&o);
    cr_assert_eq(o.capacity, 65536);
    cr_assert_eq(o.max_key_len, 256);
    cr_assert_eq(o.digest_only, false);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(o.hash_key[i], 0);
    tally_engine *e = NULL;
    cr_assert_eq(tally_open(NULL, &e), 0, "NULL options mean the defaults");
    cr_assert_not_null(e);
    tally_close(e);
    tally_close(NULL);
}

Test(engine, strerror_covers_every_code)
{
    cr_assert_str_eq(tally_strerror(0), "success");
    cr_assert_str_eq(tally_strerror(TALLY_EFULL), "no free slot for a new key: every slot holds live state");
    cr_assert_str_eq(tally_strerror(TALLY_ECONFLICT), "state changed since it was observed");
    cr_assert_str_eq(tally_strerror(12345), "unknown error");
    for (int err = TALLY_EOPEN; err <= TALLY_EINVAL; err++)
        cr_assert_str_neq(tally_strerror(err), "unknown error", "code %d", err);
}

Test(engine, now_is_epoch_and_never_goes_back)
{
    uint64_t a = tally_now_ns();
    cr_assert_gt(a, T0, "after 2023");
    for (int i = 0; i < 100000; i++) {
        uint64_t b = tally_now_ns();
        cr_assert_geq(b, a);
        a = b;
    }
}

Test(engine, fixed_window_allows_max_then_denies_until_the_window_ends)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 3, .period_ns = 10 * SEC };
    uint32_t pol = add(e, "fixed", 0, 1, &l);

    for (uint64_t i = 0; i < 3; i++) {
        tally_result r = hit(e, pol, "alice", NULL, T0 + i * SEC);
        cr_assert(r.allowed);
        cr_assert_eq(r.remaining, 2 - i);
        cr_assert_eq(r.reset_after_ns, 10 * SEC - i * SEC);
        cr_assert_eq(r.retry_after_ns, 0);
        cr_assert_eq(r.exceeded, 0);
    }
    tally_result r = hit(e, pol, "alice", NULL, T0 + 4 * SEC);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.exceeded, 1);
    cr_assert_eq(r.first_exceeded, 1);
    cr_assert_eq(r.retry_after_ns, 6 * SEC);
    r = hit(e, pol, "alice", NULL, T0 + 5 * SEC);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.first_exceeded, 0, "first_exceeded only once a window");

    r = hit(e, pol, "bob", NULL, T0 + 5 * SEC);
    cr_assert(r.allowed, "keys are independent");

    r = hit(e, pol, "alice", NULL, T0 + 10 * SEC);
    cr_assert(r.allowed, "a new window opens at the first hit after the last expired");
    cr_assert_eq(r.remaining, 2);
    tally_close(e);
}

Test(engine, weighted_costs_and_saturation)
{
    tally_engine *e = open_engine(64, true);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = SEC };
    uint32_t pol = add(e, "w", TALLY_COUNT_REJECTED, 1, &l);
    uint64_t c = 60;
    tally_result r = hit(e, pol, "k", &c, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 40);
    c = UINT64_MAX;
    r = hit(e, pol, "k", &c, T0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.retry_after_ns, TALLY_NEVER, "a cost above max can never be allowed");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, TALLY_MAX_COUNT, "costs saturate, never wrap");
    r = hit(e, pol, "k", &c, T0);
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, TALLY_MAX_COUNT);
    tally_close(e);
}

Test(engine, several_limits_consume_all_or_none)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l[2] = {
        { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 60 * SEC },      /* requests */
        { .algo = TALLY_FIXED_WINDOW, .max = 1000, .period_ns = 60 * SEC },    /* tokens */
    };
    uint32_t pol = add(e, "llm", 0, 2, l);
    uint64_t costs[2] = { 1, 400 };
    cr_assert(hit(e, pol, "team", costs, T0).allowed);
    cr_assert(hit(e, pol, "team", costs, T0).allowed);
    tally_result r = hit(e, pol, "team", costs, T0);
    cr_assert_not(r.allowed, "800 + 400 tokens exceed 1000");
    cr_assert_eq(r.exceeded, 2, "only the token limit is over");
    cr_assert_eq(r.first_exceeded, 2);
    cr_assert_eq(r.remaining, 8, "smallest remaining across limits: 8 requests, 200 tokens");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "team", 4, &s), 0);
    cr_assert_eq(s.n_limits, 2);
    cr_assert_eq(s.c[0].used, 2, "the denied hit consumed no request either");
    cr_assert_eq(s.c[1].used, 800);
    costs[1] = 200;
    r = hit(e, pol, "team", costs, T0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    tally_close(e);
}

Test(engine, shadow_mode_counts_and_reports_but_never_denies)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = SEC };
    uint32_t pol = add(e, "shadow", TALLY_SHADOW, 1, &l);
    int firsts = 0;
    for (int i = 0; i < 5; i++) {
        tally_result r = hit(e, pol, "k", NULL, T0);
        cr_assert(r.allowed);
        cr_assert_eq(r.retry_after_ns, 0);
        cr_assert_eq(r.exceeded != 0, i >= 2, "hit %d would be denied: %d", i, i >= 2);
        firsts += r.first_exceeded != 0;
    }
    cr_assert_eq(firsts, 1);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 5, "shadow mode counts every hit");
    tally_close(e);
}

Test(engine, rejected_hits_consume_only_when_asked)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 2, .period_ns = SEC };
    uint32_t plain = add(e, "plain", 0, 1, &l);
    uint32_t counting = add(e, "counting", TALLY_COUNT_REJECTED, 1, &l);
    for (int i = 0; i < 5; i++) {
        hit(e, plain, "k", NULL, T0);
        tally_result r = hit(e, counting, "k", NULL, T0);
        cr_assert_eq(r.allowed, i < 2);
    }
    tally_snapshot s;
    cr_assert_eq(tally_read(e, plain, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 2);
    cr_assert_eq(tally_read(e, counting, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 5);
    tally_close(e);
}

Test(engine, peek_consumes_nothing_and_does_not_track)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_GCRA, .max = 2, .period_ns = 2 * SEC };
    uint32_t pol = add(e, "g", 0, 1, &l);
    tally_result r;
    cr_assert_eq(tally_peek_at(e, pol, "new", 3, T0, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 2, "peek reports the room left before the hit");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "new", 3, &s), TALLY_ENOENT, "peek must not insert");
    hit(e, pol, "new", NULL, T0);
    hit(e, pol, "new", NULL, T0);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(tally_peek_at(e, pol, "new", 3, T0, &r), 0);
        cr_assert_not(r.allowed);
        cr_assert_eq(r.first_exceeded, 0);
        cr_assert_eq(r.retry_after_ns, SEC);
    }
    r = hit(e, pol, "new", NULL, T0);
    cr_assert_eq(r.first_exceeded, 1, "peeks did not take the first_exceeded mark");
    tally_close(e);
}

Test(engine, reset_if_resets_only_the_observed_state)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l[2] = {
        { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 60 * SEC },
        { .algo = TALLY_CALENDAR_WINDOW, .max = 1000, .unit = TALLY_DAY },
    };
    uint32_t pol = add(e, "two", 0, 2, l);
    uint64_t costs[2] = { 1, 10 };
    hit(e, pol, "k", costs, T0);
    tally_snapshot seen, again;
    cr_assert_eq(tally_read(e, pol, "k", 1, &seen), 0);
    cr_assert_eq(seen.policy, pol);

    /* a hit on the second limit only lands in between: only limit 0 still matches */
    uint64_t only_tokens[2] = { 0, 5 };
    hit(e, pol, "k", only_tokens, T0 + 1);
    uint32_t mask = 0;
    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &seen, &mask), 0);
    cr_assert_eq(mask, 1, "the reset says which limit it really reset");
    cr_assert_eq(tally_read(e, pol, "k", 1, &again), 0);
    cr_assert_eq(again.c[0].used, 0);
    cr_assert_eq(again.c[1].used, 15, "the increment that landed in between survives");

    cr_assert_eq(tally_reset_if(e, pol, "k", 1, &seen, &mask), TALLY_ECONFLICT);
    cr_assert_eq(mask, 0);
    cr_assert_eq(tally_reset_if(e, pol, "zz", 2, &again, &mask), TALLY_ENOENT);
    tally_close(e);
}

Test(engine, calendar_window_stamps_the_boundary)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_CALENDAR_WINDOW, .max = 5, .unit = TALLY_HOUR, .utc_offset_s = 0 };
    uint32_t pol = add(e, "hourly", 0, 1, &l);
    uint64_t hour = 3600 * SEC, start = (T0 / hour) * hour;
    hit(e, pol, "k", NULL, start + 1234 * SEC);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].window_start_ns, start, "the window starts at the hour, not at the hit");
    tally_result r = hit(e, pol, "k", NULL, start + 1300 * SEC);
    cr_assert_eq(r.reset_after_ns, hour - 1300 * SEC);
    tally_close(e);
}

Test(engine, time_running_backwards_counts_in_the_current_window)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 10 * SEC };
    uint32_t pol = add(e, "f", 0, 1, &l);
    hit(e, pol, "k", NULL, T0 + 100 * SEC);
    tally_result r = hit(e, pol, "k", NULL, T0);        /* 100 s in the past */
    cr_assert(r.allowed);
    cr_assert_eq(r.reset_after_ns, 10 * SEC, "taken as the state's own time");
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "k", 1, &s), 0);
    cr_assert_eq(s.c[0].used, 2);
    cr_assert_eq(s.c[0].window_start_ns, T0 + 100 * SEC);
    tally_close(e);
}

static int fill(tally_engine *e, uint32_t pol, int n, const char *prefix, uint64_t now)
{
    char key[32];
    int ok = 0;
    for (int i = 0; i < n; i++) {
        tally_result r;
        snprintf(key, sizeof(key), "%s-%d", prefix, i);
        ok += tally_hit_at(e, pol, key, strlen(key), NULL, now, &r) == 0;
    }
    return ok;
}

Test(engine, full_table_refuses_new_keys_and_changes_nothing)
{
    tally_engine *e = open_engine(100, true);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 10 * SEC };
    uint32_t pol = add(e, "small", 0, 1, &l);
    cr_assert_eq(fill(e, pol, 100, "a", T0), 100, "capacity keys fit");
    tally_result r;
    cr_assert_eq(tally_hit_at(e, pol, "extra", 5, NULL, T0 + SEC, &r), TALLY_EFULL);
    cr_assert_eq(tally_read(e, pol, "extra", 5, (tally_snapshot[1]){ 0 }), TALLY_ENOENT);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "a-7", 3, &s), 0);
    cr_assert_eq(s.c[0].used, 1, "live keys keep their state");
    /* a known key is still served when the table is full */
    cr_assert_eq(tally_hit_at(e, pol, "a-7", 3, NULL, T0 + SEC, &r), 0);
    tally_close(e);
}

Test(engine, expired_slots_are_reclaimed_for_new_keys)
{
    tally_engine *e = open_engine(100, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 10, .period_ns = 10 * SEC };
    uint32_t pol = add(e, "small", 0, 1, &l);
    cr_assert_eq(fill(e, pol, 100, "old", T0), 100);
    /* every old window has expired ten seconds later: the new keys take their slots */
    cr_assert_eq(fill(e, pol, 100, "new", T0 + 10 * SEC), 100);
    tally_snapshot s;
    cr_assert_eq(tally_read(e, pol, "new-42", 6, &s), 0);
    cr_assert_eq(s.c[0].used, 1);
    int old_left = 0;
    for (int i = 0; i < 100; i++) {
        char key[32];
        snprintf(key, sizeof(key), "old-%d", i);
        old_left += tally_read(e, pol, key, strlen(key), &s) == 0;
    }
    cr_assert_eq(old_left, 0, "capacity is a hard bound: the old keys had to go");
    tally_close(e);
}

Test(engine, digest_only_decides_like_key_mode)
{
    tally_options o;
    tally_engine *a, *b;
    tally_options_init(&o);
    memcpy(o.hash_key, "0123456789abcdef", 16);
    o.digest_only = true;
    cr_assert_eq(tally_open(&o, &a), 0);
    o.digest_only = false;
    cr_assert_eq(tally_open(&o, &b), 0);
    tally_limit l = { .algo = TALLY_SLIDING_WINDOW, .max = 4, .period_ns = SEC };
    uint32_t pa = add(a, "s", 0, 1, &l), pb = add(b, "s", 0, 1, &l);
    for (int i = 0; i < 6; i++) {
        tally_result ra = hit(a, pa, "token-abc", NULL, T0 + (uint64_t)i * SEC / 4);
        tally_result rb = hit(b, pb, "token-abc", NULL, T0 + (uint64_t)i * SEC / 4);
        cr_assert_eq(ra.allowed, rb.allowed);
        cr_assert_eq(ra.remaining, rb.remaining);
    }
    tally_close(a);
    tally_close(b);
}

/* Read (used 3), reset, 3 more hits (used 3 again: the very same state words),
   then a reset from the first snapshot: the hits after the reset must stay. */
static void stale_snapshot_after_reset_conflicts(uint32_t pol, tally_engine *e, uint64_t t)
{
    tally_snapshot first, again;
    uint32_t mask = 0xff;
    for (int i = 0; i < 3; i++)
        hit(e, pol, "aba", NULL, t);
    cr_assert_eq(tally_read(e, pol, "aba", 3, &first), 0);
    cr_assert_eq(first.c[0].used, 3);
    cr_assert_eq(tally_reset_if(e, pol, "aba", 3, &first, &mask), 0);
    cr_assert_eq(mask, 1);
    for (int i = 0; i < 3; i++)
        hit(e, pol, "aba", NULL, t);
    cr_assert_eq(tally_read(e, pol, "aba", 3, &again), 0);
    cr_assert_eq(again.c[0].raw[0], first.c[0].raw[0], "the hits rebuilt the same words");
    cr_assert_eq(again.c[0].raw[1], first.c[0].raw[1]);
    cr_assert_neq(again.generation, first.generation, "but it is another instance");
    mask = 0xff;
    cr_assert_eq(tally_reset_if(e, pol, "aba", 3, &first, &mask), TALLY_ECONFLICT,
                 "a stale snapshot must not reset the hits that came after the reset");
    cr_assert_eq(mask, 0);
    cr_assert_eq(tally_read(e, pol, "aba", 3, &again), 0);
    cr_assert_eq(again.c[0].used, 3);
    cr_assert_eq(tally_reset_if(e, pol, "aba", 3, &again, &mask), 0, "the fresh snapshot resets");
    cr_assert_eq(tally_reset_if(e, pol, "aba", 3, &again, &mask), TALLY_ECONFLICT,
                 "and only once");
}

Test(engine, reset_if_from_a_stale_snapshot_conflicts_calendar)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_CALENDAR_WINDOW, .max = 100, .unit = TALLY_DAY };
    /* calendar windows stamp the boundary: hits at different times rebuild the same words */
    uint32_t pol = add(e, "cal", 0, 1, &l);
    stale_snapshot_after_reset_conflicts(pol, e, T0 + 5 * SEC);
    tally_close(e);
}

Test(engine, reset_if_from_a_stale_snapshot_conflicts_aligned_fixed)
{
    tally_engine *e = open_engine(64, true);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 60 * SEC };
    uint32_t pol = add(e, "fix", TALLY_ALIGNED, 1, &l);
    stale_snapshot_after_reset_conflicts(pol, e, T0 + 7 * SEC);
    tally_close(e);
}

Test(engine, reset_if_from_a_stale_snapshot_conflicts_repeated_time)
{
    tally_engine *e = open_engine(64, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 60 * SEC };
    uint32_t pol = add(e, "rep", 0, 1, &l);
    stale_snapshot_after_reset_conflicts(pol, e, T0);
    tally_close(e);
}

/* The key leaves its slot (reclaimed) and comes back, rebuilt with an old
   time into the same words: a snapshot of the first instance still conflicts. */
Test(engine, reset_if_from_a_snapshot_of_a_reclaimed_slot_conflicts)
{
    tally_engine *e = open_engine(1, false);
    tally_limit l = { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = SEC };
    uint32_t pol = add(e, "gone", 0, 1, &l);
    tally_snapshot old, now;
    hit(e, pol, "k1", NULL, T0);
    cr_assert_eq(tally_read(e, pol, "k1", 2, &old), 0);
    hit(e, pol, "k2", NULL, T0 + 10 * SEC);       /* full: k1 expired and is reclaimed */
    cr_assert_eq(tally_read(e, pol, "k1", 2, &now), TALLY_ENOENT);
    hit(e, pol, "k1", NULL, T0 + 20 * SEC);       /* k2 is reclaimed in turn */
    tally_snapshot mid;
    cr_assert_eq(tally_read(e, pol, "k1", 2, &mid), 0);
    cr_assert_eq(tally_reset_if(e, pol, "k1", 2, &mid, NULL), 0);
    hit(e, pol, "k1", NULL, T0);                  /* an old time: rebuilt {1, T0} */
    cr_assert_eq(tally_read(e, pol, "k1", 2, &now), 0);
    cr_assert_eq(now.c[0].raw[0], old.c[0].raw[0]);
    cr_assert_eq(now.c[0].raw[1], old.c[0].raw[1]);
    cr_assert_eq(tally_reset_if(e, pol, "k1", 2, &old, NULL), TALLY_ECONFLICT);
    cr_assert_eq(tally_read(e, pol, "k1", 2, &now), 0);
    cr_assert_eq(now.c[0].used, 1);
    tally_close(e);
}

/* The flusher thread takes none of the program's signals: a program (an
   nginx worker) whose handler must run on its own thread keeps them. */
static _Atomic pid_t usr1_tid;

static void on_usr1(int sig)
{
    (void)sig;
    atomic_store(&usr1_tid, (pid_t)gettid());
}

Test(engine, the_flusher_thread_takes_none_of_the_programs_signals)
{
    tally_engine *e;
    tally_flusher_options fo;
    struct sigaction sa = { .sa_handler = on_usr1 };
    sigset_t usr1;

    cr_assert_eq(tally_open(NULL, &e), 0);
    tally_flusher_options_init(&fo);
    fo.interval_ms = 10;
    cr_assert_eq(tally_flusher_start(e, &fo), 0);
    sigemptyset(&sa.sa_mask);
    cr_assert_eq(sigaction(SIGUSR1, &sa, NULL), 0);
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    /* only the flusher could take it now */
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    kill(getpid(), SIGUSR1);
    for (int i = 0; i < 20; i++)
        usleep(10000);
    cr_assert_eq(atomic_load(&usr1_tid), 0, "the flusher thread ran the program's handler");
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
    cr_assert_eq(atomic_load(&usr1_tid), (pid_t)gettid());
    tally_flusher_stop(e);
    tally_close(e);
}
