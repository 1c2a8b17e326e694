/*
 * ngx_http_tally_module: rate limits and usage counts of tally in nginx's
 * preaccess phase, the phase of limit_req.
 *
 *   tally_zone NAME size=SIZE [redis=HOST:PORT hash_key=HEX] [flush=TIME];  http
 *   tally_policy ZONE "SPEC";                                         http
 *   tally ZONE POLICY key=$var [cost=$var] [status=CODE] [dry_run];   http, server, location
 *   tally_status CODE;                        default 429             http, server, location
 *   tally_log_level info|notice|warn|error;   default error           http, server, location
 *   tally_headers on|off;                     default off             http, server, location
 *   tally_metrics ZONE;                                               location
 *   $tally_status: PASSED, REJECTED, REJECTED_DRY_RUN or ERROR; $tally_remaining
 *
 * A zone without redis= is one shared engine (tally/shared.h) in an nginx
 * shared memory zone of size=SIZE, laid out by the master when it reads the
 * configuration and used by every worker: counts are exact across workers,
 * as limit_req's are, without a lock. Its key capacity is what SIZE holds.
 * A reload that keeps the zone's name, size and policies keeps every key's
 * usage (nginx hands the new configuration the same memory); one that
 * changes its policies at the same size is refused (give the zone another
 * size or name to start it anew), since the workers of the old
 * configuration still count in it while they finish.
 *
 * A zone with redis= syncs through Redis instead, and each worker process
 * opens an engine of its own when it starts (init_process) and closes it
 * when it exits: the flusher's threads do not survive nginx's fork, and a
 * shared engine has no flusher. Such a zone's counts are per worker: with
 * worker_processes N, a key is admitted up to N times its max within one
 * flush interval, which bounds the overshoot by what the workers admit in
 * it. Redis names a key by its keyed digest, so every engine that shares
 * the counts needs the same hash key: redis= requires hash_key= (32 hex
 * digits, a secret), the same in every nginx that shares the zone's counts.
 * A reload starts new workers with new engines: usage held only locally
 * starts again from zero.
 *
 * A request whose key evaluates to the empty string is not counted, as in
 * limit_req. The zone's policies are the specs of the policy grammar
 * (docs/TOOLS.md, "Policy specs"); each is checked when the configuration is
 * read, so that `nginx -t` refuses a bad one with the parser's message.
 */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <tally.h>

#define TALLY_NGX_BYTES_PER_KEY  128     /* a zone's size over this is its key capacity */
#define TALLY_NGX_MIN_KEYS       64
#define TALLY_NGX_DEFAULT_FLUSH  100     /* ms */

enum {
    TALLY_NGX_NONE = 0,
    TALLY_NGX_PASSED,
    TALLY_NGX_REJECTED,
    TALLY_NGX_REJECTED_DRY_RUN,
    TALLY_NGX_ERROR
};

typedef struct {
    ngx_str_t      name;                 /* the spec's name, for `tally ZONE POLICY` */
    tally_policy   policy;               /* policy.name points into name_buf */
    char           name_buf[TALLY_MAX_POLICY_NAME + 1];
    uint32_t       id;                   /* in this worker's engine */
} ngx_http_tally_policy_t;

typedef struct {
    ngx_str_t      name;
    size_t         size;
    ngx_str_t      redis_host;           /* NUL-terminated; empty: no Redis */
    ngx_int_t      redis_port;
    ngx_msec_t     flush;
    u_char         hash_key[16];         /* tally_options.hash_key */
    ngx_flag_t     has_hash_key;         /* else each worker's engine draws its own */
    ngx_array_t    policies;             /* of ngx_http_tally_policy_t */
    ngx_shm_zone_t *shm;                 /* a shared zone's memory; NULL with redis= */
    ngx_cycle_t   *cycle;                /* of the configuration that declared it */
    uint64_t       fingerprint;          /* of a shared zone's policies */
    tally_engine  *engine;               /* the shared zone's, or this worker's */
} ngx_http_tally_zone_t;

typedef struct {
    ngx_http_tally_zone_t     *zone;
    ngx_uint_t                 policy;   /* index into zone->policies */
    ngx_http_complex_value_t   key;
    ngx_http_complex_value_t  *cost;     /* NULL: 1 */
    ngx_uint_t                 status;   /* 0: tally_status */
    ngx_flag_t                 dry_run;
} ngx_http_tally_limit_t;

typedef struct {
    ngx_array_t    zones;                /* of ngx_http_tally_zone_t */
} ngx_http_tally_main_conf_t;

typedef struct {
    ngx_array_t             *limits;     /* of ngx_http_tally_limit_t; NULL: inherit */
    ngx_uint_t               status;
    ngx_uint_t               log_level;
    ngx_flag_t               headers;
    ngx_http_tally_zone_t   *metrics;    /* tally_metrics ZONE */
} ngx_http_tally_loc_conf_t;

