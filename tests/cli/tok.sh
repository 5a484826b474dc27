# tests/cli/tok.sh: tok(1) — usage errors, behaviour, corrupt input, then
# exactness against the golden file and, when the sentencepiece Python
# package is importable, against SentencePiece itself on the whole
# seed-formatted Dolly set (both models), tricky strings and hand-made
# models (tests/tok_reference.py makes the references).
. "$TOP/tests/cli/lib.sh"

if [ ! -x "$TOP/bin/tok" ]; then
    skip "tok: not built"
    exit 0
fi
if ! have_shared; then
    skip "tok: no shared data in '$SHARED'"
    exit 0
fi
LLAMA=$SHARED/models/llama2-tokenizer/tokenizer.model
S260=$SHARED/models/stories260K/tokenizer.model
REF=$TOP/tests/tok_reference.py

# --- usage errors ----------------------------------------------------------
# usage_error NAME COMMAND...: exit 2, a "tok: " line, then the usage.
usage_error() {
    n=$1; shift
    "$@" >out 2>err </dev/null; rc=$?
    if [ "$rc" -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^tok: ' &&
        sed -n 2p err | grep -q '^usage: tok '; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}
usage_error "no model" tok
usage_error "bad thread count" tok -j 0 -m "$LLAMA"
usage_error "-d and --dump together" tok -d --dump -m "$LLAMA"
usage_error "--dump takes no model" tok --dump -m "$LLAMA"
usage_error "-d reads one stream" tok -d -m "$LLAMA" a b
expect_exit 2 "missing model file" tok -m no-such.model </dev/null
grep -q "^tok: .*'no-such.model'" err && ok "missing model named" || notok "missing model named"

# --- behaviour -------------------------------------------------------------
ids() { tok "$@" | tok --dump | jq -c '[.ids, .completion_start]'; }

printf '{"text":"This is a test"}\n' >t.jsonl
check "text record: BOS, ids, EOS, no completion start" \
    [ "$(ids -m "$LLAMA" t.jsonl)" = '[[1,910,338,263,1243,2],null]' ]
check "--no-bos --no-eos" \
    [ "$(ids -m "$LLAMA" --no-bos --no-eos t.jsonl)" = '[[910,338,263,1243],null]' ]
printf '{"prompt":"This is"}\n' >p.jsonl
check "prompt-only record: no EOS, no completion start" \
    [ "$(ids -m "$LLAMA" p.jsonl)" = '[[1,910,338],null]' ]
printf '{"prompt":"This is","completion":" a test"}\n' >pc.jsonl
check "prompt+completion: one text, completion start after BOS and the prompt" \
    [ "$(ids -m "$LLAMA" pc.jsonl)" = '[[1,910,338,263,1243,2],3]' ]
printf '{"prompt":"This i","completion":"s a test"}\n' >x.jsonl
check "a token across the boundary belongs to the completion" \
    [ "$(ids -m "$LLAMA" x.jsonl)" = '[[1,910,338,263,1243,2],2]' ]
printf '{"prompt":"This is","completion":""}\n' >x.jsonl
check "empty completion starts at the EOS" \
    [ "$(ids -m "$LLAMA" x.jsonl)" = '[[1,910,338,2],3]' ]
printf '{"prompt":"a","completion":"b","category":"x"}\n\n  \n{"text":""}\n' >x.jsonl
check "other members ignored, blank lines skipped, empty text is BOS EOS" \
    [ "$(ids -m "$LLAMA" x.jsonl | tr -d '\n')" = '[[1,633,2],1][[1,2],null]' ]

tok -m "$LLAMA" t.jsonl >t.tok
check "header: one JSON line that jq reads" \
    [ "$(head -n 1 t.tok | jq -c '[.format, .version, .vocab_size, .bos_id, .eos_id, (.tokenizer|length)]')" \
      = '["qlora-tokens",1,32000,1,2,16]' ]
check "header length is a multiple of 8" [ $(( $(head -n 1 t.tok | wc -c) % 8 )) -eq 0 ]

cat t.jsonl p.jsonl pc.jsonl >all.jsonl
tok -m "$LLAMA" all.jsonl >a.tok
zstd -q -c all.jsonl >all.jsonl.zst
tok -m "$LLAMA" <all.jsonl.zst >b.tok
check "stdin and zstd input give the same stream" cmp -s a.tok b.tok
tok -m "$LLAMA" t.jsonl p.jsonl - <pc.jsonl >b.tok
check "several files make one stream" cmp -s a.tok b.tok
tok -m "$LLAMA" -o out.tok all.jsonl
check "-o writes the file" cmp -s a.tok out.tok

tok -d -m "$LLAMA" a.tok >dec.jsonl
check "decode: text, prompt-only and prompt+completion records" \
    [ "$(jq -c . dec.jsonl | tr -d '\n')" = \
      '{"text":"This is a test"}{"text":"This is"}{"prompt":"This is","completion":"a test"}' ]

tok -m "$S260" all.jsonl >s.tok
expect_exit 2 "decoding with another tokenizer's model" tok -d -m "$LLAMA" s.tok
grep -q "another tokenizer" err && grep -q "hint:" err &&
    ok "the mismatch is named, with a hint" || notok "mismatch message"

# --- bad input ------------------------------------------------------------
printf '{"text":"ok"}\n{"text": oops}\n' >bad.jsonl
expect_exit 2 "invalid JSON" tok -m "$LLAMA" -o bad.tok bad.jsonl
grep -q "^tok: bad.jsonl:2:" err && ok "invalid JSON: file:line named" || notok "invalid JSON message"
check "no output file after an error" [ ! -e bad.tok ]
printf '{"prompt":1}\n' >bad.jsonl
expect_exit 2 "non-string prompt" tok -m "$LLAMA" bad.jsonl
printf '{"completion":"x"}\n' >bad.jsonl
expect_exit 2 "completion without prompt" tok -m "$LLAMA" bad.jsonl
printf '{"title":"x"}\n' >bad.jsonl
expect_exit 2 "record without text or prompt" tok -m "$LLAMA" bad.jsonl
printf '[1,2]\n' >bad.jsonl
expect_exit 2 "record that is not an object" tok -m "$LLAMA" bad.jsonl
printf '{"text":"\\ud800"}\n' >bad.jsonl
expect_exit 2 "unpaired surrogate (invalid UTF-8) refused by the JSON reader" \
    tok -m "$LLAMA" bad.jsonl
printf '{"text":"a\377b"}\n' >bad.jsonl
expect_exit 2 "invalid UTF-8 bytes refused" tok -m "$LLAMA" bad.jsonl

head -c 1000 "$LLAMA" >cut.model
expect_exit 2 "truncated model" tok -m cut.model t.jsonl
grep -q "not a SentencePiece model 'cut.model'" err && ok "truncated model named" ||
    notok "truncated model message"
expect_exit 2 "foreign model file (JSON)" tok -m t.jsonl t.jsonl
: >empty.model
expect_exit 2 "empty model file" tok -m empty.model t.jsonl
(cat "$LLAMA"; printf '\022\002\030\001') >unigram.model
expect_exit 2 "unigram model refused" tok -m unigram.model t.jsonl
grep -q "unigram" err && ok "unigram named" || notok "unigram message"

size=$(wc -c <a.tok)
head -c $((size - 4)) a.tok >cut.tok
expect_exit 2 "truncated stream (decode)" tok -d -m "$LLAMA" cut.tok
expect_exit 2 "truncated stream (dump)" tok --dump cut.tok
expect_exit 2 "not a stream" tok --dump t.jsonl
if command -v script >/dev/null 2>&1; then
    script -qec "tok -m '$LLAMA' '$PWD/t.jsonl'" /dev/null >tty.out 2>&1 </dev/null
    grep -q "terminal" tty.out && ok "refuses to write a stream to a terminal" ||
        notok "terminal output not refused"
fi

# --- exactness: golden file -----------------------------------------------
if [ -x "$TOP/bin/dolly-fmt" ]; then
    zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | dolly-fmt >seed.jsonl
elif command -v python3 >/dev/null 2>&1; then
    zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | python3 "$REF" seed >seed.jsonl
fi
if [ -s seed.jsonl ]; then
    head -n 1000 seed.jsonl | tok -m "$LLAMA" --no-eos | tok --dump | jq -c .ids >first.ids
    zstd -dc "$SHARED/golden/tok-llama2-dolly-seed-first1000.jsonl.zst" | jq -c . >golden.ids
    check "first 1000 seed-formatted Dolly records equal the golden ids" cmp -s first.ids golden.ids
    tok -m "$LLAMA" seed.jsonl >seed.tok
    tok -m "$LLAMA" -j 2 seed.jsonl >seed2.tok
    check "-j 2 writes the same stream as -j 1" cmp -s seed.tok seed2.tok
    check "Dolly: 15011 records, 2345082 tokens (REFERENCE.md)" \
        [ "$(tok --dump seed.tok | awk -F, '{ n += NF - 1 } END { print NR, n }')" = '15011 2345082' ]
else
    skip "golden comparison: neither dolly-fmt nor python3 to format Dolly"
fi

# --- exactness: SentencePiece itself ---------------------------------------
if ! python3 -c 'import sentencepiece' 2>/dev/null; then
    skip "comparison with SentencePiece: python3 cannot import sentencepiece (pip install sentencepiece)"
    exit 0
fi
export TOK_REF_CACHE="$TOP/${BUILD:-build}/tok-ref"

# what tok writes and what SentencePiece gives, encode and decode, for one
# model and one input; $2 names the case
same_as_spm() {
    model=$1 name=$2 in=$3
    tok -m "$model" "$in" >o.tok && tok --dump o.tok >o.dump &&
        python3 "$REF" encode "$model" "$in" >r.dump
    if python3 "$REF" same r.dump o.dump >diff.txt; then
        ok "$name: ids equal SentencePiece's"
    else
        notok "$name: ids differ from SentencePiece's"; sed 's/^/    /' diff.txt
    fi
    tok -d -m "$model" o.tok >o.dec && python3 "$REF" decode "$model" r.dump >r.dec
    if python3 "$REF" same r.dec o.dec >diff.txt; then
        ok "$name: decode equals SentencePiece's"
    else
        notok "$name: decode differs from SentencePiece's"; sed 's/^/    /' diff.txt
    fi
}

if [ -s seed.jsonl ]; then
    same_as_spm "$LLAMA" "llama2, all 15011 seed-formatted Dolly records" seed.jsonl
    same_as_spm "$S260" "stories260K, all 15011 seed-formatted Dolly records" seed.jsonl
fi

# Tricky strings (JSON escapes keep them readable).
cat >tricky.jsonl <<'EOF'
{"text":""}
{"text":" "}
{"text":"  "}
{"text":"   leading"}
{"text":"trailing   "}
{"text":" both "}
{"text":"a  b   c    d"}
{"text":"\t"}
{"text":"tab\there \t mixed\t\t"}
{"text":"\n"}
{"text":"line1\nline2\n\n\nline5\n"}
{"text":"\r\n\r\n"}
{"text":" \n \t "}
{"text":"\u0000"}
{"text":"nul\u0000inside"}
{"text":"\u0001\u0002\u0003\u001f\u007f\u0085"}
{"text":"😀"}
{"text":"👍🏽 👨‍👩‍👧 🇫🇷 ❤️"}
{"text":"生活的真谛是"}
{"text":"日本語のテキスト、カタカナ。"}
{"text":"한국어 텍스트"}
{"text":"العربية نص"}
{"text":"हिन्दी"}
{"text":"ภาษาไทย"}
{"text":"e\u0301 \u00e9"}
{"text":"<s>"}
{"text":"</s> <unk> <pad> <0x41> <s>hi</s>"}
{"text":"\ufffd"}
{"text":"\u2581"}
{"text":"\u2581\u2581x \u2581"}
{"text":"\uffff \ud800\udc00 \udbff\udfff"}
{"text":"\u00a0non-breaking\u3000ideographic space"}
{"text":"The quick brown fox jumps over the lazy dog."}
{"text":"### Instruction:\nUse the Input below"}
{"text":"1234567890 3.14159 1e-5 $100 50%"}
{"text":"x=\"quoted\" back\\slash {json: [1, 2]}"}
{"prompt":"a","completion":"b"}
{"prompt":"","completion":"x"}
{"prompt":"x","completion":""}
{"prompt":"","completion":""}
{"prompt":"hello ","completion":" world"}
{"prompt":"hello  ","completion":"  world"}
{"prompt":"hello","completion":" world"}
{"prompt":"生","completion":"活"}
{"prompt":"### Response:\n","completion":"When did it start?\n"}
{"prompt":"only a prompt"}
{"prompt":"emoji 😀","completion":"😀 end"}
{"prompt":"a\u0000","completion":"\u0000b"}
EOF
awk 'BEGIN { s = ""; for (i = 0; i < 3000; i++) s = s "a"; t = ""; for (i = 0; i < 500; i++) t = t " ";
             u = ""; for (i = 0; i < 400; i++) u = u "语";
             printf "{\"text\":\"%s\"}\n{\"text\":\"x%sy\"}\n{\"text\":\"%s\"}\n", s, t, u }' >>tricky.jsonl
