# nf4-quant: usage errors, the byte-identical F32 golden, options, and bad
# input (exit 2, one line, no output directory left behind). The BF16/F16
# references and the variants are checked in tests/unit/test_nf4.c.
. "$TOP/tests/cli/lib.sh"

S=$SHARED/models/stories260K
G=$SHARED/golden/s260-nf4-f32

# no output left: neither the directory nor its temporary
no_output() { [ ! -e "$1" ] && ! ls -d "$1".tmp-* >/dev/null 2>&1; }

# mkst FILE HEADER NBYTES: a safetensors file with that header text and
# NBYTES zero bytes of data (header shorter than 64 KiB)
mkst() {
    n=${#2}
    printf "$(printf '\\%03o\\%03o' $((n % 256)) $((n / 256)))\\0\\0\\0\\0\\0\\0" >"$1"
    printf '%s' "$2" >>"$1"
    head -c "$3" /dev/zero >>"$1"
}

# jq -e, quietly
jqe() { jq -e "$@" >/dev/null; }

# the JSON header of a safetensors file
header() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n"
}

# usage_error NAME COMMAND...: exit 2, the problem on the first line of
# stderr, then the usage, nothing on stdout
usage_error() {
    n=$1; shift
    "$@" >stdout 2>stderr; rc=$?
    if [ "$rc" -eq 2 ] && [ ! -s stdout ] && head -n 1 stderr | grep -q '^nf4-quant: ' &&
        sed -n 2p stderr | grep -q '^usage: nf4-quant'; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' stderr
    fi
}
usage_error "no operand" nf4-quant -o q
usage_error "two operands" nf4-quant -o q a b
usage_error "bad block size" nf4-quant -b 48 -o q x
usage_error "bad thread count" nf4-quant -j 0 -o q x
usage_error "--dtype without --dequant" nf4-quant --dtype bf16 -o q x
usage_error "--dequant needs -o" nf4-quant --dequant x
usage_error "nothing to do without -o or --stats" nf4-quant x
usage_error "bad compute dtype" nf4-quant --compute-dtype f8 -o q x
expect_exit 2 "missing input directory" nf4-quant -o q /nonexistent/dir
check "no output after a missing input" no_output q

if ! have_shared || [ ! -d "$S" ] || [ ! -d "$G" ]; then
    skip "stories260K: shared directory absent"
    exit 0
fi

expect_exit 0 "quantize stories260K (F32)" nf4-quant -o q "$S"
check "model.safetensors byte-identical to bitsandbytes' (shared golden)" \
    cmp -s q/model.safetensors "$G/model.safetensors"
check "config.json carries the quantization_config" jqe '
    .quantization_config.quant_method == "bitsandbytes" and
    .quantization_config.load_in_4bit == true and
    .quantization_config.bnb_4bit_quant_type == "nf4" and
    .quantization_config.bnb_4bit_use_double_quant == true and
    .quantization_config.bnb_4bit_compute_dtype == "bfloat16" and
    .hidden_size == 64 and .tie_word_embeddings == true' q/config.json
check "quantization_config as transformers writes it" sh -c \
    'jq -S .quantization_config q/config.json >a && jq -S .quantization_config "$0/config.json" >b && cmp -s a b' "$G"
check "tokenizer copied" cmp -s q/tokenizer.model "$S/tokenizer.model"
check "no temporary left" no_output q.none

header q/model.safetensors >hdr
check "35 weights quantized, embeddings and norms kept in F32" jqe '
    ([keys[] | select(endswith(".quant_state.bitsandbytes__nf4"))] | length) == 35 and
    .["model.embed_tokens.weight"].dtype == "F32" and
    .["model.norm.weight"].dtype == "F32" and
    .["model.layers.0.self_attn.q_proj.weight"].dtype == "U8" and
    .["model.layers.0.self_attn.q_proj.weight"].shape == [2048, 1] and
    .["model.layers.0.self_attn.q_proj.weight.absmax"].shape == [64]' hdr

expect_exit 0 "again into an existing directory" nf4-quant -q -o q "$S"
expect_exit 0 "one thread" nf4-quant -j 1 -o out1 "$S"
check "one thread gives the same bytes" cmp -s q/model.safetensors out1/model.safetensors

nf4-quant --stats "$S" >stats 2>err
check "--stats: one JSON line per weight" test "$(wc -l <stats)" -eq 35
check "--stats: fields and plausible errors" jqe -s '
    all(.[]; .rel_err > 0.05 and .rel_err < 0.15 and .absmax_min > 0 and
        .absmax_max >= .absmax_min and .rms > 0 and .blocks > 0 and
        (.shape | length) == 2 and .dtype == "F32")' stats
