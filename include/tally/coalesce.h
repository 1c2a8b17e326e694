/*
 * tally/coalesce.h - coalescing of expensive per-key work, with a cap on
 * operations running at once, attempts per key with a cooldown, a circuit
 * breaker, and counters for operators. Included by <tally.h>.
 *
 * The first caller for a key runs the caller's operation; callers for the
 * same key that arrive while it runs wait and share its result, a refcounted
 * object freed by its last holder. The use it was made for: 100 concurrent
 * requests for one expired access token cause one refresh, not 100.
 *
 * The same contract sentences as tally.h are used: "Any thread may call it",
 * "It never blocks", "It may block (...)", "On failure nothing changes".
 * Times are nanoseconds since the Unix epoch, as tally_now_ns() returns them;
 * the _at variants take the time from the caller, as tally_hit_at() does.
 */
#ifndef TALLY_COALESCE_H
#define TALLY_COALESCE_H

#include "export.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Circuit breaker ---------------------------------------------------- */

/*
 * A circuit breaker guards a dependency that fails as a whole (an auth
 * server, a database). Its whole state is one 64-bit word changed only by
 * compare-and-swap: the state, the count of consecutive failures, and the
 * time it last opened (in milliseconds, rounded up).
 *
 *   closed     calls go ahead; @failures_to_open consecutive failures open it
 *   open       calls fail at once with TALLY_EOPEN until @open_ns have passed
 *              since it opened; then exactly one caller becomes the probe
 *   half-open  the probe runs, every other caller gets TALLY_EOPEN; the
 *              probe's success closes the breaker, its failure reopens it
 *
 * A caller asks with tally_breaker_enter() and reports with
 * tally_breaker_leave(). A report counts only while the breaker is still in
 * the period the caller entered in: a failure that comes back after the
 * breaker opened (or opened and closed again) changes nothing.
 */
typedef struct tally_breaker tally_breaker;

typedef enum tally_breaker_state {
    TALLY_BREAKER_CLOSED = 0,
    TALLY_BREAKER_OPEN = 1,
    TALLY_BREAKER_HALF_OPEN = 2
} tally_breaker_state;

typedef struct tally_breaker_options {
    uint32_t failures_to_open;  /* consecutive failures that open it; 1..TALLY_BREAKER_MAX_FAILURES */
    uint64_t open_ns;           /* how long it stays open before the probe; 1..TALLY_MAX_PERIOD_NS */
} tally_breaker_options;

#define TALLY_BREAKER_MAX_FAILURES ((UINT32_C(1) << 20) - 1)

/* What tally_breaker_enter() hands out and tally_breaker_leave() takes back. */
typedef uint64_t tally_breaker_ticket;

/* A decoded breaker word. */
typedef struct tally_breaker_view {
    tally_breaker_state state;
    uint32_t failures;          /* consecutive failures counted while closed */
    uint64_t opened_at_ns;      /* when it last opened (a multiple of 1 ms); 0: never */
} tally_breaker_view;

/*
 * tally_breaker_new - create a breaker, closed, with no failure counted.
 * @opts: failures_to_open and open_ns, both required.
 * @out:  receives the breaker.
 * (Not "open": that is one of the breaker's states.)
 * Return 0, TALLY_EINVAL (NULL argument; failures_to_open 0 or above
 * TALLY_BREAKER_MAX_FAILURES; open_ns 0 or above TALLY_MAX_PERIOD_NS) or
 * TALLY_ENOMEM.
 * Any thread may call it. It may block (it allocates).
 * On failure nothing is allocated and *@out is untouched.
 */
TALLY_EXPORT int tally_breaker_new(const tally_breaker_options *opts, tally_breaker **out);

/*
 * tally_breaker_free - destroy a breaker. NULL is a no-op.
 * No call on @b may overlap or follow it.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT void tally_breaker_free(tally_breaker *b);

/*
 * tally_breaker_enter_at - ask the breaker whether a call may go ahead at @now_ns.
 * @ticket: receives the ticket to pass to tally_breaker_leave_at().
 * Closed: the call goes ahead. Open, less than open_ns after it opened:
 * TALLY_EOPEN. Open, open_ns or more after it opened: exactly one caller
 * moves it to half-open and goes ahead as the probe; the others get
 * TALLY_EOPEN. Half-open: TALLY_EOPEN.
 * Return 0 (go ahead; the caller must then call tally_breaker_leave_at()
 * once, and the probe must or the breaker stays half-open), TALLY_EOPEN,
 * TALLY_EINVAL (NULL argument; @now_ns above INT64_MAX).
 * Any thread may call it. It never blocks.
 * On failure nothing changes.
 */
