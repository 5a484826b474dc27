# pack.sh: CLI tests of pack(1): usage errors first, then a golden dump of
# a small stream, then properties checked against independent jq
# computations (concat is the chunking of the concatenation; bfd places
# every record whole, exactly once across train and eval, with the loss
# weights of its scope), determinism, then bad input, then the man page's
# examples and the real Dolly stream when tok and ../shared are there.
#
# Token streams are made by the unit test binary test_packfile (--toks), so
# these tests do not depend on a tokenizer.
. "$TOP/tests/cli/lib.sh"

if [ ! -x "$TOP/bin/pack" ]; then
    notok "pack: not built"
    exit 1
fi
MK="$TOP/${BUILD:-build}/tests/test_packfile"
if [ ! -x "$MK" ]; then
    notok "pack: fixture generator $MK not built (make ${BUILD:-build}/tests/test_packfile)"
    exit 1
fi
toks() { "$MK" --toks "$@"; }
toks_dump() { "$MK" --toks-dump "$1"; }
jqe() { jq -e "$@" >/dev/null; }

# --- usage ------------------------------------------------------------------

usage_error() {
    n=$1; shift
    pack "$@" >out 2>err </dev/null; rc=$?
    if [ $rc -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^pack: ' &&
        sed -n 2p err | grep -q '^usage: pack '; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}
usage_error "bad flag exits 2 with the usage" --no-such-flag
usage_error "bad short flag exits 2" -x
usage_error "missing option argument exits 2" -n
usage_error "bad mode exits 2" -m ffd
usage_error "bad loss scope exits 2" -l prompt
usage_error "non-numeric length exits 2" -n 2k
usage_error "negative seed exits 2" -s -1
usage_error "bad overlong policy exits 2" --overlong drop
usage_error "eval fraction 1 exits 2" --eval-fraction 1 --eval-out e.pack
usage_error "--eval-fraction without --eval-out exits 2" --eval-fraction 0.1
usage_error "--eval-out without --eval-fraction exits 2" --eval-out e.pack
usage_error "--dump and --stats together exit 2" --dump --stats
usage_error "--dump with packing options exits 2" --dump -n 8

pack --help >out 2>err; rc=$?
check "--help exits 0, nothing on stderr" test $rc -eq 0 -a ! -s err
check "--help lists the options" grep -q -- '--eval-fraction' out
pack -V >out
check "-V prints the version" grep -q '^pack [0-9]' out

# --- a small stream: golden dump ---------------------------------------------

printf '%s\n' \
    '{"ids":[1,10,11,12,2],"completion_start":3}' \
    '{"ids":[1,20,21,2],"completion_start":2}' \
    '{"ids":[1,30,31,32,33,34,2],"completion_start":4}' \
    '[1,40,2]' \
    '{"ids":[1,50,51,52,53,54,55,56,57,58,59,2],"completion_start":6}' \
    '{"ids":[1,60,61,2],"completion_start":1}' | toks 100 feedc0de >small.toks
check "fixture stream made" test -s small.toks

cat >want.dump <<'EOF'
{"row":0,"ids":[1,50,51,52,53,54,55,56],"weights":[0,0,0,0,0,0,1,1],"spans":[[0,8]]}
{"row":1,"ids":[1,30,31,32,33,34,2,0],"weights":[0,0,0,0,1,1,1,0],"spans":[[0,7]]}
{"row":2,"ids":[1,10,11,12,2,1,40,2],"weights":[0,0,0,1,1,0,1,1],"spans":[[0,5],[5,3]]}
{"row":3,"ids":[1,20,21,2,1,60,61,2],"weights":[0,0,1,1,0,1,1,1],"spans":[[0,4],[4,4]]}
EOF
pack -n 8 --no-shuffle -o small.pack small.toks 2>err
check "bfd packs quietly" test $? -eq 0 -a ! -s err
pack --dump small.pack >got.dump
check "bfd golden dump (best fit, truncation, completion weights)" cmp -s want.dump got.dump
head -n 1 small.pack >hdr.json
check "header line is JSON that jq reads" jqe '.format == "qlora-packed" and .version == 1
    and .seq_len == 8 and .vocab_size == 100 and .tokenizer == "feedc0de"
    and .mode == "bfd" and .loss == "completion" and .rows == 4 and .spans == 6
    and .documents == 6 and .tokens == 31 and .truncated == 1
    and .dropped_tokens == 4 and .shuffled == false' hdr.json
check "header line is padded to a multiple of 8" test $(( $(wc -c <hdr.json) % 8 )) -eq 0
pack --stats small.pack >stats.json
check "--stats summary" jqe '.rows == 4 and .tokens == 31 and .padding == 1
    and .efficiency == 31/32 and .padding_share == 1/32 and .truncated == 1
    and .documents == 6' stats.json
pack -n 8 --overlong split --no-shuffle small.toks | pack --stats >split.json
check "--overlong split keeps every token" jqe '.tokens == 35 and .split_records == 1
    and .dropped_tokens == 0 and .spans == 7' split.json
pack -n 8 -l all --no-shuffle small.toks | pack --dump >all.dump
check "loss all: every token but span starts and padding" jqe -s '
    all(.[]; . as $r | [range(8)] | all(. as $t |
        $r.weights[$t] == (if any($r.spans[]; .[0] < $t and $t < .[0] + .[1])
                           then 1 else 0 end)))' all.dump

# --- concat is the chunking of the concatenation -----------------------------

# A larger fixture: 300 records of pseudo-random lengths, record k starting
# 1, 3 + k so every document is unique; every 7th is prompt-only.
awk 'BEGIN { srand(7); for (k = 0; k < 300; k++) {
        n = 2 + int(rand() * 60); s = "[1," (3 + k);
        for (i = 2; i < n - 1; i++) s = s "," (400 + int(rand() * 500));
        s = s ",2]"; cs = 1 + int(rand() * (n - 1));
        if (k % 7 == 3) print s; else print "{\"ids\":" s ",\"completion_start\":" cs "}" } }' |
    toks 1000 >big.toks
