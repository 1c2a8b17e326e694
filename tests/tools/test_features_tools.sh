#!/usr/bin/env bash
# The tools' policy options as a user runs them: tally-gate's --policy-file
# reloaded on SIGHUP, its --delay-max, and concurrent limits held while a
# python3 upstream is slow to answer; two gates and a replay sharing counts
# through a redis-server under one --hash-key; tally-replay's --delay-max and
# --hold on generated traces with known answers.
#   tests/tools/test_features_tools.sh PATH/TO/tally-replay PATH/TO/tally-gate
# Prints "ok"/"FAIL" per check and "N passed, N failed"; exits 1 on a failure.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
field() {   # field NAME JSON: a number field of tally-replay's JSON report
    grep -o "\"$1\":[0-9.]*" <<<"$2" | head -1 | cut -d: -f2
}
lr() {   # lr CURL_ARGS...: one request's status, RateLimit-Limit and RateLimit-Remaining
    curl -s -o /dev/null -w '%{http_code} %header{ratelimit-limit} %header{ratelimit-remaining}' "$@"
}
# The gate logs one line per SIGHUP once the reload is done or refused.
reloads() { grep -c 'reload' "$T/$1.err"; }
hup() {   # hup NAME: SIGHUP, and wait for its log line
    local n
    n=$(reloads "$1")
    kill -HUP "$GATE_PID"
    for _ in $(seq 50); do [ "$(reloads "$1")" -gt "$n" ] && break; sleep 0.1; done
    tail -1 "$T/$1.err"
}
socks() { find "/proc/$GATE_PID/fd" -lname 'socket:*' 2>/dev/null | wc -l; }

# ---- tally-gate --policy-file and SIGHUP -----------------------------------
P=$T/policy
printf '# the API policy\n\n   \napi: 3 per 1h fixed\nignored: 1 per 1h fixed\n' >"$P"
start_gate pf --policy-file "$P" -t 2 -H X-Key
U=http://127.0.0.1:$PORT/
A=(-H 'X-Key: alice')
check "policy file: its first policy line" "200 200 200 429" \
      "$(code "${A[@]}" $U) $(code "${A[@]}" $U) $(code "${A[@]}" $U) $(code "${A[@]}" $U)"
printf 'api: 10 per 1h fixed\n' >"$P"
check "SIGHUP: reloaded" "tally-gate: reloaded $P: api: 10 per 1h fixed" "$(hup pf)"
# alice used 3 (the 429 consumed nothing): this request makes 4 of the new 10.
check "SIGHUP: a raised max keeps the usage (remaining = new max - used)" "200 10 6" \
      "$(lr "${A[@]}" $U)"
printf 'api: 4 per 1h fixed\n' >"$P"
hup pf >/dev/null
check "SIGHUP: a lowered max keeps the usage" "429 4 0" "$(lr "${A[@]}" $U)"
# Reloads that must change nothing, each logged with why.
printf 'api: 10 per\n' >"$P"
check "SIGHUP: a bad spec is refused" \
      "tally-gate: reload of $P failed, policy unchanged: bad spec at offset 11: expected a time unit" \
      "$(hup pf | cut -d'(' -f1 | sed 's/ *$//')"
printf 'api: 10 per 1h sliding\n' >"$P"
check "SIGHUP: another algorithm is refused" \
      "tally-gate: reload of $P failed, policy unchanged: invalid argument (the name, the number of limits and each limit's algorithm must stay)" \
      "$(hup pf)"
printf 'web: 10 per 1h fixed\n' >"$P"
check "SIGHUP: another name is refused" 1 "$(hup pf | grep -c 'failed, policy unchanged: invalid argument')"
printf 'api: 10 per 1h fixed%5000s\n' '' >"$P"
check "SIGHUP: a line over 4 KiB is refused" \
      "tally-gate: reload of $P failed, policy unchanged: a line longer than 4 KiB" "$(hup pf)"
printf '# nothing\n\n' >"$P"
check "SIGHUP: a file without a policy line is refused" \
      "tally-gate: reload of $P failed, policy unchanged: no policy line" "$(hup pf)"
rm "$P"
check "SIGHUP: a missing file is refused" \
      "tally-gate: reload of $P failed, policy unchanged: No such file or directory" "$(hup pf)"
