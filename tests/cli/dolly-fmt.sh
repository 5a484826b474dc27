# dolly-fmt.sh: CLI tests of dolly-fmt(1): usage errors first, then golden
# outputs of each template and option on small inline fixtures, then bad
# input, the man page's EXAMPLES, and the whole Dolly file checked record by
# record against an independent jq implementation of the seed template.
. "$TOP/tests/cli/lib.sh"

if [ ! -x "$TOP/bin/dolly-fmt" ]; then
    notok "dolly-fmt: not built"
    exit 1
fi

# jqe FILTER FILE: jqe without printing the result.
jqe() { jq -e "$@" >/dev/null; }

# --- usage ------------------------------------------------------------------

# usage_error NAME ARGS...: exit 2, nothing on stdout, a first line
# "dolly-fmt: ..." and then the usage on stderr.
usage_error() {
    n=$1; shift
    dolly-fmt "$@" >out 2>err </dev/null; rc=$?
    if [ $rc -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^dolly-fmt: ' &&
        sed -n 2p err | grep -q '^usage: dolly-fmt '; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}
usage_error "bad flag exits 2 with the usage" --no-such-flag
usage_error "bad short flag exits 2" -x
usage_error "missing option argument exits 2" -t
usage_error "bad --field exits 2" -f instruction
usage_error "empty --field key exits 2" -f instruction=
usage_error "empty category exits 2" -c open_qa,,closed_qa
usage_error "--print-template with operands exits 2" --print-template x.jsonl

dolly-fmt --help >out 2>err; rc=$?
check "--help exits 0, nothing on stderr" test $rc -eq 0 -a ! -s err
check "--help: usage on stdout" grep -q "^usage: dolly-fmt " out
check "--help lists the options" grep -q -- '--prompt-only' out
dolly-fmt -V >out 2>err
check "-V prints the version" grep -q '^dolly-fmt [0-9]' out

# --- fixtures ---------------------------------------------------------------

# Two Dolly-like records, a blank line, one with empty context, non-ASCII,
# escapes, and a whitespace-only line at the end.
printf '%s\n' \
    '{"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced services on 31 August 2000.", "response": "On 31 August 2000.", "category": "closed_qa"}' \
    '' \
    '{"instruction":"Name a fish","context":"","response":"Tope \"the shark\"\tis one.\nAlso caf\u00e9 \ud83d\ude00","category":"classification"}' \
    '{"category":"open_qa","response":"42","instruction":"Answer?","extra":[1,{"x":null}]}' \
    '  ' >in.jsonl

# Expected outputs are JSON text, so the single-quoted strings below hold the
# escapes (\n, \") exactly as dolly-fmt must write them.
SEED='### Instruction:\nUse the Input below to create an instruction, which could have been used to generate the input using an LLM. \n\n### Input:\n'
ALP1='Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n'
ALP0='Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n'
R1='On 31 August 2000.'
R2='Tope \"the shark\"\tis one.\nAlso café 😀'
I1='When did Virgin Australia start operating?'
C1='Virgin Australia commenced services on 31 August 2000.'
RESP='\n\n### Response:\n'
printf '%s\n' \
    "{\"prompt\": \"$SEED$R1$RESP\", \"completion\": \"$I1\\n\"}" \
    "{\"prompt\": \"$SEED$R2$RESP\", \"completion\": \"Name a fish\\n\"}" \
    "{\"prompt\": \"${SEED}42$RESP\", \"completion\": \"Answer?\\n\"}" >seed.expected
printf '%s\n' \
    "{\"prompt\": \"$ALP1$I1\\n\\n### Input:\\n$C1$RESP\", \"completion\": \"$R1\\n\"}" \
    "{\"prompt\": \"${ALP0}Name a fish$RESP\", \"completion\": \"$R2\\n\"}" \
    "{\"prompt\": \"${ALP0}Answer?$RESP\", \"completion\": \"42\\n\"}" >alpaca.expected

dolly-fmt in.jsonl >out 2>err; rc=$?
check "seed: exit 0, quiet" test $rc -eq 0 -a ! -s err
if cmp -s out seed.expected; then ok "seed: golden output"; else
    notok "seed: golden output"; diff out seed.expected | head -n 10 | sed 's/^/    /'; fi
dolly-fmt <in.jsonl >out2
check "seed: stdin is the same" cmp -s out out2
dolly-fmt - <in.jsonl >out2
check "seed: '-' is stdin" cmp -s out out2
dolly-fmt -t seed in.jsonl >out2
check "-t seed is the default" cmp -s out out2
check "seed: 3 records, blank lines skipped" [ "$(wc -l <out)" -eq 3 ]
check "seed: decoded text" jqe -s \
    '.[1].prompt | contains("Tope \"the shark\"\tis one.\nAlso café 😀\n\n### Response:\n")' out
zstd -q -c in.jsonl >in.jsonl.zst
dolly-fmt in.jsonl.zst >out2
check "zstd input is read transparently" cmp -s out out2
dolly-fmt in.jsonl in.jsonl.zst >out2
check "several files are concatenated" [ "$(wc -l <out2)" -eq 6 ]

# alpaca: with and without context.
dolly-fmt -t alpaca in.jsonl >out
if cmp -s out alpaca.expected; then ok "alpaca: golden output"; else
    notok "alpaca: golden output"; diff out alpaca.expected | head | sed 's/^/    /'; fi

# --prompt-only, with fields of the completion absent.
printf '{"response":"Dear Bob,\\nthanks."}\n' | dolly-fmt -p >out
printf '%s\n' "{\"prompt\": \"${SEED}Dear Bob,\\nthanks.$RESP\"}" >exp
check "--prompt-only: golden output, completion fields not needed" cmp -s out exp
dolly-fmt --prompt-only in.jsonl >out
check "--prompt-only: no completion member" \
    jqe -s 'length == 3 and all(.[]; keys == ["prompt"])' out

# --category
dolly-fmt -c open_qa,closed_qa in.jsonl >out
check "--category keeps the listed categories" \
    jqe -s '[.[].completion] == ["When did Virgin Australia start operating?\n", "Answer?\n"]' out
dolly-fmt -c classification -c open_qa in.jsonl >out
check "--category is repeatable" [ "$(wc -l <out)" -eq 2 ]
dolly-fmt -c brainstorming in.jsonl >out
check "--category with no match writes nothing" [ ! -s out ]
printf '{"instruction":"a","response":"b"}\n' >nocat.jsonl
expect_exit 2 "--category: record without category is malformed" \
    dolly-fmt -c open_qa nocat.jsonl
check "--category: message names file:line and field" \
    grep -qx "dolly-fmt: nocat.jsonl:1: missing field 'category' used by --category" err

# field renaming
printf '{"question":"Why?","answer":"Because.","topic":"qa"}\n' >qa.jsonl
dolly-fmt -f instruction=question -f response=answer qa.jsonl >out
check "--field renames template fields" \
    jqe '.completion == "Why?\n" and (.prompt | endswith("### Input:\nBecause.\n\n### Response:\n"))' out
dolly-fmt -f instruction=question -f response=answer -f category=topic -c qa qa.jsonl >out
check "--field applies to category" [ "$(wc -l <out)" -eq 1 ]
dolly-fmt -f instruction=nope -f instruction=question -f response=answer qa.jsonl >out
check "--field: the last renaming wins" [ "$(wc -l <out)" -eq 1 ]
expect_exit 2 "--field: missing renamed field" dolly-fmt -f response=answer qa.jsonl
check "--field: message names key and template field" grep -qx \
    "dolly-fmt: qa.jsonl:1: missing field 'instruction' used by template 'seed'" err
expect_exit 2 "--field: missing key after renaming" \
    dolly-fmt -f instruction=q -f response=answer qa.jsonl
check "--field: message names the key and the template field" grep -qx \
    "dolly-fmt: qa.jsonl:1: missing field 'q' (template field 'instruction') used by template 'seed'" err

# template files
printf 'Q: {question}\n{{literal}} {#ctx}[{ctx}]{/ctx}{^ctx}(none){/ctx}\nA: {@completion}{answer}\n' >my.tpl
printf '%s\n' '{"question":"q1","answer":"a1","ctx":"c"}' \
    '{"question":"q2","answer":"a2"}' '{"question":"q3","answer":"a3","ctx":null}' \
    '{"question":"q4","answer":"a4","ctx":""}' >t.jsonl
dolly-fmt -t my.tpl t.jsonl >out
printf '%s\n' \
    '{"prompt": "Q: q1\n{literal} [c]\nA: ", "completion": "a1\n"}' \
    '{"prompt": "Q: q2\n{literal} (none)\nA: ", "completion": "a2\n"}' \
    '{"prompt": "Q: q3\n{literal} (none)\nA: ", "completion": "a3\n"}' \
    '{"prompt": "Q: q4\n{literal} (none)\nA: ", "completion": "a4\n"}' >exp
check "template file: placeholders, sections, escapes" cmp -s out exp
dolly-fmt --print-template >seed.tpl
dolly-fmt -t ./seed.tpl in.jsonl >out
check "--print-template seed as a file gives the same output" cmp -s out seed.expected
dolly-fmt --print-template -t alpaca >alpaca.tpl
dolly-fmt -t alpaca.tpl in.jsonl >out
dolly-fmt -t alpaca in.jsonl >out2
check "--print-template alpaca as a file gives the same output" cmp -s out out2
printf 'no final newline {@completion}{answer}' >nonl.tpl
dolly-fmt -t nonl.tpl t.jsonl | head -n 1 >out
check "template text is used byte for byte" \
    jqe '.prompt == "no final newline " and .completion == "a1"' out

# bad_template NAME TEXT MESSAGE
bad_template() {
    printf '%s' "$2" >bad.tpl
    expect_exit 2 "bad template: $1" dolly-fmt -t bad.tpl t.jsonl &&
        if grep -qxF "dolly-fmt: $3" err; then ok "bad template message: $1"; else
            notok "bad template message: $1"; sed 's/^/    got: /' err; fi
}
bad_template "unknown placeholder" 'x {@foo} {@completion}' "bad.tpl:1:3: unknown placeholder '{@foo}'"
bad_template "invalid placeholder" 'x\n {a b}{@completion}' "bad.tpl:1:5: invalid placeholder '{a b}' (write '{{' for a brace)"
bad_template "stray brace" 'a } b{@completion}' "bad.tpl:1:3: stray '}' (write '}}' for a brace)"
bad_template "unterminated placeholder" 'a {b{@completion}' "bad.tpl:1:3: invalid placeholder '{b{@completion}' (write '{{' for a brace)"
bad_template "no marker" 'just {question}' "bad.tpl:1:16: no {@completion} marker (it starts the completion)"
bad_template "two markers" '{@completion}{@completion}' "bad.tpl:1:14: second {@completion} marker"
bad_template "marker in section" '{#a}{@completion}{/a}' "bad.tpl:1:5: {@completion} inside a section"
bad_template "unclosed section" '{@completion}{#a}x' "bad.tpl:1:14: section 'a' not closed"
bad_template "mismatched close" '{@completion}{#a}x{/b}' "bad.tpl:1:19: '{/b}' does not close the open section"
bad_template "unopened close" '{@completion}{/a}' "bad.tpl:1:14: '{/a}' closes no section"
expect_exit 2 "missing template file" dolly-fmt -t nosuch.tpl t.jsonl
check "missing template file: message" grep -q "^dolly-fmt: cannot open 'nosuch.tpl'" err
printf '{@completion}{answer}{nosuch}\n' >unk.tpl
expect_exit 2 "field unknown to the record" dolly-fmt -t unk.tpl t.jsonl
check "field unknown to the record: names file:line, field and template" grep -qx \
    "dolly-fmt: t.jsonl:1: missing field 'nosuch' used by template 'unk.tpl'" err

# --- bad input --------------------------------------------------------------

printf '%s\n' '{"instruction":"a","response":"b"}' '{"instruction":"a" "response":"b"}' \
    '{"instruction":"c","response":"d"}' >bad.jsonl
expect_exit 2 "malformed line exits 2" dolly-fmt bad.jsonl
check "malformed line: message names file:line:col" grep -qx \
    "dolly-fmt: bad.jsonl:2:20: expected ',' or '}' in object" err
expect_exit 2 "malformed line on stdin" dolly-fmt <bad.jsonl
check "malformed line on stdin: named <stdin>" grep -q '^dolly-fmt: <stdin>:2:20: ' err
expect_exit 2 "-o: malformed line exits 2" dolly-fmt -o result.jsonl bad.jsonl
check "-o: no file left on error" [ ! -e result.jsonl ]
check "-o: no temporary file left" [ "$(ls | grep -c result)" -eq 0 ]
echo old >result.jsonl
dolly-fmt -o result.jsonl bad.jsonl 2>/dev/null
check "-o: an existing file is untouched on error" [ "$(cat result.jsonl)" = old ]
dolly-fmt -o result.jsonl in.jsonl
check "-o writes the file" cmp -s result.jsonl seed.expected

dolly-fmt -s bad.jsonl >out 2>err; rc=$?
check "--skip-bad: exit 0, good records kept" test $rc -eq 0 -a "$(wc -l <out)" -eq 2
check "--skip-bad: reports the count" grep -qx 'dolly-fmt: skipped 1 malformed line' err
dolly-fmt -s -q bad.jsonl >out 2>err
check "--skip-bad -q: silent" [ ! -s err ]
dolly-fmt -s -v bad.jsonl >out 2>err
check "--skip-bad -v: names each skipped line" grep -q 'bad.jsonl:2:20' err

# bad_input NAME EXPECTED-MESSAGE-TAIL: the line in bad1.jsonl (line 2).
bad_input() {
    expect_exit 2 "bad input: $1" dolly-fmt bad1.jsonl &&
        if grep -qxF "dolly-fmt: bad1.jsonl:$2" err; then ok "bad input message: $1"; else
            notok "bad input message: $1"; sed 's/^/    got: /' err; fi
}
good='{"instruction":"a","response":"b"}'
printf '%s\n[1]\n' "$good" >bad1.jsonl;  bad_input "array record" "2:1: record is an array, not an object"
printf '%s\n"s"\n' "$good" >bad1.jsonl;  bad_input "string record" "2:1: record is a string, not an object"
printf '%s\n{"instruction":1,"response":"b"}\n' "$good" >bad1.jsonl
bad_input "number field" "2: field 'instruction' is a number, not a string"
printf '%s\n{"instruction":"a","response":null}\n' "$good" >bad1.jsonl
bad_input "null field" "2: missing field 'response' used by template 'seed'"
printf '%s\n{"instruction":"a","response":"b"} x\n' "$good" >bad1.jsonl
bad_input "trailing garbage" "2:36: trailing characters after JSON value"
printf '%s\n{"instruction":"a","response":"\300\257"}\n' "$good" >bad1.jsonl
bad_input "overlong UTF-8" "2:32: invalid UTF-8: overlong encoding"
printf '%s\n{"instruction":"a","response":"\355\240\200"}\n' "$good" >bad1.jsonl
bad_input "encoded surrogate" "2:32: invalid UTF-8: encoded surrogate"
printf '%s\n{"instruction":"a","response":"\\ud800"}\n' "$good" >bad1.jsonl
bad_input "unpaired surrogate escape" "2:32: unpaired high surrogate in \\u escape"
printf '%s\n{"instruction":"a","response":"b\001"}\n' "$good" >bad1.jsonl
bad_input "control character" "2:33: control character in string"
printf '%s\n{"instruction":"a","response":"b' "$good" >bad1.jsonl
bad_input "truncated last line" "2:33: unterminated string"
printf '%s\n{"instruction":"a","response":"b","n":01}\n' "$good" >bad1.jsonl
bad_input "leading zero" "2:39: invalid number: leading zero"
printf '%s\n{"instruction":"a","response":"b","n":1}\r\n' "$good" >crlf.jsonl
dolly-fmt crlf.jsonl >out
check "CRLF line endings are accepted" [ "$(wc -l <out)" -eq 2 ]
: >empty.jsonl
dolly-fmt empty.jsonl >out 2>err; rc=$?
check "empty input: no output, exit 0" test $rc -eq 0 -a ! -s out -a ! -s err
if [ -w /dev/full ]; then
    expect_exit 2 "a full disk is reported" sh -c 'dolly-fmt in.jsonl >/dev/full'
else
    skip "a full disk is reported: no /dev/full"
fi
expect_exit 2 "missing input file" dolly-fmt nosuch.jsonl
check "missing input file: message" grep -q "^dolly-fmt: cannot open 'nosuch.jsonl'" err

# --- the man page's EXAMPLES run --------------------------------------------

mkdir ex && cd ex || exit 2
zstd -q -c ../in.jsonl >databricks-dolly-15k.jsonl.zst
mkdir mails && printf 'Dear Ann,\nsee you.\n' >mails/a.txt && printf 'Hi\n' >mails/b.txt
cp ../qa.jsonl qa-pairs.jsonl
awk '/^\.Sh EXAMPLES/{e=1;next} /^\.Sh /{e=0} e&&/^\.Bd/{b=1;next} e&&/^\.Ed/{b=0} e&&b' \
    "$TOP/man/dolly-fmt.1" >examples.sh
nex=0
while IFS= read -r cmd; do
    nex=$((nex + 1))
    if sh -c "$cmd" >ex.out 2>ex.err && [ ! -s ex.err ]; then
        ok "man EXAMPLES $nex runs"
    else
        notok "man EXAMPLES $nex: $cmd"; sed 's/^/    /' ex.err
    fi
done <examples.sh
check "man EXAMPLES: there are some" [ "$nex" -ge 5 ]
check "man EXAMPLES: generation inputs" jqe -s \
    'length == 2 and (.[0].prompt | contains("### Input:\nDear Ann,\nsee you.\n\n\n### Response:\n"))' inputs.jsonl
check "man EXAMPLES: alpaca file" [ "$(wc -l <qa.jsonl)" -eq 2 ]
cd .. || exit 2

# --- the whole Dolly file ---------------------------------------------------

DOLLY="$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst"
if [ ! -f "$DOLLY" ]; then
    skip "full Dolly check: $DOLLY absent (no ../shared)"
    exit 0
fi
zstd -dc "$DOLLY" | dolly-fmt >dolly.out 2>err; rc=$?
check "Dolly: exit 0, nothing on stderr" test $rc -eq 0 -a ! -s err
check "Dolly: 15,011 records" [ "$(wc -l <dolly.out)" -eq 15011 ]
# The independent implementation: jq builds prompt and completion from each
# raw record; both sides are normalised by jq -c and compared as a whole.
zstd -dc "$DOLLY" | jq -c '{prompt: ("### Instruction:\nUse the Input below to create an instruction, which could have been used to generate the input using an LLM. \n\n### Input:\n" + .response + "\n\n### Response:\n"), completion: (.instruction + "\n")}' >dolly.jq
jq -c . dolly.out >dolly.norm
if cmp -s dolly.norm dolly.jq; then
    ok "Dolly: every record equals the seed template filled by jq"
else
    notok "Dolly: records differ from the jq seed template"
    cmp dolly.norm dolly.jq | sed 's/^/    /'
fi
check "Dolly: 8,805,051 bytes of text (REFERENCE.md)" \
    [ "$(jq -j '.prompt + .completion' dolly.out | wc -c)" -eq 8805051 ]
bin_prompt=$(jq -r -s 'map(.prompt | endswith("### Response:\n")) | all' dolly.out)
check "Dolly: every prompt ends with the Response header and a newline" [ "$bin_prompt" = true ]