toks_dump big.toks >big.jsonl
check "fixture of 300 records" test "$(wc -l <big.jsonl)" -eq 300

# weights of the concatenation by loss scope, then chunked, first of each row 0
cat >chunks.jq <<'EOF'
def weights($all): .completion_start as $c | [range(.ids | length) |
    if $all or $c == null or . >= $c then 1 else 0 end];
([.[].ids[]]) as $ids | ([.[] | weights($all)] | add) as $w |
(($ids | length) - ($ids | length) % $L) as $n |
[range(0; $n; $L) as $i |
    {ids: $ids[$i:$i + $L], weights: ([0] + $w[$i + 1:$i + $L]), spans: [[0, $L]]}]
EOF
for L in 64 100; do
    for scope in completion all; do
        all=false; [ $scope = all ] && all=true
        jq -s -c --argjson L $L --argjson all $all -f chunks.jq big.jsonl >want.json
        pack -m concat -l $scope -n $L --no-shuffle big.toks | pack --dump |
            jq -s -c 'map(del(.row))' >got.json
        check "concat -n $L -l $scope: rows are the chunking of the concatenation" \
            cmp -s want.json got.json
    done
done
pack -m concat -n 64 big.toks | pack --dump | jq -c 'del(.row)' | sort >shuf.txt
pack -m concat -n 64 --no-shuffle big.toks | pack --dump | jq -c 'del(.row)' | sort >plain.txt
check "concat shuffled: the same rows in another order" cmp -s shuf.txt plain.txt

# --- bfd: every record whole and exactly once, across train and eval ---------

pack -n 128 -s 5 --eval-fraction 0.1 --eval-out eval.pack -o train.pack big.toks
check "bfd with an eval split" test $? -eq 0 -a -s train.pack -a -s eval.pack
pack --dump train.pack eval.pack |
    jq -c '.ids as $i | .spans[] | $i[.[0]:.[0] + .[1]]' | sort >docs.got
jq -c '.ids' big.jsonl | sort >docs.want
check "bfd: train + eval documents are exactly the input records" cmp -s docs.got docs.want
pack --stats train.pack eval.pack >split.json
check "eval split: 30 of 300 records, headers say so" jqe -s '
    .[0].split == "train" and .[0].documents == 270 and
    .[1].split == "eval" and .[1].documents == 30' split.json
pack --dump eval.pack | jq -c '.ids as $i | .spans[] | $i[.[0]:.[0] + .[1]]' |
    sort >eval.docs
pack --dump train.pack | jq -c '.ids as $i | .spans[] | $i[.[0]:.[0] + .[1]]' |
    sort >train.docs
