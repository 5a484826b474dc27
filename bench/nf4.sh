#!/bin/sh
# bench/nf4.sh: nf4-quant on a seeded synthetic Llama checkpoint of 1.1 B
# parameters (TinyLlama-1.1B's shapes: hidden 2048, intermediate 5632, 22
# layers, 32 heads, 4 KV heads, vocabulary 32000, untied head; BF16, 2.2 GB),
# written by bench/nf4-gen.c with our own safetensors writer into /tmp (never
# the repository). Prints the best of N runs with all threads and with one,
# the rate in parameters per second (all parameters of the checkpoint, and
# the quantized ones), the CPU seconds of the run (user + system; the build
# box is shared, so the wall time depends on what else runs), and the
# projected time for Llama 2 7B (6.74 B) at the measured wall-clock rate.
#
#   sh bench/nf4.sh [runs] [dtype]      (defaults: 3, bf16; dtype f32 too)
#
# The reference, bitsandbytes, needs a CUDA GPU and quantizes while loading
# (no CPU path to compare side by side); its output is compared bit for bit
# in tests/unit/test_nf4.c instead.
set -e
runs=${1:-3}
dtype=${2:-bf16}
top=$(cd "$(dirname "$0")/.." && pwd)
work=${NF4_BENCH_DIR:-/tmp/nf4-bench}
mkdir -p "$work"
make -C "$top" -s bin/nf4-quant build/libqlora.a
cc -O2 -std=c11 -I"$top/lib" "$top/bench/nf4-gen.c" "$top/build/libqlora.a" \
    -lzstd -lm -lpthread -o "$work/nf4-gen"
in=$work/in-$dtype
if [ ! -f "$in/model.safetensors" ] || [ ! -f "$in/params" ]; then
    rm -rf "$in"
    mkdir -p "$in"
    echo "generating $in (seed 1) ..." >&2
    "$work/nf4-gen" "$in" 2048 5632 22 32 4 32000 "$dtype" 1 >"$in/params.tmp"
    mv "$in/params.tmp" "$in/params"
fi
params=$(cat "$in/params")
# quantized: 22 layers of q, k, v, o, gate, up, down
qparams=$((22 * (2048 * 2048 * 2 + 256 * 2048 * 2 + 5632 * 2048 * 3)))
cat "$in/model.safetensors" >/dev/null # warm the page cache: time the tool

# best THREADS-OPTION: the best wall time over $runs, with the CPU seconds
# (user + system) of that run: "wall cpu"
best() {
    b=
    for i in $(seq "$runs"); do
        rm -rf "$work/out"
        /usr/bin/time -f '%e %U %S' -o "$work/time" \
            "$top/bin/nf4-quant" $1 -o "$work/out" "$in"
        r=$(awk '{printf "%.2f %.2f", $1, $2 + $3}' "$work/time")
        b=$(echo "$r $b" | awk '{if ($3 == "" || $1 < $3) print $1, $2; else print $3, $4}')
    done
    echo "$b"
}
nproc=$(getconf _NPROCESSORS_ONLN)
ball=$(best "")
bone=$(best "-j 1")
load=$(cut -d' ' -f1-3 /proc/loadavg)
size=$(du -m "$work/out/model.safetensors" | cut -f1)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $nproc cores; load average after: $load"
echo "input: $params parameters ($qparams quantized), $dtype, $(du -m "$in/model.safetensors" | cut -f1) MB; output $size MB"
printf '%-30s %7s %7s %9s %9s %11s %10s\n' "command (best of $runs)" wall cpu "Mparam/s" "Mquant/s" "Mparam/cpu-s" "Llama 2 7B"
for row in "nf4-quant (all $nproc threads):$ball" "nf4-quant -j 1:$bone"; do
    name=${row%:*} t=${row##*:}
    echo "$t $params $qparams" | awk -v name="$name" '{
        printf "%-30s %6.2fs %6.2fs %9.0f %9.0f %11.0f %9.1fs\n", name, $1, $2,
            $3 / $1 / 1e6, $4 / $1 / 1e6, $3 / $2 / 1e6, 6.74e9 / ($3 / $1) }'
done
rm -rf "$work/out"
