/* The keyed hashes that name keys, and hash keys. Private to src/. */
#ifndef TALLY_CORE_HASH_H
#define TALLY_CORE_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tally.h"

typedef struct tally__digest {
    uint64_t lo, hi;
} tally__digest;

/* SipHash-1-3 with a 128-bit output: the key digest. */
tally__digest tally__siphash128(const uint8_t key[16], const void *data, size_t len);
/* SipHash-2-4 with a 128-bit output: the reference variant, for its test vectors. */
tally__digest tally__siphash24_128(const uint8_t key[16], const void *data, size_t len);

/* The AES hash (aeshash.c) is built for x86-64 alone, and runs only where
   tally__aeshash_supported(). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TALLY__HAVE_AESHASH 1
#else
#define TALLY__HAVE_AESHASH 0
#endif

/* The AES hash's expanded key: what aeshash.c derives from the 16-byte secret. */
typedef struct tally__aeskey {
    _Alignas(16) uint8_t k[11][16];   /* AES-128 round keys of the secret */
    uint8_t r[4][16];                 /* round keys of the absorbing rounds */
    uint8_t c[4][16];                 /* the lanes' start states */
} tally__aeskey;

/* True when the CPU has AES-NI and SSE4.1, which the AES hash uses. */
bool tally__aeshash_supported(void);
#if TALLY__HAVE_AESHASH
/* Expand @key. The functions below need tally__aeshash_supported(). */
void tally__aeshash_expand(tally__aeskey *out, const uint8_t key[16]);
/* The AES hash with a 128-bit output under an expanded key: a key digest. */
tally__digest tally__aeshash128_x(const tally__aeskey *k, const void *data, size_t len);
/* The same, expanding @key first: the definition's reference form. */
tally__digest tally__aeshash128(const uint8_t key[16], const void *data, size_t len);
#endif

/* The digest function of an engine: the hash tally_open chose, with its key. */
typedef struct tally__hasher {
    tally__aeskey aes;        /* expanded, when kind is TALLY_HASH_AES */
    uint8_t       sip[16];    /* the secret, when kind is TALLY_HASH_SIPHASH */
    tally_hash    kind;       /* never TALLY_HASH_AUTO */
} tally__hasher;

/* Resolve @kind (AUTO: AES where the CPU has it, else SipHash) and set @h up
   with @key. Return 0, or TALLY_EINVAL when @kind is not a tally_hash or is
   TALLY_HASH_AES on a CPU without it. */
int tally__hasher_init(tally__hasher *h, tally_hash kind, const uint8_t key[16]);

static inline tally__digest tally__hasher_digest(const tally__hasher *h, const void *data, size_t len)
{
#if TALLY__HAVE_AESHASH
    if (h->kind == TALLY_HASH_AES)
        return tally__aeshash128_x(&h->aes, data, len);
#endif
    return tally__siphash128(h->sip, data, len);
}

/* The hash's tag in Redis key names: digests of different hashes never share
   a counter. A change to a hash's definition takes a new tag. */
static inline const char *tally__hasher_tag(const tally__hasher *h)
{
    return h->kind == TALLY_HASH_AES ? "a1" : "s1";
}

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
