# tests/cli/lib.sh: helpers for CLI tests (sourced, not run).
# ok/notok/skip print the lines tests/run.sh counts. Each test script runs
# in its own scratch directory, removed at exit.
: "${TOP:=$(pwd)}" "${SHARED:=$TOP/../shared}"
PATH="$TOP/bin:$PATH"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
cd "$SCRATCH" || exit 2

ok()    { echo "ok $*"; }
notok() { echo "not ok $*"; }
skip()  { echo "skip $*"; }

# check NAME COMMAND...: passes when the command succeeds.
check() { n=$1; shift; if "$@"; then ok "$n"; else notok "$n"; fi; }

# expect_exit CODE NAME COMMAND...: runs the command (stdout to out,
# stderr to err) and passes when it exits with CODE and, for CODE 2,
# stderr is exactly one line.
expect_exit() {
    code=$1 n=$2; shift 2
    "$@" >out 2>err; rc=$?
    if [ "$rc" -ne "$code" ]; then
        notok "$n: exit $rc, expected $code"; sed 's/^/    /' err; return 1
    fi
    if [ "$code" -eq 2 ] && [ "$(grep -cv '^[^:]*: hint: ' err)" -ne 1 ]; then
        notok "$n: stderr is not one line"; sed 's/^/    /' err; return 1
    fi
    ok "$n"
}

have_shared() { [ -d "$SHARED/data" ] && [ -d "$SHARED/models" ]; }