typedef struct {
    ngx_uint_t     status;               /* TALLY_NGX_* */
    uint64_t       remaining;
} ngx_http_tally_ctx_t;

static ngx_int_t ngx_http_tally_add_variables(ngx_conf_t *cf);
static void *ngx_http_tally_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_tally_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_tally_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static ngx_int_t ngx_http_tally_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_tally_init_process(ngx_cycle_t *cycle);
static void ngx_http_tally_exit_process(ngx_cycle_t *cycle);
static char *ngx_http_tally_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_tally_policy(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_tally(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_tally_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_tally_init_zone(ngx_shm_zone_t *shm, void *data);

static ngx_conf_enum_t ngx_http_tally_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};

static ngx_conf_num_bounds_t ngx_http_tally_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};

static ngx_command_t ngx_http_tally_commands[] = {
    { ngx_string("tally_zone"),
      NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
      ngx_http_tally_zone, 0, 0, NULL },

    { ngx_string("tally_policy"),
      NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2,
      ngx_http_tally_policy, 0, 0, NULL },

    { ngx_string("tally"),
      NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_2MORE,
      ngx_http_tally, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },

    { ngx_string("tally_status"),
      NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
      ngx_conf_set_num_slot, NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tally_loc_conf_t, status), &ngx_http_tally_status_bounds },

    { ngx_string("tally_log_level"),
      NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot, NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tally_loc_conf_t, log_level), &ngx_http_tally_log_levels },

    { ngx_string("tally_headers"),
      NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG,
      ngx_conf_set_flag_slot, NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tally_loc_conf_t, headers), NULL },

    { ngx_string("tally_metrics"),
      NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
      ngx_http_tally_metrics, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },

    ngx_null_command
};

static ngx_http_module_t ngx_http_tally_module_ctx = {
    ngx_http_tally_add_variables,        /* preconfiguration */
    ngx_http_tally_init,                 /* postconfiguration */
    ngx_http_tally_create_main_conf,
    NULL,                                /* init main configuration */
    NULL,                                /* create server configuration */
    NULL,                                /* merge server configuration */
    ngx_http_tally_create_loc_conf,
    ngx_http_tally_merge_loc_conf
};

ngx_module_t ngx_http_tally_module = {
    NGX_MODULE_V1,
    &ngx_http_tally_module_ctx,
    ngx_http_tally_commands,
    NGX_HTTP_MODULE,
    NULL,                                /* init master */
    NULL,                                /* init module */
    ngx_http_tally_init_process,
    NULL,                                /* init thread */
    NULL,                                /* exit thread */
    ngx_http_tally_exit_process,
    NULL,                                /* exit master */
    NGX_MODULE_V1_PADDING
};

/* ---- configuration --------------------------------------------------------- */

static void *ngx_http_tally_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_tally_main_conf_t *mcf = ngx_pcalloc(cf->pool, sizeof(*mcf));
    if (mcf == NULL)
        return NULL;
    if (ngx_array_init(&mcf->zones, cf->pool, 4, sizeof(ngx_http_tally_zone_t)) != NGX_OK)
        return NULL;
    return mcf;
}

static void *ngx_http_tally_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_tally_loc_conf_t *lcf = ngx_pcalloc(cf->pool, sizeof(*lcf));
    if (lcf == NULL)
        return NULL;
    lcf->limits = NULL;
    lcf->status = NGX_CONF_UNSET_UINT;
    lcf->log_level = NGX_CONF_UNSET_UINT;
    lcf->headers = NGX_CONF_UNSET;
    return lcf;
}

static char *ngx_http_tally_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_tally_loc_conf_t *prev = parent, *conf = child;

    if (conf->limits == NULL)
        conf->limits = prev->limits;
    ngx_conf_merge_uint_value(conf->status, prev->status, NGX_HTTP_TOO_MANY_REQUESTS);
    ngx_conf_merge_uint_value(conf->log_level, prev->log_level, NGX_LOG_ERR);
    ngx_conf_merge_value(conf->headers, prev->headers, 0);
    return NGX_CONF_OK;
}

static ngx_http_tally_zone_t *find_zone(ngx_http_tally_main_conf_t *mcf, ngx_str_t *name)
{
    ngx_http_tally_zone_t *z = mcf->zones.elts;
    for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++) {
        if (z[i].name.len == name->len && ngx_strncmp(z[i].name.data, name->data, name->len) == 0)
            return &z[i];
    }
    return NULL;
}

static ngx_http_tally_zone_t *zone_arg(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_http_tally_main_conf_t *mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_tally_module);
    ngx_http_tally_zone_t *z = find_zone(mcf, name);
    if (z == NULL)
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "unknown tally zone \"%V\" (tally_zone must come first)",
                           name);
    return z;
}

