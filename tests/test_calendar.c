/*
 * Unit tests of the calendar arithmetic of src/algo.c (tally__calendar_start,
 * tally__calendar_next) and of calendar windows stepped through
 * tally__algo_step.
 *
 * Expected values come from an independent oracle: the C library's timegm()
 * and gmtime_r() on a struct tm holding the *local* wall-clock time, shifted
 * by the UTC offset. No expected instant is a hand-typed number.
 */
#include "test.h"   /* Criterion, or tests/harness.h under TSan */
#include <inttypes.h>
#include <stdint.h>
#include <time.h>

#include "engine/engine-internal.h"

#define NS_PER_S   UINT64_C(1000000000)
#define NS_PER_DAY (UINT64_C(86400) * NS_PER_S)

#define EQ(a, b)                                                                   \
    cr_assert_eq((uint64_t)(a), (uint64_t)(b), "%s = %" PRIu64 ", expected %s = %" PRIu64, \
                 #a, (uint64_t)(a), #b, (uint64_t)(b))

/* UTC offsets (seconds) exercised everywhere: UTC, +02:00, -05:00, +05:45, the
   extreme real zones -12:00 and +14:00, and the accepted bounds +-18:00. */
static const int32_t OFFSETS[] = { 0, 7200, -18000, 20700, -43200, 50400, 64800, -64800 };
#define N_OFFSETS (sizeof OFFSETS / sizeof *OFFSETS)

/* ---- The oracle ---------------------------------------------------------- */

/* The UTC instant (ns) at which local wall-clock time y-mo-d h:mi:s happens at
   offset @off. Out-of-range fields are normalised by timegm (e.g. month 13). */
static uint64_t at(int y, int mo, int d, int h, int mi, int s, int32_t off)
{
    struct tm tm = { 0 };
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    time_t t = timegm(&tm);
    cr_assert_neq(t, (time_t)-1, "timegm failed");
    int64_t utc = (int64_t)t - off;
    cr_assert_geq(utc, 0, "oracle time before the epoch");
    return (uint64_t)utc * NS_PER_S;
}

#define UTC(y, mo, d, h, mi, s) at(y, mo, d, h, mi, s, 0)

/* Local broken-down time of @now at offset @off. */
static struct tm local_tm(uint64_t now, int32_t off)
{
    time_t t = (time_t)((int64_t)(now / NS_PER_S) + off);
    struct tm tm;
    cr_assert_not_null(gmtime_r(&t, &tm));
    return tm;
}

/* Oracle for the start of the unit holding @now, and for the start of the next one. */
static void oracle(tally_calendar_unit unit, int32_t off, uint64_t now, uint64_t *start,
                   uint64_t *next)
{
    struct tm tm = local_tm(now, off);
    int y = tm.tm_year + 1900, mo = tm.tm_mon + 1, d = tm.tm_mday, h = tm.tm_hour,
        mi = tm.tm_min;

    switch (unit) {
    case TALLY_MINUTE:
        *start = at(y, mo, d, h, mi, 0, off);
        *next = at(y, mo, d, h, mi + 1, 0, off);
        break;
    case TALLY_HOUR:
        *start = at(y, mo, d, h, 0, 0, off);
        *next = at(y, mo, d, h + 1, 0, 0, off);
        break;
    case TALLY_DAY:
        *start = at(y, mo, d, 0, 0, 0, off);
        *next = at(y, mo, d + 1, 0, 0, 0, off);
        break;
    case TALLY_WEEK: {
        int back = (tm.tm_wday + 6) % 7;           /* tm_wday: 0 = Sunday; weeks start Monday */
        *start = at(y, mo, d - back, 0, 0, 0, off);
        *next = at(y, mo, d - back + 7, 0, 0, 0, off);
        break;
    }
    default:
        *start = at(y, mo, 1, 0, 0, 0, off);
        *next = at(y, mo + 1, 1, 0, 0, 0, off);
        break;
    }
}

static const char *unit_name(tally_calendar_unit u)
{
    static const char *names[] = { "minute", "hour", "day", "week", "month" };
    return names[u];
}

/* start(now) and next(start) against the oracle, plus the boundary rules. */
static void check(tally_calendar_unit unit, int32_t off, uint64_t now)
{
    uint64_t want_start, want_next;
    oracle(unit, off, now, &want_start, &want_next);
    uint64_t start = tally__calendar_start(unit, off, now);
    uint64_t next = tally__calendar_next(unit, off, start);
    cr_assert_eq(start, want_start, "%s off %d now %" PRIu64 ": start %" PRIu64 ", want %" PRIu64,
                 unit_name(unit), off, now, start, want_start);
    cr_assert_eq(next, want_next, "%s off %d now %" PRIu64 ": next %" PRIu64 ", want %" PRIu64,
                 unit_name(unit), off, now, next, want_next);
    /* next() accepts any time inside the unit, not only its start */
    cr_assert_eq(tally__calendar_next(unit, off, now), want_next, "%s off %d: next(now)",
                 unit_name(unit), off);
    /* a boundary belongs to the unit it opens; 1 ns before it, to the one it closes */
    cr_assert_eq(tally__calendar_start(unit, off, want_next), want_next, "%s off %d: at next",
                 unit_name(unit), off);
    cr_assert_eq(tally__calendar_start(unit, off, want_next - 1), want_start,
                 "%s off %d: next - 1 ns", unit_name(unit), off);
    cr_assert_eq(tally__calendar_start(unit, off, want_start), want_start, "%s off %d: at start",
                 unit_name(unit), off);
    cr_assert_eq(tally__calendar_start(unit, off, want_start - 1) < want_start, true,
                 "%s off %d: start - 1 ns is in the previous unit", unit_name(unit), off);
}

/* ---- Fixed cases of each unit -------------------------------------------- */

/* Minutes: only the offset's sub-minute part could move them; offsets are whole
   minutes here, so boundaries sit on :00 UTC seconds at every offset. */
Test(calendar, minute)
{
    uint64_t now = UTC(2024, 6, 15, 11, 22, 33) + 123456789;
    for (size_t i = 0; i < N_OFFSETS; i++) {
        check(TALLY_MINUTE, OFFSETS[i], now);
        EQ(tally__calendar_start(TALLY_MINUTE, OFFSETS[i], now), UTC(2024, 6, 15, 11, 22, 0));
        EQ(tally__calendar_next(TALLY_MINUTE, OFFSETS[i], now), UTC(2024, 6, 15, 11, 23, 0));
    }
    /* An offset with seconds (accepted: any |offset| <= 18 h) shifts minute boundaries.
       At +00:00:30 local time is 11:23:03, its minute began 11:23:00 local = 11:22:30Z. */
    check(TALLY_MINUTE, 30, now);
    EQ(tally__calendar_start(TALLY_MINUTE, 30, now), UTC(2024, 6, 15, 11, 22, 30));
    /* at -00:00:40 local time is 11:21:53, its minute began 11:21:00 local = 11:21:40Z */
    check(TALLY_MINUTE, -40, now);
    EQ(tally__calendar_start(TALLY_MINUTE, -40, now), UTC(2024, 6, 15, 11, 21, 40));
}

/* Hours: at +05:45 the local hour starts at :15 UTC. */
Test(calendar, hour)
{
    uint64_t now = UTC(2024, 6, 15, 11, 10, 0);
    for (size_t i = 0; i < N_OFFSETS; i++)
        check(TALLY_HOUR, OFFSETS[i], now);
    EQ(tally__calendar_start(TALLY_HOUR, 0, now), UTC(2024, 6, 15, 11, 0, 0));
    EQ(tally__calendar_start(TALLY_HOUR, 20700, now), UTC(2024, 6, 15, 10, 15, 0));
    EQ(tally__calendar_next(TALLY_HOUR, 20700, now), UTC(2024, 6, 15, 11, 15, 0));
}

/* Days: the local date decides, which may be the day before or after the UTC date. */
Test(calendar, day)
{
    uint64_t now = UTC(2024, 6, 15, 11, 0, 0);
    for (size_t i = 0; i < N_OFFSETS; i++)
        check(TALLY_DAY, OFFSETS[i], now);
    /* +14:00: local is already 2024-06-16 01:00; the day began 2024-06-15T10:00Z */
    EQ(tally__calendar_start(TALLY_DAY, 50400, now), UTC(2024, 6, 15, 10, 0, 0));
    EQ(tally__calendar_next(TALLY_DAY, 50400, now), UTC(2024, 6, 16, 10, 0, 0));
    /* -12:00: local is still 2024-06-14 23:00; the day began 2024-06-14T12:00Z */
    EQ(tally__calendar_start(TALLY_DAY, -43200, now), UTC(2024, 6, 14, 12, 0, 0));
    EQ(tally__calendar_next(TALLY_DAY, -43200, now), UTC(2024, 6, 15, 12, 0, 0));
    /* +02:00 */
    EQ(tally__calendar_start(TALLY_DAY, 7200, now), UTC(2024, 6, 14, 22, 0, 0));
}

/* Weeks start on Monday, also when the week spans a month or a year end. */
Test(calendar, week)
{
    /* 2024-06-15 is a Saturday: the week is Mon 2024-06-10 .. Mon 2024-06-17 */
    uint64_t now = UTC(2024, 6, 15, 11, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, 0, now), UTC(2024, 6, 10, 0, 0, 0));
    EQ(tally__calendar_next(TALLY_WEEK, 0, now), UTC(2024, 6, 17, 0, 0, 0));
    /* Tue 2024-12-31: week Mon 2024-12-30 .. Mon 2025-01-06 (crosses the year) */
    now = UTC(2024, 12, 31, 12, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, 0, now), UTC(2024, 12, 30, 0, 0, 0));
    EQ(tally__calendar_next(TALLY_WEEK, 0, now), UTC(2025, 1, 6, 0, 0, 0));
    /* Fri 2024-03-01: week Mon 2024-02-26 .. Mon 2024-03-04 (crosses a leap February) */
    now = UTC(2024, 3, 1, 12, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, 0, now), UTC(2024, 2, 26, 0, 0, 0));
    EQ(tally__calendar_next(TALLY_WEEK, 0, now), UTC(2024, 3, 4, 0, 0, 0));
    /* Monday 00:00 itself opens the week; Sunday 23:59:59.999999999 is the old one */
    uint64_t mon = UTC(2024, 6, 17, 0, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, 0, mon), mon);
    EQ(tally__calendar_start(TALLY_WEEK, 0, mon - 1), UTC(2024, 6, 10, 0, 0, 0));
    /* Sun 2024-06-16 20:00Z is already Monday at +05:45: the local week began then */
    now = UTC(2024, 6, 16, 20, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, 20700, now), at(2024, 6, 17, 0, 0, 0, 20700));
    /* Mon 2024-06-17 03:00Z is still Sunday at -05:00: the previous local week */
    now = UTC(2024, 6, 17, 3, 0, 0);
    EQ(tally__calendar_start(TALLY_WEEK, -18000, now), at(2024, 6, 10, 0, 0, 0, -18000));
    for (size_t i = 0; i < N_OFFSETS; i++) {
        check(TALLY_WEEK, OFFSETS[i], UTC(2024, 12, 31, 12, 0, 0));
        check(TALLY_WEEK, OFFSETS[i], UTC(2024, 3, 1, 12, 0, 0));
        check(TALLY_WEEK, OFFSETS[i], UTC(2024, 6, 17, 3, 0, 0));
    }
}

