# lora-gen.sh: lora-gen through its command line: usage errors, greedy
# decoding from BOS against ../shared's reference text, the output's
# records and header, JSON Lines, prompts in flight, sampling with a seed,
# stop texts, an adapter, corrupt inputs. On the CPU (--device cpu); the
# GPU path is checked by tests/gpu/gen.c.
. "$TOP/tests/cli/lib.sh"

# usage_error NAME COMMAND...: exit 2, a "lora-gen: " line, then the usage.
usage_error() {
    n=$1; shift
    "$@" >out 2>err; rc=$?
    if [ "$rc" -eq 2 ] && [ "$(wc -l <err)" -eq 2 ] && head -1 err | grep -q '^lora-gen: ' &&
        sed -n 2p err | grep -q '^usage: lora-gen '; then
        ok "lora-gen: $n"
    else
        notok "lora-gen: $n (exit $rc)"; sed 's/^/    /' err
    fi
}
usage_error "no model" lora-gen /dev/null
usage_error "unknown option" lora-gen --bogus
usage_error "negative temperature" lora-gen -m x -t -1 /dev/null
usage_error "top-p 0" lora-gen -m x -p 0 /dev/null
usage_error "bad max new tokens" lora-gen -m x -n 0 /dev/null
usage_error "bad device" lora-gen -m x --device tpu /dev/null
usage_error "too many operands" lora-gen -m x a b
lora-gen -h >out 2>err && head -1 out | grep -q '^usage: lora-gen' && [ ! -s err ] &&
    ok "lora-gen -h: usage on stdout" || notok "lora-gen -h: usage on stdout"
lora-gen -V | grep -q '^lora-gen [0-9]' && ok "lora-gen -V" || notok "lora-gen -V"

if ! have_shared; then
    skip "lora-gen: $SHARED absent"
    exit 0
fi
M="$SHARED/models/stories260K"
T="$M/tokenizer.model"
gen() { lora-gen --device cpu -m "$M" "$@"; }

echo '{"prompt":""}' | tok -m "$T" >bos.toks
expect_exit 2 "lora-gen: model directory missing" lora-gen --device cpu -m nowhere bos.toks
gen -n 256 --stop-id 1 -o bos.out bos.toks 2>err || notok "lora-gen: greedy from BOS runs"
tok -d -m "$T" bos.out | jq -r .completion >bos.txt
cmp -s bos.txt "$M/greedy-from-bos.txt" && ok "lora-gen: greedy from BOS == greedy-from-bos.txt" ||
    notok "lora-gen: greedy from BOS == greedy-from-bos.txt"
head -1 bos.out | jq -e '.format == "qlora-tokens" and (.producer | startswith("lora-gen")) and .vocab_size == 512' \
    >/dev/null && ok "lora-gen: output header" || notok "lora-gen: output header"
tok --dump bos.out | jq -e '.ids[0] == 1 and .completion_start == 1 and (.ids | length) == 257' \
    >/dev/null && ok "lora-gen: record = prompt + completion, completion_start at the boundary" ||
    notok "lora-gen: record = prompt + completion"

gen -J -n 256 --stop-id 1 bos.toks >bos.jsonl
jq -e '.index == 0 and .prompt_tokens == 1 and (.ids | length) == 256 and .finish == "length"
       and (.text | startswith("Once upon a time")) and .seconds >= 0' bos.jsonl >/dev/null &&
    ok "lora-gen -J: ids, finish, text, timing" || notok "lora-gen -J: ids, finish, text, timing"

# several prompts: input order, the same whatever is in flight
printf '%s\n' '{"prompt":"Once upon a time"}' '{"prompt":"The little dog"}' \
    '{"prompt":"Lily and Tom went to the park. They"}' '{"prompt":"One day"}' \
    '{"prompt":"Sam had a red ball."}' | tok -m "$T" >p.toks
gen -n 30 -b 1 p.toks >b1.toks && gen -n 30 -b 3 p.toks >b3.toks &&
    cmp -s b1.toks b3.toks && ok "lora-gen: 3 in flight == 1 at a time" ||
    notok "lora-gen: 3 in flight == 1 at a time"
tok -d -m "$T" b3.toks | jq -r .prompt | sed -n 3p | grep -q '^Lily and Tom' &&
    ok "lora-gen: records in input order" || notok "lora-gen: records in input order"

# sampling: reproducible with a seed, whatever is in flight
gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 1 p.toks >s1.toks &&
    gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 4 p.toks >s2.toks &&
    gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 6 p.toks >s3.toks || notok "lora-gen: sampling runs"
cmp -s s1.toks s2.toks && ok "lora-gen: sampling with -S is reproducible" ||
    notok "lora-gen: sampling with -S is reproducible"
cmp -s s1.toks s3.toks && notok "lora-gen: another seed, other text" ||
    ok "lora-gen: another seed, other text"
# the sequences of a step are sampled on several threads: same tokens
OMP_NUM_THREADS=1 gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 5 p.toks >t1.toks &&
    OMP_NUM_THREADS=4 gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 5 p.toks >t4.toks &&
    cmp -s t1.toks t4.toks && cmp -s s1.toks t4.toks &&
    ok "lora-gen: sampling on 1 or 4 threads, the same tokens" ||
    notok "lora-gen: sampling on 1 or 4 threads, the same tokens"

