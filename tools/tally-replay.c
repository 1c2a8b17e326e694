/*
 * tally-replay: run a trace of (timestamp, key, cost) through a policy spec on
 * virtual time (tally_hit_at with each line's own timestamp) and report what
 * the policy would have done. Usage and exit codes: --help, docs/TOOLS.md "tally-replay".
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tally.h"
#include "redis-address.h"

enum { EXIT_MALFORMED = 1, EXIT_USAGE = 2, EXIT_INPUT = 3, EXIT_ENGINE = 4 };

#define SEC UINT64_C(1000000000)
#define MAX_KEY 1024

static const char usage_text[] =
"usage: tally-replay -p SPEC [options] [TRACE]\n"
"Replay TRACE (a file, or - / nothing for stdin) through the policy SPEC on the\n"
"trace's own timestamps and report what the policy would have done.\n"
"\n"
"  -p, --policy SPEC     the policy, e.g. 'api: 10/s burst 20 gcra' (docs/TOOLS.md)\n"
"  -f, --format FMT      tsv (default): TIMESTAMP<TAB>KEY[<TAB>COST], TIMESTAMP in\n"
"                        Unix seconds with up to 9 decimals; common or combined:\n"
"                        the nginx/Apache access log formats\n"
"  -k, --key FIELD       log formats: the key field: host (default), ident, user,\n"
"                        request, path, status, referer, agent (combined only)\n"
"  -c, --cost FIELD      log formats: one (default) or bytes (the response size)\n"
"  -n, --top N           how many keys to list by denials (default 10)\n"
"  -b, --bucket SECONDS  width of the timeline's buckets (default 60)\n"
"  -d, --decisions       also print the decision of every line\n"
"  -j, --json            print the report as one JSON object\n"
"      --capacity N      most keys tracked at once (default 1048576)\n"
"      --delay-max SECONDS  GCRA policies: reserve each line, delaying it up to\n"
"                        SECONDS instead of denying (tally_reserve_at)\n"
"      --hold SECONDS    concurrency limits: give each admitted line's holds back\n"
"                        SECONDS after its time (default: never; they expire\n"
"                        with the lease)\n"
"  -r, --redis ADDR      also share the counts through Redis, as one more engine\n"
"                        would (flushed every 100 ms and at the end); ADDR is\n"
"                        H:PORT, cluster:H:PORT[,H:PORT]... (seed nodes of a\n"
"                        Redis Cluster) or sentinel:NAME@H:PORT[,H:PORT]...\n"
"                        (the sentinels of the master NAME)\n"
"      --redis-prefix P  Redis key prefix (default tally:)\n"
"      --redis-wait N    a flush counts only once N replicas have it (WAIT)\n"
"      --hash-key HEX    the engine's hash key, 32 hex digits: the one of the\n"
"                        engines whose counts it shares (default: a random one,\n"
"                        sharing nothing)\n"
"  -q, --quiet           no progress bar (it is shown on a terminal for traces\n"
"                        of 16 MiB and more)\n"
"  -h, --help            this text\n"
"\n"
"The cost of a line is taken from every limit of the policy.\n"
"Exit status: 0 every line replayed; 1 some lines were malformed and skipped\n"
"(the report counts them); 2 bad arguments or policy spec; 3 the trace cannot\n"
"be read; 4 the engine refused hits (more keys than --capacity), or the final\n"
"flush to Redis failed.\n";

enum format { FMT_TSV, FMT_COMMON, FMT_COMBINED };
enum field { F_HOST, F_IDENT, F_USER, F_REQUEST, F_PATH, F_STATUS, F_REFERER, F_AGENT };

/* ---- per-key counts: open addressing, grown at 1/2 load ---------------- */

struct key_entry {
    char *key;
    size_t len;
    uint64_t hits, denied;
};

struct key_map {
    struct key_entry *slots;
    size_t cap, n;
};

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = UINT64_C(1469598103934665603);
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * UINT64_C(1099511628211);
    return h;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "tally-replay: out of memory\n");
        exit(EXIT_ENGINE);
    }
    return p;
}

static struct key_entry *key_map_get(struct key_map *m, const char *k, size_t len)
{
    if (2 * (m->n + 1) > m->cap) {
        struct key_map g = { .cap = m->cap ? 2 * m->cap : 1024 };
        g.slots = xcalloc(g.cap, sizeof *g.slots);
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->slots[i].key)
                continue;
            size_t j = fnv1a(m->slots[i].key, m->slots[i].len) & (g.cap - 1);
            while (g.slots[j].key)
                j = (j + 1) & (g.cap - 1);
            g.slots[j] = m->slots[i];
        }
        g.n = m->n;
        free(m->slots);
        *m = g;
    }
    size_t j = fnv1a(k, len) & (m->cap - 1);
    while (m->slots[j].key) {
        if (m->slots[j].len == len && memcmp(m->slots[j].key, k, len) == 0)
            return &m->slots[j];
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j].key = xcalloc(1, len + 1);
    memcpy(m->slots[j].key, k, len);
    m->slots[j].len = len;
    m->n++;
    return &m->slots[j];
}

