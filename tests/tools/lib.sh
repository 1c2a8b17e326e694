# Sourced by the tools' tests (tests/tools/*.sh), whose arguments are
# PATH/TO/tally-replay PATH/TO/tally-gate: the tools under test, a temp dir
# $T, the processes a test starts ($pids, stopped on exit with
# $STOP_SIGNAL, default TERM, and the temp dir removed), check(), and
# start_gate/stop_gate/code() for a tally-gate on a free loopback port.
REPLAY=$(realpath "$1")
GATE=$(realpath "$2")
T=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -"${STOP_SIGNAL:-TERM}" "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

passed=0
failed=0
check() {   # check NAME EXPECTED ACTUAL
    if [ "$2" == "$3" ]; then
        passed=$((passed + 1))
        echo "ok    $1"
    else
        failed=$((failed + 1))
        echo "FAIL  $1: expected '$2', got '$3'"
    fi
}

start_gate() {   # start_gate NAME ARGS...: sets PORT, GATE_PID
    local name=$1
    shift
    rm -f "$T/$name.port"
    "$GATE" -l 127.0.0.1:0 --port-file "$T/$name.port" "$@" 2>"$T/$name.err" &
    GATE_PID=$!
    pids+=("$GATE_PID")
    for _ in $(seq 100); do [ -s "$T/$name.port" ] && break; sleep 0.1; done
    PORT=$(cat "$T/$name.port" 2>/dev/null)
}
stop_gate() {    # stop_gate NAME: SIGTERM, check a clean exit
    kill -TERM "$GATE_PID"
    wait "$GATE_PID"
    check "gate $1: exit 0 on SIGTERM" 0 $?
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