check "no eval record in the training rows" test -z "$(comm -12 eval.docs train.docs)"
# Loss weights per document, from the record's completion_start.
jq -s -c 'map({key: (.ids | tostring), value: .completion_start}) | from_entries' \
    big.jsonl >cs.json
pack --dump train.pack >train.dump
check "bfd: loss weights follow each record's completion, padding weighs 0" \
    jqe -n --slurpfile cs cs.json --slurpfile rows train.dump '
    all($rows[]; . as $r |
        ([$r.spans[] | .[0] as $s | .[1] as $l | $r.ids[$s:$s + $l] as $d |
            $cs[0][$d | tostring] as $c |
            [range($l) | if . > 0 and ($c == null or . >= $c) then 1 else 0 end]]
         | add) as $w |
        ([$r.spans[] | range(.[0]; .[0] + .[1])]) as $in |
        ([range($r.ids | length)] - $in) as $pad |
        ($w == [$r.weights[$in[]]]) and all($pad[]; $r.weights[.] == 0 and $r.ids[.] == 0))'

# --- determinism, inputs ----------------------------------------------------

pack -n 128 -s 5 -o a.pack big.toks && pack -n 128 -s 5 -o b.pack big.toks
check "same input and seed: same bytes" cmp -s a.pack b.pack
pack -n 128 -s 6 -o c.pack big.toks
check "another seed: another row order" test "$(cmp -s a.pack c.pack; echo $?)" -eq 1
pack -n 128 -s 5 <big.toks >d.pack
check "stdin is the default input" cmp -s a.pack d.pack
pack -n 128 -s 5 - <big.toks >d.pack
check "'-' is stdin" cmp -s a.pack d.pack
zstd -q -c big.toks >big.toks.zst
pack -n 128 -s 5 -o e.pack big.toks.zst
check "zstd-compressed input is read transparently" cmp -s a.pack e.pack
zstd -q -c a.pack >a.pack.zst
pack --dump a.pack.zst >z.dump && pack --dump a.pack >p.dump
check "--dump reads a compressed packed file" cmp -s z.dump p.dump
head -n 100 big.jsonl | toks 1000 >p1.toks
tail -n +101 big.jsonl | toks 1000 >p2.toks
pack -m concat -n 16 --no-shuffle p1.toks p2.toks | pack --dump | jq -s -c 'map(.ids)' >two.json
jq -s -c '[.[].ids[]] as $a | [range(0; ($a|length) - ($a|length) % 16; 16) as $i |
    $a[$i:$i + 16]]' big.jsonl >two.want
check "several inputs are read in order" cmp -s two.json two.want

# --- bad input ----------------------------------------------------------------

