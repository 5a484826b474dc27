# tests/cli/lora-merge.sh: lora-merge's command line: usage errors, then
# merges of seeded adapters into stories260K (the adapters come from
# `test_merge --make-fixtures`), then bad adapters and bases, then the
# EXAMPLES of lora-merge(1) on the small model.
. "$TOP/tests/cli/lib.sh"

if [ ! -x "$TOP/bin/lora-merge" ]; then
    skip "lora-merge: not built"
    exit 0
fi

# usage errors first: they need no data. A usage error is a message and
# the usage on stderr, exit 2.
usage_error() {
    n=$1; shift
    "$@" >out 2>err; rc=$?
    if [ "$rc" -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^lora-merge: ' &&
        sed -n 2p err | grep -q '^usage: lora-merge'; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}
jqe() { jq -e "$@" >/dev/null; }
usage_error "no operand" lora-merge -o res
usage_error "no -o" lora-merge adapter
usage_error "two operands" lora-merge -o res a b
usage_error "bad dtype" lora-merge -t int8 -o res adapter
usage_error "bad shard size" lora-merge -s 5XB -o res adapter
usage_error "missing option argument" lora-merge -o
expect_exit 2 "adapter directory missing" lora-merge -o res no-such-dir
check "no output after usage errors" test ! -e res

case "${BUILD:-build}" in /*) B=${BUILD} ;; *) B="$TOP/${BUILD:-build}" ;; esac
if ! have_shared; then
    skip "lora-merge: no shared data (SHARED=$SHARED)"
    exit 0
fi
if [ ! -x "$B/tests/test_merge" ]; then
    skip "lora-merge: $B/tests/test_merge not built (it makes the fixtures)"
    exit 0
fi
BASE="$SHARED/models/stories260K"
NF4="$SHARED/golden/s260-nf4-f32"
"$B/tests/test_merge" --make-fixtures fx >fx.log 2>&1 ||
    { notok "fixtures: $(tail -n 1 fx.log)"; exit 0; }

# the safetensors header of a file as JSON
header() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n"
}

# behaviour
expect_exit 0 "merge, base from the adapter config" lora-merge -o m fx/adapter-qv
check "quiet on success" test ! -s out -a ! -s err
check "config: torch_dtype bfloat16, no quantization_config" \
    jqe '.torch_dtype == "bfloat16" and (has("quantization_config") | not)
        and .hidden_size == 64' m/config.json
check "tokenizer.model copied" cmp -s m/tokenizer.model "$BASE/tokenizer.model"
check "one file when it fits" test -f m/model.safetensors -a \
    ! -e m/model.safetensors.index.json
if header m/model.safetensors | jq -e '(.__metadata__.format == "pt") and
    ([to_entries[] | select(.key != "__metadata__") | .value.dtype] |
     unique == ["BF16"])' >/dev/null; then
    ok "every tensor BF16, metadata format pt"
else
    notok "every tensor BF16, metadata format pt"
fi
check "same bytes as the library's merge (sharded fixture)" sh -c '
    lora-merge -s 300000 -o m2 fx/adapter-qv &&
    for f in fx/merged-qv-bf16/*; do cmp -s "$f" "m2/${f##*/}" || exit 1; done'

expect_exit 0 "-t f32 -b base" lora-merge -t f32 -b "$BASE" -o m32 fx/adapter-qv
check "F32 merge equals the fixture" cmp -s m32/model.safetensors \
    fx/merged-qv-f32/model.safetensors
check "F32 config" jqe '.torch_dtype == "float32"' m32/config.json

expect_exit 0 "sharded at 200kB" lora-merge -s 200kB -o msh fx/adapter-all-rslora
check "shards and index" sh -c '
    n=$(ls msh | grep -c "^model-0000[0-9]-of-0000[0-9].safetensors$") &&
    [ "$n" -ge 3 ] &&
    jq -e "(.weight_map | length) > 40 and .metadata.total_size > 0" \
        msh/model.safetensors.index.json >/dev/null'
