/*
 * tally-demo: a short tour of the engine. Four threads send requests for a
 * handful of users against "100 requests per second and 5000 tokens per
 * minute", then the demo prints each user's decisions and counters.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "tally.h"

#define THREADS 4
#define USERS   5
#define HITS    20000

static tally_engine *engine;
static uint32_t policy;
static uint64_t allowed[THREADS][USERS], denied[THREADS][USERS], firsts[THREADS][USERS];

static void *worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    char key[32];
    for (int i = 0; i < HITS; i++) {
        int u = (i * 7 + t) % USERS;
        uint64_t costs[2] = { 1, (uint64_t)(u + 1) };   /* user N spends N+1 tokens a request */
        tally_result r;
        snprintf(key, sizeof(key), "user-%02d", u);
        if (tally_hit(engine, policy, key, strlen(key), costs, &r) != 0)
            continue;
        if (r.allowed)
            allowed[t][u]++;
        else
            denied[t][u]++;
        firsts[t][u] += __builtin_popcount(r.first_exceeded);
    }
    return NULL;
}

int main(void)
{
    tally_options opts;
    tally_options_init(&opts);
    opts.capacity = 1024;
    int rc = tally_open(&opts, &engine);
    if (rc) {
        fprintf(stderr, "tally_open: %s\n", tally_strerror(rc));
        return 1;
    }
    tally_policy p = {
        .name = "api",
        .n_limits = 2,
        .limits = {
            { .algo = TALLY_FIXED_WINDOW, .max = 100, .period_ns = 1000000000ull },
            { .algo = TALLY_SLIDING_WINDOW, .max = 5000, .period_ns = 60000000000ull },
        },
    };
    rc = tally_policy_add(engine, &p, &policy);
    if (rc) {
        fprintf(stderr, "tally_policy_add: %s\n", tally_strerror(rc));
        return 1;
    }

    pthread_t th[THREADS];
    for (int t = 0; t < THREADS; t++)
        pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);

    printf("policy \"api\": 100 requests/s (fixed window) and 5000 tokens/min (sliding window)\n");
    printf("%d threads x %d requests over %d users; user N costs N+1 tokens a request\n\n",
           THREADS, HITS, USERS);
    printf("%-8s %8s %8s %6s %10s %10s\n", "user", "allowed", "denied", "first", "requests", "tokens");
    for (int u = 0; u < USERS; u++) {
        uint64_t a = 0, d = 0, f = 0;
        for (int t = 0; t < THREADS; t++) {
            a += allowed[t][u];
            d += denied[t][u];
            f += firsts[t][u];
        }
        char key[32];
        tally_snapshot s;
        snprintf(key, sizeof(key), "user-%02d", u);
        rc = tally_read(engine, policy, key, strlen(key), &s);
        if (rc) {
            printf("%-8s read failed: %s\n", key, tally_strerror(rc));
            continue;
        }
        printf("%-8s %8" PRIu64 " %8" PRIu64 " %6" PRIu64 " %10" PRIu64 " %10" PRIu64 "\n",
               key, a, d, f, s.c[0].used, s.c[1].used);
    }
    printf("\n'first' counts calls that first crossed a limit in its window: one per limit and window.\n");
    tally_close(engine);
    return 0;
}