expect_exit 0 "--stats with -o" nf4-quant --stats -o out2 "$S"
check "--stats with -o writes the same checkpoint" cmp -s q/model.safetensors out2/model.safetensors

expect_exit 0 "--no-double-quant -b 128" nf4-quant --no-double-quant -b 128 -o nodq "$S"
header nodq/model.safetensors >hdr
check "--no-double-quant: fp32 absmax, no nested tensors" jqe '
    .["model.layers.0.mlp.up_proj.weight.absmax"].dtype == "F32" and
    .["model.layers.0.mlp.up_proj.weight.absmax"].shape == [86] and
    ([keys[] | select(contains("nested"))] | length) == 0' hdr
check "--no-double-quant: config says so" jqe \
    '.quantization_config.bnb_4bit_use_double_quant == false' nodq/config.json

expect_exit 0 "--dequant" nf4-quant --dequant -o deq q
header deq/model.safetensors >hdr
check "--dequant: plain F32 weights, no quantization_config" sh -c '
    jq -e "length == 48 and .[\"model.layers.4.mlp.down_proj.weight\"].dtype == \"F32\" and
           .[\"model.layers.4.mlp.down_proj.weight\"].shape == [64, 172]" hdr >/dev/null &&
    jq -e ".quantization_config == null" deq/config.json >/dev/null'
expect_exit 0 "--dequant --dtype bf16" nf4-quant --dequant --dtype bf16 -o deqb q
header deqb/model.safetensors >hdr
check "--dequant --dtype bf16: BF16 weights" jqe \
    '.["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"' hdr
expect_exit 2 "--dequant of a plain checkpoint" nf4-quant --dequant -o x "$S"
check "no output after a refused --dequant" no_output x
expect_exit 2 "quantizing a quantized checkpoint" nf4-quant -o x "$G"
check "no output after refusing a quantized input" no_output x

# bad input: each refused with one line, exit 2, nothing left
bad_dir() { rm -rf "$1"; mkdir "$1"; cp "$S/config.json" "$1/"; }
bad_dir trunc
head -c 500000 "$S/model.safetensors" >trunc/model.safetensors
expect_exit 2 "truncated model.safetensors" nf4-quant -o o1 trunc
check "no output after a truncated input" no_output o1

bad_dir arch
sed 's/"llama"/"gpt2"/' "$S/config.json" >arch/config.json
cp "$S/model.safetensors" arch/
expect_exit 2 "unsupported architecture" nf4-quant -o o2 arch
check "no output after an unsupported architecture" no_output o2

bad_dir overlap
mkst overlap/model.safetensors '{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[4,16],"data_offsets":[0,256]},"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[128,384]}}' 384
expect_exit 2 "overlapping offsets" nf4-quant -o o3 overlap
check "no output after overlapping offsets" no_output o3

bad_dir past
mkst past/model.safetensors '{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[4,16],"data_offsets":[0,256]}}' 200
expect_exit 2 "offsets past the end" nf4-quant -o o4 past
check "no output after offsets past the end" no_output o4

bad_dir dtype
mkst dtype/model.safetensors '{"model.layers.0.mlp.up_proj.weight":{"dtype":"I64","shape":[4,16],"data_offsets":[0,512]}}' 512
expect_exit 2 "unsupported dtype" nf4-quant -o o5 dtype
check "no output after an unsupported dtype" no_output o5

bad_dir shard
mkst shard/model-00001-of-00002.safetensors '{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[4,16],"data_offsets":[0,256]}}' 256
printf '{"metadata":{},"weight_map":{"model.layers.0.mlp.up_proj.weight":"model-00001-of-00002.safetensors","model.norm.weight":"model-00002-of-00002.safetensors"}}\n' \
    >shard/model.safetensors.index.json
expect_exit 2 "a shard missing from the index" nf4-quant -o o6 shard
check "no output after a missing shard" no_output o6
# the same pair, complete, is accepted
mkst shard/model-00002-of-00002.safetensors '{"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}' 256
expect_exit 0 "a complete sharded checkpoint" nf4-quant -o o7 shard
header o7/model.safetensors >hdr
check "sharded input: weight quantized, norm kept" jqe \
    '.["model.layers.0.mlp.up_proj.weight"].dtype == "U8" and .["model.norm.weight"].dtype == "F32"' hdr

# the EXAMPLES of nf4-quant(1), on stories260K
expect_exit 0 "example: quantize" nf4-quant -o llama-nf4 "$S"
nf4-quant --stats "$S" | jq -s 'max_by(.rel_err) | .name' >worst
check "example: worst weight by relative error" grep -q '_proj.weight' worst
expect_exit 0 "example: dequantize" nf4-quant --dequant --dtype bf16 -o llama-bf16 llama-nf4