TALLY_EXPORT int tally_breaker_enter_at(tally_breaker *b, uint64_t now_ns,
                                        tally_breaker_ticket *ticket);

/*
 * tally_breaker_leave_at - report the outcome of a call that entered.
 * @ticket:  what tally_breaker_enter_at() gave the call.
 * @success: whether the guarded call succeeded.
 * Closed, and still in the closed period the call entered in: a success
 * resets the failure count, a failure adds one and the failure_to_open-th
 * opens the breaker at @now_ns. Half-open, from the probe: a success closes
 * it, a failure opens it again at @now_ns. Any other report changes nothing.
 * Return 0, TALLY_EINVAL (NULL @b; @now_ns above INT64_MAX).
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT int tally_breaker_leave_at(tally_breaker *b, tally_breaker_ticket ticket, bool success,
                                        uint64_t now_ns);

/* tally_breaker_enter - tally_breaker_enter_at() at tally_now_ns(). Same contract. */
TALLY_EXPORT int tally_breaker_enter(tally_breaker *b, tally_breaker_ticket *ticket);

/* tally_breaker_leave - tally_breaker_leave_at() at tally_now_ns(). Same contract. */
TALLY_EXPORT int tally_breaker_leave(tally_breaker *b, tally_breaker_ticket ticket, bool success);

/*
 * tally_breaker_read - the breaker's state, failure count and opening time,
 * decoded from one load of its word.
 * Return 0, TALLY_EINVAL (NULL argument).
 * Any thread may call it. It never blocks. It changes nothing.
 */
TALLY_EXPORT int tally_breaker_read(const tally_breaker *b, tally_breaker_view *out);

/* ---- Shared results ----------------------------------------------------- */

/*
 * The outcome of one execution, shared by its leader and every caller that
 * waited for it. Each holder owns one reference and gives it back with
 * tally_coalesce_release(); the last one calls the operation's free_value.
 */
typedef struct tally_coalesce_result tally_coalesce_result;

/*
 * tally_coalesce_value - the value the operation produced (NULL if it set
 * none, or for NULL @r).
 * It stays valid until the caller releases its reference; every holder sees
 * the same pointer, so treat what it points to as read-only.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT void *tally_coalesce_value(const tally_coalesce_result *r);

/*
 * tally_coalesce_status - what the operation's run function returned:
 * 0 for success, any other value is the operation's own failure code
 * (TALLY_EINVAL for NULL @r).
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT int tally_coalesce_status(const tally_coalesce_result *r);

/*
 * tally_coalesce_retain - take one more reference to @r (to hand it to
 * another thread, which then releases it). Return @r.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT tally_coalesce_result *tally_coalesce_retain(tally_coalesce_result *r);

/*
 * tally_coalesce_release - give back one reference. NULL is a no-op.
 * The last reference calls free_value(value) (when both are set) and frees @r.
 * A result does not point into its coalescer: it may be released after
 * tally_coalesce_close().
 * Any thread may call it. It never blocks, except in free_value.
 */
TALLY_EXPORT void tally_coalesce_release(tally_coalesce_result *r);

/* ---- Coalescer ---------------------------------------------------------- */

typedef struct tally_coalesce tally_coalesce;

typedef struct tally_coalesce_options {
    size_t   capacity;          /* keys tracked at once: running, or holding attempt or
                                   cooldown state; memory is bounded by it. Default 4096 */
    uint32_t max_running;       /* executions running at once across keys; 0: no cap */
    uint32_t max_attempts;      /* executions per key per attempt window; 0: no limit */
    uint64_t attempt_window_ns; /* the window, opened by a key's first attempt */
    uint64_t cooldown_ns;       /* how long a key that ran out of attempts is refused */
    uint32_t breaker_failures;  /* consecutive failed executions that open the
                                   breaker (one for the coalescer); 0: no breaker */
    uint64_t breaker_open_ns;   /* how long the breaker stays open before the probe */
    const char *name;           /* the "name" label of the metrics; copied. NULL: "" */
    uint8_t  hash_key[16];      /* secret for the keyed hash; all zero => random at open */
} tally_coalesce_options;

#define TALLY_COALESCE_MAX_CAPACITY ((size_t)1 << 28)
#define TALLY_COALESCE_MAX_NAME     128

