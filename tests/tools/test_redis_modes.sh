#!/usr/bin/env bash
# The tools' --redis addresses as a user gives them: bad ones are refused
# with a message and exit status 2 before anything starts; good ones
# (HOST:PORT, sentinel:NAME@HOST:PORT,..., cluster:HOST:PORT,...) reach
# real redis-server processes started here on free loopback ports, and every
# hit is in Redis when the tool exits.
#   tests/tools/test_redis_modes.sh PATH/TO/tally-replay PATH/TO/tally-gate
# Prints "ok"/"FAIL" per check and "N passed, N failed"; exits 1 on a failure,
# 77 (skipped) when redis-server or redis-cli is missing.
set -uo pipefail
STOP_SIGNAL=KILL
. "$(dirname "$0")/lib.sh"
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A trace of 30 hits, 10 a second on key a and on key b and c, all allowed.
T0=1700000000
for s in 0 1 2; do for k in a b c; do for i in 0 1 2 3 4 5 6 7 8 9; do
    printf '%d.%d\t%s\n' $((T0 + s)) $i $k; done; done; done | head -30 >"$T/trace.tsv"
POLICY='sync: 1000 per 1h fixed; aligned'

# ---- refused before anything starts ---------------------------------------
many=$(for i in $(seq 17); do printf '127.0.0.1:%d,' $((6000 + i)); done)
bad=('nohost' ':6379' '127.0.0.1:0' '127.0.0.1:65536' '127.0.0.1:x' '127.0.0.1:'
     'cluster:' 'cluster:127.0.0.1' 'cluster:127.0.0.1:1,,127.0.0.1:2' 'cluster:127.0.0.1:1, 127.0.0.1:2'
     'cluster:127.0.0.1:1,' 'cluster:::1:6379' "cluster:${many%,}"
     'sentinel:m' 'sentinel:@127.0.0.1:1' 'sentinel:m@' 'sentinel:m@127.0.0.1:0'
     'sentinel:m@127.0.0.1:1,,127.0.0.1:2' 'sentinel:m@127.0.0.1 :1')
for a in "${bad[@]}"; do
    "$REPLAY" -p "$POLICY" -r "$a" "$T/trace.tsv" >"$T/out" 2>"$T/err"
    check "replay -r '$a': exit 2" 2 $?
    check "replay -r '$a': says so" 1 "$(grep -c "^tally-replay: bad --redis address '$a'" "$T/err")"
    check "replay -r '$a': no report" 0 "$(wc -c <"$T/out")"
    rm -f "$T/port"
    timeout 10 "$GATE" -p "$POLICY" -l 127.0.0.1:0 --port-file "$T/port" -r "$a" 2>"$T/err"
    check "gate -r '$a': exit 2" 2 $?
    check "gate -r '$a': says so" 1 "$(grep -c "^tally-gate: bad --redis address '$a'" "$T/err")"
    check "gate -r '$a': never listened" no "$([ -e "$T/port" ] && echo yes || echo no)"
done
"$REPLAY" -p "$POLICY" -r cluster:127.0.0.1:1 --redis-prefix 'a{b}:' "$T/trace.tsv" >/dev/null 2>"$T/err"
check "replay: braces in a cluster prefix: exit 2" 2 $?
check "replay: braces in a cluster prefix: says so" 1 "$(grep -c 'with this --redis-prefix' "$T/err")"
timeout 10 "$GATE" -p "$POLICY" -l 127.0.0.1:0 -r cluster:127.0.0.1:1 --redis-prefix 'a{b}:' 2>"$T/err"
check "gate: braces in a cluster prefix: exit 2" 2 $?
for w in 0 x 1001; do
    "$REPLAY" -p "$POLICY" -r 127.0.0.1:1 --redis-wait $w "$T/trace.tsv" >/dev/null 2>"$T/err"
    check "replay --redis-wait $w: exit 2" 2 $?
    timeout 10 "$GATE" -p "$POLICY" -l 127.0.0.1:0 -r 127.0.0.1:1 --redis-wait $w 2>"$T/err"
    check "gate --redis-wait $w: exit 2" 2 $?
done
"$REPLAY" --help | grep -q 'sentinel:NAME@H:PORT'
check "replay --help: the Redis forms" 0 $?
"$GATE" --help | grep -q 'sentinel:NAME@H:PORT'
check "gate --help: the Redis forms" 0 $?

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "skip  redis-server or redis-cli not installed: the good addresses are not tried"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ] && exit 77
    exit 1
fi