size=$(wc -c <small.toks)
head -c $((size - 3)) small.toks >cut.toks
expect_exit 2 "a truncated stream exits 2, one line" pack -n 8 -o out.pack cut.toks
check "  ... names the truncation" grep -q "truncated token stream 'cut.toks'" err
check "  ... and writes no output" test ! -e out.pack
head -c 200 small.toks >cut2.toks
expect_exit 2 "a stream cut mid-record exits 2" pack -n 8 cut2.toks
printf 'hello\n' >text.toks
expect_exit 2 "a text file exits 2 (bad magic)" pack -n 8 text.toks
check "  ... saying bad magic" grep -q "bad magic" err
s='{"format":"qlora-tokens","version":2,"vocab_size":100}'
while [ $(( (${#s} + 1) % 8 )) -ne 0 ]; do s="$s "; done
printf '%s\n' "$s" >v2.toks
expect_exit 2 "a future stream version exits 2" pack -n 8 v2.toks
check "  ... with a hint to regenerate" grep -q "hint: regenerate with tok" err
printf '%s\n' '[1,5,2]' | toks 200 feedc0de >other.toks
expect_exit 2 "inputs of different vocabularies exit 2" pack -n 8 small.toks other.toks
check "  ... naming the second" grep -q "other.toks' has another vocabulary" err
expect_exit 2 "--vocab mismatch exits 2" pack -n 8 --vocab 32000 small.toks
check "  ... naming the size" grep -q "vocab_size 100, not 32000" err
pack -n 8 --vocab 100 small.toks >/dev/null
check "--vocab match packs" test $? -eq 0
expect_exit 2 "a length over the format's maximum exits 2" pack -n 2000000 small.toks
check "  ... saying so" grep -q "over the packed format's maximum 1048576" err
expect_exit 2 "a length of 1 exits 2" pack -n 1 small.toks
expect_exit 2 "a missing input exits 2" pack -n 8 nosuch.toks
expect_exit 2 "--dump of a token stream exits 2" pack --dump small.toks
check "  ... saying it is another format" grep -q "another qlora format" err
size=$(wc -c <small.pack)
head -c $((size - 1)) small.pack >cut.pack
expect_exit 2 "--dump of a truncated packed file exits 2" pack --dump cut.pack
check "  ... and prints nothing" test ! -s out
expect_exit 2 "--stats of a missing file exits 2" pack --stats nosuch.pack
if [ -w /dev/full ]; then
    expect_exit 2 "a full disk is an error" sh -c 'pack -n 8 small.toks >/dev/full'
fi
pack -n 64 -q small.toks >none.pack; rc=$?
check "a stream shorter than a concat row: no rows, exit 0" test $rc -eq 0
pack -m concat -n 64 small.toks 2>err | pack --stats >none.json
check "  ... warns, and the file has 0 rows" \
    sh -c 'grep -q "warning: no rows" err && jq -e ".rows == 0" none.json >/dev/null'

# --- the real pipeline: Dolly, the man page's examples -----------------------

if ! have_shared; then
    skip "Dolly: $SHARED not present"
elif [ ! -x "$TOP/bin/tok" ] || [ ! -x "$TOP/bin/dolly-fmt" ]; then
    skip "Dolly: bin/tok or bin/dolly-fmt not built"
else
    zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | dolly-fmt |
        tok -m "$SHARED/models/llama2-tokenizer/tokenizer.model" >dolly.toks
    # pack(1) EXAMPLES
    pack -n 2048 --eval-fraction 0.02 --eval-out eval.pack -o train.pack dolly.toks
    pack --stats train.pack eval.pack | jq -c '{split, rows, efficiency}' >ex1.json
    check "EXAMPLES: train and eval packs" jqe -s 'length == 2 and .[0].split == "train"
        and .[1].split == "eval" and .[0].efficiency > 0.99' ex1.json
    pack -m concat -l all -n 2048 -o seed.pack dolly.toks
    check "EXAMPLES: the seed's packing" test -s seed.pack
    pack --dump train.pack | head -n 1 |
        jq -c '.ids as $i | .spans[] | $i[.[0]:.[0]+.[1]]' >ex3.json
    check "EXAMPLES: the documents of the first row start with BOS" \
        jqe -s 'length > 0 and all(.[]; .[0] == 1)' ex3.json

    tok --dump dolly.toks | jq -c '.ids' >dolly.docs
    pack -n 9000 --overlong split --no-shuffle dolly.toks | pack --stats >s.json
    check "Dolly: 15,011 records, 2,345,082 tokens" \
        jqe '.documents == 15011 and .tokens == 2345082 and .truncated == 0' s.json
    # bfd: every record whole and once across train and eval (no record
    # reaches 9000 tokens, so none is cut)
    pack -n 9000 -s 3 --eval-fraction 0.05 --eval-out e9.pack -o t9.pack dolly.toks
    pack --dump t9.pack e9.pack | jq -c '.ids as $i | .spans[] | $i[.[0]:.[0]+.[1]]' |
        sort >got.docs
    sort dolly.docs >want.docs
    check "Dolly bfd: train + eval documents are exactly the records" cmp -s got.docs want.docs
    # concat: the rows are the first rows * 2048 ids of the concatenation
    pack -m concat -n 2048 --no-shuffle dolly.toks | pack --dump | jq -c '.ids[]' >c.ids
    jq -c '.[]' dolly.docs | head -n "$(wc -l <c.ids)" >w.ids
    check "Dolly concat: rows are the chunking of the concatenation" \
        sh -c 'test "$(wc -l <c.ids)" -eq $((1145 * 2048)) && cmp -s c.ids w.ids'
    for m in bfd concat; do
        pack -m $m -n 2048 dolly.toks | pack --stats >"$m.json"
        ok "Dolly at 2048, $m: $(jq -c '{rows, efficiency, truncated, dropped_tokens}' "$m.json")"
    done
    check "Dolly at 2048: bfd 1143 rows, concat 1145" \
        sh -c 'jq -e ".rows == 1143" bfd.json >/dev/null && jq -e ".rows == 1145" concat.json >/dev/null'
fi
