#!/bin/sh
# The one test runner: every unit test binary in $BUILD/tests and every CLI
# script in tests/cli. Each prints lines "ok NAME", "not ok NAME" or
# "skip NAME: why"; a program that dies without saying "not ok" counts as a
# failure. Ends with "N passed, N failed, N skipped".
BUILD=${BUILD:-build}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
TOP=$(pwd)
export TOP SHARED BUILD
export BIN="$TOP/bin"
export PATH="$TOP/bin:$PATH"
pass=0 fail=0 skipped=0
log=$(mktemp)
run_one() {
    name=$1; shift
    "$@" >"$log" 2>&1
    rc=$?
    p=$(grep -c '^ok ' "$log")
    f=$(grep -c '^not ok ' "$log")
    s=$(grep -c '^skip ' "$log")
    grep -E '^(not ok|skip) ' "$log" | sed "s|^|$name: |"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ "$f" -eq 0 ]; then
        echo "$name: not ok: exited with status $rc"
        tail -n 20 "$log" | sed 's/^/    /'
        f=1
    elif [ "$f" -gt 0 ]; then
        grep -v -E '^(ok|not ok|skip) ' "$log" | head -n 40 | sed 's/^/    /'
    fi
    pass=$((pass + p)); fail=$((fail + f)); skipped=$((skipped + s))
    [ "$f" -eq 0 ] && echo "$name: $p passed${s:+, $s skipped}" | sed 's/, 0 skipped//'
}
for t in "$BUILD"/tests/*; do
    [ -f "$t" ] && [ -x "$t" ] || continue
    case "$(basename "$t")" in gpu_*) [ -n "$GPU" ] || continue ;; esac
    run_one "unit/$(basename "$t")" "$t"
done
# lora-gen's opt-in wgmma products (Hopper; elsewhere the same run again)
if [ -n "$GPU" ] && [ -x "$BUILD/tests/gpu_gen" ]; then
    run_one "unit/gpu_gen (QLORA_GEN_WG=1)" env QLORA_GEN_WG=1 "$BUILD/tests/gpu_gen"
fi
for t in tests/cli/*.sh; do
    [ -f "$t" ] || continue
    [ "$(basename "$t")" = lib.sh ] && continue
    run_one "cli/$(basename "$t" .sh)" sh "$t"
done
rm -f "$log"
echo "$pass passed, $fail failed, $skipped skipped"
[ "$fail" -eq 0 ]
