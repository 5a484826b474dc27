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

# has_checkpoint DIR: DIR holds a finished lora-train checkpoint.
has_checkpoint() { ls "$1"/checkpoint-*/trainer_state.json >/dev/null 2>&1; }

# crash_loop POLL COMMAND...: for each line "k d" of the file plan, runs
# COMMAND (lora-train writing run/, without its input), with --resume
# once run/ holds a checkpoint, on t.packed; waits (polling every POLL
# seconds) until checkpoint-k is written, sleeps d seconds and kills it
# with SIGKILL. Sets kills to the number of kills that landed (the run
# had not already finished). stderr goes to run.err.
crash_loop() {
    poll=$1; shift
    kills=0
    while read -r k d; do
        r=
        has_checkpoint run && r=--resume
        # exec: $! must be lora-train itself, not a subshell whose kill
        # would leave it running
        (exec "$@" $r t.packed >/dev/null 2>>run.err) &
        pid=$!
        while [ ! -f "run/checkpoint-$k/trainer_state.json" ] && kill -0 "$pid" 2>/dev/null; do
            sleep "$poll"
        done
        sleep "$d"
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        [ $? -eq 137 ] && kills=$((kills + 1))
    done <plan
}
