#!/bin/sh
# tests/fuzz/seeds.sh: builds the seed corpora of the fuzz harnesses from
# real files, so nothing binary is committed:
#   $SHARED's models, tokenizers and Dolly records; our own fixtures
#   (mkfixture tokenizer/model); and what the tools make of them (token
#   streams, packed files, NF4 checkpoints, adapters, configurations).
# A missing tool or a missing $SHARED leaves that part out, with a message.
#
#   sh tests/fuzz/seeds.sh [DIR]     (default build/fuzz/corpus; run from the
#                                     project root after `make all fuzz`)
# Writes DIR/<harness>/* (one seed a file). Takes a few seconds.
set -u
TOP=$(pwd)
OUT=${1:-build/fuzz/corpus}
case "$OUT" in /*) ;; *) OUT="$TOP/$OUT" ;; esac
SHARED=${SHARED:-$(cd .. && pwd)/shared}
BUILD=${BUILD:-build}
BIN="$TOP/bin"
MKFIX="$TOP/$BUILD/mkfixture"
PATH="$BIN:$PATH"
DOLLY="$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst"
S260="$SHARED/models/stories260K"

note() { echo "seeds: $*" >&2; }
have() { [ -x "$BIN/$1" ]; }

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
ALL="json safetensors sentencepiece sp_encode tokstream packfile config adapter st_index nf4_state"
for h in $ALL; do
    rm -rf "$OUT/$h"
    mkdir -p "$OUT/$h"
done

# --- text: Dolly records (or a few built-in ones) --------------------------
if [ -f "$DOLLY" ]; then
    zstd -dc "$DOLLY" | head -n 60 >"$W/dolly.jsonl"
else
    note "no $DOLLY: built-in records only"
    : >"$W/dolly.jsonl"
fi
cat >>"$W/dolly.jsonl" <<'EOF'
{"instruction": "Say hi.", "context": "", "response": "Hi \u00e9\u4e16\ud83d\ude00 \"quoted\"\ttab", "category": "open_qa"}
{"instruction": "Numbers", "context": "-0.0 1e308 12345678901234567890", "response": "[1, 2.5e-3, -7, true, false, null]", "category": "x"}
EOF
i=0
while IFS= read -r line; do
    i=$((i + 1))
    printf '%s' "$line" >"$OUT/json/dolly-$i"
    # the tokenizer's text input: 2 bytes of boundary, then the text
    resp=$(printf '%s' "$line" | jq -r '.response // empty' 2>/dev/null)
    [ -n "$resp" ] && [ $((i % 3)) -eq 0 ] &&
        { printf '\040\000'; printf '%s' "$resp"; } >"$OUT/sp_encode/dolly-$i"
done <"$W/dolly.jsonl"
printf '\003\000  two  spaces\n\ttab \377\376 bad utf-8 \342\202 cut' >"$OUT/sp_encode/odd"
printf '\000\000\344\275\240\345\245\275\357\274\214\344\270\226\347\225\214' >"$OUT/sp_encode/cjk"
printf '\010\000<s></s><unk> <0x0A>\342\226\201x' >"$OUT/sp_encode/pieces"
for f in "$S260/config.json" "$SHARED/golden/s260-nf4-f32/config.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/json/$(echo "$f" | tr / _)"
done
[ -f "$SHARED/golden/s260-forward.json" ] &&
    head -c 3000 "$SHARED/golden/s260-forward.json" >"$OUT/json/forward-head"

# safetensors headers as JSON seeds, and header-only safetensors seeds
st_header() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n"
}
k=0
for f in "$S260/model.safetensors" "$SHARED/golden/s260-nf4-f32/model.safetensors"; do
    [ -f "$f" ] || continue
    k=$((k + 1))
    st_header "$f" >"$OUT/json/st-header-$k"
    # the header and the first bytes of the data: refused (truncated), but
    # the whole header is parsed first
    n=$(od -An -t u8 -N 8 "$f" | tr -d ' ')
    head -c $((8 + n + 64)) "$f" >"$OUT/safetensors/shared-head-$k"
done

# --- tokenizers -------------------------------------------------------------
[ -f "$S260/tokenizer.model" ] && cp "$S260/tokenizer.model" "$OUT/sentencepiece/stories260K"
if [ -x "$MKFIX" ]; then
    jq -r '.response' "$W/dolly.jsonl" 2>/dev/null | head -n 20 >"$W/text.txt"
    [ -s "$W/text.txt" ] || printf 'the cat sat on the mat\nhello world\n' >"$W/text.txt"
    "$MKFIX" tokenizer -n 350 -o "$W/fx.model" "$W/text.txt" &&
        cp "$W/fx.model" "$OUT/sentencepiece/fixture-350"
    # a tokenizer learned from very little text: few merges
    printf 'aa ab\n' >"$W/tiny.txt"
    "$MKFIX" tokenizer -n 262 -o "$W/tiny.model" "$W/tiny.txt" 2>/dev/null &&
        cp "$W/tiny.model" "$OUT/sentencepiece/fixture-tiny"
    # small models: F32, BF16 tied, and their NF4 forms
    "$MKFIX" model -d 16 -f 32 -l 2 -H 2 -k 1 -c 64 -D BF16 --tied \
        -t "$W/fx.model" -o "$W/m-bf16" &&
        cp "$W/m-bf16/model.safetensors" "$OUT/safetensors/fixture-bf16"
    "$MKFIX" model -d 16 -f 16 -l 1 -H 1 -k 1 -c 32 -D F16 \
        -t "$W/fx.model" -o "$W/m-f16" &&
        cp "$W/m-f16/model.safetensors" "$OUT/safetensors/fixture-f16"
    if have nf4-quant; then
        nf4-quant -q -o "$W/m-nf4" "$W/m-bf16" &&
            cp "$W/m-nf4/model.safetensors" "$OUT/safetensors/fixture-nf4" &&
            cp "$W/m-nf4/config.json" "$OUT/json/fixture-nf4-config"
    else
        note "nf4-quant not built: no NF4 seeds"
    fi
else
    note "$MKFIX not built (make $BUILD/mkfixture): no fixture seeds"
fi

# --- token streams and packed files -----------------------------------------
if have dolly-fmt && have tok && [ -f "$S260/tokenizer.model" ]; then
    head -n 12 "$W/dolly.jsonl" | dolly-fmt -s >"$W/fmt.jsonl"
    head -n 12 "$W/dolly.jsonl" | dolly-fmt -s -p >"$W/prompt.jsonl"
    tok -m "$S260/tokenizer.model" "$W/fmt.jsonl" >"$W/s260.toks"
    tok -m "$S260/tokenizer.model" "$W/prompt.jsonl" >"$OUT/tokstream/prompts"
    tok --no-bos --no-eos -m "$S260/tokenizer.model" "$W/fmt.jsonl" |
        head -c 100000 >"$OUT/tokstream/no-bos-eos"
    tok -m "$S260/tokenizer.model" </dev/null >"$OUT/tokstream/empty"
    printf '{"text": "one"}\n{"prompt": "a", "completion": ""}\n' |
        tok -m "$S260/tokenizer.model" >"$OUT/tokstream/text"
    head -c 60000 "$W/s260.toks" >"$OUT/tokstream/s260-cut"
    head -n 3 "$W/fmt.jsonl" | tok -m "$S260/tokenizer.model" >"$OUT/tokstream/s260-3"
    zstd -q -c "$OUT/tokstream/s260-3" >"$OUT/tokstream/s260-3.zst"
    [ -f "$W/fx.model" ] && head -n 3 "$W/fmt.jsonl" |
        tok -m "$W/fx.model" >"$OUT/tokstream/fixture-3"
    head -n 1 "$OUT/tokstream/s260-3" >"$OUT/json/tokstream-header"
    if have pack; then
        pack -n 64 "$OUT/tokstream/s260-3" >"$OUT/packfile/bfd-64"
        pack -n 32 --overlong split -l all "$OUT/tokstream/s260-3" >"$OUT/packfile/split-32"
        pack -n 48 -m concat --no-shuffle "$OUT/tokstream/s260-3" >"$OUT/packfile/concat-48"
        pack -n 128 --eval-fraction 0.5 --eval-out "$OUT/packfile/eval" \
            "$OUT/tokstream/s260-3" "$OUT/tokstream/text" >"$OUT/packfile/train"
        pack -q -n 16 "$OUT/tokstream/empty" >"$OUT/packfile/empty"
        zstd -q -c "$OUT/packfile/bfd-64" >"$OUT/packfile/bfd-64.zst"
        head -n 1 "$OUT/packfile/bfd-64" >"$OUT/json/packfile-header"
        pack -n 256 "$W/s260.toks" >"$W/train.packed"
    else
        note "pack not built: no packed-file seeds"
    fi
else
    note "dolly-fmt, tok or $S260 missing: no token-stream seeds"
fi

# --- YAML configurations ----------------------------------------------------
[ -f "$TOP/examples/demo/lora.yaml" ] && cp "$TOP/examples/demo/lora.yaml" "$OUT/config/demo"
for f in "$TOP"/examples/*.yaml; do
    [ -f "$f" ] && cp "$f" "$OUT/config/$(basename "$f" .yaml)"
done
cat >"$OUT/config/seed" <<'EOF'
# the seed's settings
r: 64
lora_alpha: 16
lora_dropout: 0.1
target_modules: [q_proj, v_proj]
num_train_epochs: 3
per_device_train_batch_size: 6
gradient_accumulation_steps: 2
learning_rate: 2e-4
lr_scheduler_type: constant
warmup_ratio: 0.03
max_grad_norm: 0.3
optim: paged_adamw_32bit
gradient_checkpointing: yes
seed: 42
EOF
cat >"$OUT/config/styles" <<'EOF'
---
r: !!int "8"
lora_alpha: &a 16.0
learning_rate: *a
target_modules:
  - q_proj
  - "v_proj"
use_rslora: off
output_dir: 'out dir'
model_name_or_path: null
device: ~
lr_scheduler_type: >-
  cosine
optim: |
  adamw_torch
...
EOF
printf 'target_modules: q_proj,k_proj , o_proj\nlearning_rate: .5\nmax_steps: -1\nseed: 0x10\n' \
    >"$OUT/config/scalars"
printf '{r: 4, lora_alpha: 8, target_modules: [all-linear], gradient_checkpointing: true}\n' \
    >"$OUT/config/flow"

# --- adapter directories ----------------------------------------------------
# One file per seed: adapter_config.json, the separator line below, then
# adapter_model.safetensors (fuzz_adapter.c splits them the same way).
SEP='
--- adapter_model.safetensors ---
'
adapter_seed() { # NAME DIR
    { cat "$2/adapter_config.json"; printf '%s' "$SEP"; cat "$2/adapter_model.safetensors"; } \
        >"$OUT/adapter/$1"
}
if have lora-train && [ -f "$S260/config.json" ]; then
    lora-train -q --init-only -m "$S260" -o "$W/ad-qv" -s r=2 </dev/null >/dev/null &&
        adapter_seed qv-r2 "$W/ad-qv"
    lora-train -q --init-only -m "$S260" -o "$W/ad-all" -s r=1 -s use_rslora=true \
        -s target_modules=all-linear </dev/null >/dev/null &&
        adapter_seed all-r1 "$W/ad-all"
    if [ -f "$W/train.packed" ]; then
        # trained, so that lora_B is not all zeros
        lora-train -q -m "$S260" -o "$W/ad-t" -s r=1 -s max_steps=2 \
            -s per_device_train_batch_size=1 -s target_modules=k_proj \
            "$W/train.packed" >/dev/null && adapter_seed k-r1-trained "$W/ad-t"
    fi
else
    note "lora-train or $S260 missing: no adapter seeds"
fi

# --- sharded checkpoints ----------------------------------------------------
# One file per seed: model.safetensors.index.json, then for each shard the
# line "--- shard NAME ---" (after a newline) and its bytes (fuzz_st_index.c
# splits them the same way): what lora-merge --shard-size writes.
sharded_seed() { # NAME DIR
    {
        cat "$2/model.safetensors.index.json"
        for f in "$2"/*.safetensors; do
            printf '\n--- shard %s ---\n' "$(basename "$f")"
            cat "$f"
        done
    } >"$OUT/st_index/$1"
}
if have lora-train && have lora-merge && [ -d "$W/m-bf16" ]; then
    lora-train -q --init-only -m "$W/m-bf16" -o "$W/ad-fx" -s r=2 </dev/null >/dev/null &&
        lora-merge -q -b "$W/m-bf16" -s 4KB -o "$W/mg4" "$W/ad-fx" &&
        sharded_seed merged-4 "$W/mg4"
    lora-merge -q -b "$W/m-bf16" -s 12KB -o "$W/mg2" "$W/ad-fx" && sharded_seed merged-2 "$W/mg2"
    [ -d "$W/m-f16" ] && lora-train -q --init-only -m "$W/m-f16" -o "$W/ad-f16" -s r=1 \
        </dev/null >/dev/null && lora-merge -q -b "$W/m-f16" -s 2KB -o "$W/mgf" "$W/ad-f16" &&
        sharded_seed f16-merged "$W/mgf"
    # stories260K's index alone (its shards are too big a seed): the shards
    # are missing, but the whole index is parsed first
    lora-train -q --init-only -m "$S260" -o "$W/ad-s" -s r=1 </dev/null >/dev/null &&
        lora-merge -q -b "$S260" -s 200KB -o "$W/mgs" "$W/ad-s" &&
        cp "$W/mgs/model.safetensors.index.json" "$OUT/st_index/s260-index-only"
else
    note "lora-train, lora-merge or the fixture model missing: no sharded seeds"
fi

# --- NF4 quantization state -------------------------------------------------
# fuzz_nf4_state.c's input: a weight's quant_state JSON, then optionally
# "--- state ---" (between newlines) and the bytes of its state tensors
# (quant_map, then absmax codes, nested_absmax and nested_quant_map, or the
# fp32 absmax). Taken from real NF4 checkpoints (bitsandbytes' golden one,
# nf4-quant's), as they are (refused: the harness's weight is 4 x 96) and
# with the shape set to the harness's, so that they load.
st_bytes() { # FILE TENSOR [MAX]: the tensor's data
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    set -- "$1" "$2" "${3:-}" "$(tail -c +9 "$1" | head -c "$n" |
        jq -r --arg k "$2" '.[$k].data_offsets | "\(.[0]) \(.[1] - .[0])"')" "$n"
    off=${4% *} len=${4#* }
    [ -n "$3" ] && [ "$len" -gt "$3" ] && len=$3
    tail -c +$((9 + $5 + off)) "$1" | head -c "$len"
}
nf4_seeds() { # NAME CHECKPOINT-DIR WEIGHT NESTED(0/1)
    f=$2/model.safetensors w=$3
    [ -f "$f" ] || return 0
    st_bytes "$f" "$w.quant_state.bitsandbytes__nf4" >"$OUT/nf4_state/$1-orig"
    sed 's/"shape": \[[0-9, ]*\]/"shape": [4, 96]/' "$OUT/nf4_state/$1-orig" >"$OUT/nf4_state/$1"
    {
        cat "$OUT/nf4_state/$1"
        printf '\n--- state ---\n'
        st_bytes "$f" "$w.quant_map"
        if [ "$4" -eq 1 ]; then
            st_bytes "$f" "$w.absmax" 6
            st_bytes "$f" "$w.nested_absmax" 4
            st_bytes "$f" "$w.nested_quant_map"
        else
            st_bytes "$f" "$w.absmax" 24
        fi
    } >"$OUT/nf4_state/$1-state"
}
nf4_seeds bnb-golden "$SHARED/golden/s260-nf4-f32" model.layers.0.self_attn.q_proj.weight 1
if have nf4-quant; then
    nf4-quant -q -o "$W/s-nf4" "$S260" 2>/dev/null &&
        nf4_seeds s260 "$W/s-nf4" model.layers.1.mlp.down_proj.weight 1
    [ -d "$W/m-nf4" ] && nf4_seeds fixture-bf16 "$W/m-nf4" model.layers.0.mlp.up_proj.weight 1
    [ -d "$W/m-bf16" ] && nf4-quant -q --no-double-quant -o "$W/m-nf4p" "$W/m-bf16" &&
        nf4_seeds fixture-plain "$W/m-nf4p" model.layers.1.self_attn.o_proj.weight 0
fi

for h in $ALL; do
    n=$(find "$OUT/$h" -type f | wc -l)
    echo "seeds: $h: $n files"
done
