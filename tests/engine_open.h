/* Times and an engine for the tests that hit one directly. */
#ifndef TALLY_TEST_ENGINE_OPEN_H
#define TALLY_TEST_ENGINE_OPEN_H

#include "test.h"
#include "tally.h"

#define MS  UINT64_C(1000000)
#define SEC UINT64_C(1000000000)
#define T0  (UINT64_C(1700000000) * SEC)      /* a fixed "now" of the tests */

/* An engine of the default options but @capacity keys per policy. */
static inline tally_engine *open_engine(size_t capacity)
{
    tally_options o;
    tally_engine *e;
    tally_options_init(&o);
    o.capacity = capacity;
    cr_assert_eq(tally_open(&o, &e), 0);
    return e;
}

#endif /* TALLY_TEST_ENGINE_OPEN_H */