/* Month lengths, leap years and the year end, at every offset. */
Test(calendar, month_lengths)
{
    static const struct {
        int y, mo, days;
    } months[] = {
        { 2023, 1, 31 },  { 2023, 2, 28 },  { 2024, 2, 29 },  /* 2024: leap */
        { 2100, 2, 28 },  { 2000, 2, 29 },                    /* century rule; 400 rule */
        { 2023, 4, 30 },  { 2023, 12, 31 }, { 2024, 12, 31 },
    };
    for (size_t i = 0; i < sizeof months / sizeof *months; i++) {
        for (size_t j = 0; j < N_OFFSETS; j++) {
            int32_t off = OFFSETS[j];
            uint64_t first = at(months[i].y, months[i].mo, 1, 0, 0, 0, off);
            uint64_t mid = at(months[i].y, months[i].mo, 15, 12, 0, 0, off);
            uint64_t start = tally__calendar_start(TALLY_MONTH, off, mid);
            uint64_t next = tally__calendar_next(TALLY_MONTH, off, start);
            EQ(start, first);
            EQ(next - start, (uint64_t)months[i].days * NS_PER_DAY);
            /* Dec -> Jan 1 of the next year; otherwise the 1st of the next month */
            uint64_t want = months[i].mo == 12 ? at(months[i].y + 1, 1, 1, 0, 0, 0, off)
                                               : at(months[i].y, months[i].mo + 1, 1, 0, 0, 0, off);
            EQ(next, want);
            check(TALLY_MONTH, off, mid);
        }
    }
}

