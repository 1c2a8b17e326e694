/* A lease in shared memory (core/lease.h has its guarantees). */
#include "core/lease.h"
#include "core/proc.h"

bool tally__lease_take(tally__lease *l)
{
    uint64_t me = tally__proc_self();
    /* acquire: paired with the release of tally__lease_give() by the last
       holder, whose writes the new holder takes over */
    uint64_t cur = atomic_load_explicit(&l->holder, memory_order_acquire);

    if (cur == me)
        return true;
    if (cur != 0 && !tally__proc_dead(cur))
        return false;
    /* acquire: paired with the release of tally__lease_give(), as the load above */
    return atomic_compare_exchange_strong_explicit(&l->holder, &cur, me, memory_order_acquire,
                                                   memory_order_relaxed);
}

void tally__lease_give(tally__lease *l)
{
    uint64_t me = tally__proc_self();
    /* release: the holder's writes before the next holder's; paired with
       the acquire of tally__lease_take() */
    atomic_compare_exchange_strong_explicit(&l->holder, &me, 0, memory_order_release, memory_order_relaxed);
}

bool tally__lease_held(tally__lease *l)
{
    return atomic_load_explicit(&l->holder, memory_order_relaxed) == tally__proc_self();   /* only we set ours */
}
