#!/bin/sh
# device.sh: runs the kernel tests (and, with --bench, their timings) on a
# GPU machine, from binaries built elsewhere and copied into DIR (default
# .carry/gpu). Used with the team's device tool; logs go to $OUT when set.
#   sh tests/gpu/device.sh [--bench] [DIR]
bench=
[ "$1" = "--bench" ] && { bench=--bench; shift; }
dir=${1:-.carry/gpu}
out=${OUT:-/tmp}
cuda=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")
export LD_LIBRARY_PATH="$cuda/lib64:$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
pass=0 fail=0
# one test program: its log in $out/LOG.log, its counts added up
run_test() {
    name=$1 log=$2; shift 2
    timeout 300 "$@" $bench >"$out/$log.log" 2>&1
    rc=$?
    p=$(grep -c '^ok ' "$out/$log.log"); f=$(grep -c '^not ok ' "$out/$log.log")
    pass=$((pass + p)); fail=$((fail + f))
    echo "$name: rc=$rc ok=$p notok=$f"
    grep -E '^not ok|^#|^skip' "$out/$log.log" | head -30
    # exit 77: skipped (no device, too few GPUs), not a failure
    [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ "$f" -eq 0 ] && { tail -5 "$out/$log.log"; fail=$((fail + 1)); }
}
for t in "$dir"/gpu_*; do
    run_test "$(basename "$t")" "$(basename "$t")" "$t"
done
# lora-gen's opt-in wgmma products (Hopper; elsewhere the same run again)
[ -x "$dir/gpu_gen" ] && run_test "gpu_gen QLORA_GEN_WG=1" gpu_gen_wg env QLORA_GEN_WG=1 "$dir/gpu_gen"
echo "$pass passed, $fail failed"
