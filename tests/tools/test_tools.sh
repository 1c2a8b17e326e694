#!/usr/bin/env bash
# The tools as a user runs them: tally-replay on generated traces with known
# answers, tally-gate on a free loopback port driven by curl and wrk, in front
# of another gate or of a python3 upstream as slow as a test asks.
#   tests/tools/test_tools.sh PATH/TO/tally-replay PATH/TO/tally-gate
# Prints "ok"/"FAIL" per check and "N passed, N failed"; exits 1 on a failure.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
field() {   # field NAME JSON: an integer field of tally-replay's JSON report
    grep -o "\"$1\":[0-9]*" <<<"$2" | head -1 | cut -d: -f2
}

# ---- tally-replay ----------------------------------------------------------
T0=1700000000
# key a: 10 hits in each of 10 seconds; key b: 3 per second; a comment, a blank line.
awk -v t0=$T0 'BEGIN { print "# ts key cost"; print "";
    for (s = 0; s < 10; s++) { for (i = 0; i < 10; i++) printf "%d.%d\ta\n", t0 + s, i;
                               for (i = 0; i < 3; i++) printf "%d.%d5\tb\n", t0 + s, i } }' >"$T/fixed.tsv"
out=$("$REPLAY" -j -p 'r: 5 per 1s fixed' "$T/fixed.tsv")
check "replay: exit 0" 0 $?
check "replay fixed: hits" 130 "$(field hits "$out")"
check "replay fixed: allowed" 80 "$(field allowed "$out")"
check "replay fixed: denied" 50 "$(field denied "$out")"
check "replay fixed: first exceeded once per second" 10 "$(field first_exceeded "$out")"
check "replay fixed: top key" '"key":"a","hits":100,"denied":50' \
      "$(grep -o '"key":"a","hits":[0-9]*,"denied":[0-9]*' <<<"$out")"
check "replay: stdin and text report" "denied   50" \
      "$("$REPLAY" -p 'r: 5 per 1s fixed' <"$T/fixed.tsv" | grep '^denied')"
check "replay: one decision per line" "50" \
      "$("$REPLAY" -d -p 'r: 5 per 1s fixed' "$T/fixed.tsv" | awk -F'\t' '$4 == "deny"' | wc -l)"

# Weighted costs: 10 lines of cost 30 against 100 per minute: 3 fit, 7 do not.
awk -v t0=$T0 'BEGIN { for (i = 0; i < 10; i++) printf "%d\tk\t30\n", t0 + i }' >"$T/cost.tsv"
out=$("$REPLAY" -j -p 'c: 100 per 1m fixed' "$T/cost.tsv")
check "replay cost: allowed" 3 "$(field allowed "$out")"

# Calendar day at utc+02:00: 5 hits at 23:59 local, 5 at 00:00 local the next day.
# 2023-11-14 21:59:00 UTC = 1699999140 (23:59 at +02:00); +60 s is local midnight.
awk 'BEGIN { for (i = 0; i < 5; i++) printf "1699999140\tk\n"; for (i = 0; i < 5; i++) printf "1699999200\tk\n" }' \
    >"$T/cal.tsv"
out=$("$REPLAY" -j -p 'd: 3 per day calendar utc+02:00' "$T/cal.tsv")
check "replay calendar utc+02:00: allowed in two days" 6 "$(field allowed "$out")"
out=$("$REPLAY" -j -p 'd: 3 per day calendar utc' "$T/cal.tsv")
check "replay calendar utc: one day" 3 "$(field allowed "$out")"

# Two limits; and shadow mode allows everything but reports.
out=$("$REPLAY" -j -p 'two: 5 per 1s fixed, 40 per 1m fixed' "$T/fixed.tsv")
check "replay two limits: allowed" 70 "$(field allowed "$out")"
out=$("$REPLAY" -j -p 's: 5 per 1s fixed; shadow' "$T/fixed.tsv")
check "replay shadow: allowed" 130 "$(field allowed "$out")"
check "replay shadow: would deny" 50 "$(field shadow_denied "$out")"

# GCRA 10/s burst 20, one key at 20 hits per second for 10 s (every 50 ms):
# the burst of 20, then one per 100 ms: 20 + 99 = 119 (the last hit at 9.95 s).
awk -v t0=$T0 'BEGIN { for (i = 0; i < 200; i++) printf "%d.%03d\tg\n", t0 + int(i / 20), (i % 20) * 50 }' \
    >"$T/gcra.tsv"
