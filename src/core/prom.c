/* The Prometheus text appender and label escaper (prom.h). */
#include "core/prom.h"

#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "tally.h"

void tally__prom_put(tally__prom *w, const char *fmt, ...)
{
    if (w->failed)
        return;
    /* past the end, the pieces are only counted */
    bool room = w->buf && w->written < w->len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(room ? w->buf + w->written : NULL, room ? w->len - w->written : 0, fmt, ap);
    va_end(ap);
    /* a length size_t cannot hold fails the text as surely as a vsnprintf error */
    if (n < 0 || (size_t)n > SIZE_MAX - w->written)
        w->failed = true;
    else
        w->written += (size_t)n;
}

size_t tally__prom_end(tally__prom *w)
{
    /* a failed piece may have left part of itself in buf, unterminated */
    if (w->buf && w->len)
        w->buf[w->failed ? 0 : w->written < w->len ? w->written : w->len - 1] = '\0';
    return w->failed ? 0 : w->written;
}

int tally__prom_end_int(tally__prom *w)
{
    if (w->written > INT_MAX)
        w->failed = true;
    size_t n = tally__prom_end(w);
    return w->failed ? TALLY_EINVAL : (int)n;
}

size_t tally__prom_escape(char *dst, size_t cap, const char *src)
{
    size_t n = 0, kept = 0;
    for (; src && *src; src++) {
        bool esc = *src == '\\' || *src == '"' || *src == '\n';
        size_t k = esc ? 2 : 1;
        /* an escape that does not fit whole is left out, not split */
        if (n + k < cap) {
            if (esc)
                dst[n] = '\\';
            dst[n + k - 1] = *src == '\n' ? 'n' : *src;
            kept = n + k;
        }
        n += k;
    }
    if (cap)
        dst[kept] = '\0';
    return n;
}