/* A negative offset puts the local date on the previous day: 2024-03-01T03:00Z at
   -05:00 is still 2024-02-29 22:00 local, so the month began 2024-02-01T05:00Z. */
Test(calendar, month_negative_offset_previous_day)
{
    uint64_t now = UTC(2024, 3, 1, 3, 0, 0);
    EQ(tally__calendar_start(TALLY_MONTH, -18000, now), UTC(2024, 2, 1, 5, 0, 0));
    EQ(tally__calendar_next(TALLY_MONTH, -18000, now), UTC(2024, 3, 1, 5, 0, 0));
    /* at UTC it is March already */
    EQ(tally__calendar_start(TALLY_MONTH, 0, now), UTC(2024, 3, 1, 0, 0, 0));
    /* and a positive offset flips the other way: 2024-02-29T22:00Z at +02:00 is March 1 */
    now = UTC(2024, 2, 29, 22, 0, 0);
    EQ(tally__calendar_start(TALLY_MONTH, 7200, now), UTC(2024, 2, 29, 22, 0, 0));
    EQ(tally__calendar_start(TALLY_MONTH, 7200, now - 1), UTC(2024, 1, 31, 22, 0, 0));
    /* the same at the year end: 2025-01-01T04:00Z at -05:00 is still December 2024 */
    now = UTC(2025, 1, 1, 4, 0, 0);
    EQ(tally__calendar_start(TALLY_MONTH, -18000, now), UTC(2024, 12, 1, 5, 0, 0));
    EQ(tally__calendar_next(TALLY_MONTH, -18000, now), UTC(2025, 1, 1, 5, 0, 0));
}

