/* Tests include this instead of Criterion directly: see harness.h for why. */
#ifndef TALLY_TEST_H
#define TALLY_TEST_H
#ifdef TALLY_TEST_HARNESS
#include "harness.h"
#else
#include <criterion/criterion.h>
#endif
#endif
