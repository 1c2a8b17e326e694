/* RCU registration (rcu.h). */
#include <pthread.h>
#include <stdatomic.h>

#include "core/rcu.h"

__thread bool tally__rcu_registered __attribute__((tls_model("initial-exec")));
__thread unsigned tally__thread_no __attribute__((tls_model("initial-exec")));

static pthread_once_t rcu_once = PTHREAD_ONCE_INIT;
static pthread_key_t rcu_key;
static _Atomic unsigned thread_next;

static void rcu_thread_exit(void *arg)
{
    (void)arg;
    urcu_memb_unregister_thread();
}

static void rcu_key_init(void)
{
    pthread_key_create(&rcu_key, rcu_thread_exit);
}

void tally__rcu_register(void)
{
    pthread_once(&rcu_once, rcu_key_init);
    urcu_memb_register_thread();
    /* non-NULL so that the destructor runs when the thread exits */
    pthread_setspecific(rcu_key, &tally__rcu_registered);
    tally__rcu_registered = true;
    tally__thread_no = atomic_fetch_add_explicit(&thread_next, 1, memory_order_relaxed);
}

void tally__rcu_wait(void)
{
    urcu_memb_synchronize_rcu();
}

void tally__rcu_read(void (*fn)(void *), void *arg)
{
    tally__rcu_enter();
    fn(arg);
    tally__rcu_exit();
}