/* ---- the timeline: one entry per bucket, merged at the end ------------- */

struct bucket {
    int64_t index;               /* (timestamp - first timestamp) / width */
    uint64_t first_exceeded, denied;
};

struct timeline {
    struct bucket *b;
    size_t n, cap;
};

static struct bucket *timeline_at(struct timeline *t, int64_t index)
{
    if (t->n > 0 && t->b[t->n - 1].index == index)
        return &t->b[t->n - 1];
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 256;
        t->b = realloc(t->b, t->cap * sizeof *t->b);
        if (!t->b) {
            fprintf(stderr, "tally-replay: out of memory\n");
            exit(EXIT_ENGINE);
        }
    }
    t->b[t->n] = (struct bucket){ .index = index };
    return &t->b[t->n++];
}

static int bucket_cmp(const void *a, const void *b)
{
    const struct bucket *x = a, *y = b;
    return (x->index > y->index) - (x->index < y->index);
}

static void timeline_merge(struct timeline *t)
{
    if (t->n)           /* an empty timeline may have no array */
        qsort(t->b, t->n, sizeof *t->b, bucket_cmp);
    size_t w = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (w > 0 && t->b[w - 1].index == t->b[i].index) {
            t->b[w - 1].first_exceeded += t->b[i].first_exceeded;
            t->b[w - 1].denied += t->b[i].denied;
        } else {
            t->b[w++] = t->b[i];
        }
    }
    t->n = w;
}

/* ---- line parsing ------------------------------------------------------ */

struct line {
    uint64_t ts_ns;
    const char *key;
    size_t key_len;
    uint64_t cost;
};