same_as_spm "$LLAMA" "llama2, tricky strings" tricky.jsonl
same_as_spm "$S260" "stories260K, tricky strings" tricky.jsonl

# decode(encode(x)) == x for text records (Llama keeps all whitespace;
# U+2581 is SentencePiece's space and comes back as ' ').
grep '"text"' tricky.jsonl | grep -v 'u2581' >texts.jsonl
tok -m "$LLAMA" texts.jsonl | tok -d -m "$LLAMA" >back.jsonl
if python3 "$REF" same texts.jsonl back.jsonl >diff.txt; then
    ok "decode(encode(x)) == x for valid UTF-8 (llama2)"
else
    notok "decode(encode(x)) != x"; sed 's/^/    /' diff.txt
fi

# Hand-made models: user-defined, unused and tied pieces, no byte fallback,
# removal of extra whitespace; byte fallback without dummy prefix or
# whitespace escaping. Random records over the alphabet that matters.
python3 "$REF" fuzz 1 4000 >fuzz.jsonl
for kind in ud seg raw; do
    python3 "$REF" mkmodel "$kind" "$kind.model"
    same_as_spm "$kind.model" "hand-made model '$kind', 4000 random records" fuzz.jsonl
done

# The EXAMPLES of tok(1).
if [ -s seed.jsonl ]; then
    head -n 3 seed.jsonl >train.jsonl
    tok -m "$LLAMA" train.jsonl >train.tok &&
        tok --dump train.tok | jq -c '.ids | length' >lens && [ "$(wc -l <lens)" -eq 3 ] &&
        tok -d -m "$LLAMA" train.tok | jq -e -s 'length == 3 and (.[0].completion | endswith("\n"))' >/dev/null
    check "man page examples run (1)" [ $? -eq 0 ]
    head -n 1 seed.tok | jq . >/dev/null
    check "man page examples run (header)" [ $? -eq 0 ]
fi
