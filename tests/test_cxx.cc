// tally.h must compile as C++ (the benchmark shim is C++) and link from C++.
#include <criterion/criterion.h>

#include <cstring>

#include "tally.h"

Test(cxx, header_compiles_and_links_from_cpp)
{
    tally_engine *e = nullptr;
    tally_options o;
    tally_options_init(&o);
    cr_assert_eq(tally_open(&o, &e), 0);
    tally_policy p{};
    p.name = "cxx";
    p.n_limits = 1;
    p.limits[0].algo = TALLY_GCRA;
    p.limits[0].max = 1;
    p.limits[0].period_ns = 1000000000;
    uint32_t id = 0;
    cr_assert_eq(tally_policy_add(e, &p, &id), 0);
    tally_result r{};
    cr_assert_eq(tally_hit_at(e, id, "k", 1, nullptr, 1000, &r), 0);
    cr_assert(r.allowed);
    cr_assert_eq(tally_hit_at(e, id, "k", 1, nullptr, 1000, &r), 0);
    cr_assert_not(r.allowed);
    cr_assert_str_eq(tally_strerror(TALLY_EINVAL), "invalid argument");
    tally_close(e);
}
