#!/bin/sh
# make-inputs.sh: prepares the inputs of the torch + peft reference run
# (train_ref.py) in DIR (default .carry/torchref, ignored by git, carried to
# the GPU machine by the `run` tool).
#
#   sh tests/torch/make-inputs.sh [DIR]      here, after `make`
#   python3 tests/torch/train_ref.py DIR OUT.json RANDOM.json   where torch is
#   cp OUT.json tests/golden/torch-train-s260.json
#   cp RANDOM.json tests/golden/llama-random-hf.json
#
# What it does: packs the first 40 Dolly records (seed template, the
# stories260K tokenizer) into rows of 64 tokens, several documents a row
# where pieces are short; writes our initial adapter (--init-only); trains
# with --dump-batches so that the reference sees the very rows of every
# micro-batch; keeps our final adapter, whose logits peft then computes.
# The model files are copied next to them because only the checkout
# travels. The GPU run used for the committed fixtures:
#   cd .carry/torchref && python3 ../../tests/torch/train_ref.py . \
#       $OUT/torch-train-s260.json $OUT/llama-random-hf.json
set -eu
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${SHARED:-$TOP/../shared}
DIR=${1:-$TOP/.carry/torchref}
B=$TOP/bin
M=$SHARED/models/stories260K
rm -rf "$DIR"
mkdir -p "$DIR/model"
cp "$M/config.json" "$M/model.safetensors" "$DIR/model/"
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -40 |
    "$B/dolly-fmt" | "$B/tok" -m "$M/tokenizer.model" |
    "$B/pack" -n 64 --loss all --overlong split -s 3 -o "$DIR/train.pack"
"$B/pack" --dump "$DIR/train.pack" >"$DIR/rows.jsonl"
cp "$TOP/tests/torch/ref-config.yaml" "$DIR/config.yaml"
"$B/lora-train" -c "$DIR/config.yaml" -m "$M" --print-config >"$DIR/config.json"
"$B/lora-train" -c "$DIR/config.yaml" -m "$M" -o "$DIR/init" --init-only
"$B/lora-train" -c "$DIR/config.yaml" -m "$M" -o "$DIR/ours" \
    --dump-batches "$DIR/batches.jsonl" "$DIR/train.pack" >"$DIR/metrics.jsonl"
jq -c '.input_ids' "$SHARED/golden/s260-forward.json" >"$DIR/input_ids.json"
"$TOP/build/tests/test_llama_hf" --write "$DIR/random"
# where peft may be missing: WHEELS=dir-of-peft-wheel sh make-inputs.sh
if [ -n "${WHEELS:-}" ]; then mkdir -p "$DIR/whl" && cp "$WHEELS"/*.whl "$DIR/whl/"; fi
echo "inputs in $DIR"