/* "k=v": the value when @arg starts with @k and '=', else NULL. */
static ngx_str_t *arg_value(ngx_str_t *arg, const char *k, ngx_str_t *out)
{
    size_t n = ngx_strlen(k);
    if (arg->len <= n || ngx_strncmp(arg->data, k, n) != 0 || arg->data[n] != '=')
        return NULL;
    out->data = arg->data + n + 1;
    out->len = arg->len - n - 1;
    return out;
}

/* 32 hex digits into 16 bytes, not all zero (tally_open would take that
   for "draw a random key", one per worker). The value is a secret: no
   message repeats it. */
static ngx_int_t parse_hash_key(const ngx_str_t *v, u_char out[16])
{
    u_char any = 0;
    if (v->len != 32)
        return NGX_ERROR;
    for (size_t i = 0; i < 16; i++) {
        ngx_int_t b = ngx_hextoi(v->data + 2 * i, 2);
        if (b == NGX_ERROR)
            return NGX_ERROR;
        out[i] = (u_char)b;
        any |= out[i];
    }
    return any ? NGX_OK : NGX_ERROR;
}

static char *ngx_http_tally_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tally_main_conf_t *mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_tally_module);
    ngx_str_t *value = cf->args->elts, v;
    ngx_http_tally_zone_t *z;

    (void)cmd;
    (void)conf;
    if (value[1].len == 0 || value[1].len > TALLY_MAX_POLICY_NAME) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid tally zone name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }
    if (find_zone(mcf, &value[1])) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "duplicate tally zone \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }
    z = ngx_array_push(&mcf->zones);
    if (z == NULL)
        return NGX_CONF_ERROR;
    ngx_memzero(z, sizeof(*z));
    z->name = value[1];
    z->flush = TALLY_NGX_DEFAULT_FLUSH;
    if (ngx_array_init(&z->policies, cf->pool, 4, sizeof(ngx_http_tally_policy_t)) != NGX_OK)
        return NGX_CONF_ERROR;

    for (ngx_uint_t i = 2; i < cf->args->nelts; i++) {
        if (arg_value(&value[i], "size", &v)) {
            ssize_t size = ngx_parse_size(&v);
            if (size == NGX_ERROR || (size_t)size < TALLY_NGX_MIN_KEYS * TALLY_NGX_BYTES_PER_KEY) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": invalid size \"%V\" "
                                   "(at least %uz bytes)", &z->name, &v,
                                   (size_t)TALLY_NGX_MIN_KEYS * TALLY_NGX_BYTES_PER_KEY);
                return NGX_CONF_ERROR;
            }
            z->size = (size_t)size;
        } else if (arg_value(&value[i], "redis", &v)) {
            u_char *colon = ngx_strlchr(v.data, v.data + v.len, ':');
            ngx_int_t port = colon ? ngx_atoi(colon + 1, (size_t)(v.data + v.len - colon - 1)) : NGX_ERROR;
            if (colon == NULL || colon == v.data || port < 1 || port > 65535) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": invalid redis=\"%V\" "
                                   "(HOST:PORT)", &z->name, &v);
                return NGX_CONF_ERROR;
            }
            z->redis_host.len = (size_t)(colon - v.data);
            z->redis_host.data = ngx_pnalloc(cf->pool, z->redis_host.len + 1);
            if (z->redis_host.data == NULL)
                return NGX_CONF_ERROR;
            ngx_memcpy(z->redis_host.data, v.data, z->redis_host.len);
            z->redis_host.data[z->redis_host.len] = '\0';
            z->redis_port = port;
        } else if (arg_value(&value[i], "hash_key", &v)) {
            if (parse_hash_key(&v, z->hash_key) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": invalid hash_key "
                                   "(32 hex digits, not all zero)", &z->name);
                return NGX_CONF_ERROR;
            }
            z->has_hash_key = 1;
        } else if (arg_value(&value[i], "flush", &v)) {
            ngx_int_t ms = ngx_parse_time(&v, 0);
            if (ms == NGX_ERROR || ms == 0 || ms > 3600000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": invalid flush=\"%V\"",
                                   &z->name, &v);
                return NGX_CONF_ERROR;
            }
            z->flush = (ngx_msec_t)ms;
        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": unknown parameter \"%V\"",
                               &z->name, &value[i]);
            return NGX_CONF_ERROR;
        }
    }
    if (z->size == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\" needs size=SIZE", &z->name);
        return NGX_CONF_ERROR;
    }
    if (z->redis_host.len && !z->has_hash_key) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": redis= needs hash_key=HEX "
                           "(32 hex digits, the same in every nginx that shares the counts)",
                           &z->name);
        return NGX_CONF_ERROR;
    }
    if (z->redis_host.len == 0) {
        z->shm = ngx_shared_memory_add(cf, &z->name, z->size, &ngx_http_tally_module);
        if (z->shm == NULL)
            return NGX_CONF_ERROR;
        if (z->shm->data) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally zone \"%V\": the name of another shared "
                               "memory zone", &z->name);
            return NGX_CONF_ERROR;
        }
        z->shm->init = ngx_http_tally_init_zone;
        z->shm->data = z;
        z->cycle = cf->cycle;
    }
    return NGX_CONF_OK;
}

