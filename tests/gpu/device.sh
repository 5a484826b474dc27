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
for t in "$dir"/gpu_*; do
    name=$(basename "$t")
    timeout 300 "$t" $bench >"$out/$name.log" 2>&1
    rc=$?
    p=$(grep -c '^ok ' "$out/$name.log"); f=$(grep -c '^not ok ' "$out/$name.log")
    pass=$((pass + p)); fail=$((fail + f))
    echo "$name: rc=$rc ok=$p notok=$f"
    grep -E '^not ok|^#|^skip' "$out/$name.log" | head -30
    # exit 77: skipped (no device, too few GPUs), not a failure
    [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ "$f" -eq 0 ] && { tail -5 "$out/$name.log"; fail=$((fail + 1)); }
done
# lora-gen's opt-in wgmma products (Hopper; elsewhere the same run again)
if [ -x "$dir/gpu_gen" ]; then
    QLORA_GEN_WG=1 timeout 300 "$dir/gpu_gen" $bench >"$out/gpu_gen_wg.log" 2>&1
    rc=$?
    p=$(grep -c '^ok ' "$out/gpu_gen_wg.log"); f=$(grep -c '^not ok ' "$out/gpu_gen_wg.log")
    pass=$((pass + p)); fail=$((fail + f))
    echo "gpu_gen QLORA_GEN_WG=1: rc=$rc ok=$p notok=$f"
    grep -E '^not ok' "$out/gpu_gen_wg.log" | head -30
    [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ "$f" -eq 0 ] && { tail -5 "$out/gpu_gen_wg.log"; fail=$((fail + 1)); }
fi
echo "$pass passed, $fail failed"
