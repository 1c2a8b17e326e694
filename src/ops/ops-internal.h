/* The ops layer's entry points for the layers above it (sync, close). Not installed. */
#ifndef TALLY_OPS_INTERNAL_H
#define TALLY_OPS_INTERNAL_H

#include "core/prom.h"
#include "engine/engine-internal.h"

/* Set a flag learnt from Redis (no event: another engine delivered it). */
void tally__watch_import(tally_engine *e, uint32_t policy, tally__digest d, uint64_t at,
                         uint64_t amount);
/* The flusher's part of the operator views (ops.c). */
void tally__ops_flush(tally_engine *e, uint64_t now);
void tally__ops_usage_add(tally__policy *p, unsigned limit, uint64_t delta);
void tally__ops_usage_emit(tally_engine *e, uint64_t start, uint64_t end,
                           void (*cb)(void *, const tally_usage_report *), void *ctx);
/* The ops views' part of tally_stats_prometheus(), appended to @w. */
void tally__ops_prometheus(tally_engine *e, tally__prom *w);
void tally__ops_free(tally_engine *e);

#endif /* TALLY_OPS_INTERNAL_H */