/* Wait for the leader without a bound (the timeout of tally_coalesce_do). */
#define TALLY_COALESCE_FOREVER UINT64_MAX

/*
 * tally_coalesce_options_init - fill @opts with defaults: capacity 4096, no
 * cap, no attempt limit, no breaker, name NULL, hash_key all zero.
 * Any thread may call it. It never blocks.
 */
TALLY_EXPORT void tally_coalesce_options_init(tally_coalesce_options *opts);

/*
 * tally_coalesce_open - create a coalescer.
 * @opts: options; NULL means the defaults of tally_coalesce_options_init().
 * @out:  receives the coalescer.
 * Return 0, TALLY_EINVAL (NULL @out; capacity 0 or above
 * TALLY_COALESCE_MAX_CAPACITY; max_attempts set with attempt_window_ns 0;
 * attempt_window_ns or cooldown_ns above TALLY_MAX_PERIOD_NS; breaker_failures
 * above TALLY_BREAKER_MAX_FAILURES; breaker_failures set with breaker_open_ns 0
 * or above TALLY_MAX_PERIOD_NS; name longer than TALLY_COALESCE_MAX_NAME)
 * or TALLY_ENOMEM.
 * Any thread may call it. It may block (it allocates).
 * On failure nothing is allocated and *@out is untouched.
 */
TALLY_EXPORT int tally_coalesce_open(const tally_coalesce_options *opts, tally_coalesce **out);

/*
 * The caller's operation. run() is called on the leader's thread with @arg
 * and *value set to NULL; it returns 0 on success or its own nonzero failure
 * code, and may set *value in both cases. free_value (may be NULL) is called
 * once on that value by whoever releases the last reference to the result.
 * Only the leader's operation runs: a caller that joins a running execution
 * shares its result and its run() is not called.
 * run() must not call tally_coalesce_do() for its own key (it would wait for
 * itself until its timeout) nor tally_coalesce_shutdown/close on its coalescer.
 * A time bound on the operation itself is run()'s own business (the I/O
 * timeouts it sets); the coalescer cannot interrupt it.
 */
typedef struct tally_coalesce_op {
    int  (*run)(void *arg, void **value);
    void (*free_value)(void *value);
    void  *arg;
} tally_coalesce_op;

/*
 * tally_coalesce_do_at - run @op for @key, or share the result of the
 * execution already running for @key.
 * @key, @key_len: the key; only a keyed 128-bit digest of it is kept.
 * @op:         the operation, used only if this call becomes the leader.
 * @now_ns:     the time for the attempt window, the cooldown and the breaker
 *              (also the time of the breaker report after the run).
 * @timeout_ns: how long to wait for a running execution (real time, from the
 *              call); 0: do not wait; TALLY_COALESCE_FOREVER: no bound.
 * @out:        receives a reference to the result, to release with
 *              tally_coalesce_release().
 * If an execution of @key is running, the call joins it, waits, and receives
 * that execution's result: no limit below applies to it. Otherwise it becomes
 * the leader, in this order: a key in cooldown is refused (TALLY_ECOOLDOWN);
 * a key whose attempt window is full is refused and enters its cooldown,
 * until max(now + cooldown_ns, end of the window) (TALLY_ECOOLDOWN); with
 * max_running executions already running the call is refused (TALLY_EBUSY);
 * an open breaker refuses it (TALLY_EOPEN). Then the call counts one attempt
 * for @key, runs op->run on its own thread, reports the outcome to the
 * breaker, wakes the waiters and returns the result. A waiter that gives up
 * (timeout or shutdown) changes nothing for the execution or the other waiters.
 * Return 0 (*@out holds the result, whose status tells whether the
 * operation succeeded), TALLY_ETIMEDOUT (the execution it joined was still
 * running after @timeout_ns), TALLY_ECOOLDOWN, TALLY_EBUSY, TALLY_EOPEN,
 * TALLY_EFULL (@key is new and every one of the capacity entries holds a
 * running key or unexpired attempt state), TALLY_ENOMEM, TALLY_ESTATE
 * (shutdown started, also while waiting), TALLY_EINVAL (NULL @c, @key, @op,
 * op->run or @out; key_len 0 or above TALLY_MAX_KEY_LEN; @now_ns above
 * INT64_MAX).
 * Any thread may call it. It may block: a leader runs op->run; a waiter waits
 * up to @timeout_ns; a new key in a full table takes other keys' locks to
 * reclaim expired entries.
 * On failure *@out is untouched and no reference is taken; a refusal changes
 * nothing but the key's cooldown and the counters.
 */
