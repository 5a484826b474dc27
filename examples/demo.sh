#!/bin/sh
# demo.sh: the whole job end to end on material the project builds itself,
# with no download and without ../shared; what `make demo` runs.
#
#   format -> tokenize -> pack -> quantize -> train -> generate -> merge
#
# The inputs are examples/demo/train.jsonl (32 Dolly-format records written
# for the project), a SentencePiece tokenizer learned from them and a small
# Llama checkpoint with random weights, both made by build/mkfixture from a
# seed. Every file lands in demo/ (DEMO_DIR) for inspection; the script
# prints each command it runs, then the commands to look at the results.
#
# Learning is shown twice: the training loss falls, and for training inputs
# the adapter writes the instruction that the random base model cannot.
#
# Environment:
#   DEMO_DIR     output directory (default: demo/ in the project root)
#   DEMO_EPOCHS  passes over the data (default: examples/demo/lora.yaml's)
#   DEMO_SHOW    how many results to show side by side (default 4)
#   DEVICE       cpu or cuda (default: cuda when lora-train can use a GPU)
#   BUILD        build directory holding mkfixture (default: build)
set -u
TOP=$(cd "$(dirname "$0")/.." && pwd)
cd "$TOP" || exit 2
BUILD=${BUILD:-build}
D=${DEMO_DIR:-demo}
SHOW=${DEMO_SHOW:-4}
PATH=$TOP/bin:$PATH
export PATH
t0=$(date +%s)
ran="" skipped=""

say() { printf '\n== %s\n' "$*"; }
die() { echo "demo: $*" >&2; exit 2; }
# sh_run COMMAND: print the command line, then run it; stop on failure.
sh_run() {
    printf '  $ %s\n' "$1"
    sh -c "$1" || die "failed: $1"
}
# need STAGE TOOL [FILE...]: whether the stage can run; says why not.
need() {
    stage=$1 tool=$2
    shift 2
    if [ ! -x "bin/$tool" ] && [ ! -x "$BUILD/$tool" ]; then
        echo "skipping $stage: $tool not built yet"
        skipped="$skipped $stage"
        return 1
    fi
    for f in "$@"; do
        if [ ! -e "$f" ]; then
            echo "skipping $stage: no $f (an earlier stage was skipped)"
            skipped="$skipped $stage"
            return 1
        fi
    done
    ran="$ran $stage"
}

[ -x "$BUILD/mkfixture" ] || die "$BUILD/mkfixture is missing (run make demo, or make $BUILD/mkfixture)"
command -v jq >/dev/null 2>&1 || die "jq is needed (sh .ci/deps installs it)"
mkdir -p "$D" || exit 2
# a fresh run every time: nothing stale to confuse
(cd "$D" && rm -rf train.* inputs.* tokenizer.model base base-nf4 metrics.jsonl \
    loss.svg adapter gen-* truth.jsonl merged)

say "the job, on built-in material; every file goes to $D/"

if need format dolly-fmt; then
    say "format: Dolly records -> {prompt, completion} with the seed template"
    sh_run "dolly-fmt -o $D/train.jsonl examples/demo/train.jsonl"
    # Generation inputs: the training responses, as prompts only.
    sh_run "dolly-fmt --prompt-only -o $D/inputs.jsonl examples/demo/train.jsonl"
fi

if need tokenizer mkfixture "$D/train.jsonl"; then
    say "tokenizer and base model: a BPE tokenizer learned from the formatted text, a random Llama"
    sh_run "jq -r '.prompt + .completion' $D/train.jsonl | $BUILD/mkfixture tokenizer -n 512 -o $D/tokenizer.model"
    sh_run "$BUILD/mkfixture model -s 1 -d 128 -l 2 -H 4 -i 0.09 -t $D/tokenizer.model -o $D/base"
fi

if need tokenize tok "$D/train.jsonl" "$D/tokenizer.model"; then
    say "tokenize: text -> token stream (BOS, EOS; the completion start recorded)"
    sh_run "tok -m $D/tokenizer.model -o $D/train.tok $D/train.jsonl"
    [ -f "$D/inputs.jsonl" ] && sh_run "tok -m $D/tokenizer.model -o $D/inputs.tok $D/inputs.jsonl"
fi

if need pack pack "$D/train.tok"; then
    say "pack: token stream -> rows of 256 tokens, loss on the completions"
    sh_run "pack -n 256 -o $D/train.pack $D/train.tok"
    sh_run "pack --stats $D/train.pack | jq -c '{rows, documents, tokens, loss_tokens, efficiency}'"
fi

if need quantize nf4-quant "$D/base"; then
    say "quantize: the frozen base model -> NF4 with double quantization (bitsandbytes layout)"
    sh_run "nf4-quant -o $D/base-nf4 $D/base"
fi

DEVICE=${DEVICE:-}
if [ -z "$DEVICE" ]; then
    DEVICE=cpu
    # A GPU is used when there is one and lora-train was built with CUDA.
    if [ -x bin/lora-train ] && [ -d "$D/base" ] &&
        command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
        lora-train -q --device cuda --init-only -m "$D/base" -o "$D/probe" >/dev/null 2>&1; then
        DEVICE=cuda
    fi
    rm -rf "$D/probe"
