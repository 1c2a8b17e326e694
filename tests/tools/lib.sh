# Sourced by the tools' tests (tests/tools/*.sh), whose arguments are
# PATH/TO/tally-replay PATH/TO/tally-gate: the tools under test, a temp dir
# $T, the processes a test starts ($pids, stopped on exit with
# $STOP_SIGNAL, default TERM, and the temp dir removed), and check().
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
