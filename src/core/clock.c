/* Clocks and deadlines (clock.h). */
#include "core/clock.h"
#include "tally.h"

static uint64_t clock_base_real, clock_base_mono;

static uint64_t read_clock(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * TALLY__NS_PER_S + (uint64_t)ts.tv_nsec;
}

__attribute__((constructor)) static void clock_init(void)
{
    clock_base_real = read_clock(CLOCK_REALTIME);
    clock_base_mono = read_clock(CLOCK_MONOTONIC);
}

uint64_t tally_now_ns(void)
{
    return clock_base_real + (read_clock(CLOCK_MONOTONIC) - clock_base_mono);
}

uint64_t tally__mono_ns(void)
{
    return read_clock(CLOCK_MONOTONIC);
}

struct timespec tally__deadline(uint64_t timeout_ns)
{
    uint64_t now = tally__mono_ns();
    uint64_t t = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
    return (struct timespec){ .tv_sec = (time_t)(t / TALLY__NS_PER_S),
                              .tv_nsec = (long)(t % TALLY__NS_PER_S) };
}

int tally__cond_init_mono(pthread_cond_t *c)
{
    pthread_condattr_t a;
    int rc = pthread_condattr_init(&a);
    if (rc)
        return rc;
    rc = pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    if (!rc)
        rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc;
}