# prompts whose cache need is over --cache run first in a pass of their
# own (needs here: 35 35 44 33 40 with -n 30): the same tokens, input order
gen -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 4 p.toks >c1.toks &&
    gen -v -n 30 -t 0.9 -p 0.9 -k 40 -r 1.1 -S 5 -b 4 --cache 37 p.toks >c2.toks 2>err &&
    cmp -s c1.toks c2.toks && grep -q '2 prompts need more than 37 cache positions' err &&
    grep -q '3 prompts (longest 5 tokens), 3 in flight, cache of 37 positions' err &&
    ok "lora-gen --cache: long prompts in a pass of their own, the same tokens" ||
    { notok "lora-gen --cache: long prompts in a pass of their own, the same tokens"; sed 's/^/    /' err; }
gen -J -n 30 --cache 37 p.toks | jq -s -e 'map(.index) == [0, 1, 2, 3, 4]' >/dev/null &&
    gen -n 30 p.toks | cmp -s - "$(gen -n 30 --cache 37 -o g2.toks p.toks && echo g2.toks)" &&
    ok "lora-gen --cache: greedy the same, records in input order" ||
    notok "lora-gen --cache: greedy the same, records in input order"
usage_error "bad cache size" lora-gen -m x --cache 0 /dev/null

# a prompt longer than the context (512): cut to its last 512 - 20 tokens
# after the BOS, with a warning; --overlong error refuses the run
long=$(awk 'BEGIN { for (i = 0; i < 120; i++) printf "Lily saw a big red ball. "; }')
printf '{"prompt":"%s"}\n{"prompt":"One day"}\n' "$long" | tok -m "$T" >long.toks
tok --dump long.toks | head -1 | jq -e '.ids | length > 512' >/dev/null ||
    notok "lora-gen: the long prompt is longer than the context"
gen -n 20 long.toks >long.out 2>err &&
    tok --dump long.out | jq -s -e '.[0].completion_start == 492 and .[0].ids[0] == 1
        and (.[0].ids | length) == 512 and .[1].completion_start == 3' >/dev/null &&
    grep -q "1 prompt longer than the model's context (512 tokens) cut to their last 492 tokens, the first record 1" err &&
    ok "lora-gen: an overlong prompt is cut to its end, with a warning" ||
    { notok "lora-gen: an overlong prompt is cut to its end, with a warning"; sed 's/^/    /' err; }
tok --dump long.toks | head -1 | jq -c '.ids[-491:]' >want.json
tok --dump long.out | head -1 | jq -c '.ids[1:492]' >got.json
cmp -s want.json got.json && ok "lora-gen: the cut prompt keeps the last tokens" ||
    notok "lora-gen: the cut prompt keeps the last tokens"
expect_exit 2 "lora-gen --overlong error: refused" gen -n 20 --overlong error -o x.out long.toks
[ ! -e x.out ] && ok "lora-gen --overlong error: no output" || notok "lora-gen --overlong error: no output"
usage_error "bad overlong policy" lora-gen -m x --overlong drop /dev/null

# a stop text ends the completion with it
gen -n 200 -s Lily bos.toks | tok -d -m "$T" | jq -r .completion >stop.txt
[ "$(cat stop.txt)" = "Once upon a time, there was a little girl named Lily" ] &&
    ok "lora-gen -s: stops at the text" || notok "lora-gen -s: stops at the text ($(cat stop.txt))"
gen -J -n 200 -s Lily bos.toks | jq -e '.finish == "stop"' >/dev/null &&
    ok "lora-gen -s: finish stop" || notok "lora-gen -s: finish stop"

# an adapter: a fresh one (B = 0) changes nothing
if lora-train -m "$M" -o ad --init-only -s target_modules=all-linear >/dev/null 2>&1; then
    gen -n 30 -a ad p.toks >a.toks && cmp -s a.toks b1.toks &&
        ok "lora-gen -a: a fresh adapter (B = 0) gives the base model's text" ||
        notok "lora-gen -a: a fresh adapter (B = 0) gives the base model's text"
else
    skip "lora-gen -a: lora-train --init-only unavailable"
fi
expect_exit 2 "lora-gen: adapter directory missing" gen -a nowhere p.toks

# a stream with completions: regenerated from the prompt part
echo '{"prompt":"Once upon a time","completion":" there was a cat."}' | tok -m "$T" >pc.toks
gen -n 5 pc.toks | tok -d -m "$T" | jq -e '.prompt == "Once upon a time"' >/dev/null &&
    ok "lora-gen: a record's completion is replaced" || notok "lora-gen: a record's completion is replaced"

# corrupt inputs: one line, exit 2, no output file left
head -c 40 p.toks >trunc.toks
expect_exit 2 "lora-gen: truncated stream" gen -o never.toks trunc.toks
[ ! -e never.toks ] && ok "lora-gen: no output file after an error" ||
    notok "lora-gen: no output file after an error"
echo '{"prompt":"x"}' >text.jsonl
expect_exit 2 "lora-gen: not a token stream" gen text.jsonl
if [ -f "$SHARED/models/llama2-tokenizer/tokenizer.model" ]; then
    echo '{"prompt":"Hello"}' | tok -m "$SHARED/models/llama2-tokenizer/tokenizer.model" >big.toks
    expect_exit 2 "lora-gen: a vocabulary larger than the model's" gen big.toks
fi