out=$("$REPLAY" -j -p 'g: 10/s burst 20 gcra' "$T/gcra.tsv")
check "replay gcra: allowed" 119 "$(field allowed "$out")"

# Combined log, key = client address; cost = bytes.
cat >"$T/access.log" <<'EOF'
10.0.0.1 - frank [14/Nov/2023:22:13:20 +0000] "GET /a HTTP/1.1" 200 100 "-" "curl/8"
10.0.0.1 - frank [14/Nov/2023:22:13:21 +0000] "GET /b HTTP/1.1" 200 100 "-" "curl/8"
10.0.0.2 - - [14/Nov/2023:23:13:21 +0100] "GET /b HTTP/1.1" 200 100 "-" "curl/8"
10.0.0.1 - frank [14/Nov/2023:22:13:22 +0000] "GET /c HTTP/1.1" 404 - "-" "curl/8"
EOF
out=$("$REPLAY" -j -f combined -k host -p 'h: 2 per 1m fixed' "$T/access.log")
check "replay combined by host: denied" 1 "$(field denied "$out")"
out=$("$REPLAY" -j -f common -k path -p 'h: 1 per 1m fixed' "$T/access.log")
check "replay common by path: denied" 1 "$(field denied "$out")"
out=$("$REPLAY" -j -f combined -c bytes -p 'h: 150 per 1m fixed' "$T/access.log")
check "replay bytes as cost: denied" 1 "$(field denied "$out")"

# Exit codes.
"$REPLAY" -p 'r: 5 per 1s fixd' "$T/fixed.tsv" >/dev/null 2>"$T/err"
check "replay bad spec: exit 2" 2 $?
check "replay bad spec: message" 1 "$(grep -c 'offset 12: expected an algorithm' "$T/err")"
"$REPLAY" -p 'r: 5 per 1s fixed' "$T/missing" >/dev/null 2>&1
check "replay unreadable trace: exit 3" 3 $?
printf '1700000000\ta\nnot a line\n' | "$REPLAY" -p 'r: 5 per 1s fixed' >/dev/null 2>&1
check "replay malformed line: exit 1" 1 $?
"$REPLAY" --bogus >/dev/null 2>&1
check "replay bad option: exit 2" 2 $?
"$REPLAY" --help | grep -q '^usage: tally-replay'
check "replay --help" 0 $?

# ---- tally-gate ------------------------------------------------------------

start_gate h -p 'api: 3 per 1m fixed' -t 2 -H X-Key
U=http://127.0.0.1:$PORT/
check "gate: three allowed" "200 200 200" "$(code -H 'X-Key: alice' $U) $(code -H 'X-Key: alice' $U) $(code -H 'X-Key: alice' $U)"
curl -s -D "$T/h429" -o /dev/null -H 'X-Key: alice' $U
check "gate: 429 after the limit" 1 "$(grep -c '^HTTP/1.1 429' "$T/h429")"
check "gate: Retry-After" "Retry-After: 60" "$(grep -o '^Retry-After: [0-9]*' "$T/h429")"
check "gate: RateLimit-Remaining 0" "RateLimit-Remaining: 0" "$(grep -o '^RateLimit-Remaining: [0-9]*' "$T/h429")"
curl -s -D "$T/h200" -o "$T/body" -H 'X-Key: bob' $U
check "gate: another header key is its own" 1 "$(grep -c '^HTTP/1.1 200' "$T/h200")"
check "gate: RateLimit-Limit" "RateLimit-Limit: 3" "$(grep -o '^RateLimit-Limit: [0-9]*' "$T/h200")"
check "gate: RateLimit-Remaining" "RateLimit-Remaining: 2" "$(grep -o '^RateLimit-Remaining: [0-9]*' "$T/h200")"
check "gate: RateLimit-Reset" "RateLimit-Reset: 60" "$(grep -o '^RateLimit-Reset: [0-9]*' "$T/h200")"
check "gate: no Retry-After when allowed" 0 "$(grep -c '^Retry-After' "$T/h200")"
check "gate: without the header the address is the key" "200 200 200 429" \
      "$(code $U) $(code $U) $(code $U) $(code $U)"
