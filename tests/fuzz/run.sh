#!/bin/sh
# tests/fuzz/run.sh: runs the libFuzzer harnesses one after the other (never
# two at once: they are CPU-bound), each for a fixed time, and prints how
# many inputs each executed.
#
#   sh tests/fuzz/run.sh [-r] [-t seconds] [harness ...]
#
#   -t seconds  time per harness (default 600)
#   -r          also append the table to tests/fuzz/RESULTS.md
#   harness     json safetensors sentencepiece sp_encode tokstream packfile
#               config adapter st_index nf4_state (default: all)
#
# Run from the project root after `make all fuzz`; the seed corpora are made
# by tests/fuzz/seeds.sh when build/fuzz/corpus is missing. Inputs that find
# new coverage collect in build/fuzz/work/<harness>; crashes, leaks, hangs
# (over 10 s) and out-of-memory inputs in build/fuzz/crashes/<harness>/.
# Each crash must become a regression test (tests/unit/test_fuzz_regress.c)
# and be fixed. Exit status 1 when any harness failed.
set -u
secs=600 record=
while getopts rt: o; do
    case $o in
    r) record=1 ;;
    t) secs=$OPTARG ;;
    *) echo "usage: sh tests/fuzz/run.sh [-r] [-t seconds] [harness ...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
all="json safetensors sentencepiece sp_encode tokstream packfile config adapter st_index nf4_state"
[ $# -gt 0 ] && all="$*"
SHARED=${SHARED:-$(cd .. && pwd)/shared}
export SHARED
F=build/fuzz
[ -d "$F/corpus" ] || sh tests/fuzz/seeds.sh "$F/corpus" || exit 2

# the largest input each harness is given (bytes): above its biggest seed
max_len() {
    case $1 in
    safetensors|adapter|st_index) echo 65536 ;;
    tokstream) echo 32768 ;;
    sentencepiece) echo 16384 ;;
    packfile) echo 8192 ;;
    *) echo 4096 ;;
    esac
}

# one fuzzer at a time on this machine, whoever starts it
mkdir -p "$F"
if ! mkdir "$F/.running" 2>/dev/null; then
    echo "run.sh: another run is in progress ($F/.running exists)" >&2
    exit 2
fi
table=$(mktemp)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/qlora-fuzz-run.XXXXXX")
[ -d /dev/shm ] && scratch_shm=$(mktemp -d /dev/shm/qlora-fuzz-run.XXXXXX) || scratch_shm=$scratch
trap 'rm -rf "$scratch" "$scratch_shm" "$table" "$F/.running"' EXIT
trap 'exit 2' INT TERM HUP
failed=0
printf '| harness | seconds | executions | exec/s | corpus | result |\n' >"$table"
printf '|---|---:|---:|---:|---:|---|\n' >>"$table"
for h in $all; do
    bin=$F/fuzz_$h
    if [ ! -x "$bin" ]; then
        echo "run.sh: $bin not built (make fuzz)" >&2
        failed=1
        continue
    fi
    mkdir -p "$F/work/$h" "$F/crashes/$h"
    log=$scratch/$h.log
    start=$(date +%s)
    FUZZ_TMPDIR=$scratch_shm nice -n 19 "$bin" "$F/work/$h" "$F/corpus/$h" \
        -max_total_time="$secs" -max_len="$(max_len "$h")" -timeout=10 \
        -rss_limit_mb=2048 -close_fd_mask=2 -print_final_stats=1 \
        -artifact_prefix="$F/crashes/$h/" >"$log" 2>&1
    rc=$?
    end=$(date +%s)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    [ -n "$runs" ] || runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    corpus=$(find "$F/work/$h" -type f | wc -l)
    t=$((end - start))
    [ "$t" -gt 0 ] || t=1
    if [ "$rc" -eq 0 ]; then
        result=clean
    else
        failed=1
        art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        kind=$(grep -m 1 -o -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer): [a-z-]+|runtime error: .*|broken promise: .*' "$log" | head -n 1)
        result="FAILED ($kind) ${art:-}"
        cp "$log" "$F/crashes/$h/last.log"
        echo "run.sh: $h: $kind; log in $F/crashes/$h/last.log" >&2
    fi
    printf '| %s | %d | %s | %d | %d | %s |\n' "$h" "$t" "${runs:-?}" \
        $(( ${runs:-0} / t )) "$corpus" "$result" >>"$table"
    echo "run.sh: $h: ${runs:-?} executions in ${t} s: $result" >&2
done
cat "$table"
if [ -n "$record" ]; then
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n), $(nproc) cores, nice 19, -t $secs"
        echo
        echo "\`sh tests/fuzz/run.sh -r -t $secs $*\` ($(clang --version | head -n 1))"
        echo
        cat "$table"
    } >>tests/fuzz/RESULTS.md
fi
exit "$failed"
