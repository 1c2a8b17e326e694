/*
 * Key slots of a Redis Cluster: CRC16-CCITT (XMODEM: polynomial 0x1021,
 * initial value 0, no reflection, no final xor) of the key name, or of its
 * hash tag, modulo 16384, as the cluster specification defines them.
 */
#include <string.h>

#include "sync/redis-internal.h"

uint16_t tally__crc16(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

/* The first '{' and the first '}' after it enclose the tag; an empty tag
   ("{}") or an unclosed brace leaves the whole name hashed. */
unsigned tally__key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(open + 1, '}', len - from);
        if (close && close > open + 1)
            return tally__crc16(open + 1, (size_t)(close - open - 1)) & (TALLY__CLUSTER_SLOTS - 1);
    }
    return tally__crc16(key, len) & (TALLY__CLUSTER_SLOTS - 1);
}
