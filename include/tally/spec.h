/*
 * tally/spec.h - policies written as text, e.g. "api: 10/s burst 20 gcra".
 * Included by <tally.h>. The grammar is in docs/TOOLS.md ("Policy specs").
 *
 * The same contract sentences as tally.h are used: "Any thread may call it",
 * "It never blocks", "On failure nothing changes".
 */
#ifndef TALLY_SPEC_H
#define TALLY_SPEC_H

#include "export.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tally_policy tally_policy;

/* Where and why a spec was refused. */
typedef struct tally_spec_error {
    size_t offset;          /* byte offset into the text where the error was found */
    char   message[128];    /* NUL-terminated, one line, no trailing period */
} tally_spec_error;

/*
 * tally_policy_parse - parse one policy spec into a policy.
 * @text:     the NUL-terminated spec, "name: LIMIT[, LIMIT]...[; flag]...".
 * @out:      receives the policy; out->name points into @name_buf.
 * @name_buf: receives the policy name, NUL-terminated.
 * @name_len: size of @name_buf; at least the name's length + 1.
 * @err:      receives the offset and a message on failure (may be NULL).
 * Every value is checked against the bounds of tally_policy_add(), so a
 * policy parsed here is accepted by it unless its name is already used.
 * Return 0 or TALLY_EINVAL (NULL @text, @out or @name_buf; a spec that does
 * not follow the grammar or is out of bounds; a name that does not fit).
 * Any thread may call it. It never blocks (it does not allocate).
 * On failure *@out and @name_buf are untouched.
 */
TALLY_EXPORT int tally_policy_parse(const char *text, tally_policy *out, char *name_buf,
                                    size_t name_len, tally_spec_error *err);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_SPEC_H */
