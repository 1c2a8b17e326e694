/*
 * The Prometheus text exposition format (version 0.0.4), written in one place
 * for every writer of the library. Private to src/.
 *
 * A tally__prom appends pieces as one snprintf would write them all:
 * `written` counts the whole text, `buf` holds what fits of it, and every
 * piece that reaches `buf` leaves it NUL-terminated. A NULL `buf` or a `len`
 * of 0 is a size query. A piece vsnprintf cannot format (a negative return:
 * an encoding error, or more than INT_MAX bytes), or one that takes the
 * length past SIZE_MAX, fails the writer, since the text would then miss
 * that piece: later pieces are dropped, and the end reports no text.
 *
 *   tally__prom w = { .buf = buf, .len = len };
 *   tally__prom_put(&w, "%s %llu\n", name, value);
 *   return tally__prom_end(&w);
 */
#ifndef TALLY_CORE_PROM_H
#define TALLY_CORE_PROM_H

#include <stdbool.h>
#include <stddef.h>

typedef struct tally__prom {
    char  *buf;      /* NULL for a size query */
    size_t len;      /* bytes of buf, the NUL included */
    size_t written;  /* length of the whole text so far, without its NUL */
    bool   failed;   /* a piece could not be formatted */
} tally__prom;

void tally__prom_put(tally__prom *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * End the text: NUL-terminate buf (when len > 0) at the end of what fit.
 * Return written, as snprintf; 0 with buf emptied when the writer failed,
 * the answer a size_t writer gives when it has no text.
 */
size_t tally__prom_end(tally__prom *w);

/*
 * tally__prom_end for a writer that returns int: TALLY_EINVAL, with buf
 * emptied, when the writer failed or the text is longer than INT_MAX (the
 * negative answer of snprintf, as the one error such a writer documents).
 */
int tally__prom_end_int(tally__prom *w);

/*
 * Escape @src for a label value: backslash, double quote and newline become
 * \\, \" and \n. @dst receives at most @cap bytes with the NUL (none when
 * @cap is 0), cut only between whole characters of the escaped text. A NULL
 * @src is the empty value. Return the length of the whole escaped text,
 * without its NUL, as snprintf.
 */
size_t tally__prom_escape(char *dst, size_t cap, const char *src);

#endif /* TALLY_CORE_PROM_H */
