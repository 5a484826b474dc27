# tests/cli/bad-input.sh: the bad-input catalogue, for every tool that is
# built. Each bad input must give exit status 2, one line on stderr (plus
# "hint:" lines) and no partial output: nothing on stdout, and no output
# file, directory or temporary file left behind.
#
#   case                     applies to
#   truncated file           tok (model, -d stream), pack (stream, --dump),
#                            nf4-quant, lora-train (packed file), lora-merge
#   wrong magic              the same inputs, given a file of another kind
#   future format version    token streams, packed files, trainer state
#   another vocabulary       tok -d, pack (two streams), lora-train
#   empty input              every tool (dolly-fmt and tok: an empty data set
#                            is valid, exit 0; the rest refuse)
#   non-UTF-8 text           dolly-fmt, tok, lora-train's YAML
#   NaN in weights           nf4-quant, lora-train (base model), lora-merge
#                            (adapter), lora-gen: refused, naming the tensor
#   NaN/Inf in NF4 state     lora-train, lora-gen, lora-merge on an NF4
#                            checkpoint whose absmax, nested absmax,
#                            quant_map, nested quant_map or nested_offset
#                            is not finite (or multiplies out to infinity):
#                            refused, naming the file and the tensor
#   out-of-range token ids   tok -d, pack, lora-train
#   read-only output dir     every tool that writes files
#   full output dir          the same, on a 64 KiB tmpfs (root only) that a
#                            filler file leaves 4 KiB of
#   stdout on /dev/full      every tool that writes stdout
# Formats without a version or magic (JSON Lines text) have no such case.
. "$TOP/tests/cli/lib.sh"

if ! have_shared; then
    skip "bad-input: no shared data in '$SHARED'"
    exit 0
fi
S260=$SHARED/models/stories260K
LLAMA_TOK=$SHARED/models/llama2-tokenizer/tokenizer.model
have_tool() { [ -x "$TOP/bin/$1" ]; }

