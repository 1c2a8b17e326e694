/* Engine statistics, also in the Prometheus text format, and the sink's last error. */
#include <inttypes.h>
#include <stddef.h>
#include <string.h>

#include "core/prom.h"
#include "sync/sync-internal.h"

int tally__stats_read(tally_engine *e, tally_stats *out)
{
    if (!e || !out)
        return TALLY_EINVAL;
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < TALLY__STAT_SHARDS; i++) {
        out->hits += atomic_load_explicit(&e->stats[i].hits, memory_order_relaxed);
        out->denials += atomic_load_explicit(&e->stats[i].denials, memory_order_relaxed);
        out->shadow_denials += atomic_load_explicit(&e->stats[i].shadow_denials, memory_order_relaxed);
        out->full_refusals += atomic_load_explicit(&e->stats[i].full_refusals, memory_order_relaxed);
    }
    /* acquire: paired with the release store in tally_policy_add() (engine/engine.c) */
    uint32_t np = atomic_load_explicit(&e->n_policies, memory_order_acquire);
    for (uint32_t i = 0; i < np; i++) {
        tally__table *t = &tally__policy_get(e, i)->table;
        out->evictions += atomic_load_explicit(&t->reclaimed, memory_order_relaxed);
        out->lru_evictions += atomic_load_explicit(&t->lru_evicted, memory_order_relaxed);
    }
    out->pending_deltas = atomic_load_explicit(&e->pending_deltas, memory_order_relaxed);
    out->pending_cost = atomic_load_explicit(&e->pending_cost, memory_order_relaxed);
    out->flush_batches = atomic_load_explicit(&e->flush_batches, memory_order_relaxed);
    out->flush_failures = atomic_load_explicit(&e->flush_failures, memory_order_relaxed);
    out->redis_reconnects = atomic_load_explicit(&e->redis_reconnects, memory_order_relaxed);
    out->last_flush_ok_ns = atomic_load_explicit(&e->last_flush_ok_ns, memory_order_relaxed);
    out->events = atomic_load_explicit(&e->events_delivered, memory_order_relaxed);
    out->lost_cost = atomic_load_explicit(&e->notes.lost, memory_order_relaxed);
    out->redis_errors = atomic_load_explicit(&e->redis_errors, memory_order_relaxed);
    out->redis_permanent_errors = atomic_load_explicit(&e->redis_permanent_errors, memory_order_relaxed);
    return 0;
}

int tally_flusher_last_error(tally_engine *e, char *buf, size_t len)
{
    if (!e || (!buf && len))
        return TALLY_EINVAL;
    size_t n = 0;
    /* under add_lock the flusher cannot be freed (tally_flusher_stop) */
    tally__lock(&e->add_lock);
    struct tally__flusher *f = e->flusher;
    if (f) {
        pthread_mutex_lock(&f->err_lock);
        n = f->errlen;
        if (len) {
            size_t k = n < len - 1 ? n : len - 1;
            memcpy(buf, f->errstr, k);
            buf[k] = 0;
        }
        pthread_mutex_unlock(&f->err_lock);
    } else if (len) {
        buf[0] = 0;
    }
    pthread_mutex_unlock(&e->add_lock);
    return (int)n;
}

int tally_stats_prometheus(tally_engine *e, char *buf, size_t len)
{
    tally_stats s;
    if (!buf && len)
        return TALLY_EINVAL;
    if (tally__stats_read(e, &s))
        return TALLY_EINVAL;
    static const struct { const char *name, *type, *help; size_t off; } m[] = {
#define M(field, type, help) { "tally_" #field, type, help, offsetof(tally_stats, field) }
        M(hits, "counter", "Hits decided."),
        M(denials, "counter", "Hits denied."),
        M(shadow_denials, "counter", "Hits a shadow-mode policy would have denied."),
        M(evictions, "counter", "Slots reclaimed from keys whose windows expired."),
        M(lru_evictions, "counter", "Live keys evicted to admit a new key (evict-lru)."),
        M(full_refusals, "counter", "Hits refused with TALLY_EFULL."),
        M(pending_deltas, "gauge", "Deltas not yet acknowledged by every sink."),
        M(pending_cost, "gauge", "Cost of the deltas not yet acknowledged."),
        M(flush_batches, "counter", "Flushes that pushed deltas or events."),
        M(flush_failures, "counter", "Flushes in which a sink failed."),
        M(redis_reconnects, "counter", "Reconnections to Redis."),
        M(events, "counter", "first_exceeded events delivered."),
        M(lost_cost, "counter", "Cost that could not be kept for the sinks (out of memory)."),
        M(redis_errors, "counter", "Error replies from Redis."),
        M(redis_permanent_errors, "counter", "Error replies from Redis that a retry cannot cure by itself."),
#undef M
    };
    tally__prom w = { .buf = buf, .len = len };
    for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
        uint64_t v;
        memcpy(&v, (const char *)&s + m[i].off, sizeof(v));
        tally__prom_put(&w, "# HELP %s %s\n# TYPE %s %s\n%s %" PRIu64 "\n",
                        m[i].name, m[i].help, m[i].name, m[i].type, m[i].name, v);
    }
    tally__prom_put(&w, "# HELP tally_last_flush_ok_seconds Unix time of the last acknowledged "
                        "flush.\n# TYPE tally_last_flush_ok_seconds gauge\n"
                        "tally_last_flush_ok_seconds %.3f\n", (double)s.last_flush_ok_ns / 1e9);
    tally__ops_prometheus(e, &w);
    return tally__prom_end_int(&w);
}
