#!/bin/sh
# bench/dolly-fmt.sh: dolly-fmt on the whole Dolly file (13 MB, 15,011
# records) beside the reference way of doing the same formatting (Python's
# json module, as the seed's Python script does) and a jq one-liner. Each
# command runs RUNS times; the table shows the best wall time.
#
#   sh bench/dolly-fmt.sh [RUNS]        (from the project root, after make)
TOP=$(pwd)
SHARED=${SHARED:-$TOP/../shared}
DOLLY="$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst"
RUNS=${1:-5}
[ -f "$DOLLY" ] || { echo "bench: $DOLLY absent" >&2; exit 2; }
[ -x "$TOP/bin/dolly-fmt" ] || { echo "bench: build bin/dolly-fmt first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
zstd -dc "$DOLLY" >"$tmp/dolly.jsonl"

cat >"$tmp/ref.py" <<'EOF'
import json, sys
P = ("### Instruction:\nUse the Input below to create an instruction, which "
     "could have been used to generate the input using an LLM. \n\n"
     "### Input:\n{response}\n\n### Response:\n")
out = sys.stdout
for line in sys.stdin:
    if line.strip():
        r = json.loads(line)
        out.write(json.dumps({"prompt": P.format(response=r["response"]),
                              "completion": r["instruction"] + "\n"},
                             ensure_ascii=False) + "\n")
EOF
JQ='{prompt: ("### Instruction:\nUse the Input below to create an instruction, which could have been used to generate the input using an LLM. \n\n### Input:\n" + .response + "\n\n### Response:\n"), completion: (.instruction + "\n")}'

# best NAME COMMAND: best of RUNS wall times in seconds.
best() {
    name=$1 cmd=$2 b=""
    i=0
    while [ $i -lt "$RUNS" ]; do
        s=$(date +%s.%N)
        sh -c "$cmd" >/dev/null || { echo "bench: '$name' failed" >&2; exit 2; }
        e=$(date +%s.%N)
        b=$(awk -v s="$s" -v e="$e" -v b="$b" \
            'BEGIN { t = e - s; print (b == "" || t < b) ? t : b }')
        i=$((i + 1))
    done
    printf '%-44s %8.3f s\n' "$name" "$b"
}

cd "$tmp" || exit 2
printf '%-44s %10s\n' "command (best of $RUNS)" "wall"
best "dolly-fmt dolly.jsonl" "'$TOP/bin/dolly-fmt' dolly.jsonl"
best "dolly-fmt dolly.jsonl.zst (zstd inside)" "'$TOP/bin/dolly-fmt' '$DOLLY'"
best "zstd -dc dolly.jsonl.zst | dolly-fmt" "zstd -dc '$DOLLY' | '$TOP/bin/dolly-fmt'"
command -v python3 >/dev/null &&
    best "python3 json (reference)" "python3 ref.py <dolly.jsonl"
command -v jq >/dev/null &&
    best "jq -c" "jq -c '$JQ' dolly.jsonl"