check "no shard over 200kB (each tensor is smaller)" sh -c '
    for f in msh/model-*.safetensors; do
        [ $(wc -c <"$f") -le 201000 ] || exit 1; done'

expect_exit 0 "-v says what was written" lora-merge -v -o mv fx/adapter-qv
check "-v summary on stderr" grep -q "lora-merge: wrote 'mv': .* tensors, 10 merged" err

expect_exit 0 "an existing output is replaced" lora-merge -t f32 -o m fx/adapter-qv
check "replaced" jqe '.torch_dtype == "float32"' m/config.json
mkdir notckpt && echo precious >notckpt/file
expect_exit 2 "a directory that is not a checkpoint is not replaced" \
    lora-merge -o notckpt fx/adapter-qv
check "its files are still there" grep -q precious notckpt/file
echo precious >afile
expect_exit 2 "a file is not replaced" lora-merge -o afile fx/adapter-qv
mkdir empty
expect_exit 0 "an empty directory is replaced" lora-merge -o empty fx/adapter-qv

# NF4 bases
expect_exit 2 "an NF4 base needs --from-nf4" lora-merge -b "$NF4" -o mn fx/adapter-qv
check "its message names the choice" grep -q "from-nf4" err
check "no output" test ! -e mn
expect_exit 0 "--from-nf4 on the NF4 base" lora-merge --from-nf4 -b "$NF4" -t f32 \
    -o mn fx/adapter-qv
expect_exit 0 "--from-nf4 on the float base" lora-merge --from-nf4 -t f32 \
    -o mn2 fx/adapter-qv
check "both --from-nf4 merges give the same bytes" \
    cmp -s mn/model.safetensors mn2/model.safetensors
check "config without quantization_config" \
    jqe 'has("quantization_config") | not' mn/config.json

if [ -x "$TOP/bin/nf4-quant" ]; then
    expect_exit 0 "--requantize" lora-merge --requantize -o mq fx/adapter-qv
    check "requantized config" jqe '.quantization_config.quant_method ==
        "bitsandbytes"' mq/config.json
    check "--requantize = lora-merge | nf4-quant" sh -c '
        lora-merge -o mb fx/adapter-qv && nf4-quant -o mbq mb >/dev/null 2>&1 &&
        cmp -s mq/model.safetensors mbq/model.safetensors'
    check "no scratch directory left" sh -c '! ls -d mq.* >/dev/null 2>&1'
else
    skip "--requantize against nf4-quant: nf4-quant not built"
fi

# bad input: one line, exit 2, no output
for bad in bad-shape bad-layers bad-target bad-noconfig bad-dora bad-loha \
    bad-nobase bad-truncated; do
    expect_exit 2 "$bad refused" lora-merge -o res "fx/$bad"
done
expect_exit 2 "a base missing a targeted weight" lora-merge -b fx/base-missing \
    -o res fx/adapter-qv
expect_exit 2 "the output may not be the adapter" lora-merge -o fx/adapter-qv \
    fx/adapter-qv
check "no output, no temporary directory" sh -c '! ls -d res res.* >/dev/null 2>&1'

# the EXAMPLES of lora-merge(1), on the small model
mkdir ex && cp -r fx/adapter-qv ex/adapter && ln -s "$BASE" ex/Llama-2-7b-hf &&
    ln -s "$NF4" ex/llama-nf4
(
    cd ex || exit 2
    jq --arg b "$BASE" '.base_model_name_or_path = $b' adapter/adapter_config.json \
        >c && mv c adapter/adapter_config.json
    lora-merge -o merged adapter &&
        lora-merge -b Llama-2-7b-hf -t f16 -s 2GB -o merged adapter &&
        jq '.weight_map | length' merged/model.safetensors.index.json 2>/dev/null
    [ -f merged/model.safetensors ] || exit 1
    if [ -x "$TOP/bin/nf4-quant" ]; then
        lora-merge --from-nf4 --requantize -b llama-nf4 -o merged-nf4 adapter ||
            exit 1
    fi
) >ex.out 2>ex.err
check "the man page's examples run" test $? -eq 0
