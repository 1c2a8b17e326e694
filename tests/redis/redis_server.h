/*
 * A real redis-server for the tests: started on a free loopback port in a
 * temp dir, stopped (or stopped, killed, paused and restarted) by the test.
 */
#ifndef TALLY_TEST_REDIS_SERVER_H
#define TALLY_TEST_REDIS_SERVER_H

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct test_redis {
    pid_t pid;
    int   port;
    char  dir[64];
    const char *extra[8];     /* more redis-server arguments, NULL-terminated */
} test_redis;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0
        || getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static redisContext *test_redis_connect(const test_redis *r)
{
    struct timeval tv = { 1, 0 };
    redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
    if (c && c->err) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Start (or restart, keeping the dir and port) the server; true when it answers PING. */
static bool test_redis_start(test_redis *r)
{
    if (!r->dir[0]) {
        snprintf(r->dir, sizeof(r->dir), "/tmp/tally-redis-XXXXXX");
        if (!mkdtemp(r->dir))
            return false;
    }
    if (!r->port)
        r->port = free_port();
    char port[16];
    snprintf(port, sizeof(port), "%d", r->port);
    pid_t pid = fork();
    if (pid == 0) {
        const char *argv[32] = { "redis-server", "--port", port, "--bind", "127.0.0.1",
                                 "--dir", r->dir, "--save", "", "--daemonize", "no",
                                 "--loglevel", "warning" };
        int n = 13;
        for (int i = 0; r->extra[i] && n < 30; i++)
            argv[n++] = r->extra[i];
        argv[n] = NULL;
        /* dies with the test process, and keeps none of its pipes open */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execvp("redis-server", (char **)argv);
        _exit(127);
    }
    if (pid < 0)
        return false;
    r->pid = pid;
    for (int i = 0; i < 500; i++) {
        redisContext *c = test_redis_connect(r);
        if (c) {
            redisReply *rep = redisCommand(c, "PING");
            /* any answer, NOAUTH included, means the server is up */
            bool ok = rep != NULL;
            if (rep)
                freeReplyObject(rep);
            redisFree(c);
            if (ok)
                return true;
        }
        sleep_ms(10);
    }
    return false;
}

static void test_redis_kill(test_redis *r, int sig)
{
    if (r->pid > 0) {
        kill(r->pid, sig);
        if (sig == SIGKILL || sig == SIGTERM) {
            waitpid(r->pid, NULL, 0);
            r->pid = 0;
        }
    }
}

static void test_redis_stop(test_redis *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGCONT);
        test_redis_kill(r, SIGTERM);
    }
    if (r->dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", r->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", r->dir);
        r->dir[0] = 0;
    }
}

/* GET a key as an integer; -1 when missing. */
__attribute__((unused)) static long long test_redis_get(const test_redis *r, const char *key, size_t len)
{
    redisContext *c = test_redis_connect(r);
    if (!c)
        return -2;
    const char *argv[] = { "GET", key };
    size_t argl[] = { 3, len };
    redisReply *rep = redisCommandArgv(c, 2, argv, argl);
    long long v = -1;
    if (rep && rep->type == REDIS_REPLY_STRING)
        v = atoll(rep->str);
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return v;
}

#endif