static char *ngx_http_tally_policy(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t *value = cf->args->elts;
    ngx_http_tally_zone_t *z = zone_arg(cf, &value[1]);
    ngx_http_tally_policy_t *p, *all;
    tally_spec_error err;
    char *text;

    (void)cmd;
    (void)conf;
    if (z == NULL)
        return NGX_CONF_ERROR;
    text = ngx_pnalloc(cf->pool, value[2].len + 1);
    if (text == NULL)
        return NGX_CONF_ERROR;
    ngx_memcpy(text, value[2].data, value[2].len);
    text[value[2].len] = '\0';
    p = ngx_array_push(&z->policies);
    if (p == NULL)
        return NGX_CONF_ERROR;
    ngx_memzero(p, sizeof(*p));
    if (ngx_strlen(text) != value[2].len
        || tally_policy_parse(text, &p->policy, p->name_buf, sizeof(p->name_buf), &err) != 0) {
        if (ngx_strlen(text) != value[2].len)
            ngx_cpystrn((u_char *)err.message, (u_char *)"a NUL byte in the spec", sizeof(err.message));
        z->policies.nelts--;
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally_policy \"%V\": %s at byte %uz",
                           &value[2], err.message, err.offset);
        return NGX_CONF_ERROR;
    }
    p->name.data = (u_char *)p->name_buf;
    p->name.len = ngx_strlen(p->name_buf);
    all = z->policies.elts;
    for (ngx_uint_t i = 0; i + 1 < z->policies.nelts; i++) {
        if (all[i].name.len == p->name.len && ngx_strcmp(all[i].name_buf, p->name_buf) == 0) {
            z->policies.nelts--;
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "duplicate tally policy \"%V\" in zone \"%V\"",
                               &p->name, &z->name);
            return NGX_CONF_ERROR;
        }
    }
    return NGX_CONF_OK;
}

/* The policy of @z named @name: its index, or NGX_ERROR. */
static ngx_int_t find_policy(ngx_http_tally_zone_t *z, ngx_str_t *name)
{
    ngx_http_tally_policy_t *p = z->policies.elts;
    for (ngx_uint_t i = 0; i < z->policies.nelts; i++) {
        if (p[i].name.len == name->len && ngx_strncmp(p[i].name.data, name->data, name->len) == 0)
            return (ngx_int_t)i;
    }
    return NGX_ERROR;
}

static char *complex_arg(ngx_conf_t *cf, ngx_str_t *v, ngx_http_complex_value_t *cv)
{
    ngx_http_compile_complex_value_t ccv;

    ngx_memzero(&ccv, sizeof(ccv));
    ccv.cf = cf;
    ccv.value = v;
    ccv.complex_value = cv;
    return ngx_http_compile_complex_value(&ccv) == NGX_OK ? NGX_CONF_OK : NGX_CONF_ERROR;
}

static char *ngx_http_tally(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tally_loc_conf_t *lcf = conf;
    ngx_str_t *value = cf->args->elts, v;
    ngx_http_tally_zone_t *z = zone_arg(cf, &value[1]);
    ngx_http_tally_limit_t *l;
    ngx_int_t policy;
    ngx_flag_t have_key = 0;

    (void)cmd;
    if (z == NULL)
        return NGX_CONF_ERROR;
    policy = find_policy(z, &value[2]);
    if (policy == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "unknown tally policy \"%V\" in zone \"%V\" "
                           "(tally_policy must come first)", &value[2], &z->name);
        return NGX_CONF_ERROR;
    }
    if (lcf->limits == NULL) {
        lcf->limits = ngx_array_create(cf->pool, 2, sizeof(ngx_http_tally_limit_t));
        if (lcf->limits == NULL)
            return NGX_CONF_ERROR;
    }
    l = ngx_array_push(lcf->limits);
    if (l == NULL)
        return NGX_CONF_ERROR;
    ngx_memzero(l, sizeof(*l));
    l->zone = z;
    l->policy = (ngx_uint_t)policy;

    for (ngx_uint_t i = 3; i < cf->args->nelts; i++) {
        if (arg_value(&value[i], "key", &v)) {
            if (complex_arg(cf, &v, &l->key) != NGX_CONF_OK)
                return NGX_CONF_ERROR;
            have_key = 1;
        } else if (arg_value(&value[i], "cost", &v)) {
            l->cost = ngx_pcalloc(cf->pool, sizeof(*l->cost));
            if (l->cost == NULL || complex_arg(cf, &v, l->cost) != NGX_CONF_OK)
                return NGX_CONF_ERROR;
        } else if (arg_value(&value[i], "status", &v)) {
            ngx_int_t status = ngx_atoi(v.data, v.len);
            if (status < 400 || status > 599) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally: invalid status=\"%V\" (400..599)", &v);
                return NGX_CONF_ERROR;
            }
            l->status = (ngx_uint_t)status;
        } else if (value[i].len == 7 && ngx_strncmp(value[i].data, "dry_run", 7) == 0) {
            l->dry_run = 1;
        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally: unknown parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }
    }
    if (!have_key) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally %V %V needs key=$variable", &value[1], &value[2]);
        return NGX_CONF_ERROR;
    }
    return NGX_CONF_OK;
}

