/*
 * The version macros of <tally.h> (tally/export.h) against meson's project
 * version, which names the shared library's file, libtally.so.MAJOR.MINOR.PATCH:
 * tests/meson.build passes it in as TALLY_MESON_VERSION, so a release that
 * bumps one and not the other fails here.
 */
#include "test.h"
#include <stdio.h>
#include <string.h>

#include "tally.h"

Test(version, string_is_the_project_version)
{
    cr_assert_str_eq(TALLY_VERSION_STRING, TALLY_MESON_VERSION);
}

Test(version, numbers_spell_the_string)
{
    char s[64];
    snprintf(s, sizeof s, "%d.%d.%d", TALLY_VERSION_MAJOR, TALLY_VERSION_MINOR,
             TALLY_VERSION_PATCH);
    cr_assert_str_eq(s, TALLY_VERSION_STRING);
}
