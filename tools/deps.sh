# Sourced by tools/run and tools/test: install the Debian packages the build
# needs when any is missing. Needs root (or sudo) only when something is missing.
TALLY_PACKAGES="gcc g++ pkg-config meson ninja-build liburcu-dev libck-dev libhiredis-dev
libcriterion-dev libbenchmark-dev redis-server redis-tools clang libclang-rt-14-dev valgrind gnuplot-nox
curl wrk nginx-light nginx-dev spin"

tally_install_deps() {
    local missing=""
    for p in $TALLY_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    echo "tally: installing:$missing" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
}
