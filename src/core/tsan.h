/*
 * Hand-off annotations for ThreadSanitizer. Private to src/; not installed.
 *
 * A program built with -fsanitize=thread usually links the library as it was
 * installed, not instrumented. ThreadSanitizer then still sees what the
 * library does through the calls it intercepts (malloc, free, memcpy, memset,
 * pthread), but not the C11 atomics by which the library hands memory from
 * one thread to another: a key copied by a hit and read by the flusher, a
 * note pushed on the flusher's stack, a result freed by its last holder. Each
 * such hand-off would be reported as a race in the user's program.
 *
 * So the producer of a hand-off calls tally__tsan_release(obj) before the
 * atomic operation that publishes obj, and the consumer tally__tsan_acquire(obj)
 * after the one by which it took obj: to the sanitizer that is the
 * synchronisation the atomics really provide. The runtime's functions are weak
 * references, resolved only in a process that has the ThreadSanitizer runtime;
 * elsewhere each annotation costs a predictable branch. In a library built
 * with -fsanitize=thread itself they repeat what the instrumented atomics
 * already tell the sanitizer: redundant, and harmless.
 */
#ifndef TALLY_TSAN_INTERNAL_H
#define TALLY_TSAN_INTERNAL_H

#include <stddef.h>

void __tsan_acquire(void *addr) __attribute__((weak));
void __tsan_release(void *addr) __attribute__((weak));

/* A NULL @obj is no object (a digest_only table has no key copies): nothing to order. */
static inline void tally__tsan_acquire(const void *obj)
{
    if (__tsan_acquire && obj)
        __tsan_acquire((void *)obj);
}

static inline void tally__tsan_release(const void *obj)
{
    if (__tsan_release && obj)
        __tsan_release((void *)obj);
}

#endif /* TALLY_TSAN_INTERNAL_H */
