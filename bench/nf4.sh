#!/bin/sh
# bench/nf4.sh: nf4-quant on a seeded synthetic Llama checkpoint of 1.1 B
# parameters (TinyLlama-1.1B's shapes: hidden 2048, intermediate 5632, 22
# layers, 32 heads, 4 KV heads, vocabulary 32000, untied head; BF16, 2.2 GB),
# written by bench/nf4-gen.c with our own safetensors writer into /tmp (never
# the repository). Prints the best of N runs with all threads and with one,
# the rate in parameters per second (all parameters of the checkpoint, and
# the quantized ones), and the projected time for Llama 2 7B (6.74 B).
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

now() { date +%s.%N; }
best() { # threads -> best wall seconds over $runs
    b=
    for i in $(seq "$runs"); do
        rm -rf "$work/out"
        t0=$(now)
        "$top/bin/nf4-quant" $1 -o "$work/out" "$in"
        t1=$(now)
        b=$(echo "$t0 $t1 $b" | awk '{d = $2 - $1; if ($3 == "" || d < $3) d = d; else d = $3; printf "%.3f", d}')
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
printf '%-36s %8s %12s %12s %14s\n' "command (best of $runs)" wall "Mparam/s" "Mquant/s" "Llama 2 7B"
for row in "nf4-quant (all $nproc threads):$ball" "nf4-quant -j 1:$bone"; do
    name=${row%:*} t=${row##*:}
    echo "$t $params $qparams" | awk -v name="$name" '{
        r = $2 / $1 / 1e6; q = $3 / $1 / 1e6;
        printf "%-36s %7.2fs %12.0f %12.0f %13.1fs\n", name, $1, r, q, 6.74e9 / ($2 / $1) }'
done
rm -rf "$work/out"
