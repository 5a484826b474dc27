#!/bin/sh
# pipeline.sh: the reference job as shell pipelines, with no intermediate
# file that a pipe can carry: the same stages as examples/Makefile, for
# reading top to bottom (the Makefile is the one to use for long runs: it
# resumes).
#
#   sh examples/pipeline.sh
#   MODEL=/models/Llama-2-7b-hf DEVICE=cuda OUT=run1 sh examples/pipeline.sh
#
# Environment (defaults in brackets): SHARED [../shared], DOLLY [Dolly in
# SHARED], MODEL [SHARED's stories260K], TOKENIZER [MODEL's tokenizer.model],
# CONFIG [examples/seed.yaml], OUT [job], DEVICE [cpu], SEQ_LEN [2048, or
# the model's context when shorter], N_INPUTS [100: the Dolly responses to
# write instructions for], TRAIN_FLAGS and GEN_FLAGS (extra options).
set -eu
TOP=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$(cd "$TOP/.." && pwd)/shared}
DOLLY=${DOLLY:-$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst}
MODEL=${MODEL:-$SHARED/models/stories260K}
TOKENIZER=${TOKENIZER:-$MODEL/tokenizer.model}
[ -f "$TOKENIZER" ] || TOKENIZER=$SHARED/models/llama2-tokenizer/tokenizer.model
CONFIG=${CONFIG:-$TOP/examples/seed.yaml}
OUT=${OUT:-job}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) # adapters record the path
DEVICE=${DEVICE:-cpu}
SEQ_LEN=${SEQ_LEN:-$(jq '[.max_position_embeddings // 2048, 2048] | min' "$MODEL/config.json")}
N_INPUTS=${N_INPUTS:-100}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
GEN_FLAGS=${GEN_FLAGS:--n 100 --top-p 0.9 --temperature 0.9 --seed 0}
PATH=$TOP/bin:$PATH
set -x

# training data: format, tokenize, pack
dolly-fmt "$DOLLY" | tok -m "$TOKENIZER" | pack -n "$SEQ_LEN" -o "$OUT/train.pack"

# the frozen base in 4 bits, then the adapter (metrics: JSON Lines)
nf4-quant -o "$OUT/base-nf4" "$MODEL"
lora-train -c "$CONFIG" --device "$DEVICE" $TRAIN_FLAGS -m "$OUT/base-nf4" \
    -o "$OUT/adapter" "$OUT/train.pack" >"$OUT/metrics.jsonl"

# instructions for responses the model has not seen
zstd -dcf "$DOLLY" | tail -n "$N_INPUTS" | jq -c '{response}' |
    dolly-fmt --prompt-only | tok -m "$TOKENIZER" |
    lora-gen --device "$DEVICE" -m "$OUT/base-nf4" -a "$OUT/adapter" $GEN_FLAGS |
    tok -d -m "$TOKENIZER" >"$OUT/generated.jsonl"

# one plain checkpoint: the adapter merged into the high-precision base
lora-merge -b "$MODEL" -o "$OUT/merged" "$OUT/adapter"