check "SIGHUP: after refused reloads the gate runs" yes "$(kill -0 "$GATE_PID" && echo yes)"
check "SIGHUP: ...with the old policy and usage" "429 4 0 | 200 4 3" \
      "$(lr "${A[@]}" $U) | $(lr -H 'X-Key: bob' $U)"
printf 'api: 6 per 1h fixed\n' >"$P"
hup pf >/dev/null
check "SIGHUP: a good file is taken again" "200 6 1" "$(lr "${A[@]}" $U)"
m=$(curl -s http://127.0.0.1:$PORT/metrics)
check "policy file: the gate's counts" 'allowed 6 denied 3' \
      "$(sed -n 's/^tally_gate_requests_total{decision="\([a-z]*\)"} /\1 /p' <<<"$m" | paste -sd' ')"
stop_gate pf

start_gate nofile -p 'api: 3 per 1h fixed' -t 1
check "SIGHUP without --policy-file: logged" "tally-gate: SIGHUP: no --policy-file to reload" \
      "$(kill -HUP "$GATE_PID"; for _ in $(seq 50); do grep -q SIGHUP "$T/nofile.err" && break; sleep 0.1; done
         grep SIGHUP "$T/nofile.err")"
check "SIGHUP without --policy-file: the gate runs" 200 "$(code http://127.0.0.1:$PORT/)"
stop_gate nofile
"$GATE" --policy-file "$T/missing" >/dev/null 2>"$T/err"
check "missing --policy-file: exit 2" 2 $?
check "missing --policy-file: message" \
      "tally-gate: cannot read a policy from $T/missing: No such file or directory" "$(cat "$T/err")"
echo 'api: 3 per 1h fixed' >"$P"
"$GATE" --policy-file "$P" -p 'x: 1 per 1h fixed' >/dev/null 2>"$T/err"
check "--policy with --policy-file: exit 2" 2 $?

# ---- tally-gate --delay-max ------------------------------------------------
# 1/s burst 2: T = 1 s, tau = 2 s. Of 6 requests at once, 2 pass at once, 2 are
# delayed 1 s and 2 s, and the last two would wait 3 s and 4 s, more than
# 2.5 s: 429 at once. One worker: every request is on the same loop.
start_gate dm -p 'g: 1/s burst 2 gcra' --delay-max 2500ms -t 1 -H X-Key
U=http://127.0.0.1:$PORT/
urls=()
for _ in 1 2 3 4 5 6; do urls+=(-o /dev/null "$U"); done
curl -s --parallel --parallel-immediate --parallel-max 6 -H 'X-Key: d' \
     -w '%{http_code} %{time_total} %header{retry-after}\n' "${urls[@]}" >"$T/burst" 2>/dev/null
check "delay-max: 4 of 6 allowed, the rest 429" "200 200 200 200 429 429" \
      "$(cut -d' ' -f1 "$T/burst" | sort | paste -sd' ')"
check "delay-max: each 429 carries Retry-After" 2 "$(awk '$1 == 429 && $3 >= 1' "$T/burst" | wc -l)"
# The delayed answers arrive no sooner than their delay (less 0.1 s of slack
# for the requests' arrival spread): the 3rd at 1 s, the 4th at 2 s.
check "delay-max: the delayed answers arrive after their delays" yes \
      "$(awk '$1 == 200 { print $2 }' "$T/burst" | sort -n | paste -sd' ' |
         awk '{ print ($3 >= 0.9 && $4 >= 1.9) ? "yes" : "no (" $0 ")" }')"
# While delayed answers wait, the worker answers another connection: the
# requests are in (the gate counted them) and the one delayed 2 s is still
# unanswered when the other key's answer comes.
code -H 'X-Key: e' $U >/dev/null
code -H 'X-Key: e' $U >/dev/null
curl -s -o /dev/null -w '%{http_code}' -H 'X-Key: e' $U >"$T/delayed1" &
bg1=$!
for _ in $(seq 50); do
    [ "$(curl -s --max-time 5 http://127.0.0.1:$PORT/metrics | sed -n 's/^tally_gate_requests_total{decision="allowed"} //p')" = 7 ] && break
    sleep 0.02
