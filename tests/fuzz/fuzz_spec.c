/*
 * libFuzzer target for tally_policy_parse: any bytes must give 0 or
 * TALLY_EINVAL, an error offset inside the text, and, on success, a policy
 * that tally_policy_add accepts (the parser promises to check every bound).
 * Built and run by tools/test with clang -fsanitize=fuzzer,address,undefined.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"

static tally_engine *engine;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!engine) {
        tally_options o;
        tally_options_init(&o);
        o.capacity = 1;
        if (tally_open(&o, &engine) != 0)
            abort();
    }
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    tally_policy p;
    char name[TALLY_MAX_POLICY_NAME + 1];
    tally_spec_error err;
    int rc = tally_policy_parse(text, &p, name, sizeof name, &err);
    if (rc == 0) {
        if (strlen(name) == 0 || p.n_limits == 0 || p.n_limits > TALLY_MAX_LIMITS)
            abort();
        /* A fresh name each time: "already used" is the one refusal allowed. */
        static unsigned long seq;
        char unique[32];
        snprintf(unique, sizeof unique, "f%lu", seq++);
        p.name = unique;
        uint32_t id;
        int add = tally_policy_add(engine, &p, &id);
        if (add != 0 && add != TALLY_ENOMEM)  /* ENOMEM: TALLY_MAX_POLICIES reached */
            abort();
    } else {
        if (rc != TALLY_EINVAL || err.offset > strlen(text) ||
            memchr(err.message, '\0', sizeof err.message) == NULL || err.message[0] == '\0')
            abort();
    }
    free(text);
    return 0;
}