m=$(curl -s http://127.0.0.1:$PORT/metrics)
check "gate /metrics: allowed" 'tally_gate_requests_total{decision="allowed"} 7' "$(grep 'decision="allowed"' <<<"$m")"
check "gate /metrics: denied" 'tally_gate_requests_total{decision="denied"} 2' "$(grep 'decision="denied"' <<<"$m")"
check "gate /metrics: engine counters" "tally_hits 9" "$(grep '^tally_hits ' <<<"$m")"
stop_gate h

# Requests the gate refuses with 400 before counting anything: a key header
# that is empty or longer than the engine's max_key_len (256), and framing
# that RFC 9112 section 6.3 makes invalid (several or bad Content-Length
# values, Content-Length with Transfer-Encoding). raw sends bytes as they are
# (bash writes them line by line) and prints the whole answer; the gate closes
# after each of these (the framing cases) or because the request asks it to.
raw() {   # raw DATA [MORE]: send DATA (printf %b escapes) to the gate at $PORT, MORE 0.3 s later
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || return
    printf '%b' "$1" >&3
    if [ $# -gt 1 ]; then
        sleep 0.3
        printf '%b' "$2" >&3
    fi
    timeout 5 cat <&3
    echo $? >"$T/raw.rc"    # 0: the gate closed; 124: it kept the connection open
    exec 3<&-
}
status() { head -1 | tr -d '\r'; }
body() { tr -d '\r' | sed '1,/^$/d'; }
start_gate bad -p 'api: 3 per 1m fixed' -t 1 -H X-Key
U=http://127.0.0.1:$PORT/
long=$(printf 'k%.0s' $(seq 257))
check "gate: empty key header is 400" 400 "$(code -H 'X-Key;' $U)"
check "gate: empty key header names the problem" "empty X-Key header" "$(curl -s -H 'X-Key;' $U)"
check "gate: 257-byte key header is 400" 400 "$(code -H "X-Key: $long" $U)"
check "gate: long key header names the problem" "X-Key header longer than 256 bytes" \
      "$(curl -s -H "X-Key: $long" $U)"
check "gate: a 400 keeps the connection" "400:1 200:0" \
      "$(curl -s -o /dev/null -w '%{http_code}:%{num_connects} ' -H 'X-Key;' $U \
              --next -s -o /dev/null -w '%{http_code}:%{num_connects}' -H 'X-Key: dave' $U)"
check "gate: 256-byte key header is a key" 200 "$(code -H "X-Key: ${long:1}" $U)"
q='POST / HTTP/1.1\r\nHost: t\r\nX-Key: carol\r\n'
check "gate: a key header of blanks is empty" "HTTP/1.1 400 Bad Request" \
      "$(raw 'GET / HTTP/1.1\r\nHost: t\r\nX-Key: \t \r\nConnection: close\r\n\r\n' | status)"
a=$(raw "${q}Content-Length: 0\r\nContent-Length: 3\r\n\r\nabc")
check "gate: two differing Content-Length is 400" "HTTP/1.1 400 Bad Request" "$(status <<<"$a")"
check "gate: two Content-Length names the problem" "more than one Content-Length" "$(body <<<"$a")"
check "gate: two equal Content-Length is 400" "HTTP/1.1 400 Bad Request" \
      "$(raw "${q}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc" | status)"
a=$(raw "${q}Content-Length: 3, 3\r\n\r\nabc")
check "gate: a list as Content-Length is 400" "HTTP/1.1 400 Bad Request" "$(status <<<"$a")"
check "gate: bad Content-Length names the problem" "invalid Content-Length" "$(body <<<"$a")"
check "gate: empty Content-Length is 400" "HTTP/1.1 400 Bad Request" \
      "$(raw "${q}Content-Length:\r\n\r\n" | status)"
check "gate: negative Content-Length is 400" "HTTP/1.1 400 Bad Request" \
      "$(raw "${q}Content-Length: -1\r\n\r\n" | status)"
a=$(raw "${q}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
check "gate: Content-Length with Transfer-Encoding is 400" "HTTP/1.1 400 Bad Request" "$(status <<<"$a")"
check "gate: Content-Length with Transfer-Encoding names the problem" \
      "Content-Length with Transfer-Encoding" "$(body <<<"$a")"
check "gate: Transfer-Encoding alone is still 501" "HTTP/1.1 501 Not Implemented" \
      "$(raw "${q}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" | status)"
# A smuggling attempt: whichever Content-Length the gate took, it would answer a
# second request (or swallow it); refused framing answers once and closes.
inner='GET / HTTP/1.1\r\nHost: t\r\nX-Key: carol\r\n\r\n'
a=$(raw "${q}Content-Length: 0\r\nContent-Length: $(printf '%b' "$inner" | wc -c)\r\n\r\n${inner}")
check "gate: refused framing answers once" "HTTP/1.1 400 Bad Request" \
      "$(grep -a '^HTTP/' <<<"$a" | tr -d '\r' | paste -sd,)"
check "gate: refused framing closes the connection" 0 "$(cat "$T/raw.rc")"
# The gate has answered and closes while the client still sends its body (two
# more lines, or more than the gate reads at once): closing with those bytes
# unread, or unsent yet, resets the connection, and the reset destroys the
# answer the client has not read yet.
a=$(raw "${q}Content-Length: 0\r\nContent-Length: 8\r\n\r\n" "a=1\r\nb=2\r\n" 2>/dev/null)
check "gate: the 400 reaches a client still sending" "HTTP/1.1 400 Bad Request" "$(status <<<"$a")"
a=$(raw "${q}Content-Length: 0\r\nContent-Length: 1\r\n\r\n$(head -c 100000 /dev/zero | tr '\0' x)" 2>/dev/null)
check "gate: the 400 reaches a client that sent more than 64 KiB" "HTTP/1.1 400 Bad Request" \
      "$(status <<<"$a")"
a=$(raw "${q}Transfer-Encoding: chunked\r\n\r\n" "3\r\nabc\r\n0\r\n\r\n" 2>/dev/null)
check "gate: the 501 reaches a client still sending" "HTTP/1.1 501 Not Implemented" "$(status <<<"$a")"
# None of the refused requests consumed anything: carol still has all 3.
check "gate: refused requests consumed nothing" "200 200 200 429" \
      "$(code -H 'X-Key: carol' $U) $(code -H 'X-Key: carol' $U) $(code -H 'X-Key: carol' $U) $(code -H 'X-Key: carol' $U)"
m=$(curl -s http://127.0.0.1:$PORT/metrics)
check "gate refused: engine saw only the counted hits" "tally_hits 6" "$(grep '^tally_hits ' <<<"$m")"
check "gate refused: allowed" 'tally_gate_requests_total{decision="allowed"} 5' "$(grep 'decision="allowed"' <<<"$m")"
check "gate refused: no engine errors" "tally_gate_engine_errors_total 0" "$(grep '^tally_gate_engine_errors_total ' <<<"$m")"
"$GATE" --help | grep -q 'answered 400'
check "gate --help: the 400s are documented" 0 $?
stop_gate bad

# A client that reads the closing answer but never closes its side must not
# hold the connection: the gate lingers (reads what it still sends) for at most
# 2 s, whether the client stays silent (fd 3) or keeps sending (fd 4). The
# gate's sockets in /proc show when it lets go; the client sees it as a reset.
start_gate linger -p 'api: 3 per 1m fixed' -t 1 -H X-Key
socks() { find "/proc/$GATE_PID/fd" -lname 'socket:*' 2>/dev/null | wc -l; }
base=$(socks)
exec 3<>"/dev/tcp/127.0.0.1/$PORT" 4<>"/dev/tcp/127.0.0.1/$PORT"
printf '%b' "${q}Content-Length: 0\r\nContent-Length: 3\r\n\r\nabc" >&3
printf '%b' "${q}Content-Length: 0\r\nContent-Length: 3\r\n\r\nabc" >&4
a=$(timeout 5 cat <&3)
b=$(timeout 5 cat <&4)
check "gate linger: the 400 arrives" "HTTP/1.1 400 Bad Request" "$(status <<<"$a")"
check "gate linger: the answer arrives whole" \
      "$(tr -d '\r' <<<"$a" | sed -n 's/^Content-Length: //p') more than one Content-Length" \
      "$(printf '%s\n' "$(body <<<"$a")" | wc -c) $(body <<<"$a")"
check "gate linger: the same on the other connection" "$a" "$b"
check "gate linger: the gate holds both while lingering" $((base + 2)) "$(socks)"
for _ in $(seq 50); do
    [ "$(socks)" -eq "$base" ] && break
    (printf x >&4) 2>/dev/null    # a subshell: a write after the reset is a SIGPIPE
    sleep 0.2
done
check "gate linger: both closed within 10 s" "$base" "$(socks)"
# A read only sees the FIN it already had; a write draws a reset from the
# closed socket, and the next write fails (EPIPE: SIGPIPE kills the subshell).
(printf x >&3) 2>/dev/null
sleep 0.2
check "gate linger: the silent client sees the close as a reset" failed \
      "$( (printf x >&3) 2>/dev/null && echo written || echo failed)"
exec 3<&- 4<&-
"$GATE" --help | grep -q 'at most 2 s after the answer'
check "gate --help: the linger bound is documented" 0 $?
stop_gate linger

# Address keys: a 127.0.0.2 client is not limited by 127.0.0.1's use.
start_gate a -p 'api: 1 per 1m fixed' -t 2 -l 127.0.0.1:0
U=http://127.0.0.1:$PORT/
check "gate by address: second hit denied" "200 429" "$(code $U) $(code $U)"
check "gate by address: another address" 200 "$(code --interface 127.0.0.2 $U 2>/dev/null || true)"
stop_gate a

# Forwarding: an upstream gate with a large limit behind a limiting one.
start_gate up -p 'up: 1000 per 1m fixed' -t 1
UP=$PORT
UP_PID=$GATE_PID
start_gate fw -p 'fw: 2 per 1m fixed' -t 2 -u 127.0.0.1:$UP
U=http://127.0.0.1:$PORT/
curl -s -D "$T/hf" -o "$T/bf" $U
check "gate upstream: body from upstream" "ok" "$(cat "$T/bf")"
check "gate upstream: our RateLimit-Limit first" "RateLimit-Limit: 2" "$(grep -o '^RateLimit-Limit: [0-9]*' "$T/hf" | head -1)"
check "gate upstream: its own headers too" "RateLimit-Limit: 1000" "$(grep -o '^RateLimit-Limit: [0-9]*' "$T/hf" | tail -1)"
check "gate upstream: denied not forwarded" "200 429" "$(code $U) $(code $U)"
FW_PID=$GATE_PID
GATE_PID=$UP_PID
stop_gate up
GATE_PID=$FW_PID
stop_gate fw
start_gate down -p 'd: 5 per 1m fixed' -u 127.0.0.1:$UP
check "gate upstream down: 502" 502 "$(code http://127.0.0.1:$PORT/)"
stop_gate down

# A slow upstream holds up only the connection waiting for it. The upstream
# answers GET /delay/MS after MS ms; /open at once, but keeps its connection
# open 5 s more (the gate must end the response at its Content-Length); /eof
# without a length, ended by its close; /close closes without an answer. The
# body is the path.
if command -v python3 >/dev/null; then
    cat >"$T/upstream.py" <<'EOF'
import socketserver, sys, time

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        words = self.rfile.readline().split()
        while self.rfile.readline() not in (b'\r\n', b''):
            pass
        path = words[1].decode() if len(words) > 1 else '/'
        if path == '/close':
            return
        if path.startswith('/delay/'):
            time.sleep(int(path[7:]) / 1000)
        body = (path + '\n').encode()
        if path == '/eof':
            self.wfile.write(b'HTTP/1.1 200 OK\r\n\r\n' + body)
            return
        self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))
        if path == '/open':
            time.sleep(5)

socketserver.ThreadingTCPServer.daemon_threads = True
server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Handler)
with open(sys.argv[1] + '.tmp', 'w') as f:
    f.write('%d\n' % server.server_address[1])
import os; os.rename(sys.argv[1] + '.tmp', sys.argv[1])
server.serve_forever()
EOF
    python3 "$T/upstream.py" "$T/slow.port" 2>"$T/slow.err" &
    pids+=($!)
    for _ in $(seq 50); do [ -s "$T/slow.port" ] && break; sleep 0.1; done
    SP=$(cat "$T/slow.port")

    start_gate nb -p 'nb: 1000 per 1m fixed' -t 1 -u 127.0.0.1:$SP
    U=http://127.0.0.1:$PORT
    base=$(socks)
    curl -s -w ' %{http_code}' $U/delay/2000 >"$T/slow" &
    slow=$!
    # Pipelined on one connection: the second answer waits for the first.
    raw 'GET /delay/1000 HTTP/1.1\r\nHost: t\r\n\r\nGET /fast HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n' \
        >"$T/pipe" &
    pipe=$!
    # Both forwarded: two client and two upstream connections.
    for _ in $(seq 20); do [ "$(socks)" -ge $((base + 4)) ] && break; sleep 0.05; done
    # One worker: were the exchange blocking, /fast would wait for /delay/2000.
    a=$(curl -s -o "$T/fast" -w '%{http_code} %{time_total}' $U/fast)
    check "gate upstream: another connection is answered while a slow one waits" \
          "200 /fast fast pending" \
          "${a% *} $(cat "$T/fast") $(awk -v t="${a#* }" 'BEGIN { print t < 1 ? "fast" : "slow (" t " s)" }') \
$([ -s "$T/slow" ] && echo answered || echo pending)"
    wait $slow
    check "gate upstream: the slow one gets its answer" "/delay/2000 200" "$(tr -d '\n' <"$T/slow")"
    wait $pipe
    check "gate upstream: pipelined answers in order" "200,/delay/1000,200,/fast" \
          "$(tr -d '\r' <"$T/pipe" | sed -n 's/^HTTP\/1.1 \([0-9]*\).*/\1/p; /^\//p' | paste -sd,)"
    a=$(curl -s --max-time 2 -w ' %{http_code}' $U/open)
    check "gate upstream: a response ends at its Content-Length" "/open 200" "$(tr -d '\n' <<<"$a")"
    check "gate upstream: a response ends at the upstream's close" "/eof" "$(curl -s $U/eof)"
    check "gate upstream: ...and then so does the connection" "200:1 200:1" \
          "$(curl -s -o /dev/null -w '%{http_code}:%{num_connects} ' $U/eof \
                  --next -s -o /dev/null -w '%{http_code}:%{num_connects}' $U/fast)"
    check "gate upstream: a close without an answer is 502" 502 "$(code $U/close)"
    check "gate upstream: the 502 is counted" "tally_gate_upstream_errors_total 1" \
          "$(curl -s $U/metrics | grep '^tally_gate_upstream_errors_total ')"
    stop_gate nb

    # A client that resets its connection while its answer is pending: the
    # gate closes the upstream connection with it, without waiting for it.
    start_gate rst -p 'r: 1000 per 1m fixed' -t 1 -u 127.0.0.1:$SP
    base=$(socks)
    mkfifo "$T/go"
    python3 -c '
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /delay/3000 HTTP/1.1\r\nHost: t\r\n\r\n")
sys.stdin.read()
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()' "$PORT" <"$T/go" &
    client=$!
    exec 5>"$T/go"    # the client resets its connection when this closes
    for _ in $(seq 20); do [ "$(socks)" -eq $((base + 2)) ] && break; sleep 0.1; done
    check "gate reset: the client's and the upstream's connections" $((base + 2)) "$(socks)"
    exec 5>&-
    wait $client
    for _ in $(seq 10); do [ "$(socks)" -eq "$base" ] && break; sleep 0.1; done
    check "gate reset: both closed before the upstream answers" "$base" "$(socks)"
    stop_gate rst

    start_gate to -p 't: 1000 per 1m fixed' -t 1 -u 127.0.0.1:$SP --upstream-timeout-ms 300
    U=http://127.0.0.1:$PORT
    base=$(socks)
    curl -s -D "$T/h504" -o "$T/b504" $U/delay/5000
    check "gate upstream timeout: 504" "HTTP/1.1 504 Gateway Timeout" "$(status <"$T/h504")"
    check "gate upstream timeout: names it" "upstream timed out" "$(cat "$T/b504" 2>/dev/null)"
    check "gate upstream timeout: with our RateLimit headers" "RateLimit-Limit: 1000" \
          "$(grep -o '^RateLimit-Limit: [0-9]*' "$T/h504")"
    check "gate upstream timeout: the connection goes on" "504:1 200:0" \
          "$(curl -s -o /dev/null -w '%{http_code}:%{num_connects} ' $U/delay/5000 \
                  --next -s -o /dev/null -w '%{http_code}:%{num_connects}' $U/fast)"
    for _ in $(seq 10); do [ "$(socks)" -eq "$base" ] && break; sleep 0.1; done
    check "gate upstream timeout: the upstream connections are closed" "$base" "$(socks)"
    check "gate upstream timeout: counted" "tally_gate_upstream_errors_total 2" \
          "$(curl -s $U/metrics | grep '^tally_gate_upstream_errors_total ')"
    stop_gate to
    "$GATE" --help | grep -q '(default 10000)'
    check "gate --help: the upstream timeout is documented" 0 $?
else
    echo "skip  python3 not installed: slow upstream"
fi

# Load: wrk on one header key against a limit of 1000 per hour. Exactly 1000
# 2xx, no socket errors, and the gate's own counts add up to what wrk sent.
if command -v wrk >/dev/null; then
    start_gate w -p 'w: 1000 per 1h fixed' -t 2 -H X-Key
    wrk -t2 -c8 -d2s -H 'X-Key: load' http://127.0.0.1:$PORT/ >"$T/wrk" 2>&1
    check "wrk: exit 0" 0 $?
    reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$T/wrk")
    non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: \([0-9]*\)/\1/p' "$T/wrk")
    check "wrk: no socket errors" 0 "$(grep -c 'Socket errors' "$T/wrk")"
    check "wrk: exactly 1000 allowed" 1000 "$((reqs - ${non2xx:-0}))"
    m=$(curl -s http://127.0.0.1:$PORT/metrics)
    allowed=$(sed -n 's/^tally_gate_requests_total{decision="allowed"} //p' <<<"$m")
    denied=$(sed -n 's/^tally_gate_requests_total{decision="denied"} //p' <<<"$m")
    check "wrk: gate allowed exactly 1000" 1000 "$allowed"
    # wrk does not count the replies still in flight when its time is up.
    inflight=$((allowed + denied - reqs))
    check "wrk: the gate answered what wrk counted (+ at most 8 in flight)" yes \
          "$([ "$inflight" -ge 0 ] && [ "$inflight" -le 8 ] && echo yes || echo "no ($inflight)")"
    stop_gate w
else
    echo "skip  wrk not installed"
fi

# Redis: the flusher pushes every hit before the gate exits.
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    # a random port may be taken (other suites start servers too): try a few
    for _ in 1 2 3 4 5; do
        RPORT=$(( (RANDOM % 20000) + 30000 ))
        redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --dir "$T" \
            --daemonize no >"$T/redis.log" 2>&1 &
        RPID=$!
        pids+=("$RPID")
        up=no
        for _ in $(seq 50); do
            redis-cli -p $RPORT ping >/dev/null 2>&1 && { up=yes; break; }
            kill -0 "$RPID" 2>/dev/null || break
            sleep 0.1
        done
        [ "$up" == yes ] && break
        kill "$RPID" 2>/dev/null
    done
    start_gate r -p 'sync: 100 per 1h fixed; aligned' -H X-Key -r 127.0.0.1:$RPORT --redis-prefix gt: --flush-ms 100
    for i in 1 2 3 4 5; do code -H 'X-Key: rk' http://127.0.0.1:$PORT/ >/dev/null; done
    stop_gate r
    total=0
    for k in $(redis-cli -p $RPORT --scan --pattern 'gt:sync:*' | sort -u); do
        total=$((total + $(redis-cli -p $RPORT get "$k")))
    done
    check "gate redis: every hit is in Redis after SIGTERM" 5 "$total"
    [ "$total" == 5 ] || redis-cli -p $RPORT --scan | while read -r k; do echo "  $k = $(redis-cli -p $RPORT get "$k")"; done
    kill "$RPID"
fi

# Bad arguments.
"$GATE" >/dev/null 2>&1
check "gate without a policy: exit 2" 2 $?
"$GATE" -p 'x: 1 per' >/dev/null 2>"$T/err"
check "gate bad spec: exit 2" 2 $?
check "gate bad spec: message" 1 "$(grep -c 'offset 8: expected a time unit' "$T/err")"
"$GATE" -p 'x: 1/s gcra' -t 0 >/dev/null 2>&1
check "gate bad --threads: exit 2" 2 $?
"$GATE" -p 'x: 1/s gcra' --upstream-timeout-ms 0 >/dev/null 2>&1
check "gate bad --upstream-timeout-ms: exit 2" 2 $?
"$GATE" -p 'x: 1/s gcra' -l 256.0.0.1:80 >/dev/null 2>&1
check "gate bad address: exit 2" 2 $?
"$GATE" --help | grep -q '^usage: tally-gate'
check "gate --help" 0 $?

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
