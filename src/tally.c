/*
 * The entry points that span the layers. Everything else belongs to one
 * layer (docs/ARCHITECTURE.md); only this file may call into all of them.
 */
#include "ops/ops-internal.h"
#include "tally/shared.h"

void tally_close(tally_engine *e)
{
    if (!e)
        return;
    if (e->region) {
        tally_shared_detach(e);     /* the engine is its region's, for the other processes */
        return;
    }
    tally_flusher_stop(e);          /* sync: the last flush, then no flusher thread */
    tally__engine_quiesce(e);       /* engine: no call of the engine's own in flight */
    tally__ops_free(e);             /* ops: episodes and usage reports */
    tally__engine_free(e);
}