TALLY_EXPORT int tally_coalesce_do_at(tally_coalesce *c, const void *key, size_t key_len,
                                      const tally_coalesce_op *op, uint64_t now_ns,
                                      uint64_t timeout_ns, tally_coalesce_result **out);

/* tally_coalesce_do - tally_coalesce_do_at() at tally_now_ns(), read at the
   call and, for the breaker report, again when run() returns. Same contract. */
TALLY_EXPORT int tally_coalesce_do(tally_coalesce *c, const void *key, size_t key_len,
                                   const tally_coalesce_op *op, uint64_t timeout_ns,
                                   tally_coalesce_result **out);

/* ---- Counters ------------------------------------------------------------ */

typedef struct tally_coalesce_stats {
    uint64_t calls;             /* calls past argument checks and shutdown */
    uint64_t coalesced;         /* calls that joined a running execution */
    uint64_t executions;        /* operations started (leaders) */
    uint64_t failures;          /* executions whose run() returned nonzero */
    uint64_t timeouts;          /* joined calls that gave up waiting */
    uint64_t rejected_busy;     /* refused with TALLY_EBUSY (cap on running executions) */
    uint64_t rejected_cooldown; /* refused with TALLY_ECOOLDOWN */
    uint64_t rejected_open;     /* refused with TALLY_EOPEN (breaker) */
    uint64_t rejected_full;     /* refused with TALLY_EFULL (no entry for a new key) */
    uint64_t running;           /* executions running now */
    uint64_t keys;              /* entries in use now (running or holding attempt state) */
    bool     has_breaker;
    tally_breaker_view breaker; /* all zero (closed) without a breaker */
} tally_coalesce_stats;

/*
 * tally_coalesce_read_stats - read the counters.
 * Each counter is exact for the calls that finished before the read; the
 * set is not one atomic snapshot (the counters are kept per lock stripe).
 * Return 0, TALLY_EINVAL (NULL argument).
 * Any thread may call it, also during shutdown. It may block (it takes each
 * stripe's lock in turn, briefly). It changes nothing.
 */
TALLY_EXPORT int tally_coalesce_read_stats(tally_coalesce *c, tally_coalesce_stats *out);

/*
 * tally_coalesce_prometheus - write the counters in the Prometheus text
 * exposition format (version 0.0.4), each sample labelled name="<name>".
 * @buf, @size: where to write; at most @size bytes including a final NUL
 *              (nothing is written when @size is 0; @buf may then be NULL).
 * Return the length of the whole text without its NUL, as snprintf() does:
 * the text is complete when the return value is below @size. 0 for NULL @c.
 * Any thread may call it, also during shutdown. It may block as
 * tally_coalesce_read_stats() does. It changes nothing.
 */
TALLY_EXPORT size_t tally_coalesce_prometheus(tally_coalesce *c, char *buf, size_t size);

/* ---- Shutdown ------------------------------------------------------------ */

/*
 * tally_coalesce_shutdown - stop taking calls and wait for running executions.
 * @timeout_ns: the most it waits (real time); 0: do not wait;
 *              TALLY_COALESCE_FOREVER: no bound.
 * From its start every new call, and every call waiting for an execution,
 * returns TALLY_ESTATE; executions already running finish and hand their
 * result to their leader. It may be called any number of times, from any
 * number of threads.
 * Return 0 (no call is inside the coalescer any more), TALLY_ETIMEDOUT
 * (executions still run; call it again to keep waiting), TALLY_EINVAL
 * (NULL @c).
 * Any thread may call it, except from inside run(). It may block up to
 * @timeout_ns.
 */
TALLY_EXPORT int tally_coalesce_shutdown(tally_coalesce *c, uint64_t timeout_ns);

/*
 * tally_coalesce_close - shut down without a bound, then free the coalescer.
 * NULL is a no-op. Calls already running or waiting when it starts are
 * waited for (a waiter returns TALLY_ESTATE at once, a leader finishes its
 * run()): call tally_coalesce_shutdown() first to bound that wait. No other
 * call may overlap close, and none may follow it (the handle is gone): stop
 * the calling threads first; tally_coalesce_shutdown() makes their late calls
 * return TALLY_ESTATE meanwhile. Results still held by callers stay valid.
 * Any thread may call it, except from inside run(). It may block.
 */
TALLY_EXPORT void tally_coalesce_close(tally_coalesce *c);

#ifdef __cplusplus
}
#endif

#endif /* TALLY_COALESCE_H */