/* ---- variables ------------------------------------------------------------- */

static ngx_str_t ngx_http_tally_status_names[] = {
    ngx_null_string,
    ngx_string("PASSED"),
    ngx_string("REJECTED"),
    ngx_string("REJECTED_DRY_RUN"),
    ngx_string("ERROR")
};

static ngx_int_t ngx_http_tally_status_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
                                               uintptr_t data)
{
    ngx_http_tally_ctx_t *ctx = ngx_http_get_module_ctx(r, ngx_http_tally_module);

    (void)data;
    if (ctx == NULL || ctx->status == TALLY_NGX_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->len = ngx_http_tally_status_names[ctx->status].len;
    v->data = ngx_http_tally_status_names[ctx->status].data;
    return NGX_OK;
}

static ngx_int_t ngx_http_tally_remaining_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
                                                  uintptr_t data)
{
    ngx_http_tally_ctx_t *ctx = ngx_http_get_module_ctx(r, ngx_http_tally_module);
    u_char *p;

    (void)data;
    if (ctx == NULL || ctx->status == TALLY_NGX_NONE || ctx->status == TALLY_NGX_ERROR) {
        v->not_found = 1;
        return NGX_OK;
    }
    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL)
        return NGX_ERROR;
    v->len = (unsigned)(ngx_sprintf(p, "%uL", ctx->remaining) - p);
    v->data = p;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    return NGX_OK;
}

static ngx_int_t ngx_http_tally_add_variables(ngx_conf_t *cf)
{
    static ngx_str_t status = ngx_string("tally_status"), remaining = ngx_string("tally_remaining");
    ngx_http_variable_t *v;

    v = ngx_http_add_variable(cf, &status, NGX_HTTP_VAR_NOCACHEABLE);
    if (v == NULL)
        return NGX_ERROR;
    v->get_handler = ngx_http_tally_status_variable;
    v = ngx_http_add_variable(cf, &remaining, NGX_HTTP_VAR_NOCACHEABLE);
    if (v == NULL)
        return NGX_ERROR;
    v->get_handler = ngx_http_tally_remaining_variable;
    return NGX_OK;
}

/* ---- the preaccess handler ------------------------------------------------- */

static ngx_int_t add_header(ngx_http_request_t *r, const char *name, uint64_t value)
{
    ngx_table_elt_t *h = ngx_list_push(&r->headers_out.headers);
    u_char *p = ngx_pnalloc(r->pool, NGX_INT64_LEN);

    if (h == NULL || p == NULL)
        return NGX_ERROR;
    h->hash = 1;
    h->key.data = (u_char *)name;
    h->key.len = ngx_strlen(name);
    h->value.data = p;
    h->value.len = (size_t)(ngx_sprintf(p, "%uL", value) - p);
    h->lowcase_key = NULL;
    return NGX_OK;
}

static uint64_t seconds_up(uint64_t ns)
{
    return ns / 1000000000u + (ns % 1000000000u != 0);
}

/* RateLimit-Limit/-Remaining/-Reset, and Retry-After on a refusal, of the
   limit that decided: the one that refused, or the one with the least left. */
static ngx_int_t set_headers(ngx_http_request_t *r, const ngx_http_tally_limit_t *l, const tally_result *res,
                             ngx_flag_t refused)
{
    ngx_http_tally_policy_t *p = (ngx_http_tally_policy_t *)l->zone->policies.elts + l->policy;
    uint64_t max = p->policy.limits[0].max;

    for (unsigned i = 0; i < p->policy.n_limits; i++) {
        if (res->exceeded & (1u << i)) {
            max = p->policy.limits[i].max;
            break;
        }
    }
    if (add_header(r, "RateLimit-Limit", max) != NGX_OK
        || add_header(r, "RateLimit-Remaining", res->remaining) != NGX_OK
        || add_header(r, "RateLimit-Reset", seconds_up(res->reset_after_ns)) != NGX_OK)
        return NGX_ERROR;
    if (refused && res->retry_after_ns != TALLY_NEVER
        && add_header(r, "Retry-After", seconds_up(res->retry_after_ns)) != NGX_OK)
        return NGX_ERROR;
    return NGX_OK;
}

