/* The Redis sink of a library built without hiredis (meson -Dredis=disabled). */
#include "sync/sync-internal.h"

int tally__sink_redis_new(const tally_redis_options *ro, tally__sink **out)
{
    (void)ro;
    (void)out;
    return TALLY_EINVAL;
}