static bool parse_uint(const char *s, size_t n, uint64_t *out)
{
    if (n == 0 || n > 19)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

/* Unix seconds with up to 9 decimals, at most INT64_MAX ns. */
static bool parse_ts(const char *s, size_t n, uint64_t *ns)
{
    const char *dot = memchr(s, '.', n);
    size_t ilen = dot ? (size_t)(dot - s) : n;
    uint64_t sec, frac = 0;
    if (!parse_uint(s, ilen, &sec) || sec > (uint64_t)INT64_MAX / SEC - 1)
        return false;
    if (dot) {
        size_t flen = n - ilen - 1;
        if (flen == 0 || flen > 9 || !parse_uint(dot + 1, flen, &frac))
            return false;
        for (size_t i = flen; i < 9; i++)
            frac *= 10;
    }
    *ns = sec * SEC + frac;
    return true;
}

static bool parse_tsv(char *s, size_t n, struct line *l)
{
    char *t1 = memchr(s, '\t', n);
    if (!t1 || !parse_ts(s, (size_t)(t1 - s), &l->ts_ns))
        return false;
    char *k = t1 + 1;
    char *t2 = memchr(k, '\t', n - (size_t)(k - s));
    l->key = k;
    l->key_len = t2 ? (size_t)(t2 - k) : n - (size_t)(k - s);
    l->cost = 1;
    if (t2 && !parse_uint(t2 + 1, n - (size_t)(t2 + 1 - s), &l->cost))
        return false;
    return true;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static bool digits(const char *s, size_t n, unsigned *out)
{
    uint64_t v;
    if (!parse_uint(s, n, &v))
        return false;
    *out = (unsigned)v;
    return true;
}

/* "10/Oct/2000:13:55:36 -0700" */
static bool parse_clf_time(const char *s, size_t n, uint64_t *ns)
{
    static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
    unsigned d, y, hh, mi, ss, oh, om, mon = 0;
    if (n != 26 || s[2] != '/' || s[6] != '/' || s[11] != ':' || s[14] != ':' || s[17] != ':' ||
        s[20] != ' ' || (s[21] != '+' && s[21] != '-'))
        return false;
    for (unsigned i = 0; i < 12; i++)
        if (memcmp(months + 3 * i, s + 3, 3) == 0)
            mon = i + 1;
    if (!mon || !digits(s, 2, &d) || !digits(s + 7, 4, &y) || !digits(s + 12, 2, &hh) ||
        !digits(s + 15, 2, &mi) || !digits(s + 18, 2, &ss) || !digits(s + 22, 2, &oh) ||
        !digits(s + 24, 2, &om) || d < 1 || d > 31 || hh > 23 || mi > 59 || ss > 60 || y < 1970)
        return false;
    int64_t t = days_from_civil(y, mon, d) * 86400 + hh * 3600 + mi * 60 + ss;
    int64_t off = (int64_t)(oh * 3600 + om * 60);
    t -= s[21] == '+' ? off : -off;
    if (t < 0)
        return false;
    *ns = (uint64_t)t * SEC;
    return true;
}

/* The next field of a log line: a bare word, a [bracketed] or a "quoted" one. */
static bool next_field(char **p, char *end, const char **f, size_t *n)
{
    char *s = *p;
    while (s < end && *s == ' ')
        s++;
    if (s >= end)
        return false;
    char close = *s == '[' ? ']' : *s == '"' ? '"' : ' ';
    if (close != ' ')
        s++;
    char *e = s;
    while (e < end && *e != close) {
        if (close == '"' && *e == '\\' && e + 1 < end)
            e++;
        e++;
    }
    if (close != ' ' && e >= end)
        return false;
    *f = s;
    *n = (size_t)(e - s);
    *p = close != ' ' ? e + 1 : e;
    return true;
}

static bool parse_log(char *s, size_t n, enum format fmt, enum field key, bool cost_bytes,
                      struct line *l)
{
    const char *f[9];
    size_t fl[9];
    size_t want = fmt == FMT_COMBINED ? 9 : 7;
    char *p = s, *end = s + n;
    for (size_t i = 0; i < want; i++)
        if (!next_field(&p, end, &f[i], &fl[i]))
            return false;
    /* host ident user [time] "request" status bytes ["referer" "agent"] */
    if (!parse_clf_time(f[3], fl[3], &l->ts_ns))
        return false;
    static const int index[] = { [F_HOST] = 0, [F_IDENT] = 1, [F_USER] = 2, [F_REQUEST] = 4,
                                 [F_PATH] = 4, [F_STATUS] = 5, [F_REFERER] = 7, [F_AGENT] = 8 };
    l->key = f[index[key]];
    l->key_len = fl[index[key]];
    if (key == F_PATH) {     /* "GET /path?q HTTP/1.1" -> /path?q */
        const char *sp = memchr(l->key, ' ', l->key_len);
        if (!sp)
            return false;
        const char *path = sp + 1;
        const char *sp2 = memchr(path, ' ', l->key_len - (size_t)(path - l->key));
        l->key_len = sp2 ? (size_t)(sp2 - path) : l->key_len - (size_t)(path - l->key);
        l->key = path;
    }
    l->cost = 1;
    if (cost_bytes && !parse_uint(f[6], fl[6], &l->cost)) {
        if (!(fl[6] == 1 && f[6][0] == '-'))
            return false;
        l->cost = 0;
    }
    return true;
}

/* ---- output helpers ---------------------------------------------------- */

static void json_str(FILE *o, const char *s, size_t n)
{
    fputc('"', o);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            fprintf(o, "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            fprintf(o, "\\u%04x", c);
        else
            fputc(c, o);
    }
    fputc('"', o);
}

static void describe_limit(const tally_limit *l, char *buf, size_t len)
{
    static const char *const units[] = { "minute", "hour", "day", "week", "month" };
    switch (l->algo) {
    case TALLY_FIXED_WINDOW:
    case TALLY_SLIDING_WINDOW:
        snprintf(buf, len, "%" PRIu64 " per %" PRIu64 "ms %s", l->max, l->period_ns / 1000000,
                 l->algo == TALLY_FIXED_WINDOW ? "fixed" : "sliding");
        break;
    case TALLY_CALENDAR_WINDOW:
        snprintf(buf, len, "%" PRIu64 " per %s calendar utc%c%02d:%02d", l->max, units[l->unit],
                 l->utc_offset_s < 0 ? '-' : '+', abs(l->utc_offset_s) / 3600,
                 abs(l->utc_offset_s) % 3600 / 60);
        break;
    case TALLY_GCRA:
        snprintf(buf, len, "burst %" PRIu64 " refilled in %" PRIu64 "ms gcra", l->max,
                 l->period_ns / 1000000);
        break;
    case TALLY_CONCURRENCY:
        snprintf(buf, len, "%" PRIu64 " concurrent lease %" PRIu64 "ms", l->max,
                 l->period_ns / 1000000);
        break;
    }
}

static int entry_cmp(const void *a, const void *b)
{
    const struct key_entry *x = a, *y = b;
    if (x->denied != y->denied)
        return x->denied < y->denied ? 1 : -1;
    if (x->len != y->len || memcmp(x->key, y->key, x->len) != 0) {
        int c = memcmp(x->key, y->key, x->len < y->len ? x->len : y->len);
        return c ? c : (x->len > y->len) - (x->len < y->len);
    }
    return 0;
}

struct report {
    uint64_t lines, hits, allowed, denied, shadow_denied, malformed, refused;
    uint64_t delayed, delay_ns;
    uint64_t limit_denied[TALLY_MAX_LIMITS], limit_first[TALLY_MAX_LIMITS];
    uint64_t base_ts, min_ts, max_ts;
    bool any_ts;
};

/* Holds to give back, in the order of their times (one hold time for all). */
struct hold {
    uint64_t at, cost;
    char *key;
    size_t len;
};

struct holds {
    struct hold *h;
    size_t head, n, cap;
};

static void holds_push(struct holds *q, uint64_t at, uint64_t cost, const char *key, size_t len)
{
    if (q->head + q->n == q->cap) {
        if (q->head) {
            memmove(q->h, q->h + q->head, q->n * sizeof *q->h);
            q->head = 0;
        } else {
            q->cap = q->cap ? 2 * q->cap : 1024;
            q->h = realloc(q->h, q->cap * sizeof *q->h);
            if (!q->h) {
                fputs("tally-replay: out of memory\n", stderr);
                exit(EXIT_ENGINE);
            }
        }
    }
    char *k = xcalloc(1, len + 1);
    memcpy(k, key, len);
    q->h[q->head + q->n++] = (struct hold){ at, cost, k, len };
}

/* --hash-key (redis-address.h); the message never repeats the value. */
static bool hash_key_option(const char *arg, uint8_t key[16])
{
    if (redis_hash_key(arg, key))
        return true;
    fprintf(stderr, "tally-replay: bad --hash-key (want 32 hex digits, not all zero)\n");
    return false;
}

static void progress(off_t done, off_t total, uint64_t lines, bool last)
{
    int pct = total > 0 ? (int)(done * 100 / total) : 100;
    int bar = pct * 30 / 100;
    fprintf(stderr, "\r[%.*s%*s] %3d%% %" PRIu64 " lines", bar, "##############################",
            30 - bar, "", pct, lines);
    if (last)
        fputc('\n', stderr);
}

int main(int argc, char **argv)
{
    const char *spec = NULL, *path = NULL, *redis = NULL, *redis_prefix = NULL;
    enum format fmt = FMT_TSV;
    enum field key = F_HOST;
    bool cost_bytes = false, decisions = false, json = false, quiet = false;
    uint64_t top = 10, bucket_s = 60, capacity = 1 << 20, redis_wait = 0;
    uint64_t delay_max = 0, hold_ns = 0;
    bool reserve = false;
    uint8_t hash_key[16] = { 0 };
    bool keyed = false;
    static const struct option longopts[] = {
        { "policy", required_argument, 0, 'p' }, { "format", required_argument, 0, 'f' },
        { "key", required_argument, 0, 'k' },    { "cost", required_argument, 0, 'c' },
        { "top", required_argument, 0, 'n' },    { "bucket", required_argument, 0, 'b' },
        { "decisions", no_argument, 0, 'd' },    { "json", no_argument, 0, 'j' },
        { "capacity", required_argument, 0, 'C' }, { "quiet", no_argument, 0, 'q' },
        { "redis", required_argument, 0, 'r' },  { "redis-prefix", required_argument, 0, 'P' },
        { "redis-wait", required_argument, 0, 'W' },
        { "delay-max", required_argument, 0, 'D' }, { "hold", required_argument, 0, 'H' },
        { "hash-key", required_argument, 0, 'K' },
        { "help", no_argument, 0, 'h' },         { 0, 0, 0, 0 },
    };
    static const char *const field_names[] = { "host", "ident", "user", "request", "path",
                                               "status", "referer", "agent" };
    int c;
    while ((c = getopt_long(argc, argv, "p:f:k:c:n:b:r:djqh", longopts, NULL)) != -1) {
        switch (c) {
        case 'p': spec = optarg; break;
        case 'f':
            if (strcmp(optarg, "tsv") == 0) fmt = FMT_TSV;
            else if (strcmp(optarg, "common") == 0) fmt = FMT_COMMON;
            else if (strcmp(optarg, "combined") == 0) fmt = FMT_COMBINED;
            else {
                fprintf(stderr, "tally-replay: unknown format '%s' (tsv, common, combined)\n", optarg);
                return EXIT_USAGE;
            }
            break;
        case 'k': {
            size_t i = 0;
            while (i < 8 && strcmp(optarg, field_names[i]) != 0)
                i++;
            if (i == 8) {
                fprintf(stderr, "tally-replay: unknown key field '%s' (host, ident, user, "
                                "request, path, status, referer, agent)\n", optarg);
                return EXIT_USAGE;
            }
            key = (enum field)i;
            break;
        }
        case 'c':
            if (strcmp(optarg, "one") == 0) cost_bytes = false;
            else if (strcmp(optarg, "bytes") == 0) cost_bytes = true;
            else {
                fprintf(stderr, "tally-replay: unknown cost field '%s' (one, bytes)\n", optarg);
                return EXIT_USAGE;
            }
            break;
        case 'n':
        case 'b':
        case 'C': {
            uint64_t v;
            if (!parse_uint(optarg, strlen(optarg), &v) || (c != 'n' && v == 0) ||
                (c == 'b' && v > (uint64_t)INT64_MAX / SEC) || (c == 'C' && v > TALLY_MAX_CAPACITY)) {
                fprintf(stderr, "tally-replay: bad number '%s' for %s\n", optarg,
                        c == 'n' ? "--top" : c == 'b' ? "--bucket" : "--capacity");
                return EXIT_USAGE;
            }
            *(c == 'n' ? &top : c == 'b' ? &bucket_s : &capacity) = v;
            break;
        }
        case 'r': redis = optarg; break;
        case 'P': redis_prefix = optarg; break;
        case 'K':
            if (!hash_key_option(optarg, hash_key))
                return EXIT_USAGE;
            keyed = true;
            break;
        case 'W':
            if (!parse_uint(optarg, strlen(optarg), &redis_wait) || redis_wait < 1 || redis_wait > 1000) {
                fprintf(stderr, "tally-replay: bad value '%s' for --redis-wait (1..1000)\n", optarg);
                return EXIT_USAGE;
            }
            break;
        case 'D':
        case 'H': {
            uint64_t v;
            if (!parse_ts(optarg, strlen(optarg), &v) || (c == 'H' && v == 0)) {
                fprintf(stderr, "tally-replay: bad duration '%s' for %s (seconds, up to 9 "
                                "decimals)\n", optarg, c == 'D' ? "--delay-max" : "--hold");
                return EXIT_USAGE;
            }
            *(c == 'D' ? &delay_max : &hold_ns) = v;
            reserve |= c == 'D';
            break;
        }
        case 'd': decisions = true; break;
        case 'j': json = true; break;
        case 'q': quiet = true; break;
        case 'h': fputs(usage_text, stdout); return 0;
        default:
            fputs("Try 'tally-replay --help'.\n", stderr);
            return EXIT_USAGE;
        }
    }
    if (!spec) {
        fputs("tally-replay: missing --policy SPEC\nTry 'tally-replay --help'.\n", stderr);
        return EXIT_USAGE;
    }
    if (optind + 1 < argc) {
        fputs("tally-replay: more than one trace given\nTry 'tally-replay --help'.\n", stderr);
        return EXIT_USAGE;
    }
    if (optind < argc && strcmp(argv[optind], "-") != 0)
        path = argv[optind];
    if (fmt == FMT_COMMON && (key == F_REFERER || key == F_AGENT)) {
        fprintf(stderr, "tally-replay: key field '%s' needs --format combined\n", field_names[key]);
        return EXIT_USAGE;
    }

    tally_policy pol;
    char name[TALLY_MAX_POLICY_NAME + 1];
    tally_spec_error err;
    if (tally_policy_parse(spec, &pol, name, sizeof name, &err) != 0) {
        fprintf(stderr, "tally-replay: bad policy spec at offset %zu: %s\n  %s\n  %*s^\n",
                err.offset, err.message, spec, (int)err.offset, "");
        return EXIT_USAGE;
    }

    bool has_conc = false, all_gcra = true;
    for (unsigned i = 0; i < pol.n_limits; i++) {
        has_conc |= pol.limits[i].algo == TALLY_CONCURRENCY;
        all_gcra &= pol.limits[i].algo == TALLY_GCRA;
    }
    if (reserve && !all_gcra) {
        fputs("tally-replay: --delay-max needs a policy of GCRA limits only\n", stderr);
        return EXIT_USAGE;
    }
    if (hold_ns && !has_conc) {
        fputs("tally-replay: --hold needs a policy with a concurrent limit\n", stderr);
        return EXIT_USAGE;
    }

    tally_redis_options ro = { 0 };
    char redis_buf[256];
    if (redis && !redis_option(redis, &ro, redis_buf, sizeof redis_buf)) {
        fprintf(stderr, "tally-replay: bad --redis address '%s' (want " REDIS_FORMS ")\n", redis);
        return EXIT_USAGE;
    }
    ro.key_prefix = redis_prefix;
    ro.wait_replicas = (unsigned)redis_wait;

    FILE *in = path ? fopen(path, "r") : stdin;
    if (!in) {
        fprintf(stderr, "tally-replay: cannot open '%s': %s\n", path, strerror(errno));
        return EXIT_INPUT;
    }
    struct stat st;
    off_t total = 0;
    if (fstat(fileno(in), &st) == 0 && S_ISREG(st.st_mode))
        total = st.st_size;
    bool show_progress = !quiet && isatty(STDERR_FILENO) && total >= (off_t)16 << 20;

    tally_engine *e;
    tally_options o;
    tally_options_init(&o);
    o.capacity = capacity;
    o.max_key_len = MAX_KEY;
    memcpy(o.hash_key, hash_key, sizeof hash_key);
    uint32_t pid;
    int rc = tally_open(&o, &e);
    if (rc == 0 && (rc = tally_policy_add(e, &pol, &pid)) != 0)
        tally_close(e);
    if (rc != 0) {
        fprintf(stderr, "tally-replay: cannot start the engine: %s\n", tally_strerror(rc));
        return EXIT_ENGINE;
    }
    if (redis) {
        tally_flusher_options fo;
        tally_flusher_options_init(&fo);
        fo.interval_ms = 100;
        fo.redis = &ro;
        /* here only the Redis options can be invalid: a bad node list, or a
           prefix with braces in cluster mode (where the slot's hash tag must
           be the first braces of a key name) */
        if ((rc = tally_flusher_start(e, &fo)) != 0) {
            if (rc == TALLY_EINVAL)
                fprintf(stderr, "tally-replay: bad --redis address '%s'%s: the library refused it "
                                "(want " REDIS_FORMS ", each PORT 1..65535, at most 16 nodes)\n",
                        redis, redis_prefix ? " with this --redis-prefix" : "");
            else
                fprintf(stderr, "tally-replay: cannot start the flusher: %s\n", tally_strerror(rc));
            tally_close(e);
            if (path)
                fclose(in);
            return rc == TALLY_EINVAL ? EXIT_USAGE : EXIT_ENGINE;
        }
        if (!keyed)
            fputs("tally-replay: -r without --hash-key: it shares no count with other "
                  "engines\n", stderr);
    }

    struct report r = { 0 };
    struct holds holds = { 0 };
    struct key_map keys = { 0 };
    struct timeline tl = { 0 };
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    FILE *out = stdout;
    if (decisions && json)
        fputs("{\"decisions\":[", out);
    bool first_decision = true;
    while ((n = getline(&buf, &cap, in)) != -1) {
        r.lines++;
        if (show_progress && (r.lines & 0xffff) == 0)
            progress(ftello(in), total, r.lines, false);
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
            buf[--n] = '\0';
        if (n == 0 || buf[0] == '#')
            continue;
        struct line l;
        bool ok = fmt == FMT_TSV ? parse_tsv(buf, (size_t)n, &l)
                                 : parse_log(buf, (size_t)n, fmt, key, cost_bytes, &l);
        if (!ok || l.key_len == 0 || l.key_len > MAX_KEY) {
            if (r.malformed++ < 5)
                fprintf(stderr, "tally-replay: line %" PRIu64 ": malformed, skipped\n", r.lines);
            continue;
        }
        uint64_t costs[TALLY_MAX_LIMITS];
        for (unsigned i = 0; i < TALLY_MAX_LIMITS; i++)
            costs[i] = l.cost;
        /* the holds due by this line's time are given back first */
        while (holds.n && holds.h[holds.head].at <= l.ts_ns) {
            struct hold *h = &holds.h[holds.head++];
            holds.n--;
            uint64_t hc[TALLY_MAX_LIMITS];
            for (unsigned i = 0; i < TALLY_MAX_LIMITS; i++)
                hc[i] = h->cost;
            tally_release_at(e, pid, h->key, h->len, hc, h->at);   /* ENOENT: the lease ended first */
            free(h->key);
        }
        tally_result res;
        uint64_t delay = 0;
        rc = reserve ? tally_reserve_at(e, pid, l.key, l.key_len, costs, l.ts_ns, delay_max, &delay, &res)
                     : tally_hit_at(e, pid, l.key, l.key_len, costs, l.ts_ns, &res);
        if (rc == 0 && res.allowed && hold_ns)
            holds_push(&holds, l.ts_ns + hold_ns, l.cost, l.key, l.key_len);
        if (rc == 0 && delay) {
            r.delayed++;
            r.delay_ns += delay;
        }
        if (rc != 0) {
            if (r.refused++ < 5)
                fprintf(stderr, "tally-replay: line %" PRIu64 ": %s\n", r.lines, tally_strerror(rc));
            continue;
        }
        if (!r.any_ts)   /* the timeline counts from the first line's time */
            r.base_ts = r.min_ts = r.max_ts = l.ts_ns;
        r.any_ts = true;
        r.min_ts = l.ts_ns < r.min_ts ? l.ts_ns : r.min_ts;
        r.max_ts = l.ts_ns > r.max_ts ? l.ts_ns : r.max_ts;
        r.hits++;
        if (res.allowed)
            r.allowed++;
        else
            r.denied++;
        if (res.allowed && res.exceeded)
            r.shadow_denied++;
        unsigned nfe = 0;
        for (unsigned i = 0; i < pol.n_limits; i++) {
            r.limit_denied[i] += (res.exceeded >> i) & 1;
            r.limit_first[i] += (res.first_exceeded >> i) & 1;
            nfe += (res.first_exceeded >> i) & 1;
        }
        struct key_entry *ke = key_map_get(&keys, l.key, l.key_len);
        ke->hits++;
        ke->denied += res.exceeded != 0;
        if (res.exceeded || nfe) {
            int64_t d = (int64_t)l.ts_ns - (int64_t)r.base_ts, w = (int64_t)(bucket_s * SEC);
            int64_t bi = d >= 0 ? d / w : -((-d + w - 1) / w);
            struct bucket *b = timeline_at(&tl, bi);
            b->first_exceeded += nfe;
            b->denied += res.exceeded != 0;
        }
        if (decisions) {
            const char *verdict = !res.allowed ? "deny" : res.exceeded ? "shadow-deny"
                                : delay ? "delay" : "allow";
            double retry = res.retry_after_ns == TALLY_NEVER ? -1 : (double)res.retry_after_ns / 1e9;
            if (delay)
                retry = (double)delay / 1e9;      /* a delayed line: how long it waits */
            if (json) {
                fprintf(out, "%s\n{\"line\":%" PRIu64 ",\"ts\":%" PRIu64 ".%09" PRIu64 ",\"key\":",
                        first_decision ? "" : ",", r.lines, l.ts_ns / SEC, l.ts_ns % SEC);
                json_str(out, l.key, l.key_len);
                fprintf(out, ",\"decision\":\"%s\",\"exceeded\":%" PRIu32 ",\"remaining\":%" PRIu64
                             ",\"retry_after_s\":%.3f}", verdict, res.exceeded, res.remaining, retry);
            } else {
                fprintf(out, "%" PRIu64 "\t%" PRIu64 ".%09" PRIu64 "\t%.*s\t%s\t%" PRIu64 "\t%.3f\n",
                        r.lines, l.ts_ns / SEC, l.ts_ns % SEC, (int)l.key_len, l.key, verdict,
                        res.remaining, retry);
            }
            first_decision = false;
        }
    }
    bool read_error = ferror(in);
    if (show_progress)
        progress(total, total, r.lines, true);
    if (path)
        fclose(in);
    free(buf);
    for (size_t i = 0; i < holds.n; i++)
        free(holds.h[holds.head + i].key);
    free(holds.h);
    bool flush_failed = redis && (rc = tally_flusher_stop(e)) != 0;
    if (flush_failed)
        fprintf(stderr, "tally-replay: final flush to Redis failed: %s\n", tally_strerror(rc));
    tally_close(e);
    if (read_error) {
        fprintf(stderr, "tally-replay: error reading '%s'\n", path ? path : "stdin");
        return EXIT_INPUT;
    }

    /* Keys with denials, most first. */
    size_t nk = 0;
    struct key_entry *denied = xcalloc(keys.n + 1, sizeof *denied);
    for (size_t i = 0; i < keys.cap; i++)
        if (keys.slots[i].key && keys.slots[i].denied)
            denied[nk++] = keys.slots[i];     /* borrows the key strings */
    qsort(denied, nk, sizeof *denied, entry_cmp);
    timeline_merge(&tl);
    uint64_t first_s = r.base_ts / SEC;

    if (json) {
        fputs(decisions ? "\n],\n" : "{", out);
        fprintf(out, "\"policy\":");
        json_str(out, spec, strlen(spec));
        fprintf(out, ",\"lines\":%" PRIu64 ",\"malformed\":%" PRIu64 ",\"refused\":%" PRIu64
                     ",\"hits\":%" PRIu64 ",\"allowed\":%" PRIu64 ",\"denied\":%" PRIu64
                     ",\"shadow_denied\":%" PRIu64 ",\"keys\":%zu",
                r.lines, r.malformed, r.refused, r.hits, r.allowed, r.denied, r.shadow_denied, keys.n);
        if (reserve)
            fprintf(out, ",\"delayed\":%" PRIu64 ",\"delay_s\":%.3f", r.delayed,
                    (double)r.delay_ns / 1e9);
        fputs(",\"limits\":[", out);
        for (unsigned i = 0; i < pol.n_limits; i++) {
            char d[128];
            describe_limit(&pol.limits[i], d, sizeof d);
            fprintf(out, "%s{\"limit\":%u,\"is\":\"%s\",\"allowed\":%" PRIu64 ",\"denied\":%" PRIu64
                         ",\"first_exceeded\":%" PRIu64 "}", i ? "," : "", i, d,
                    r.hits - r.limit_denied[i], r.limit_denied[i], r.limit_first[i]);
        }
        fputs("],\"top_denied\":[", out);
        for (size_t i = 0; i < nk && i < top; i++) {
            fputs(i ? ",{\"key\":" : "{\"key\":", out);
            json_str(out, denied[i].key, denied[i].len);
            fprintf(out, ",\"hits\":%" PRIu64 ",\"denied\":%" PRIu64 "}", denied[i].hits,
                    denied[i].denied);
        }
        fprintf(out, "],\"bucket_s\":%" PRIu64 ",\"timeline\":[", bucket_s);
        for (size_t i = 0; i < tl.n; i++)
            fprintf(out, "%s{\"start\":%" PRId64 ",\"first_exceeded\":%" PRIu64 ",\"denied\":%" PRIu64 "}",
                    i ? "," : "", (int64_t)first_s + tl.b[i].index * (int64_t)bucket_s,
                    tl.b[i].first_exceeded, tl.b[i].denied);
        fputs("]}\n", out);
    } else {
        fprintf(out, "policy   %s\n", spec);
        fprintf(out, "lines    %" PRIu64 " (%" PRIu64 " malformed, %" PRIu64 " refused by the engine)\n",
                r.lines, r.malformed, r.refused);
        fprintf(out, "hits     %" PRIu64 " from %zu keys over %" PRIu64 " s\n", r.hits, keys.n,
                r.any_ts ? (r.max_ts - r.min_ts) / SEC : 0);
        fprintf(out, "allowed  %" PRIu64 "\ndenied   %" PRIu64 "\n", r.allowed, r.denied);
        if (reserve)
            fprintf(out, "delayed  %" PRIu64 " of the allowed, %.3f s in all\n", r.delayed,
                    (double)r.delay_ns / 1e9);
        if (pol.flags & TALLY_SHADOW)
            fprintf(out, "shadow   %" PRIu64 " allowed only because the policy is in shadow mode\n",
                    r.shadow_denied);
        fputs("\nlimit  allowed     denied      first-exceeded  is\n", out);
        for (unsigned i = 0; i < pol.n_limits; i++) {
            char d[128];
            describe_limit(&pol.limits[i], d, sizeof d);
            fprintf(out, "%-6u %-11" PRIu64 " %-11" PRIu64 " %-15" PRIu64 " %s\n", i,
                    r.hits - r.limit_denied[i], r.limit_denied[i], r.limit_first[i], d);
        }
        fprintf(out, "\ntop keys by denials\n");
        if (nk == 0)
            fputs("  (none)\n", out);
        for (size_t i = 0; i < nk && i < top; i++)
            fprintf(out, "  %-11" PRIu64 " of %-11" PRIu64 " %.*s\n", denied[i].denied,
                    denied[i].hits, (int)denied[i].len, denied[i].key);
        fprintf(out, "\ntimeline (%" PRIu64 " s buckets from %" PRIu64 ")\n", bucket_s, first_s);
        if (tl.n == 0)
            fputs("  (no limit exceeded)\n", out);
        else
            fputs("  +seconds    first-exceeded  denied\n", out);
        for (size_t i = 0; i < tl.n; i++)
            fprintf(out, "  %-11" PRId64 " %-15" PRIu64 " %" PRIu64 "\n",
                    tl.b[i].index * (int64_t)bucket_s, tl.b[i].first_exceeded, tl.b[i].denied);
    }
    for (size_t i = 0; i < keys.cap; i++)
        free(keys.slots[i].key);
    free(denied);
    free(keys.slots);
    free(tl.b);
    if (fflush(out) != 0) {
        fprintf(stderr, "tally-replay: cannot write the report: %s\n", strerror(errno));
        return EXIT_INPUT;
    }
    return r.refused || flush_failed ? EXIT_ENGINE : r.malformed ? EXIT_MALFORMED : 0;
}