/* The cost of this request: 1, or the value of cost=, a decimal integer. */
static ngx_int_t request_cost(ngx_http_request_t *r, const ngx_http_tally_limit_t *l, uint64_t *cost)
{
    ngx_str_t v;
    ngx_int_t n;

    *cost = 1;
    if (l->cost == NULL)
        return NGX_OK;
    if (ngx_http_complex_value(r, l->cost, &v) != NGX_OK)
        return NGX_ERROR;
    n = ngx_atoi(v.data, v.len);
    if (n == NGX_ERROR) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "tally: cost \"%V\" is not a number", &v);
        return NGX_ERROR;
    }
    *cost = (uint64_t)n;
    return NGX_OK;
}

/* The mark of a counted request: a cleanup of its pool (which survives
   internal redirects) whose data is the request's context. */
static void counted_mark(void *data)
{
    (void)data;
}

static ngx_http_tally_ctx_t *counted(ngx_http_request_t *r)
{
    for (ngx_pool_cleanup_t *c = r->pool->cleanup; c; c = c->next) {
        if (c->handler == counted_mark)
            return c->data;
    }
    return NULL;
}

static ngx_int_t ngx_http_tally_handler(ngx_http_request_t *r)
{
    ngx_http_tally_loc_conf_t *lcf = ngx_http_get_module_loc_conf(r, ngx_http_tally_module);
    ngx_http_tally_limit_t *limits;
    ngx_http_tally_ctx_t *ctx;
    const ngx_http_tally_limit_t *decided = NULL;
    tally_result res, decided_res = { 0 };
    ngx_flag_t refused = 0;

    if (lcf->limits == NULL || r != r->main)
        return NGX_DECLINED;
    /* A request is counted once: an internal redirect (error_page,
       try_files, a named location) runs this phase again with the module
       contexts cleared, but the pool and its cleanups stay. */
    ctx = counted(r);
    if (ctx) {
        ngx_http_set_ctx(r, ctx, ngx_http_tally_module);
        return NGX_DECLINED;
    }
    ngx_pool_cleanup_t *mark = ngx_pool_cleanup_add(r->pool, sizeof(*ctx));
    if (mark == NULL)
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    mark->handler = counted_mark;
    ctx = mark->data;
    ngx_memzero(ctx, sizeof(*ctx));
    ngx_http_set_ctx(r, ctx, ngx_http_tally_module);

    limits = lcf->limits->elts;
    for (ngx_uint_t i = 0; i < lcf->limits->nelts && !refused; i++) {
        ngx_http_tally_limit_t *l = &limits[i];
        ngx_http_tally_policy_t *p = (ngx_http_tally_policy_t *)l->zone->policies.elts + l->policy;
        uint64_t costs[TALLY_MAX_LIMITS], cost;
        ngx_str_t key;
        int rc;

        if (ngx_http_complex_value(r, &l->key, &key) != NGX_OK)
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        if (key.len == 0)
            continue;
        if (request_cost(r, l, &cost) != NGX_OK) {
            ctx->status = TALLY_NGX_ERROR;
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        for (unsigned k = 0; k < TALLY_MAX_LIMITS; k++)
            costs[k] = cost;
        if (l->zone->engine == NULL) {
            ctx->status = TALLY_NGX_ERROR;
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "tally zone \"%V\" is not open", &l->zone->name);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        rc = tally_hit(l->zone->engine, p->id, key.data, key.len, costs, &res);
        if (rc == TALLY_EFULL) {
            /* as limit_req when its zone cannot hold a new state: refuse */
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "tally zone \"%V\" is full", &l->zone->name);
            ngx_memzero(&res, sizeof(res));
            res.retry_after_ns = TALLY_NEVER;
            res.exceeded = 1;
        } else if (rc != 0) {
            ctx->status = TALLY_NGX_ERROR;
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "tally zone \"%V\" policy \"%V\": %s",
                          &l->zone->name, &p->name, tally_strerror(rc));
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        if (rc == TALLY_EFULL || !res.allowed) {
            ngx_log_error(lcf->log_level, r->connection->log, 0, "tally: %s by zone \"%V\" policy \"%V\"",
                          l->dry_run ? "would refuse (dry run)" : "refused", &l->zone->name, &p->name);
            if (l->dry_run) {
                ctx->status = TALLY_NGX_REJECTED_DRY_RUN;
            } else {
                ctx->status = TALLY_NGX_REJECTED;
                refused = 1;
                decided = l;
                decided_res = res;
                break;
            }
        } else if (ctx->status == TALLY_NGX_NONE) {
            ctx->status = TALLY_NGX_PASSED;
        }
        if (decided == NULL || res.remaining < decided_res.remaining) {
            decided = l;
            decided_res = res;
        }
    }
    if (decided == NULL)
        return NGX_DECLINED;
    ctx->remaining = decided_res.remaining;
    if (lcf->headers && set_headers(r, decided, &decided_res, refused) != NGX_OK)
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    if (refused)
        return decided->status ? (ngx_int_t)decided->status : (ngx_int_t)lcf->status;
    return NGX_DECLINED;
}

