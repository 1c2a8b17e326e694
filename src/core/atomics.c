/* The CPU check behind tally__state_load_atomic() (atomics.h). */
#include "core/atomics.h"

bool tally__vector_load16;

__attribute__((constructor)) static void atomics_init(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    /* AVX (with the OS saving its state) on a vendor that documents aligned
       16-byte vector accesses as atomic */
    tally__vector_load16 = __builtin_cpu_supports("avx")
        && (__builtin_cpu_is("intel") || __builtin_cpu_is("amd"));
#endif
}