done
curl -s -o /dev/null -w '%{http_code}' -H 'X-Key: e' $U >"$T/delayed2" &
bg2=$!
for _ in $(seq 50); do
    [ "$(curl -s --max-time 5 http://127.0.0.1:$PORT/metrics | sed -n 's/^tally_gate_requests_total{decision="allowed"} //p')" = 8 ] && break
    sleep 0.02
done
check "delay-max: another key is answered while a delayed one waits" "200 pending" \
      "$(code -H 'X-Key: f' $U) $([ -s "$T/delayed2" ] && echo answered || echo pending)"
wait $bg1 $bg2
check "delay-max: ...then the delayed ones get their 200" "200 200" "$(cat "$T/delayed1") $(cat "$T/delayed2")"
# Pipelined requests of one connection are answered in order, each after the
# delay of the one before.
a="$(code -H 'X-Key: p' $U) $(code -H 'X-Key: p' $U)"
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET / HTTP/1.1\r\nHost: t\r\nX-Key: p\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nX-Key: p\r\nConnection: close\r\n\r\n' >&3
check "delay-max: pipelined answers in order" "200 200 200,ok,200,ok" \
      "$a $(timeout 10 cat <&3 | tr -d '\r' | sed -n 's/^HTTP\/1.1 \([0-9]*\).*/\1/p; /^ok$/p' | paste -sd,)"
exec 3<&-
stop_gate dm
"$GATE" -p 'f: 3 per 1m fixed' --delay-max 1s >/dev/null 2>"$T/err"
check "delay-max with a fixed window: exit 2" 2 $?
check "delay-max with a fixed window: message" \
      "tally-gate: --delay-max needs a policy of GCRA limits only" "$(cat "$T/err")"
"$GATE" -p 'g: 1/s gcra' --delay-max 1m >/dev/null 2>"$T/err"
check "delay-max without ms or s: exit 2" 2 $?

# ---- tally-gate concurrent limits, behind a slow upstream ------------------
# The upstream answers GET /delay/MS after MS ms and /close with a close; the
# body is the path.
cat >"$T/upstream.py" <<'EOF'
import os, socketserver, sys, time

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
        self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))

socketserver.ThreadingTCPServer.daemon_threads = True
server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Handler)
with open(sys.argv[1] + '.tmp', 'w') as f:
    f.write('%d\n' % server.server_address[1])
os.rename(sys.argv[1] + '.tmp', sys.argv[1])
server.serve_forever()
EOF
python3 "$T/upstream.py" "$T/up.port" 2>"$T/up.err" &
pids+=($!)
for _ in $(seq 50); do [ -s "$T/up.port" ] && break; sleep 0.1; done
UP=127.0.0.1:$(cat "$T/up.port")

# --delay-max with -u: a delayed request goes to the upstream when its time
# comes, the one pipelined behind it after that; each gets its own answer.
start_gate du -p 'g: 1/s burst 1 gcra' --delay-max 2s -t 1 -u $UP
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET /first HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHost: t\r\n\r\nGET /third HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n' >&3
check "delay-max upstream: pipelined, delayed, each forwarded in order" "200,/first,200,/second,200,/third" \
      "$(timeout 10 cat <&3 | tr -d '\r' | sed -n 's/^HTTP\/1.1 \([0-9]*\).*/\1/p; /^\//p' | paste -sd,)"
exec 3<&-
stop_gate du

start_gate cc -p 'c: 2 concurrent lease 1m' -t 2 -H X-Key -u $UP
U=http://127.0.0.1:$PORT
C=(-H 'X-Key: c')
base=$(socks)
curl -s -w ' %{http_code}' "${C[@]}" $U/delay/1500 >"$T/slow1" &
s1=$!
curl -s -w ' %{http_code}' "${C[@]}" $U/delay/1500 >"$T/slow2" &
s2=$!
# Both forwarded: two client and two upstream connections.
for _ in $(seq 50); do [ "$(socks)" -ge $((base + 4)) ] && break; sleep 0.05; done
curl -s -o /dev/null -D "$T/h3" "${C[@]}" $U/fast
check "concurrent: a third request of the key while two are in flight is 429" \
      "HTTP/1.1 429 Too Many Requests" "$(head -1 "$T/h3" | tr -d '\r')"
check "concurrent: ...with RateLimit-Remaining 0 and Retry-After" "RateLimit-Remaining: 0 Retry-After: 60" \
      "$(tr -d '\r' <"$T/h3" | grep -E '^(Retry-After|RateLimit-Remaining):' | sort | paste -sd' ')"
