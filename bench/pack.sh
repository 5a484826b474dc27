#!/bin/sh
# bench/pack.sh: pack on the whole Dolly token stream (15,011 records,
# 2,345,082 tokens, Llama 2 tokenizer) at 2048, in both modes, beside a
# pure-Python reference of the same two packings (the seed's chunking of the
# concatenation, as TRL's ConstantLengthDataset does it on lists, and a
# best-fit-decreasing with bisect). The stream is made once with dolly-fmt
# and tok, untimed. Each command runs RUNS times; the table shows the best
# wall time and, for pack, the rows and efficiency of its output.
#
#   sh bench/pack.sh [RUNS]        (from the project root, after make)
TOP=$(pwd)
SHARED=${SHARED:-$TOP/../shared}
DOLLY="$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst"
MODEL="$SHARED/models/llama2-tokenizer/tokenizer.model"
RUNS=${1:-5}
[ -f "$DOLLY" ] || { echo "bench: $DOLLY absent" >&2; exit 2; }
for t in dolly-fmt tok pack; do
    [ -x "$TOP/bin/$t" ] || { echo "bench: build bin/$t first" >&2; exit 2; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 2
zstd -dc "$DOLLY" | "$TOP/bin/dolly-fmt" | "$TOP/bin/tok" -m "$MODEL" >dolly.toks ||
    { echo "bench: tokenizing failed" >&2; exit 2; }
zstd -q -c dolly.toks >dolly.toks.zst

cat >ref.py <<'EOF'
# Reference packings in plain Python, reading the token stream directly.
import bisect, struct, sys
mode, L = sys.argv[1], int(sys.argv[2])
data = open("dolly.toks", "rb").read()
pos = data.index(b"\n") + 1
recs = []
while True:
    n, cs = struct.unpack_from("<II", data, pos)
    pos += 8
    if n == 0xFFFFFFFF:
        break
    recs.append(list(struct.unpack_from("<%dI" % n, data, pos)))
    pos += 4 * n
if mode == "concat":
    flat = [t for r in recs for t in r]
    rows = [flat[i:i + L] for i in range(0, len(flat) - len(flat) % L, L)]
    eff = 1.0
else:
    rows, room, keys = [], [], []   # keys: sorted (room, row) pairs
    for r in sorted(recs, key=len, reverse=True):
        r = r[:L]
        i = bisect.bisect_left(keys, (len(r), -1))
        if i == len(keys):
            rows.append(list(r)); keys.insert(bisect.bisect_left(keys, (L - len(r), len(rows) - 1)), (L - len(r), len(rows) - 1))
        else:
            left, k = keys.pop(i)
            rows[k].extend(r)
            keys.insert(bisect.bisect_left(keys, (left - len(r), k)), (left - len(r), k))
    eff = sum(map(len, rows)) / (len(rows) * L)
out = bytearray()
for row in rows:
    out += struct.pack("<%dI" % L, *(row + [0] * (L - len(row))))
sys.stderr.write("%d %.4f\n" % (len(rows), eff))
EOF

# best NAME COMMAND: best of RUNS wall times in seconds.
best() {
    name=$1 cmd=$2 b=""
    i=0
    while [ $i -lt "$RUNS" ]; do
        s=$(date +%s.%N)
        sh -c "$cmd" >/dev/null 2>info || { echo "bench: '$name' failed" >&2; exit 2; }
        e=$(date +%s.%N)
        b=$(awk -v s="$s" -v e="$e" -v b="$b" \
            'BEGIN { t = e - s; print (b == "" || t < b) ? t : b }')
        i=$((i + 1))
    done
    if [ -s out.pack ]; then
        extra=$("$TOP/bin/pack" --stats out.pack |
            jq -r '"\(.rows) \(.efficiency * 10000 | round / 10000)"')
        rm -f out.pack
    else
        extra=$(cat info)
    fi
    set -- $extra
    printf '%-46s %8.3f s %7s %9s\n' "$name" "$b" "$1" "$2"
}

printf '%-46s %10s %7s %9s\n' "command (best of $RUNS), Dolly at 2048" "wall" "rows" "effic."
P="'$TOP/bin/pack'"
best "pack -m concat -l all (the seed's packing)" "$P -m concat -l all -n 2048 -o out.pack dolly.toks"
best "pack (bfd, loss completion)" "$P -n 2048 -o out.pack dolly.toks"
best "pack --overlong split" "$P -n 2048 --overlong split -o out.pack dolly.toks"
best "pack --eval-fraction 0.02" "$P -n 2048 --eval-fraction 0.02 --eval-out e.pack -o out.pack dolly.toks"
best "pack dolly.toks.zst (zstd inside)" "$P -n 2048 -o out.pack dolly.toks.zst"
if command -v python3 >/dev/null; then
    best "python3 concat (reference)" "python3 ref.py concat 2048"
    best "python3 bfd with bisect (reference)" "python3 ref.py bfd 2048"
fi
