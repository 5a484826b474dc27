#!/bin/sh
# bench/merge.sh: lora-merge on a 7B-shaped checkpoint against the speed of
# the disk it reads and writes.
#
# Makes a seeded random Llama-2-7B-shaped BF16 checkpoint (4096 / 11008 /
# 32 layers / 32 heads / vocab 32000, 13.5 GB, one file, with bench/nf4-gen.c)
# and LoRA adapters (r 64, alpha 16; B random so the merge computes) with
# bench/merge-adapter.c, then times, each with the base dropped from the page
# cache first (dd iflag=nocache), so reads come from the disk:
#
#   dd read      dd iflag=direct of the base: the disk's read speed
#   dd write     dd of the same size with conv=fdatasync: its write speed
#   cp           cat base > copy; sync: read + write of the same bytes, the
#                ceiling for a merge, which moves as much
#   lora-merge   q,v (the seed's adapter), and all seven linears
#
# GB/s counts the bytes read plus the bytes written (1 GB = 1e9 bytes), and
# "model GB/s" the checkpoint's size over the wall time. CPU seconds (user
# and system) and peak RSS from /usr/bin/time: CPU near wall x cores means
# the merge was bound by the processors, not the disk. The load average
# before each step is printed, since on a shared machine it decides a lot. Needs about 2.1x the checkpoint's size free in BENCH_DIR
# (default /tmp); with less, it uses the most layers that fit and says so.
#
#   sh bench/merge.sh [LAYERS]        (from the project root, after make)
#
# BENCH_BASE=DIR uses an existing checkpoint (made by an earlier run with
# BENCH_KEEP=1, which leaves its scratch directory and says where) instead
# of generating one.
TOP=$(pwd)
DIR=${BENCH_DIR:-/tmp}
[ -x "$TOP/bin/lora-merge" ] && [ -f "$TOP/build/libqlora.a" ] ||
    { echo "bench: build bin/lora-merge first (make)" >&2; exit 2; }
CC=${CC:-cc}
tmp=$(mktemp -d "$DIR/bench-merge.XXXXXX") || exit 2
if [ -n "$BENCH_KEEP" ]; then
    echo "bench: keeping $tmp" >&2
else
    trap 'rm -rf "$tmp"' EXIT INT TERM
fi
LIBS="$TOP/build/libqlora.a -fopenmp -lzstd -lyaml -lm -lpthread"
$CC -O2 -std=c11 -I"$TOP/lib" -o "$tmp/nf4-gen" "$TOP/bench/nf4-gen.c" $LIBS &&
    $CC -O2 -std=c11 -I"$TOP/lib" -o "$tmp/merge-adapter" \
        "$TOP/bench/merge-adapter.c" $LIBS || exit 2

H=4096 I=11008 HEADS=32 KV=32 V=32000
per_layer=$(( (4 * H * H + 3 * H * I + 2 * H) * 2 ))
fixed=$(( (2 * V * H + H) * 2 ))
avail=$(( $(df -Pk "$DIR" | awk 'NR==2 {print $4}') * 1024 ))
WANT=${1:-32}
L=$WANT
while [ "$L" -gt 1 ] && [ $(( (fixed + L * per_layer) * 21 / 10 )) -gt "$avail" ]; do
    L=$((L - 1))
done
size=$((fixed + L * per_layer))
[ "$L" -lt "$WANT" ] && echo "bench: only $((avail / 1000000000)) GB free in" \
    "$DIR: $L layers instead of $WANT" >&2

now() { date +%s.%N; }
gbps() { awk -v b="$1" -v s="$2" -v e="$3" 'BEGIN { printf "%.3f", b / (e - s) / 1e9 }'; }
secs() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.1f", e - s }'; }
uncache() { for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; }
row() { printf '%-34s %8s s %9s %11s %12s %9s %5s\n' "$@" "$ld"; }
load() { ld=$(cut -d' ' -f1 /proc/loadavg); }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
echo "disk: $(df -P "$DIR" | awk 'NR==2 {print $1}') ($DIR)"
if [ -n "$BENCH_BASE" ]; then
    BD=$BENCH_BASE
    L=$(jq .num_hidden_layers "$BD/config.json")
    size=$(wc -c <"$BD/model.safetensors")
    echo "checkpoint: $L layers, $size bytes, BF16 ($BD)"
else
    BD="$tmp/base"
    mkdir "$BD" || exit 2
    s=$(now)
    "$tmp/nf4-gen" "$BD" $H $I "$L" $HEADS $KV $V bf16 1 >/dev/null || exit 2
    e=$(now)
    echo "checkpoint: $L layers, $size bytes, BF16 (generated in" \
        "$(secs "$s" "$e") s)"
fi
"$tmp/merge-adapter" "$BD" "$tmp/ad-qv" 64 q_proj,v_proj 1 &&
    "$tmp/merge-adapter" "$BD" "$tmp/ad-all" 64 all-linear 2 || exit 2
B="$BD/model.safetensors"
echo
ld="load"
row "command" "wall" "GB/s" "model GB/s" "CPU usr+sys" "peak RSS"

uncache "$B"; sync; load
s=$(now); dd if="$B" of=/dev/null bs=16M iflag=direct status=none; e=$(now)
row "dd read (iflag=direct)" "$(secs "$s" "$e")" "$(gbps "$size" "$s" "$e")" "" "" ""
load; s=$(now)
dd if=/dev/zero of="$tmp/dd" bs=16M count=$((size / 16777216)) conv=fdatasync status=none
e=$(now)
row "dd write (conv=fdatasync)" "$(secs "$s" "$e")" \
    "$(gbps $((size / 16777216 * 16777216)) "$s" "$e")" "" "" ""
rm -f "$tmp/dd"
uncache "$B"; sync; load
s=$(now); cat "$B" >"$tmp/copy" && sync; e=$(now)
row "cp (cat > copy; sync)" "$(secs "$s" "$e")" "$(gbps $((2 * size)) "$s" "$e")" \
    "$(gbps "$size" "$s" "$e")" "" ""
rm -f "$tmp/copy"

merge() {
    name=$1; shift
    uncache "$B"; sync; load
    s=$(now)
    /usr/bin/time -f '%M %U %S' -o "$tmp/rss" "$TOP/bin/lora-merge" -q "$@" ||
        exit 2
    e=$(now)
    row "$name" "$(secs "$s" "$e")" "$(gbps $((2 * size)) "$s" "$e")" \
        "$(gbps "$size" "$s" "$e")" "$(awk '{printf "%.1f+%.1f", $2, $3}' "$tmp/rss")" \
        "$(awk '{printf "%d MiB", $1 / 1024}' "$tmp/rss")"
    rm -rf "$tmp/merged"
}
merge "lora-merge q,v r64 (BF16, 5GB)" -b "$BD" -o "$tmp/merged" "$tmp/ad-qv"
merge "lora-merge all-linear r64" -b "$BD" -o "$tmp/merged" "$tmp/ad-all"
