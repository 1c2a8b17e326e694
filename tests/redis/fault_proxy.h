/*
 * A fault-injecting Redis proxy for the tests: a thread of the test process
 * that listens on a free loopback port and joins each client it accepts to a
 * real redis-server. It parses RESP2 both ways (commands from the client,
 * replies from the server, nested and split across reads), so it knows which
 * reply answers which command, and faults commands by rules: each rule
 * counts the commands it matches, lets `skip` of them through, then faults
 * `count`; of the rules past their skip, the first one added decides:
 *   FAULT_ERROR       answer "-<text>\r\n" and never forward the command; the
 *                     answer keeps its place among pipelined replies
 *   FAULT_DELAY       forward, hold the reply for ms (later replies wait too)
 *   FAULT_DROP_REPLY  forward (Redis applies it), never answer, close the
 *                     connection FAULT_DROP_CLOSE_MS later
 *   FAULT_SPLIT       forward, send the reply in pieces of 1..7 bytes with
 *                     pauses of 20..200 us, so the client must reassemble it
 *   FAULT_CLOSE_MID   forward, send the first half of the reply, then close
 *   FAULT_HOLD        forward nothing to Redis from this command on for ms
 *                     (the connection's later commands wait behind it), even
 *                     if the client leaves meanwhile: then Redis gets it all,
 *                     and the proxy closes FAULT_DROP_CLOSE_MS after
 * FAULT_ERROR on an EXEC forwards a DISCARD in its place (its reply is the
 * proxy's), so that Redis leaves the transaction, as after a refused EXEC.
 * A reply is sent only after every earlier reply of its connection, and
 * nothing more is sent on a connection after a dropped or cut reply.
 * Every call takes the proxy's lock; any thread may call them.
 */
#ifndef TALLY_TEST_FAULT_PROXY_H
#define TALLY_TEST_FAULT_PROXY_H

#include <stdint.h>

#define FAULT_DROP_CLOSE_MS 100

typedef enum fault_action {
    FAULT_ERROR,
    FAULT_DELAY,
    FAULT_DROP_REPLY,
    FAULT_SPLIT,
    FAULT_CLOSE_MID,
    FAULT_HOLD
} fault_action;

typedef struct fault_rule {
    const char  *command;   /* "EXEC", "PING"...: case-insensitive; "*": any command */
    fault_action action;
    int          skip;      /* matching commands it lets through before it bites */
    int          count;     /* matching commands it then faults; -1: every one */
    unsigned     ms;        /* FAULT_DELAY, FAULT_HOLD */
    const char  *text;      /* FAULT_ERROR: the error line without '-' and CRLF */
} fault_rule;

typedef struct fault_proxy {
    int                       port;   /* clients connect to 127.0.0.1:port */
    struct fault_proxy_state *s;
} fault_proxy;

typedef struct fault_proxy_count {
    uint64_t commands;      /* commands seen from clients, faulted or not */
    uint64_t bytes;         /* their size in RESP */
} fault_proxy_count;

/* Start the proxy in front of 127.0.0.1:@upstream_port; NULL on failure. */
fault_proxy *fault_proxy_start(int upstream_port);

/* Add a rule after the others. Return the rule's id for fault_proxy_fired, or -1 (no room, or a bad rule). */
int fault_proxy_add(fault_proxy *p, const fault_rule *r);

/* Remove every rule (rule ids become void). A fault already decided for a
   command the proxy has seen still happens. */
void fault_proxy_clear(fault_proxy *p);

/* How many commands rule @id has faulted. */
uint64_t fault_proxy_fired(fault_proxy *p, int id);

/* Commands seen with this name ("*": all of them), since the start. */
fault_proxy_count fault_proxy_seen(fault_proxy *p, const char *command);

/* Bytes written to Redis, and to the clients. */
uint64_t fault_proxy_bytes_up(fault_proxy *p);
uint64_t fault_proxy_bytes_down(fault_proxy *p);

/* Connections accepted since the start. */
uint64_t fault_proxy_accepted(fault_proxy *p);

/* Pieces of split replies written (one send each). */
uint64_t fault_proxy_pieces(fault_proxy *p);

/* Close every connection, stop the thread and free the proxy. */
void fault_proxy_stop(fault_proxy *p);

#endif
