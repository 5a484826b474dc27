# e2e.sh: the whole job end to end. First the fixtures that `make demo`
# builds (a SentencePiece tokenizer and a random Llama checkpoint from
# mkfixture): deterministic, loadable by our reader and, where python's
# sentencepiece is installed, tokenizing exactly as SentencePiece does. Then
# a short run of examples/demo.sh: every stage whose tool is built leaves
# its output, the training loss falls, the loss plot is drawn.
. "$TOP/tests/cli/lib.sh"

# jqe FILTER FILE: jq -e without printing the result.
jqe() { jq -e "$@" >/dev/null; }
# usage_error NAME ARGS...: mkfixture exits 2 with a message and the usage.
usage_error() {
    n=$1; shift
    "$MK" "$@" >out 2>err; rc=$?
    if [ $rc -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^mkfixture: ' &&
        sed -n 2p err | grep -q '^usage: mkfixture '; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}

BUILD=${BUILD:-build}
case $BUILD in /*) MK=$BUILD/mkfixture ;; *) MK=$TOP/$BUILD/mkfixture ;; esac
if [ ! -x "$MK" ]; then
    notok "mkfixture: not built ($MK; make $BUILD/mkfixture)"
    exit 1
fi

# --- the tokenizer fixture ---------------------------------------------------

if [ -x "$TOP/bin/dolly-fmt" ]; then
    dolly-fmt "$TOP/examples/demo/train.jsonl" | jq -r '.prompt + .completion' >text.txt
else
    jq -r '.instruction, .context, .response' "$TOP/examples/demo/train.jsonl" >text.txt
fi
"$MK" tokenizer -n 400 -o a.model text.txt 2>err
check "mkfixture tokenizer runs" [ $? -eq 0 -a -s a.model -a ! -s err ]
"$MK" tokenizer -n 400 <text.txt >b.model
check "mkfixture tokenizer: deterministic, stdin as a file" cmp -s a.model b.model
"$MK" tokenizer -n 260 -o small.model text.txt 2>err
check "mkfixture tokenizer: too small a vocabulary is refused" \
    grep -q "^mkfixture: vocabulary size 260 too small" err
usage_error "mkfixture: bad option" tokenizer --no-such-option
usage_error "mkfixture: unknown command" frobnicate

# A few lines exercising what the trainer must get right: a tab (no piece:
# bytes), non-ASCII letters, digits next to letters, repeated spaces.
printf 'caf\303\251 na\303\257ve 1990s  x\tyz\n### Input:\nthe the the\n' >odd.txt
cat text.txt odd.txt >mixed.txt
"$MK" tokenizer -n 420 -o mixed.model mixed.txt
if [ -x "$TOP/bin/tok" ]; then
    jq -cR '{text: .}' mixed.txt >mixed.jsonl
    tok -m a.model mixed.jsonl >mixed.tok 2>err
    check "tok reads the fixture tokenizer" [ $? -eq 0 -a ! -s err ]
    tok -m mixed.model mixed.jsonl | tok -d -m mixed.model | jq -r .text >round.txt
    check "tok: the fixture tokenizer round-trips text" cmp -s round.txt mixed.txt
    if python3 -c 'import sentencepiece' 2>/dev/null; then
        tok -m mixed.model --no-eos mixed.jsonl | tok --dump | jq -c .ids >ours.txt
        python3 - mixed.model mixed.txt >ref.txt <<'EOF'
import json, sys
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
assert sp.vocab_size() > 300 and sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
for line in open(sys.argv[2], encoding="utf-8").read().split("\n")[:-1]:
    print(json.dumps([sp.bos_id()] + sp.encode(line), separators=(",", ":")))
EOF
        check "python sentencepiece loads the fixture and tokenizes as tok does" \
            cmp -s ours.txt ref.txt
    else
        skip "fixture tokenizer vs python sentencepiece: no python3 sentencepiece"
    fi
else
    skip "fixture tokenizer with tok: tok not built yet"
fi

# --- the model fixture -------------------------------------------------------

"$MK" model -s 7 -d 32 -l 1 -H 2 -t a.model -o m1 2>err
check "mkfixture model runs" [ $? -eq 0 -a ! -s err ]
check "mkfixture model: HF layout" [ -f m1/config.json -a -f m1/model.safetensors -a -f m1/tokenizer.model ]
check "mkfixture model: config" jqe '.model_type == "llama" and .hidden_size == 32 and
    .num_hidden_layers == 1 and .intermediate_size == 88 and .vocab_size > 300 and
    .bos_token_id == 1 and .eos_token_id == 2' m1/config.json
"$MK" model -s 7 -d 32 -l 1 -H 2 -t a.model -o m2
"$MK" model -s 8 -d 32 -l 1 -H 2 -t a.model -o m3
check "mkfixture model: the seed decides the weights" \
    sh -c 'cmp -s m1/model.safetensors m2/model.safetensors && ! cmp -s m1/model.safetensors m3/model.safetensors'
# safetensors header: u64 length, then JSON; 9 tensors a layer + 3
n=$(od -An -tu8 -N8 m1/model.safetensors | tr -d ' ')
dd if=m1/model.safetensors bs=1 skip=8 count="$n" 2>/dev/null >hdr.json
check "mkfixture model: 12 tensors, the seed in the metadata" jqe \
    '(keys | length) == 13 and .__metadata__.mkfixture_seed == "7" and
     .["model.layers.0.mlp.down_proj.weight"].shape == [32, 88]' hdr.json
usage_error "mkfixture model: missing -t" model -o m4
usage_error "mkfixture model: dim not a multiple of heads" model -d 30 -H 4 -t a.model -o m4
check "mkfixture model: no output after an error" [ ! -e m4 ]

# --- the demo, short --------------------------------------------------------

DEMO_DIR=$SCRATCH/demo DEMO_EPOCHS=2 DEMO_SHOW=2 DEVICE=cpu BUILD=$BUILD \
    sh "$TOP/examples/demo.sh" >demo.out 2>demo.err
rc=$?
if [ $rc -eq 0 ]; then
    ok "demo runs"
else
    notok "demo runs (exit $rc)"
    tail -n 20 demo.out demo.err | sed 's/^/    /'
fi
d=$SCRATCH/demo
# stage TOOL NAME FILE...: the stage ran and left its files, or its tool is
# not built and the demo said so.
stage() {
    tool=$1 name=$2
    shift 2
    if [ -x "$TOP/bin/$tool" ]; then
        missing=""
        for f in "$@"; do [ -s "$d/$f" ] || missing="$missing $f"; done
        check "demo $name: output${missing:+ (missing:$missing)}" [ -z "$missing" ]
    else
        check "demo $name: skipped with a message" grep -q "^skipping $name: $tool not built yet" demo.out
        skip "demo $name: $tool not built yet"
    fi
}
stage dolly-fmt format train.jsonl inputs.jsonl
check "demo tokenizer and base model" [ -s "$d/tokenizer.model" -a -s "$d/base/model.safetensors" ]
stage tok tokenize train.tok inputs.tok
stage pack pack train.pack
stage nf4-quant quantize base-nf4/model.safetensors base-nf4/config.json
stage lora-train train adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl
stage lora-gen generate gen-base.jsonl gen-adapter.jsonl
stage lora-merge merge merged/config.json
if [ -s "$d/metrics.jsonl" ]; then
    check "demo: the loss falls" jqe -s '[.[] | select(.loss != null) | .loss] |
        length >= 2 and last < first - 0.5' "$d/metrics.jsonl"
    check "demo: says the first and last loss" grep -q '^  loss: [0-9.]* at step 1 -> ' demo.out
    if command -v gnuplot >/dev/null 2>&1; then
        sh "$TOP/examples/plot-loss.sh" "$d/metrics.jsonl" loss.svg 2>err
        check "plot-loss.sh draws an SVG" grep -q '<svg' loss.svg
        check "demo draws the loss curve" grep -q '<svg' "$d/loss.svg"
    else
        skip "plot-loss.sh: no gnuplot"
    fi
fi
if [ -x "$TOP/bin/lora-gen" ]; then
    check "demo: generation side by side" grep -q '^  with adapter:  ' demo.out
    check "demo: counts the instructions written exactly" \
        grep -q '^  instructions written exactly: base model [0-9]* of 32, with the adapter [0-9]* of 32$' demo.out
fi
check "demo: prints how to inspect the files" grep -q "jq . $d/adapter/adapter_config.json" demo.out
check "demo: lists the stages run" grep -q '^== done in [0-9]* s; stages run: format tokenizer' demo.out

# --- examples/Makefile and pipeline.sh on the demo's material ------------------

all_built() { for t in "$@"; do [ -x "$TOP/bin/$t" ] || return 1; done; }
if all_built dolly-fmt tok pack nf4-quant lora-train lora-merge && [ -d "$d/base" ]; then
    # exm ARGS...: examples/Makefile on the demo's records and random base
    exm() {
        make -s -C "$TOP/examples" OUT="$SCRATCH/job" DOLLY="$TOP/examples/demo/train.jsonl" \
            MODEL="$d/base" CONFIG="$TOP/examples/demo/lora.yaml" "$@"
    }
    targets="format tokenize pack quantize train merge"
    all_built lora-gen && targets="$targets generate"
    exm TRAIN_FLAGS="-s max_steps=4 -s save_steps=2" $targets >make.out 2>&1
    rc=$?; [ $rc -eq 0 ] || sed "s/^/    /" make.out
    check "examples/Makefile: the stages run" [ $rc -eq 0 -a -s job/merged/config.json \
        -a -s job/adapter/adapter_config.json -a -s job/eval.pack ]
    exm -q $targets
    check "examples/Makefile: then everything is up to date" [ $? -eq 0 ]
    touch job/train.tok
    exm -q quantize
    check "examples/Makefile: a stage depends only on its inputs" [ $? -eq 0 ]
    exm -q pack
    check "examples/Makefile: a changed input remakes what follows" [ $? -eq 1 ]
    # an interrupted run: the adapter is missing, checkpoint-2 is there
    rm job/adapter/adapter_config.json
    exm TRAIN_FLAGS="-s max_steps=4 -s save_steps=2" train >make.out 2>&1
    check "examples/Makefile: training resumes from its checkpoint" \
        [ $? -eq 0 -a -s job/adapter/adapter_config.json ]
    check "examples/Makefile: resumed metrics without repeats" \
        jqe -s '[.[] | select(.loss != null) | .step] == [1, 2, 3, 4]' job/metrics.jsonl
    if all_built lora-gen; then
        check "examples/Makefile: generated instructions" [ -s job/generated.jsonl ]
        OUT=pipe DOLLY="$TOP/examples/demo/train.jsonl" MODEL="$d/base" \
            CONFIG="$TOP/examples/demo/lora.yaml" TRAIN_FLAGS="-s max_steps=2" \
            N_INPUTS=3 GEN_FLAGS="-n 8" sh "$TOP/examples/pipeline.sh" >pipe.out 2>&1
        check "pipeline.sh runs" [ $? -eq 0 -a -s pipe/merged/config.json ]
        check "pipeline.sh: an instruction for each input" \
            [ "$(wc -l <pipe/generated.jsonl)" -eq 3 ]
    else
        skip "pipeline.sh: lora-gen not built yet"
    fi
else
    skip "examples/Makefile and pipeline.sh: a tool is not built yet"
fi

# --- own-texts.sh ---------------------------------------------------------------

if all_built dolly-fmt tok lora-gen && [ -d "$d/adapter" ]; then
    mkdir texts
    printf 'The capital of France is Paris.\n' >texts/a.txt
    printf 'A spider has eight legs.\n' >texts/b.txt
    printf 'Dear neighbour,\nthank you for the flowers!\n' >texts/c.txt
    GEN_FLAGS="-n 24" sh "$TOP/examples/own-texts.sh" -m "$d/base-nf4" texts "$d/adapter" \
        >own.jsonl 2>err
    check "own-texts.sh runs" [ $? -eq 0 ]
    check "own-texts.sh: a Dolly record a text, in order" jqe -s 'length == 3 and
        (map(.response) == ["The capital of France is Paris.\n", "A spider has eight legs.\n",
                            "Dear neighbour,\nthank you for the flowers!\n"]) and
        all(.[]; (.instruction | type) == "string" and .context == "" and .category == "own")' own.jsonl
    check "own-texts.sh: its output is dolly-fmt input" sh -c 'dolly-fmt own.jsonl >/dev/null'
else
    skip "own-texts.sh: lora-gen not built yet"
fi