fi

epochs=${DEMO_EPOCHS:+ -s num_train_epochs=$DEMO_EPOCHS}
if need train lora-train "$D/train.pack" "$D/base-nf4"; then
    say "train: a LoRA adapter on the NF4 base ($DEVICE); metrics as JSON Lines"
    sh_run "lora-train -c examples/demo/lora.yaml$epochs --device $DEVICE -m $D/base-nf4 -o $D/adapter $D/train.pack > $D/metrics.jsonl"
    first=$(jq -s '[.[] | select(.loss != null)] | first | "\(.loss * 1000 | round / 1000) at step \(.step)"' -r "$D/metrics.jsonl")
    last=$(jq -s '[.[] | select(.loss != null)] | last | "\(.loss * 1000 | round / 1000) at step \(.step)"' -r "$D/metrics.jsonl")
    echo "  loss: $first -> $last"
    if command -v gnuplot >/dev/null 2>&1; then
        sh_run "sh examples/plot-loss.sh $D/metrics.jsonl $D/loss.svg"
    else
        echo "  (no gnuplot: examples/plot-loss.sh would draw $D/loss.svg)"
    fi
fi

if need generate lora-gen "$D/inputs.tok" "$D/base-nf4" "$D/adapter"; then
    say "generate: instructions for training responses, greedy, without and with the adapter"
    sh_run "lora-gen --device $DEVICE -m $D/base-nf4 -n 40 -o $D/gen-base.tok $D/inputs.tok"
    sh_run "lora-gen --device $DEVICE -m $D/base-nf4 -a $D/adapter -n 40 -o $D/gen-adapter.tok $D/inputs.tok"
    sh_run "tok -d -m $D/tokenizer.model -o $D/gen-base.jsonl $D/gen-base.tok"
    sh_run "tok -d -m $D/tokenizer.model -o $D/gen-adapter.jsonl $D/gen-adapter.tok"
    # side by side: the response given, the true instruction, both outputs
    jq -c '{response, instruction}' examples/demo/train.jsonl >"$D/truth.jsonl"
    paste -d '\n' "$D/truth.jsonl" "$D/gen-base.jsonl" "$D/gen-adapter.jsonl" |
        jq -r -n --argjson show "$SHOW" '
            def clean: sub("\\s+$"; "") | gsub("\n"; " / ") | gsub("[\\p{Cc}\\x{FFFD}]"; "?") | .[:90];
            [inputs] | [range(0; length; 3) as $i | .[$i:$i+3]] |
            (.[:$show][] | "",
                "  response:      \(.[0].response | clean)",
                "  true:          \(.[0].instruction | clean)",
                "  base model:    \(.[1].completion | clean)",
                "  with adapter:  \(.[2].completion | clean)"),
            "",
            "  instructions written exactly: base model \(map(select((.[1].completion | clean) == (.[0].instruction | clean))) | length) of \(length), with the adapter \(map(select((.[2].completion | clean) == (.[0].instruction | clean))) | length) of \(length)"'
fi

if need merge lora-merge "$D/base-nf4" "$D/adapter"; then
    # --from-nf4: into the weights the adapter was trained against, so the
    # merged model behaves as base + adapter did (see lora-merge(1)).
    say "merge: the adapter folded into the dequantized base -> a plain f32 checkpoint"
    sh_run "lora-merge --from-nf4 -t f32 -b $D/base-nf4 -o $D/merged $D/adapter"
    if [ -x bin/lora-gen ] && [ -f "$D/gen-adapter.tok" ]; then
        sh_run "lora-gen --device $DEVICE -m $D/merged -n 40 -o $D/gen-merged.tok $D/inputs.tok"
        if cmp -s "$D/gen-adapter.tok" "$D/gen-merged.tok"; then
            echo "  the merged model writes what base + adapter wrote"
        else
            echo "  the merged model's output differs from base + adapter's (rounding)"
        fi
    fi
fi

say "look at the intermediate files"
cat <<EOF
  jq -c . $D/train.jsonl | head -n 1              # formatted text
  head -n 1 $D/train.tok                          # token stream header (JSON)
  tok --dump $D/train.tok | head -n 1 | jq -c .   # ids and completion start
  tok -d -m $D/tokenizer.model $D/train.tok | head -n 1 | jq .
  head -n 1 $D/train.pack                         # packed file header
  pack --dump $D/train.pack | head -n 1 | jq -c '{row, spans}'
  jq . $D/base/config.json; jq -r '.quantization_config' $D/base-nf4/config.json
  jq . $D/adapter/adapter_config.json
  jq -c . $D/metrics.jsonl | tail -n 3            # training metrics
  jq -c . $D/gen-adapter.jsonl                    # generated instructions
  jq . $D/merged/config.json
EOF
[ -f "$D/loss.svg" ] && echo "  $D/loss.svg                                   # the loss curve"

t1=$(date +%s)
say "done in $((t1 - t0)) s; stages run:${ran:- none}${skipped:+; skipped:$skipped}"