/* Exactly at a boundary the new unit has begun; 1 ns earlier the old one holds. */
Test(calendar, boundary_belongs_to_new_unit)
{
    for (size_t j = 0; j < N_OFFSETS; j++) {
        int32_t off = OFFSETS[j];
        uint64_t b = at(2024, 3, 1, 0, 0, 0, off);   /* a minute, hour, day and month boundary */
        for (tally_calendar_unit u = TALLY_MINUTE; u <= TALLY_MONTH; u++) {
            if (u == TALLY_WEEK)
                continue;                            /* 2024-03-01 is a Friday */
            cr_assert_eq(tally__calendar_start(u, off, b), b, "%s off %d", unit_name(u), off);
            cr_assert_lt(tally__calendar_start(u, off, b - 1), b, "%s off %d", unit_name(u), off);
            cr_assert_eq(tally__calendar_next(u, off, b - 1), b, "%s off %d", unit_name(u), off);
        }
        uint64_t mon = at(2024, 3, 4, 0, 0, 0, off);
        EQ(tally__calendar_start(TALLY_WEEK, off, mon), mon);
        EQ(tally__calendar_start(TALLY_WEEK, off, mon - 1), at(2024, 2, 26, 0, 0, 0, off));
        EQ(tally__calendar_next(TALLY_WEEK, off, mon - 1), mon);
    }
}

/* Random instants from 1971 to 2261 for every unit and offset, against the oracle. */
Test(calendar, random_sweep_against_timegm)
{
    uint64_t lo = UTC(1971, 1, 1, 0, 0, 0), hi = UTC(2261, 12, 1, 0, 0, 0);
    uint64_t x = UINT64_C(0x9e3779b97f4a7c15);
    for (int n = 0; n < 4000; n++) {
        /* splitmix64: a fixed, reproducible sequence */
        uint64_t z = (x += UINT64_C(0x9e3779b97f4a7c15));
        z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
        z ^= z >> 31;
        uint64_t now = lo + z % (hi - lo);
        check((tally_calendar_unit)(n % 5), OFFSETS[(n / 5) % N_OFFSETS], now);
    }
}

/* ---- Calendar windows through tally__algo_step ----------------------------- */

static tally__limit calendar_limit(tally_calendar_unit unit, int32_t off, uint64_t max)
{
    tally_limit spec = { .algo = TALLY_CALENDAR_WINDOW, .max = max, .unit = unit,
                         .utc_offset_s = off };
    tally__limit l;
    cr_assert_eq(tally__limit_compile(&spec, &l), 0);
    return l;
}

static tally__step step(const tally__limit *l, tally__state cur, uint64_t now, uint64_t cost)
{
    tally__step o;
    tally__algo_step(l, cur, now, cost, TALLY__ADD_IF_FITS, NULL, &o);
    return o;
}

