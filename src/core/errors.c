/* Error texts: one X-macro table (TALLY_ERRORS in tally.h) gives every code. */
#include "tally.h"

const char *tally_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define TALLY_ERR_CASE_(name, value, msg) case name: return msg;
        TALLY_ERRORS(TALLY_ERR_CASE_)
#undef TALLY_ERR_CASE_
    default:
        return "unknown error";
    }
}
