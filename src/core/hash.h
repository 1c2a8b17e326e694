/* The keyed hash that names keys, and hash keys. Private to src/. */
#ifndef TALLY_CORE_HASH_H
#define TALLY_CORE_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tally__digest {
    uint64_t lo, hi;
} tally__digest;

/* SipHash-1-3 with a 128-bit output: the key digest. */
tally__digest tally__siphash128(const uint8_t key[16], const void *data, size_t len);
/* SipHash-2-4 with a 128-bit output: the reference variant, for its test vectors. */
tally__digest tally__siphash24_128(const uint8_t key[16], const void *data, size_t len);

/* True when @n bytes at @p are all zero (an unset hash key). */
static inline bool tally__all_zero(const uint8_t *p, size_t n)
{
    uint8_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

/* An all-zero hash key becomes a random one. Return 0 or TALLY_ENOMEM. */
int tally__hash_key_fill(uint8_t key[16]);

#endif /* TALLY_CORE_HASH_H */