check "concurrent: another key passes meanwhile" "/fast" "$(curl -s -H 'X-Key: other' $U/fast)"
check "concurrent: the two in flight still wait" "pending pending" \
      "$([ -s "$T/slow1" ] && echo answered || echo pending) $([ -s "$T/slow2" ] && echo answered || echo pending)"
wait $s1 $s2
check "concurrent: the two get the upstream's answers" "/delay/1500 200|/delay/1500 200" \
      "$(tr -d '\n' <"$T/slow1")|$(tr -d '\n' <"$T/slow2")"
# Once they ended, the key holds nothing: this request is its only holder.
check "concurrent: after they end the key is admitted again" "200 2 1" "$(lr "${C[@]}" $U/fast)"
stop_gate cc

# An exchange that fails gives its hold back too: three in a row, each one's
# own answer, never a 429.
start_gate cf -p 'c: 2 concurrent lease 1m' -t 2 -H X-Key -u $UP --upstream-timeout-ms 300
U=http://127.0.0.1:$PORT
base=$(socks)
check "concurrent: a 502 gives the hold back" "502 502 502" \
      "$(code "${C[@]}" $U/close) $(code "${C[@]}" $U/close) $(code "${C[@]}" $U/close)"
check "concurrent: a 504 gives the hold back" "504 504 504" \
      "$(code "${C[@]}" $U/delay/1000) $(code "${C[@]}" $U/delay/1000) $(code "${C[@]}" $U/delay/1000)"
# Two clients that reset their connections while the upstream works: their
# holds end with their connections, not with the upstream's answers.
for _ in 1 2; do
    python3 -c '
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /delay/3000 HTTP/1.1\r\nHost: t\r\nX-Key: c\r\n\r\n")
time.sleep(0.3)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()' "$PORT" &
    pids+=($!)
done
wait "${pids[@]: -2}"
for _ in $(seq 20); do [ "$(socks)" -eq "$base" ] && break; sleep 0.05; done
check "concurrent: a client's reset gives the hold back" 200 "$(code "${C[@]}" $U/fast)"
stop_gate cf

# Without an upstream the answer is produced at once, and the hold given back
# with it: one at a time is never refused to a client that asks in turn.
start_gate c1 -p 'one: 1 concurrent lease 1m' -t 1 -H X-Key
U=http://127.0.0.1:$PORT/
check "concurrent without upstream: each request in turn admitted" "200 200 200 200 200" \
      "$(for _ in 1 2 3 4 5; do code -H 'X-Key: k' $U; echo; done | paste -sd' ')"
stop_gate c1