/* The window is the calendar unit: window_start is its boundary, not the hit's time. */
Test(calendar, step_window_starts_at_boundary)
{
    const int32_t off = 7200;
    tally__limit l = calendar_limit(TALLY_DAY, off, 3);
    tally__state empty = { 0, 0 };
    uint64_t day1 = at(2024, 6, 15, 0, 0, 0, off), day2 = at(2024, 6, 16, 0, 0, 0, off);
    uint64_t t1 = at(2024, 6, 15, 9, 30, 0, off);

    tally__step o = step(&l, empty, t1, 2);
    cr_assert(o.fits && o.changed);
    EQ(o.next.w1, day1);                            /* the local midnight, not t1 */
    EQ(o.next.w0, 2);
    EQ(o.reset_after_ns, day2 - t1);
    EQ(o.remaining, 1);

    /* the last ns of the day is the same window */
    tally__step same = step(&l, o.next, day2 - 1, 1);
    cr_assert(same.fits);
    EQ(same.next.w1, day1);
    EQ(same.next.w0, 3);
    EQ(same.reset_after_ns, 1);

    /* full: denied until the next boundary */
    tally__step d = step(&l, same.next, day2 - 1, 1);
    cr_assert(!d.fits);
    EQ(d.retry_after_ns, 1);

    /* a hit in the next day opens a new window at that day's boundary */
    uint64_t t2 = at(2024, 6, 16, 17, 0, 0, off);
    tally__step n = step(&l, d.next, t2, 1);
    cr_assert(n.fits && !n.first);
    EQ(n.next.w1, day2);
    EQ(n.next.w0, 1);                               /* fresh count, mark cleared */
    EQ(n.reset_after_ns, at(2024, 6, 17, 0, 0, 0, off) - t2);

    /* a hit several days later opens the window of its own day */
    uint64_t t3 = at(2024, 6, 20, 1, 0, 0, off);
    tally__step m = step(&l, n.next, t3, 1);
    EQ(m.next.w1, at(2024, 6, 20, 0, 0, 0, off));
}

/* Month windows follow the real month length, and a time earlier than the
   window start (clock went back) counts in the stored window. */
Test(calendar, step_window_month)
{
    const int32_t off = -18000;
    tally__limit l = calendar_limit(TALLY_MONTH, off, 10);
    tally__state empty = { 0, 0 };
    uint64_t feb = at(2024, 2, 1, 0, 0, 0, off), mar = at(2024, 3, 1, 0, 0, 0, off);

    tally__step o = step(&l, empty, UTC(2024, 3, 1, 3, 0, 0), 4);   /* still Feb 29 local */
    EQ(o.next.w1, feb);
    EQ(o.reset_after_ns, mar - UTC(2024, 3, 1, 3, 0, 0));

    tally__step n = step(&l, o.next, mar, 1);                        /* March opens */
    EQ(n.next.w1, mar);
    EQ(n.next.w0, 1);

    tally__step back = step(&l, n.next, mar - 1000, 1);             /* clock went back */
    EQ(back.next.w1, mar);
    EQ(back.next.w0, 2);
}

/* Near the epoch a unit may have begun before 1970: start is clamped to 0 and
   never lies after now (local time before the epoch is floored, not truncated). */
Test(calendar, start_clamped_at_epoch)
{
    uint64_t now = 3600 * NS_PER_S;                 /* 1970-01-01T01:00Z = Dec 31 20:00 at -05:00 */
    EQ(tally__calendar_start(TALLY_DAY, -18000, now), 0);
    EQ(tally__calendar_start(TALLY_WEEK, -18000, now), 0);
    EQ(tally__calendar_start(TALLY_MONTH, -18000, now), 0);
    EQ(tally__calendar_start(TALLY_HOUR, -18000, now), now);
    EQ(tally__calendar_start(TALLY_HOUR, -18000 - 1800, now), 1800 * NS_PER_S);
    /* the units computed in days still find the real next boundary */
    EQ(tally__calendar_next(TALLY_MONTH, -18000, 0), UTC(1970, 1, 1, 5, 0, 0));
    EQ(tally__calendar_next(TALLY_WEEK, -18000, 0), UTC(1970, 1, 5, 5, 0, 0));  /* a Monday */
}

/*
 * Near the epoch the start of a local day can fall before 1970 and is clamped
 * to 0; the end of that day must still be local midnight. At -05:00 the local
 * day holding 1970-01-01T01:00Z ends at 1970-01-01T05:00Z.
 */
Test(calendar, next_after_clamped_start_near_epoch)
{
    uint64_t now = 3600 * NS_PER_S;                 /* 1970-01-01T01:00Z = Dec 31 20:00 local */
    uint64_t start = tally__calendar_start(TALLY_DAY, -18000, now);
    EQ(start, 0);
    EQ(tally__calendar_next(TALLY_DAY, -18000, start), UTC(1970, 1, 1, 5, 0, 0));
}