/* ---- tally_metrics --------------------------------------------------------- */

static ngx_int_t ngx_http_tally_metrics_handler(ngx_http_request_t *r)
{
    ngx_http_tally_loc_conf_t *lcf = ngx_http_get_module_loc_conf(r, ngx_http_tally_module);
    tally_engine *e = lcf->metrics->engine;
    ngx_buf_t *b;
    ngx_chain_t out;
    ngx_int_t rc;
    int len;

    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD)))
        return NGX_HTTP_NOT_ALLOWED;
    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK)
        return rc;
    if (e == NULL || (len = tally_stats_prometheus(e, NULL, 0)) < 0)
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    /* the text can grow between the two calls: room for it to */
    b = ngx_create_temp_buf(r->pool, (size_t)len + 4096);
    if (b == NULL)
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    len = tally_stats_prometheus(e, (char *)b->pos, (size_t)len + 4096);
    if (len < 0 || (size_t)len >= (size_t)(b->end - b->pos))
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    b->last = b->pos + len;
    b->last_buf = (r == r->main);
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4");
    r->headers_out.content_length_n = len;
    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only)
        return rc;
    out.buf = b;
    out.next = NULL;
    return ngx_http_output_filter(r, &out);
}

static char *ngx_http_tally_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tally_loc_conf_t *lcf = conf;
    ngx_str_t *value = cf->args->elts;
    ngx_http_core_loc_conf_t *clcf;

    (void)cmd;
    if (lcf->metrics)
        return "is duplicate";
    lcf->metrics = zone_arg(cf, &value[1]);
    if (lcf->metrics == NULL)
        return NGX_CONF_ERROR;
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_tally_metrics_handler;
    return NGX_CONF_OK;
}

/* ---- shared zones: one engine for every worker --------------------------------- */

/* FNV-1a over @n bytes at @p, on from @h. */
static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const u_char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

/* What a reload must keep for the zone's memory to be kept: the policies,
   in order, as the parser made them. */
static uint64_t zone_fingerprint(ngx_http_tally_zone_t *z)
{
    ngx_http_tally_policy_t *p = z->policies.elts;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (ngx_uint_t i = 0; i < z->policies.nelts; i++) {
        h = fnv(h, p[i].name_buf, sizeof(p[i].name_buf));
        h = fnv(h, &p[i].policy.n_limits, sizeof(p[i].policy.n_limits));
        h = fnv(h, &p[i].policy.flags, sizeof(p[i].policy.flags));
        h = fnv(h, p[i].policy.limits, sizeof(p[i].policy.limits));
    }
    return h;
}

/* Readers of the shared engine: each worker's thread holds one until it
   exits, and the workers of an older configuration keep theirs while they
   finish after a reload. */
static uint32_t zone_threads(ngx_cycle_t *cycle)
{
    ngx_core_conf_t *ccf = (ngx_core_conf_t *)ngx_get_conf(cycle->conf_ctx, ngx_core_module);
    ngx_int_t n = ccf && ccf->worker_processes > 0 ? ccf->worker_processes : 1;
    return n * 4 < 256 ? 256 : (uint32_t)(n * 4 > 65536 ? 65536 : n * 4);
}