# ---- good addresses against real servers ----------------------------------
wait_up() {   # wait_up PORT PID: PING answers
    for _ in $(seq 100); do
        redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
start_redis() {   # start_redis NAME ARGS...: sets PORT_<NAME>
    local name=$1 port
    shift
    port=$(free_port)
    mkdir -p "$T/$name"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$T/$name" \
        --daemonize no --loglevel warning "$@" >"$T/$name.log" 2>&1 &
    pids+=($!)
    wait_up "$port" $! || echo "FAIL  $name did not start"
    printf -v "PORT_$name" %s "$port"
}
total() {   # total PORT PREFIX: the sum of the counters of the policy sync under PREFIX
    local sum=0 k v
    for k in $(redis-cli -p "$1" --scan --pattern "$2*sync:*" | grep -v ':notified$' | sort -u); do
        v=$(redis-cli -p "$1" get "$k")
        sum=$((sum + v))
    done
    echo $sum
}
gate_hits() {   # gate_hits NAME N ARGS...: N requests through a gate started with ARGS, then SIGTERM
    local name=$1 n=$2
    shift 2
    rm -f "$T/$name.port"
    "$GATE" -p "$POLICY" -H X-Key -l 127.0.0.1:0 --port-file "$T/$name.port" --flush-ms 100 "$@" \
        2>"$T/$name.err" &
    local pid=$!
    pids+=($pid)
    for _ in $(seq 100); do [ -s "$T/$name.port" ] && break; sleep 0.05; done
    for _ in $(seq "$n"); do
        curl -s -o /dev/null -H 'X-Key: g' "http://127.0.0.1:$(cat "$T/$name.port")/"
    done
    kill -TERM $pid
    wait $pid
}

start_redis master --repl-diskless-sync yes --repl-diskless-sync-delay 0
"$REPLAY" -q -p "$POLICY" -r 127.0.0.1:$PORT_master --redis-prefix hp: "$T/trace.tsv" >/dev/null
check "replay -r HOST:PORT: exit 0" 0 $?
check "replay -r HOST:PORT: every hit in Redis" 30 "$(total $PORT_master hp:)"

# one replica, one sentinel (quorum 1): discovery only, no failover here
start_redis replica --replicaof 127.0.0.1 $PORT_master
for _ in $(seq 100); do
    redis-cli -p $PORT_master info replication | grep -q "port=$PORT_replica,state=online" && break
    sleep 0.05
done
SPORT=$(free_port)
mkdir -p "$T/sentinel"
printf 'port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor tm 127.0.0.1 %d 1\n' \
    $SPORT "$T/sentinel" $PORT_master >"$T/sentinel/sentinel.conf"
redis-server "$T/sentinel/sentinel.conf" --sentinel >"$T/sentinel.log" 2>&1 &
pids+=($!)
wait_up $SPORT $! || echo "FAIL  the sentinel did not start"
DEAD=$(free_port)
S="sentinel:tm@127.0.0.1:$DEAD,127.0.0.1:$SPORT"

"$REPLAY" -q -p "$POLICY" -r "$S" --redis-prefix sp: "$T/trace.tsv" >/dev/null
check "replay -r sentinel:NAME@...: exit 0" 0 $?
check "replay -r sentinel:NAME@...: every hit on the master" 30 "$(total $PORT_master sp:)"
gate_hits sg 7 -r "$S" --redis-prefix sg:
check "gate -r sentinel:NAME@...: exit 0 on SIGTERM" 0 $?
check "gate -r sentinel:NAME@...: every hit on the master" 7 "$(total $PORT_master sg:)"
"$REPLAY" -q -p "$POLICY" -r "$S" --redis-prefix sw: --redis-wait 1 "$T/trace.tsv" >/dev/null
check "replay --redis-wait 1 with one replica: exit 0" 0 $?
check "replay --redis-wait 1: every hit on the replica too" 30 "$(total $PORT_replica sw:)"
"$REPLAY" -q -p "$POLICY" -r "$S" --redis-prefix sx: --redis-wait 2 "$T/trace.tsv" >/dev/null 2>"$T/err"
check "replay --redis-wait 2 with one replica: the final flush fails, exit 4" 4 $?
check "replay --redis-wait 2: says so" 1 "$(grep -c 'final flush to Redis failed' "$T/err")"

# three masters of a Redis Cluster, each with its own bus port
cports=()
for i in 1 2 3; do
    start_redis "c$i" --cluster-enabled yes --cluster-config-file "$T/c$i/nodes.conf" \
        --cluster-port "$(free_port)" --cluster-node-timeout 2000
    v=PORT_c$i
    cports+=("127.0.0.1:${!v}")
done
redis-cli --cluster create "${cports[@]}" --cluster-yes >"$T/cluster.log" 2>&1
for _ in $(seq 100); do   # every node must know the whole slot map
    n=0
    for p in $PORT_c1 $PORT_c2 $PORT_c3; do
        redis-cli -p $p cluster info | grep -q 'cluster_state:ok' && n=$((n + 1))
    done
    [ $n -eq 3 ] && break
    sleep 0.1
done
C="cluster:${cports[0]}"
"$REPLAY" -q -p "$POLICY" -r "$C" --redis-prefix cp: "$T/trace.tsv" >/dev/null
check "replay -r cluster:...: exit 0" 0 $?
ctotal() {   # ctotal PREFIX: the sum over the three masters
    echo $(( $(total $PORT_c1 "$1") + $(total $PORT_c2 "$1") + $(total $PORT_c3 "$1") ))
}
check "replay -r cluster:...: every hit in the cluster" 30 "$(ctotal cp:)"
gate_hits cg 7 -r "$C,${cports[1]}" --redis-prefix cg:
check "gate -r cluster:...: exit 0 on SIGTERM" 0 $?
check "gate -r cluster:...: every hit in the cluster" 7 "$(ctotal cg:)"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
