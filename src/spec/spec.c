/*
 * Policy specs: a hand-written recursive-descent parser over the grammar in
 * docs/TOOLS.md ("Policy specs"). It reads the text once, never allocates, and
 * fills a local policy that is copied out only when the whole text is valid.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "tally.h"

#define MS  UINT64_C(1000000)
#define SEC UINT64_C(1000000000)
#define MINUTE (60 * SEC)
#define HOUR   (60 * MINUTE)
#define DAY    (24 * HOUR)
#define WEEK   (7 * DAY)

struct parser {
    const char *s;      /* the whole text */
    size_t pos;
    tally_spec_error *err;
    bool failed;
};

/* Records the first error only: later ones are consequences of it. */
static bool fail_at(struct parser *p, size_t at, const char *fmt, ...)
{
    if (!p->failed && p->err) {
        va_list ap;
        va_start(ap, fmt);
        p->err->offset = at;
        vsnprintf(p->err->message, sizeof p->err->message, fmt, ap);
        va_end(ap);
    }
    p->failed = true;
    return false;
}

static void skip_ws(struct parser *p)
{
    while (p->s[p->pos] == ' ' || p->s[p->pos] == '\t')
        p->pos++;
}

static bool is_alpha(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

/* A word: letters and '-' (for count-rejected, evict-lru). Returns its length at pos. */
static size_t word_len(const struct parser *p)
{
    size_t n = 0;
    while (is_alpha(p->s[p->pos + n]) || (n > 0 && p->s[p->pos + n] == '-'))
        n++;
    return n;
}

static bool word_is(const struct parser *p, size_t n, const char *w)
{
    if (strlen(w) != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (lower(p->s[p->pos + i]) != w[i])
            return false;
    return true;
}

/* Consumes the keyword @w (case-insensitive) if it is the next whole word. */
static bool accept_word(struct parser *p, const char *w)
{
    skip_ws(p);
    size_t n = word_len(p);
    if (n == 0 || !word_is(p, n, w))
        return false;
    p->pos += n;
    return true;
}

static bool parse_u64(struct parser *p, uint64_t *out, const char *what)
{
    skip_ws(p);
    size_t start = p->pos;
    if (!is_digit(p->s[p->pos]))
        return fail_at(p, start, "expected %s (a decimal number)", what);
    uint64_t v = 0;
    while (is_digit(p->s[p->pos])) {
        unsigned d = (unsigned)(p->s[p->pos] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return fail_at(p, start, "%s is too large", what);
        v = v * 10 + d;
        p->pos++;
    }
    *out = v;
    return true;
}

/* A period: what follows "per" or "/". */
struct period {
    uint64_t ns;          /* 0 for "month" */
    bool calendar_ok;     /* exactly one minute, hour, day, week or month */
    tally_calendar_unit unit;
    size_t at;
};

static const struct unit_name {
    const char *name;
    uint64_t ns;
} unit_names[] = {
    { "ms", MS }, { "millisecond", MS }, { "milliseconds", MS },
    { "s", SEC }, { "sec", SEC }, { "second", SEC }, { "seconds", SEC },
    { "m", MINUTE }, { "min", MINUTE }, { "minute", MINUTE }, { "minutes", MINUTE },
    { "h", HOUR }, { "hour", HOUR }, { "hours", HOUR },
    { "d", DAY }, { "day", DAY }, { "days", DAY },
    { "w", WEEK }, { "week", WEEK }, { "weeks", WEEK },
    { "month", 0 }, { "months", 0 },
};

static bool parse_period(struct parser *p, struct period *out)
{
    skip_ws(p);
    out->at = p->pos;
    uint64_t count = 1;
    bool counted = is_digit(p->s[p->pos]);
    if (counted && !parse_u64(p, &count, "the period length"))
        return false;
    if (counted && count == 0)
        return fail_at(p, out->at, "the period must be longer than 0");
    skip_ws(p);
    size_t n = word_len(p);
    const struct unit_name *u = NULL;
    for (size_t i = 0; n > 0 && i < sizeof unit_names / sizeof unit_names[0]; i++)
        if (word_is(p, n, unit_names[i].name))
            u = &unit_names[i];
    if (!u)
        return fail_at(p, p->pos, "expected a time unit (ms, s, m, h, d, w, or "
                                  "second, minute, hour, day, week, month)");
    p->pos += n;
    if (u->ns == 0) {
        if (count != 1)
            return fail_at(p, out->at, "a month period is exactly one month");
        *out = (struct period){ .ns = 0, .calendar_ok = true, .unit = TALLY_MONTH, .at = out->at };
        return true;
    }
    if (count > TALLY_MAX_PERIOD_NS / u->ns)
        return fail_at(p, out->at, "the period is longer than the largest one (about 146 years)");
    out->ns = count * u->ns;
    out->calendar_ok = true;
    switch (out->ns) {
    case MINUTE: out->unit = TALLY_MINUTE; break;
    case HOUR: out->unit = TALLY_HOUR; break;
    case DAY: out->unit = TALLY_DAY; break;
    case WEEK: out->unit = TALLY_WEEK; break;
    default: out->calendar_ok = false;
    }
    return true;
}

static bool parse_two_digits(struct parser *p, unsigned *out, unsigned limit, const char *what)
{
    size_t at = p->pos;
    if (!is_digit(p->s[p->pos]) || !is_digit(p->s[p->pos + 1]))
        return fail_at(p, at, "expected two digits for the %s of the UTC offset", what);
    *out = (unsigned)(p->s[p->pos] - '0') * 10 + (unsigned)(p->s[p->pos + 1] - '0');
    p->pos += 2;
    if (*out > limit)
        return fail_at(p, at, "the %s of the UTC offset is above %u", what, limit);
    return true;
}

/* Optional "utc", "utc+HH:MM", "utc-HH:MM", "utc+HH" after "calendar". */
static bool parse_utc_offset(struct parser *p, int32_t *out)
{
    *out = 0;
    skip_ws(p);
    size_t at = p->pos;
    if (!(lower(p->s[at]) == 'u' && lower(p->s[at + 1]) == 't' && lower(p->s[at + 2]) == 'c') ||
        is_alpha(p->s[at + 3]))
        return true;
    p->pos += 3;
    char sign = p->s[p->pos];
    if (sign != '+' && sign != '-')
        return true;
    p->pos++;
    unsigned hh, mm = 0;
    if (!parse_two_digits(p, &hh, 18, "hours"))
        return false;
    if (p->s[p->pos] == ':') {
        p->pos++;
        if (!parse_two_digits(p, &mm, 59, "minutes"))
            return false;
    }
    int32_t off = (int32_t)(hh * 3600 + mm * 60);
    if (off > TALLY_MAX_UTC_OFFSET_S)
        return fail_at(p, at, "the UTC offset is beyond 18:00");
    *out = sign == '-' ? -off : off;
    return true;
}

/* B * P / R without overflow: the time a rate of R per P takes to refill a burst B. */
static bool gcra_period(uint64_t rate, uint64_t per_ns, uint64_t burst, uint64_t *out)
{
    unsigned __int128 t = (unsigned __int128)burst * per_ns / rate;
    if (t > TALLY_MAX_PERIOD_NS)
        return false;
    *out = (uint64_t)t;
    return true;
}

static bool parse_limit(struct parser *p, tally_limit *l)
{
    uint64_t count;
    skip_ws(p);
    size_t count_at = p->pos;
    if (!parse_u64(p, &count, "a count"))
        return false;
    if (count == 0)
        return fail_at(p, count_at, "the count must be at least 1");
    if (accept_word(p, "concurrent")) {
        if (count > TALLY_CONCURRENCY_MAX_COUNT)
            return fail_at(p, count_at, "the count is above %llu, the most concurrent holders",
                           (unsigned long long)TALLY_CONCURRENCY_MAX_COUNT);
        if (!accept_word(p, "lease"))
            return fail_at(p, p->pos, "expected 'lease' and a duration after 'concurrent'");
        struct period lease;
        if (!parse_period(p, &lease))
            return false;
        if (lease.ns == 0)
            return fail_at(p, lease.at, "a lease is a duration, not a month");
        *l = (tally_limit){ .algo = TALLY_CONCURRENCY, .max = count, .period_ns = lease.ns };
        return true;
    }
    skip_ws(p);
    if (p->s[p->pos] == '/')
        p->pos++;
    else if (!accept_word(p, "per"))
        return fail_at(p, p->pos, "expected 'per', '/' or 'concurrent' after the count");
    struct period per;
    if (!parse_period(p, &per))
        return false;

    skip_ws(p);
    size_t algo_at = p->pos;
    *l = (tally_limit){ .max = count, .period_ns = per.ns };
    bool fixed = accept_word(p, "fixed");
    if (fixed || accept_word(p, "sliding")) {
        bool sliding = !fixed;
        l->algo = sliding ? TALLY_SLIDING_WINDOW : TALLY_FIXED_WINDOW;
        if (per.ns == 0)
            return fail_at(p, per.at, "a month is only a calendar window");
        uint64_t bound = sliding ? TALLY_SLIDING_MAX_COUNT : TALLY_MAX_COUNT;
        if (count > bound)
            return fail_at(p, count_at, "the count is above %llu, the largest for %s windows",
                           (unsigned long long)bound, sliding ? "sliding" : "fixed");
        return true;
    }
    if (accept_word(p, "calendar")) {
        l->algo = TALLY_CALENDAR_WINDOW;
        l->period_ns = 0;
        if (!per.calendar_ok)
            return fail_at(p, per.at, "a calendar window is one minute, hour, day, week or month");
        l->unit = per.unit;
        if (count > TALLY_MAX_COUNT)
            return fail_at(p, count_at, "the count is above %llu, the largest for calendar windows",
                           (unsigned long long)TALLY_MAX_COUNT);
        return parse_utc_offset(p, &l->utc_offset_s);
    }
    uint64_t burst = count;
    size_t burst_at = count_at;
    if (accept_word(p, "burst")) {
        skip_ws(p);
        burst_at = p->pos;
        if (!parse_u64(p, &burst, "the burst"))
            return false;
        if (burst == 0)
            return fail_at(p, burst_at, "the burst must be at least 1");
        if (!accept_word(p, "gcra"))
            return fail_at(p, p->pos, "expected 'gcra' after the burst");
    } else if (!accept_word(p, "gcra")) {
        return fail_at(p, algo_at, "expected an algorithm: fixed, sliding, calendar, gcra "
                                   "or burst N gcra");
    }
    l->algo = TALLY_GCRA;
    if (per.ns == 0)
        return fail_at(p, per.at, "a month is only a calendar window");
    if (burst > TALLY_MAX_COUNT)
        return fail_at(p, burst_at, "the burst is above %llu", (unsigned long long)TALLY_MAX_COUNT);
    l->max = burst;
    if (!gcra_period(count, per.ns, burst, &l->period_ns))
        return fail_at(p, burst_at, "refilling the burst takes longer than the largest period "
                                    "(about 146 years)");
    if (l->period_ns / burst == 0)
        return fail_at(p, count_at, "the rate is above one per nanosecond");
    return true;
}

static bool parse_name(struct parser *p, size_t *start, size_t *len)
{
    skip_ws(p);
    *start = p->pos;
    while (is_alpha(p->s[p->pos]) || is_digit(p->s[p->pos]) || p->s[p->pos] == '_' ||
           p->s[p->pos] == '-' || p->s[p->pos] == '.')
        p->pos++;
    *len = p->pos - *start;
    if (*len == 0)
        return fail_at(p, *start, "expected a policy name (letters, digits, '_', '-', '.')");
    if (*len > TALLY_MAX_POLICY_NAME)
        return fail_at(p, *start, "the policy name is longer than %d bytes", TALLY_MAX_POLICY_NAME);
    skip_ws(p);
    if (p->s[p->pos] != ':')
        return fail_at(p, p->pos, "expected ':' after the policy name");
    p->pos++;
    return true;
}

static bool parse_flag(struct parser *p, unsigned *flags)
{
    skip_ws(p);
    size_t at = p->pos;
    unsigned f;
    if (accept_word(p, "shadow"))
        f = TALLY_SHADOW;
    else if (accept_word(p, "count-rejected"))
        f = TALLY_COUNT_REJECTED;
    else if (accept_word(p, "aligned"))
        f = TALLY_ALIGNED;
    else if (accept_word(p, "evict-lru"))
        f = TALLY_EVICT_LRU;
    else
        return fail_at(p, at, "expected a flag: shadow, count-rejected, aligned or evict-lru");
    if (*flags & f)
        return fail_at(p, at, "the flag is given twice");
    *flags |= f;
    return true;
}

int tally_policy_parse(const char *text, tally_policy *out, char *name_buf, size_t name_len,
                       tally_spec_error *err)
{
    struct parser p = { .s = text, .err = err };
    if (!text || !out || !name_buf) {
        fail_at(&p, 0, "NULL argument");
        return TALLY_EINVAL;
    }
    tally_policy pol = { .n_limits = 0 };
    size_t name_at, nlen;
    if (!parse_name(&p, &name_at, &nlen))
        return TALLY_EINVAL;
    for (;;) {
        if (pol.n_limits == TALLY_MAX_LIMITS) {
            skip_ws(&p);
            fail_at(&p, p.pos, "more than %d limits", TALLY_MAX_LIMITS);
            return TALLY_EINVAL;
        }
        skip_ws(&p);
        size_t limit_at = p.pos;
        if (!parse_limit(&p, &pol.limits[pol.n_limits++]))
            return TALLY_EINVAL;
        for (unsigned i = 0; i + 1 < pol.n_limits; i++)
            if (pol.limits[i].algo == TALLY_CONCURRENCY
                && pol.limits[pol.n_limits - 1].algo == TALLY_CONCURRENCY) {
                fail_at(&p, limit_at, "a policy has at most one concurrent limit");
                return TALLY_EINVAL;
            }
        skip_ws(&p);
        if (p.s[p.pos] != ',')
            break;
        p.pos++;
    }
    while (p.s[p.pos] == ';') {
        p.pos++;
        if (!parse_flag(&p, &pol.flags))
            return TALLY_EINVAL;
        skip_ws(&p);
    }
    if (p.s[p.pos] != '\0') {
        fail_at(&p, p.pos, pol.flags ? "expected ';' and a flag, or the end"
                                     : "expected ',' and a limit, ';' and a flag, or the end");
        return TALLY_EINVAL;
    }
    if (nlen + 1 > name_len) {
        fail_at(&p, name_at, "the policy name does not fit in %zu bytes", name_len);
        return TALLY_EINVAL;
    }
    memcpy(name_buf, text + name_at, nlen);
    name_buf[nlen] = '\0';
    pol.name = name_buf;
    *out = pol;
    return 0;
}