static ngx_int_t ngx_http_tally_init_zone(ngx_shm_zone_t *shm, void *data)
{
    ngx_http_tally_zone_t *z = shm->data, *old = data;
    ngx_slab_pool_t *pool = (ngx_slab_pool_t *)shm->shm.addr;
    ngx_http_tally_policy_t *p = z->policies.elts;
    tally_options o;
    tally_policy *all;
    size_t need = 0, room, lo, hi;
    uint32_t threads = zone_threads(z->cycle);
    void *mem;
    int rc;

    z->fingerprint = zone_fingerprint(z);
    for (ngx_uint_t i = 0; i < z->policies.nelts; i++)
        p[i].id = (uint32_t)i;
    if (old) {
        if (old->fingerprint != z->fingerprint) {
            ngx_log_error(NGX_LOG_EMERG, shm->shm.log, 0, "tally zone \"%V\": its policies changed; "
                          "give it another size or name to start its counts anew", &z->name);
            return NGX_ERROR;
        }
        z->engine = old->engine;         /* the same memory: every key keeps its usage */
        return NGX_OK;
    }
    if (z->policies.nelts == 0) {
        ngx_log_error(NGX_LOG_EMERG, shm->shm.log, 0, "tally zone \"%V\" has no tally_policy", &z->name);
        return NGX_ERROR;
    }
    all = ngx_alloc(z->policies.nelts * sizeof(*all), shm->shm.log);
    if (all == NULL)
        return NGX_ERROR;
    for (ngx_uint_t i = 0; i < z->policies.nelts; i++)
        all[i] = p[i].policy;
    tally_options_init(&o);
    o.digest_only = true;           /* keys may be secrets (API tokens): keep only digests */
    /* The largest capacity whose engine fits the slab pool's free pages,
       less a page a hundred for the pool's own page records. */
    room = (size_t)(pool->end - pool->start);
    room -= room / 100 + 2 * ngx_pagesize;
    for (lo = TALLY_NGX_MIN_KEYS, hi = room / 16; lo < hi;) {
        size_t mid = lo + (hi - lo + 1) / 2, n;
        o.capacity = mid;
        if (tally_shared_size(&o, all, z->policies.nelts, threads, &n) == 0 && n <= room)
            lo = mid;
        else
            hi = mid - 1;
    }
    o.capacity = lo;
    rc = tally_shared_size(&o, all, z->policies.nelts, threads, &need);
    mem = rc == 0 ? ngx_slab_alloc(pool, need) : NULL;
    if (rc == 0 && mem == NULL) {
        ngx_free(all);
        ngx_log_error(NGX_LOG_EMERG, shm->shm.log, 0, "tally zone \"%V\": size=%uz holds no engine "
                      "of %uz keys", &z->name, z->size, (size_t)TALLY_NGX_MIN_KEYS);
        return NGX_ERROR;
    }
    if (rc == 0)
        rc = tally_shared_create(mem, need, &o, all, z->policies.nelts, threads, &z->engine);
    ngx_free(all);
    if (rc != 0) {
        ngx_log_error(NGX_LOG_EMERG, shm->shm.log, 0, "tally zone \"%V\": %s", &z->name, tally_strerror(rc));
        return NGX_ERROR;
    }
    ngx_log_error(NGX_LOG_NOTICE, shm->shm.log, 0, "tally zone \"%V\": %uz keys a policy, shared by "
                  "every worker", &z->name, o.capacity);
    return NGX_OK;
}

/* ---- engines, one per worker and zone, for zones that sync through Redis ---------- */

static ngx_int_t ngx_http_tally_init(ngx_conf_t *cf)
{
    ngx_http_core_main_conf_t *cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    ngx_http_handler_pt *h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);

    if (h == NULL)
        return NGX_ERROR;
    *h = ngx_http_tally_handler;
    return NGX_OK;
}

static ngx_int_t open_zone(ngx_cycle_t *cycle, ngx_http_tally_zone_t *z)
{
    ngx_http_tally_policy_t *p = z->policies.elts;
    tally_options o;
    tally_flusher_options fo;
    tally_redis_options ro;
    int rc;

    tally_options_init(&o);
    o.capacity = z->size / TALLY_NGX_BYTES_PER_KEY / (z->policies.nelts ? z->policies.nelts : 1);
    if (o.capacity < TALLY_NGX_MIN_KEYS)
        o.capacity = TALLY_NGX_MIN_KEYS;
    o.digest_only = true;           /* keys may be secrets (API tokens): keep only digests */
    if (z->has_hash_key)
        ngx_memcpy(o.hash_key, z->hash_key, sizeof(o.hash_key));
    rc = tally_open(&o, &z->engine);
    for (ngx_uint_t i = 0; rc == 0 && i < z->policies.nelts; i++)
        rc = tally_policy_add(z->engine, &p[i].policy, &p[i].id);
    if (rc == 0) {
        tally_flusher_options_init(&fo);
        fo.interval_ms = (uint32_t)z->flush;
        if (z->redis_host.len) {
            ngx_memzero(&ro, sizeof(ro));
            ro.host = (const char *)z->redis_host.data;
            ro.port = (int)z->redis_port;
            fo.redis = &ro;
        }
        rc = tally_flusher_start(z->engine, &fo);
    }
    if (rc != 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "tally zone \"%V\": %s", &z->name, tally_strerror(rc));
        tally_close(z->engine);
        z->engine = NULL;
        return NGX_ERROR;
    }
    return NGX_OK;
}

static ngx_int_t ngx_http_tally_init_process(ngx_cycle_t *cycle)
{
    ngx_http_tally_main_conf_t *mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_tally_module);
    ngx_http_tally_zone_t *z;

    if (mcf == NULL)
        return NGX_OK;
    z = mcf->zones.elts;
    for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++) {
        if (z[i].shm == NULL && open_zone(cycle, &z[i]) != NGX_OK)
            return NGX_ERROR;
    }
    return NGX_OK;
}

static void ngx_http_tally_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_tally_main_conf_t *mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_tally_module);
    ngx_http_tally_zone_t *z;

    if (mcf == NULL)
        return;
    z = mcf->zones.elts;
    for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++) {
        /* the final flush pushes what Redis has not acknowledged yet; a
           shared zone's engine stays, for the other workers: this worker
           gives back its reader */
        tally_close(z[i].engine);
        z[i].engine = NULL;
    }
}