# ---- tally-gate and tally-replay sharing counts through Redis --------------
# Redis names a key by its keyed digest: engines share a count only under one
# --hash-key. Gate a uses up the key; once gate b has flushed, it denies it.
for _ in 1 2 3 4 5; do   # a random port may be taken: try a few
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
done
check "redis-server started" yes "$up"
HK=00112233445566778899aabbccddeeff
total() {   # total PREFIX: the counts in Redis under PREFIX, as "KEYS TOTAL"
    local n=0 t=0
    for k in $(redis-cli -p $RPORT --scan --pattern "$1sync:*"); do
        n=$((n + 1))
        t=$((t + $(redis-cli -p $RPORT get "$k")))
    done
    echo "$n $t"
}
shared() {   # shared PREFIX GATE-ARGS...: a's 5 hits, then b's, the codes of b's into $T/b
    local prefix=$1 a b codes c
    shift
    start_gate ra -p 'sync: 5 per 1h fixed; aligned' -H X-Key -r 127.0.0.1:$RPORT \
        --redis-prefix "$prefix" --flush-ms 100 "$@"
    a=$PORT
    A_PID=$GATE_PID
    start_gate rb -p 'sync: 5 per 1h fixed; aligned' -H X-Key -r 127.0.0.1:$RPORT \
        --redis-prefix "$prefix" --flush-ms 100 "$@"
    b=$PORT
    for _ in 1 2 3 4 5; do code -H 'X-Key: k' http://127.0.0.1:$a/ >/dev/null; done
    # b's first hit of the key is decided on b's count alone; once Redis has
    # every hit, b's next flushes bring it a's. At most 3 more of b's own: 4 in
    # all stay within its max of 5.
    codes=$(code -H 'X-Key: k' http://127.0.0.1:$b/)
    for _ in $(seq 100); do [ "$(total "$prefix" | cut -d' ' -f2)" -ge 6 ] && break; sleep 0.1; done
    for _ in 1 2 3; do
        sleep 0.5
        c=$(code -H 'X-Key: k' http://127.0.0.1:$b/)
        codes="$codes $c"
        [ "$c" = 429 ] && break
    done
    echo "$codes" >"$T/b"
    stop_gate rb
    GATE_PID=$A_PID
    stop_gate ra
}
allowed() { echo $((5 + $(grep -o 200 "$T/b" | wc -l))); }
shared k1: --hash-key $HK
check "redis, one --hash-key: gate b comes to deny what gate a used up" 429 "$(awk '{ print $NF }' "$T/b")"
check "redis, one --hash-key: one count in Redis, every allowed hit" "1 $(allowed)" "$(total k1:)"
k1=$(allowed)
check "redis, one --hash-key: no warning" 0 "$(cat "$T/ra.err" "$T/rb.err" | grep -c 'without --hash-key')"
shared k2:
check "redis, random keys: each gate its own count" "200 200 200 200" "$(cat "$T/b")"
check "redis, random keys: two counts in Redis" "2 9" "$(total k2:)"
check "redis, random keys: each gate says so" 2 "$(cat "$T/ra.err" "$T/rb.err" |
      grep -c '^tally-gate: -r without --hash-key: the counts in Redis are this gate.s alone$')"
# The replay of two hits of this hour, under the same key, adds to that count.
printf '%d\tk\n%d\tk\n' "$(date +%s)" "$(date +%s)" >"$T/now.tsv"
out=$("$REPLAY" -j -p 'sync: 5 per 1h fixed; aligned' -r 127.0.0.1:$RPORT --redis-prefix k1: \
      --hash-key $HK "$T/now.tsv")
check "redis, replay under the gates' --hash-key: adds to their count" "1 $((k1 + 2))" "$(total k1:)"
"$GATE" -p 'x: 1/s gcra' --hash-key 0011 >/dev/null 2>"$T/err"
check "gate bad --hash-key: exit 2, the value not echoed" "2 tally-gate: bad --hash-key (want 32 hex digits, not all zero)" \
      "$? $(cat "$T/err")"
"$REPLAY" -p 'x: 1/s gcra' --hash-key 00000000000000000000000000000000 "$T/now.tsv" >/dev/null 2>&1
check "replay all-zero --hash-key: exit 2" 2 $?
"$REPLAY" -p 'x: 1/s gcra' --hash-key 0011223344556677889900aabbccddgg "$T/now.tsv" >/dev/null 2>&1
check "replay --hash-key with a non-hex digit: exit 2" 2 $?
kill "$RPID"

# ---- tally-replay --delay-max ----------------------------------------------
T0=1700000000
# 10 lines of one key at one instant through 1/s burst 2 (T = 1 s, tau = 2 s):
# 2 in the burst, 3 booked 1, 2 and 3 s later, 5 would wait 4 s or more.
awk -v t0=$T0 'BEGIN { for (i = 0; i < 10; i++) printf "%d\tg\n", t0 }' >"$T/same.tsv"
out=$("$REPLAY" -j -p 'g: 1/s burst 2 gcra' --delay-max 3 "$T/same.tsv")
check "replay delay-max: allowed, denied" "5 5" "$(field allowed "$out") $(field denied "$out")"
check "replay delay-max: delayed and their total delay" "3 6.000" \
      "$(field delayed "$out") $(field delay_s "$out")"
check "replay delay-max: each line's verdict and wait" \
      "allow 0.000,allow 0.000,delay 1.000,delay 2.000,delay 3.000,deny 4.000,deny 4.000,deny 4.000,deny 4.000,deny 4.000" \
      "$("$REPLAY" -d -p 'g: 1/s burst 2 gcra' --delay-max 3 "$T/same.tsv" | awk -F'\t' 'NF == 6 { print $4, $6 }' | paste -sd,)"
check "replay delay-max: text report" "delayed  3 of the allowed, 6.000 s in all" \
      "$("$REPLAY" -p 'g: 1/s burst 2 gcra' --delay-max 3 "$T/same.tsv" | grep '^delayed')"
out=$("$REPLAY" -j -p 'g: 1/s burst 2 gcra' "$T/same.tsv")
check "replay without delay-max: the burst alone" "2 absent" \
      "$(field allowed "$out") $(grep -q '"delayed"' <<<"$out" && echo present || echo absent)"
# A line later in the trace waits less for the same booking.
printf '%d\tg\n%d\tg\n%d\tg\n%d.5\tg\n' $T0 $T0 $T0 $T0 >"$T/later.tsv"
check "replay delay-max: waits measured from each line's time" "delay 1.000,delay 1.500" \
      "$("$REPLAY" -d -p 'g: 1/s burst 2 gcra' --delay-max 3 "$T/later.tsv" | awk -F'\t' '$4 == "delay" { print $4, $6 }' | paste -sd,)"
"$REPLAY" -p 'f: 3 per 1m fixed' --delay-max 1 "$T/same.tsv" >/dev/null 2>"$T/err"
check "replay delay-max with a fixed window: exit 2" 2 $?
check "replay delay-max with a fixed window: message" \
      "tally-replay: --delay-max needs a policy of GCRA limits only" "$(cat "$T/err")"

# ---- tally-replay --hold ---------------------------------------------------
# One key, a line every second for 10 s, one holder at most.
awk -v t0=$T0 'BEGIN { for (i = 0; i < 10; i++) printf "%d\tk\n", t0 + i }' >"$T/each.tsv"
out=$("$REPLAY" -j -p 'c: 1 concurrent lease 1h' --hold 1.5 "$T/each.tsv")
check "replay hold 1.5 s: every other line admitted" "5 5" "$(field allowed "$out") $(field denied "$out")"
check "replay hold 1.5 s: which lines" "allow,deny,allow,deny,allow,deny,allow,deny,allow,deny" \
      "$("$REPLAY" -d -p 'c: 1 concurrent lease 1h' --hold 1.5 "$T/each.tsv" | awk -F'\t' 'NF == 6 { print $4 }' | paste -sd,)"
out=$("$REPLAY" -j -p 'c: 1 concurrent lease 1h' --hold 0.5 "$T/each.tsv")
check "replay hold 0.5 s: every line admitted" 10 "$(field allowed "$out")"
# A hold given back exactly at the next line's time is back for it.
out=$("$REPLAY" -j -p 'c: 1 concurrent lease 1h' --hold 1 "$T/each.tsv")
check "replay hold 1 s: given back by the next line" 10 "$(field allowed "$out")"
# Without --hold, holds end with the lease, a lease after the latest acquire
# (denied lines acquire nothing): lines 0, 3, 6 and 9 with a lease of 2.5 s.
check "replay without hold: holds expire with the lease" "allow,deny,deny,allow,deny,deny,allow,deny,deny,allow" \
      "$("$REPLAY" -d -p 'c: 1 concurrent lease 2500ms' "$T/each.tsv" | awk -F'\t' 'NF == 6 { print $4 }' | paste -sd,)"
out=$("$REPLAY" -j -p 'c: 1 concurrent lease 1h' "$T/each.tsv")
check "replay without hold, lease 1 h: only the first" 1 "$(field allowed "$out")"
# Each line holds its cost, and gives it all back.
printf '%d\tk\t2\n%d\tk\t1\n%d\tk\t3\n' $T0 $T0 $((T0 + 2)) >"$T/cost.tsv"
check "replay hold: a line's cost is held and given back" "allow,allow,allow" \
      "$("$REPLAY" -d -p 'c: 3 concurrent lease 1h' --hold 1 "$T/cost.tsv" | awk -F'\t' 'NF == 6 { print $4 }' | paste -sd,)"
"$REPLAY" -p 'f: 3 per 1m fixed' --hold 1 "$T/each.tsv" >/dev/null 2>"$T/err"
check "replay hold without a concurrent limit: exit 2" 2 $?
check "replay hold without a concurrent limit: message" \
      "tally-replay: --hold needs a policy with a concurrent limit" "$(cat "$T/err")"
"$REPLAY" -p 'c: 1 concurrent lease 1h' --hold 0 "$T/each.tsv" >/dev/null 2>&1
check "replay hold 0: exit 2" 2 $?

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