# refuse NAME LEFTOVER COMMAND...: exit 2, one line on stderr (besides
# hints), nothing on stdout, and LEFTOVER (a path; "-" for none) absent,
# with no temporary file next to it.
refuse() {
    n=$1 left=$2; shift 2
    [ "$left" != - ] && rm -rf "$left"
    "$@" >out 2>err </dev/null
    rc=$?
    why=
    [ "$rc" -eq 2 ] || why="exit $rc"
    [ -z "$why" ] && [ "$(grep -cv '^[^:]*: hint: ' err)" -ne 1 ] && why="stderr is not one line"
    [ -z "$why" ] && [ -s out ] && why="output on stdout"
    if [ -z "$why" ] && [ "$left" != - ]; then
        [ -e "$left" ] && why="'$left' left behind"
        ls -d "$left".tmp-* "$(dirname "$left")"/*.tmp-* >/dev/null 2>&1 &&
            why="temporary file left behind"
    fi
    [ -n "${BAD_INPUT_SHOW:-}" ] && sed "s|^|    [$n] |" err
    if [ -z "$why" ]; then
        ok "$n"
    else
        notok "$n: $why"
        sed 's/^/    /' err | head -n 5
    fi
}
# accept NAME COMMAND...: exit 0.
accept() {
    n=$1; shift
    if "$@" >out 2>err </dev/null; then ok "$n"; else
        notok "$n: exit $?"; sed 's/^/    /' err | head -n 5
    fi
}
# the first line's length (a header), and a copy with the header edited
hdr_len() { head -n 1 "$1" | wc -c | tr -d ' '; }
with_header() { # FILE SED-EXPR > OUT (the header keeps its length)
    h=$(hdr_len "$1")
    { head -c "$h" "$1" | sed "$2"; tail -c +"$((h + 1))" "$1"; }
}
# poke FILE OFFSET OCTAL-BYTES: overwrite bytes in place
poke() { printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null; }
# the offset of tensor NAME's data in a safetensors file
st_offset() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    b=$(tail -c +9 "$1" | head -c "$n" | jq -r --arg k "$2" '.[$k].data_offsets[0]')
    echo $((8 + n + b))
}
NAN='\000\000\300\177' # f32 quiet NaN, little-endian
INF='\000\000\200\177' # f32 +infinity
BIG='\346\261\141\177' # f32 3e38, finite
# the byte length of tensor NAME's data
st_len() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n" | jq -r --arg k "$2" '.[$k].data_offsets[1] - .[$k].data_offsets[0]'
}

# --- read-only and full output directories ---------------------------------
mkdir ro && chmod 555 ro
if [ "$(id -u)" -eq 0 ]; then
    # root ignores permissions; a read-only mount does not
    mkdir -p ro_m && mount -t tmpfs -o size=64k,ro tmpfs ro_m 2>/dev/null && RO=ro_m || RO=
else
    RO=ro
fi
FULL=
mkdir full
if mount -t tmpfs -o size=64k tmpfs full 2>/dev/null; then
    FULL=full
    trap 'umount "$SCRATCH/full" "$SCRATCH/ro_m" 2>/dev/null; rm -rf "$SCRATCH"' EXIT
    # leave one 4 KiB page, so that small outputs already fill it
    head -c 61440 /dev/zero >full/filler 2>/dev/null
else
    skip "bad-input: full output directory: cannot mount a tmpfs (not root)"
fi
[ -n "$RO" ] || skip "bad-input: read-only output directory: cannot make one"

# --- fixtures ----------------------------------------------------------------
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 20 >d20.jsonl
printf '{"instruction": "x", "context": "", "response": "caf\351", "category": "a"}\n' >latin1.jsonl
printf '\211PNG\r\n\032\n\000\000\000\rIHDR' >garbage
: >empty
have_tool dolly-fmt && dolly-fmt d20.jsonl >f20.jsonl
if have_tool tok && [ -s f20.jsonl ]; then
    tok -m "$S260/tokenizer.model" f20.jsonl >s.toks
    tok -m "$LLAMA_TOK" f20.jsonl >l.toks
    head -c 3000 s.toks >s-cut.toks
    with_header s.toks 's/"version":1/"version":9/' >s-v9.toks
    with_header s.toks 's/qlora-tokens/qlora-tokenz/' >s-magic.toks
    # the first id of the first record (after the header and 8 bytes of
    # record head) becomes 600, past stories260K's 512
    cp s.toks s-oor.toks && poke s-oor.toks $(($(hdr_len s.toks) + 8)) '\130\002\000\000'
fi
if have_tool pack && [ -s s.toks ]; then
    pack -q -n 512 s.toks >s.packed
    pack -q -n 512 l.toks >l.packed
    head -c 2000 s.packed >s-cut.packed
    with_header s.packed 's/"version":1/"version":9/' >s-v9.packed
    with_header s.packed 's/qlora-packed/qlora-packex/' >s-magic.packed
    tok -m "$S260/tokenizer.model" <empty >empty.toks
    pack -q -n 64 empty.toks >none.packed
fi
# models: stories260K copies, cut, foreign and with a NaN weight
mkmodel() { mkdir "$1" && cp "$S260/config.json" "$S260/tokenizer.model" "$1/"; }
mkmodel m-cut && head -c 500000 "$S260/model.safetensors" >m-cut/model.safetensors
mkmodel m-magic && cp garbage m-magic/model.safetensors
mkmodel m-empty && : >m-empty/model.safetensors
mkmodel m-nan && cp "$S260/model.safetensors" m-nan/model.safetensors &&
    chmod u+w m-nan/model.safetensors &&
    poke m-nan/model.safetensors \
        $(($(st_offset m-nan/model.safetensors model.layers.1.self_attn.q_proj.weight) + 40)) "$NAN"
# the same in a linear no q/v adapter touches (copied through by lora-merge)
mkmodel m-nan2 && cp "$S260/model.safetensors" m-nan2/model.safetensors &&
    chmod u+w m-nan2/model.safetensors &&
    poke m-nan2/model.safetensors \
        $(st_offset m-nan2/model.safetensors model.layers.0.mlp.down_proj.weight) "$NAN"
mkdir m-none
# adapters: one made by lora-train, cut, foreign and with a NaN
if have_tool lora-train; then
    lora-train -q --init-only -m "$S260" -s r=2 -o ad >/dev/null 2>&1
    mkad() { mkdir "$1" && cp ad/adapter_config.json "$1/"; }
    mkad a-cut && head -c 3000 ad/adapter_model.safetensors >a-cut/adapter_model.safetensors
    mkad a-magic && cp garbage a-magic/adapter_model.safetensors
    mkad a-nan && cp ad/adapter_model.safetensors a-nan/ && chmod u+w a-nan/adapter_model.safetensors &&
        poke a-nan/adapter_model.safetensors \
            $(st_offset a-nan/adapter_model.safetensors \
                base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight) "$NAN"
    mkdir a-empty
fi

# --- dolly-fmt ----------------------------------------------------------------
if have_tool dolly-fmt; then
    refuse "dolly-fmt: truncated record" - sh -c 'head -c 700 d20.jsonl | dolly-fmt'
    refuse "dolly-fmt: not JSON Lines" - dolly-fmt garbage
    accept "dolly-fmt: empty input is an empty data set" dolly-fmt empty
    check "dolly-fmt: empty input gives empty output" test ! -s out
    refuse "dolly-fmt: non-UTF-8 text" - dolly-fmt latin1.jsonl
    [ -n "$RO" ] && refuse "dolly-fmt: read-only output directory" "$RO/f.jsonl" \
        dolly-fmt -o "$RO/f.jsonl" d20.jsonl
    [ -n "$FULL" ] && refuse "dolly-fmt: full output directory" full/f.jsonl \
        dolly-fmt -o full/f.jsonl d20.jsonl
    refuse "dolly-fmt: stdout on /dev/full" - sh -c 'dolly-fmt d20.jsonl >/dev/full'
else
    skip "bad-input: dolly-fmt not built"
fi

# --- tok ------------------------------------------------------------------------
if have_tool tok && [ -s s.toks ]; then
    head -c 3000 "$S260/tokenizer.model" >cut.model
    refuse "tok: truncated model" - tok -m cut.model f20.jsonl
    refuse "tok: model of another kind" - tok -m "$S260/config.json" f20.jsonl
    refuse "tok: empty model" - tok -m empty f20.jsonl
    # (-o: on stdout, what was encoded before the error has gone out, and a
    # stream without its trailer is refused downstream as truncated)
    refuse "tok: non-UTF-8 text" t.toks tok -m "$S260/tokenizer.model" -o t.toks latin1.jsonl
    refuse "tok: not JSON Lines" t.toks tok -m "$S260/tokenizer.model" -o t.toks garbage
    # on stdout, the buffered header is dropped: nothing goes out
    refuse "tok: non-UTF-8 text, on stdout" - tok -m "$S260/tokenizer.model" latin1.jsonl
    accept "tok: empty input is an empty stream" tok -m "$S260/tokenizer.model" empty
    check "tok: the empty stream has no records" \
        test "$(tok --dump out | wc -l)" -eq 0
    refuse "tok -d: truncated stream" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl s-cut.toks
    refuse "tok -d: wrong magic" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl s-magic.toks
    refuse "tok -d: a packed file" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl s.packed
    refuse "tok -d: future version" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl s-v9.toks
    refuse "tok -d: empty file" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl empty
    refuse "tok -d: another vocabulary" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl l.toks
    refuse "tok -d: out-of-range token id" d.jsonl tok -d -m "$S260/tokenizer.model" -o d.jsonl s-oor.toks
    refuse "tok --dump: truncated stream" d.jsonl tok --dump -o d.jsonl s-cut.toks
    [ -n "$RO" ] && refuse "tok: read-only output directory" "$RO/s.toks" \
        tok -m "$S260/tokenizer.model" -o "$RO/s.toks" f20.jsonl
    if [ -n "$FULL" ]; then
        refuse "tok: full output directory" full/s.toks \
            tok -m "$S260/tokenizer.model" -o full/s.toks f20.jsonl
    fi
    refuse "tok: stdout on /dev/full" - \
        sh -c 'tok -m "$1" f20.jsonl >/dev/full' sh "$S260/tokenizer.model"
    refuse "tok -d: stdout on /dev/full" - \
        sh -c 'tok -d -m "$1" s.toks >/dev/full' sh "$S260/tokenizer.model"
else
    skip "bad-input: tok not built"
fi

# --- pack -----------------------------------------------------------------------
if have_tool pack && [ -s s.packed ]; then
    refuse "pack: truncated stream" p.packed pack -n 64 -o p.packed s-cut.toks
    refuse "pack: wrong magic" p.packed pack -n 64 -o p.packed s-magic.toks
    refuse "pack: a packed file as input" p.packed pack -n 64 -o p.packed s.packed
    refuse "pack: future version" p.packed pack -n 64 -o p.packed s-v9.toks
    refuse "pack: empty file" p.packed pack -n 64 -o p.packed empty
    refuse "pack: streams of two vocabularies" p.packed pack -n 64 -o p.packed s.toks l.toks
    refuse "pack: another vocabulary than --vocab" p.packed pack -n 64 --vocab 512 -o p.packed l.toks
    refuse "pack: out-of-range token id" p.packed pack -n 64 -o p.packed s-oor.toks
    refuse "pack --dump: truncated packed file" - pack --dump s-cut.packed
    refuse "pack --dump: wrong magic" - pack --dump s-magic.packed
    refuse "pack --dump: a token stream" - pack --dump s.toks
    refuse "pack --dump: future version" - pack --dump s-v9.packed
    refuse "pack --dump: empty file" - pack --dump empty
    [ -n "$RO" ] && refuse "pack: read-only output directory" "$RO/p.packed" \
        pack -n 64 -o "$RO/p.packed" s.toks
    if [ -n "$FULL" ]; then
        refuse "pack: full output directory" full/p.packed pack -q -n 512 -o full/p.packed s.toks
    fi
    refuse "pack: stdout on /dev/full" - sh -c 'pack -q -n 64 s.toks >/dev/full'
    refuse "pack --dump: stdout on /dev/full" - sh -c 'pack --dump s.packed >/dev/full'
else
    skip "bad-input: pack not built"
fi

# --- nf4-quant ------------------------------------------------------------------
if have_tool nf4-quant; then
    refuse "nf4-quant: truncated safetensors" q nf4-quant -o q m-cut
    refuse "nf4-quant: not safetensors" q nf4-quant -o q m-magic
    refuse "nf4-quant: empty safetensors" q nf4-quant -o q m-empty
    refuse "nf4-quant: empty directory" q nf4-quant -o q m-none
    refuse "nf4-quant: NaN in a weight" q nf4-quant -o q m-nan
    grep -q 'q_proj' err && ok "nf4-quant: the NaN's tensor is named" ||
        notok "nf4-quant: the NaN's tensor is named"
    [ -n "$RO" ] && refuse "nf4-quant: read-only output directory" "$RO/q" \
        nf4-quant -o "$RO/q" "$S260"
    # the NF4 form of stories260K is about 300 KB
    [ -n "$FULL" ] && refuse "nf4-quant: full output directory" full/q \
        nf4-quant -o full/q "$S260"
    refuse "nf4-quant --stats: stdout on /dev/full" - \
        sh -c 'nf4-quant --stats -o q "$1" >/dev/full' sh "$S260"
    rm -rf q
else
    skip "bad-input: nf4-quant not built"
fi

# --- lora-train -----------------------------------------------------------------
if have_tool lora-train && [ -s s.packed ]; then
    T="lora-train -m $S260 -s max_steps=1 -s per_device_train_batch_size=1"
    refuse "lora-train: truncated packed file" o $T -o o s-cut.packed
    refuse "lora-train: wrong magic" o $T -o o s-magic.packed
    refuse "lora-train: a token stream" o $T -o o s.toks
    refuse "lora-train: future version" o $T -o o s-v9.packed
    refuse "lora-train: empty file" o $T -o o empty
    [ -s none.packed ] && refuse "lora-train: no rows" o $T -o o none.packed
    refuse "lora-train: another vocabulary" o $T -o o l.packed
    refuse "lora-train: truncated model" o lora-train -m m-cut -s max_steps=1 -o o s.packed
    refuse "lora-train: NaN in the base model" o lora-train -m m-nan -s max_steps=1 -o o s.packed
    printf 'r: 8\noutput_dir: "caf\351"\n' >latin1.yaml
    refuse "lora-train: non-UTF-8 configuration" o $T -c latin1.yaml -o o s.packed
    [ -n "$RO" ] && refuse "lora-train: read-only output directory" "$RO/o" \
        lora-train --init-only -m "$S260" -o "$RO/o"
    [ -n "$FULL" ] && refuse "lora-train: full output directory" full/o/adapter_model.safetensors \
        lora-train --init-only -m "$S260" -o full/o
    refuse "lora-train: metrics to /dev/full" - sh -c '"$0" "$@" -o o s.packed >/dev/full' $T
else
    skip "bad-input: lora-train not built"
fi

# --- lora-merge -----------------------------------------------------------------
if have_tool lora-merge && [ -d ad ]; then
    M="lora-merge -b $S260"
    refuse "lora-merge: truncated adapter" mm $M -o mm a-cut
    refuse "lora-merge: adapter not safetensors" mm $M -o mm a-magic
    refuse "lora-merge: empty adapter directory" mm $M -o mm a-empty
    refuse "lora-merge: NaN in the adapter" mm $M -o mm a-nan
    refuse "lora-merge: truncated base model" mm lora-merge -b m-cut -o mm ad
    refuse "lora-merge: NaN in the base model" mm lora-merge -b m-nan -o mm ad
    refuse "lora-merge: NaN in a base weight the adapter leaves alone" mm \
        lora-merge -b m-nan2 -o mm ad
    [ -n "$RO" ] && refuse "lora-merge: read-only output directory" "$RO/mm" $M -o "$RO/mm" ad
    [ -n "$FULL" ] && refuse "lora-merge: full output directory" full/mm $M -o full/mm ad
else
    skip "bad-input: lora-merge not built"
fi

# --- lora-gen -------------------------------------------------------------------
if have_tool lora-gen && [ -s s.toks ]; then
    have_tool dolly-fmt && dolly-fmt -p d20.jsonl | head -n 3 |
        tok -m "$S260/tokenizer.model" >prompts.toks
    G="lora-gen -m $S260 -n 4"
    refuse "lora-gen: truncated stream" g.toks $G -o g.toks s-cut.toks
    refuse "lora-gen: wrong magic" g.toks $G -o g.toks s-magic.toks
    refuse "lora-gen: a packed file" g.toks $G -o g.toks s.packed
    refuse "lora-gen: future version" g.toks $G -o g.toks s-v9.toks
    refuse "lora-gen: empty file" g.toks $G -o g.toks empty
    refuse "lora-gen: another vocabulary" g.toks $G -o g.toks l.toks
    refuse "lora-gen: out-of-range token id" g.toks $G -o g.toks s-oor.toks
    refuse "lora-gen: truncated model" g.toks lora-gen -m m-cut -n 4 -o g.toks prompts.toks
    refuse "lora-gen: NaN in the model" g.toks lora-gen -m m-nan -n 4 -o g.toks prompts.toks
    if [ -d ad ]; then
        refuse "lora-gen: truncated adapter" g.toks $G -a a-cut -o g.toks prompts.toks
        refuse "lora-gen: adapter not safetensors" g.toks $G -a a-magic -o g.toks prompts.toks
        refuse "lora-gen: empty adapter directory" g.toks $G -a a-empty -o g.toks prompts.toks
        refuse "lora-gen: NaN in the adapter" g.toks $G -a a-nan -o g.toks prompts.toks
    fi
    [ -n "$RO" ] && refuse "lora-gen: read-only output directory" "$RO/g.toks" \
        $G -o "$RO/g.toks" prompts.toks
    if [ -n "$FULL" ]; then
        # 20 prompts of up to 600 characters: more than the 4 KiB left
        jq -c '{prompt: (.instruction + " " + .context)[0:600]}' d20.jsonl |
            tok -m "$S260/tokenizer.model" >p20.toks
        refuse "lora-gen: full output directory" full/g.toks \
            $G -n 1 -o full/g.toks p20.toks
    fi
    refuse "lora-gen: stdout on /dev/full" - sh -c '"$0" "$@" prompts.toks >/dev/full' $G
else
    skip "bad-input: lora-gen not built"
fi

# --- NF4 quantization state -----------------------------------------------------
# An NF4 checkpoint of stories260K (nested and, for the fp32 absmax, not),
# with one value of one weight's state made non-finite; every tool that
# loads a model refuses it at load, naming the file and the tensor.
if have_tool nf4-quant && have_tool lora-train && [ -s s.packed ]; then
    nf4-quant -q -o q "$S260" && nf4-quant -q --no-double-quant -o qn "$S260" ||
        notok "bad-input: nf4-quant fixture"
    W=model.layers.2.self_attn.v_proj.weight
    # mkq DIR FROM TENSOR-SUFFIX ELEMENT BYTES: a copy of FROM with one f32
    # of W's tensor overwritten
    mkq() {
        rm -rf "$1" && cp -r "$2" "$1" && chmod -R u+w "$1" &&
            poke "$1/model.safetensors" \
                $(($(st_offset "$1/model.safetensors" "$W$3") + 4 * $4)) "$5"
    }
    # set_offset DIR TEXT: W's nested_offset, in its quant_state JSON,
    # becomes TEXT (padded with spaces to the number's length)
    set_offset() {
        rm -rf "$1" && cp -r q "$1" && chmod -R u+w "$1"
        f=$1/model.safetensors t=$W.quant_state.bitsandbytes__nf4
        o=$(st_offset "$f" "$t")
        js=$(tail -c +$((o + 1)) "$f" | head -c "$(st_len "$f" "$t")")
        k=$(printf '%s' "$js" | awk '{ print index($0, "\"nested_offset\": ") + 16 }')
        num=${js#*\"nested_offset\": }
        num=${num%\}}
        awk -v t="$2" -v n="${#num}" 'BEGIN { printf "%-" n "s", t }' |
            dd of="$f" bs=1 seek=$((o + k)) conv=notrunc 2>/dev/null
    }
    mkq q-na q .nested_absmax 0 "$NAN"
    mkq q-qm q .quant_map 15 "$INF"
    mkq q-nm q .nested_quant_map 200 "$NAN"
    mkq qn-am qn .absmax 3 "$NAN"
    set_offset q-off NaN
    set_offset q-big 1e300
    # finite, but 3e38 x 3e38 is not
    mkq q-ovf q .quant_map 15 "$BIG" &&
        poke q-ovf/model.safetensors $(st_offset q-ovf/model.safetensors "$W.nested_absmax") "$BIG"
    accept "NF4 state: the intact NF4 checkpoint loads" \
        lora-train -q -m q -o oq -s max_steps=1 -s per_device_train_batch_size=1 s.packed
    # what each case must name: the tensor
    for c in "q-na:$W.nested_absmax" "q-qm:$W.quant_map" "q-nm:$W.nested_quant_map" \
        "qn-am:$W.absmax" "q-off:$W.quant_state" "q-big:$W.quant_state" "q-ovf:$W.absmax"; do
        d=${c%%:*} t=${c#*:}
        case $d in
        q-na) what="NaN in a nested absmax" ;;
        q-qm) what="infinity in a quant_map" ;;
        q-nm) what="NaN in a nested quant_map" ;;
        qn-am) what="NaN in an fp32 absmax" ;;
        q-off) what="NaN nested_offset" ;;
        q-big) what="nested_offset past float32" ;;
        q-ovf) what="a state that overflows" ;;
        esac
        refuse "lora-train: NF4 state: $what" o \
            lora-train -m "$d" -s max_steps=1 -s per_device_train_batch_size=1 -o o s.packed
        names="$d/model.safetensors: NF4 tensor '$t"
        grep -qF "$names" err && ok "lora-train: NF4 state: $what: file and tensor named" ||
            notok "lora-train: NF4 state: $what: file and tensor named ($(head -n 1 err))"
        if have_tool lora-gen && [ -s prompts.toks ]; then
            refuse "lora-gen: NF4 state: $what" g.toks lora-gen -m "$d" -n 4 -o g.toks prompts.toks
            grep -qF "$names" err && ok "lora-gen: NF4 state: $what: file and tensor named" ||
                notok "lora-gen: NF4 state: $what: file and tensor named ($(head -n 1 err))"
        fi
        if have_tool lora-merge && [ -d ad ]; then
            refuse "lora-merge: NF4 state: $what" mm lora-merge --from-nf4 -b "$d" -o mm ad
            grep -qF "$names" err && ok "lora-merge: NF4 state: $what: file and tensor named" ||
                notok "lora-merge: NF4 state: $what: file and tensor named ($(head -n 1 err))"
        fi
    done
else
    skip "bad-input: NF4 state: nf4-quant or lora-train not built"
fi
