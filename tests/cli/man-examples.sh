# man-examples.sh: every EXAMPLES pipeline of every manual page runs.
#
# Each .Bd -literal block (and .Dl line) of a page's EXAMPLES section is one
# shell script (sh -e; one of our tools failing inside a pipeline counts
# too), run in order in a directory of its own that holds small stand-ins
# for the files the examples name (the world below): Dolly is the demo's 32
# records, the tokenizer and the "7B" checkpoint are mkfixture's. A block
# whose first word is not a command (sample output, a YAML file) is not run;
# "$ " prompts are removed and lines after them without one (output) are
# dropped; mdoc escapes are undone. A page of a tool that is not built is
# skipped, and so is a block that calls a project tool not built yet, or
# needs ../shared when it is absent, or a program or python module that is
# missing, or follows a comment line in the page source
#     .\" example-skip: why it cannot run on the small stand-ins
#
# The world, for writers of examples: databricks-dolly-15k.jsonl(.zst),
# train.jsonl (formatted), tokenizer.model, Llama-2-7b-hf (also
# llama-2-7b-hf, model, base: a checkpoint directory), llama-nf4 (also
# base-nf4, llama-2-7b-nf4: its NF4 form), stories260K (the same small
# checkpoint: it fits the world's tokenizer), adapter (a PEFT adapter on
# Llama-2-7b-hf), train.tok, dolly.tok, train.pack (rows of 64 tokens;
# also dolly.pack), split.pack with eval.pack, inputs.jsonl, inputs.tok,
# mails/*.txt, qa-pairs.jsonl ({question, answer}) and examples/ (the
# project's).
. "$TOP/tests/cli/lib.sh"

TOOLS="dolly-fmt tok pack nf4-quant lora-train lora-gen lora-merge"
BUILD=${BUILD:-build}
case $BUILD in /*) MK=$BUILD/mkfixture ;; *) MK=$TOP/$BUILD/mkfixture ;; esac
built() { [ -x "$TOP/bin/$1" ]; }
if ! command -v mandoc >/dev/null 2>&1; then
    skip "man page examples: no mandoc"
fi

# --- the world ----------------------------------------------------------------

mkdir world && cd world || exit 2
ln -s "$TOP/examples" examples
cp "$TOP/examples/demo/train.jsonl" databricks-dolly-15k.jsonl
zstd -q databricks-dolly-15k.jsonl
mkdir mails
printf 'Dear Ann,\nthe meeting moves to Friday.\nBest, Bob\n' >mails/friday.txt
printf 'Our garden had its first tomatoes today.\n' >mails/garden.txt
jq -c '{question: .instruction, answer: .response}' databricks-dolly-15k.jsonl >qa-pairs.jsonl
if built dolly-fmt; then
    dolly-fmt -o train.jsonl databricks-dolly-15k.jsonl
    for f in mails/*.txt; do jq -cRs '{response: .}' "$f"; done | dolly-fmt -p >inputs.jsonl
    jq -r '.prompt + .completion' train.jsonl >text.txt
else
    jq -r '.instruction, .context, .response' databricks-dolly-15k.jsonl >text.txt
fi
"$MK" tokenizer -n 400 -o tokenizer.model text.txt || exit 2
"$MK" model -s 1 -d 32 -l 1 -H 2 -c 2048 -t tokenizer.model -o Llama-2-7b-hf || exit 2
for n in llama-2-7b-hf model base; do ln -s Llama-2-7b-hf $n; done
if built tok && [ -f train.jsonl ]; then
    tok -m tokenizer.model -o train.tok train.jsonl
    cp train.tok dolly.tok
    tok -m tokenizer.model -o inputs.tok inputs.jsonl
fi
if built nf4-quant; then
    nf4-quant -o llama-nf4 Llama-2-7b-hf && ln -s llama-nf4 base-nf4
fi
if built lora-train; then
    lora-train -q --init-only -s target_modules=all-linear -m Llama-2-7b-hf -o adapter >/dev/null
fi
if built pack && [ -f train.tok ]; then
    pack -n 64 -o train.pack train.tok
    pack -n 64 --eval-fraction 0.1 --eval-out eval.pack -o split.pack train.tok
    cp train.pack dolly.pack
fi
for n in llama-2-7b-nf4 Llama-2-7b-nf4; do [ -d llama-nf4 ] && ln -s llama-nf4 $n; done
ln -s Llama-2-7b-hf stories260K # a small Llama with the world's tokenizer
cd .. || exit 2

# Our tools, through shims that log a failure even in the middle of a
# pipeline (whose status is its last command's); SIGPIPE is no failure.
mkdir shims
for t in $TOOLS; do
    built "$t" || continue
    cat >"shims/$t" <<EOF
#!/bin/sh
"$TOP/bin/$t" "\$@"
rc=\$?
[ \$rc -eq 0 ] || [ \$rc -eq 141 ] || echo "$t exited with status \$rc" >>"$SCRATCH/failures"
exit \$rc
EOF
    chmod +x "shims/$t"
done
PATH=$SCRATCH/shims:$PATH

# --- the pages ------------------------------------------------------------------

# blocks PAGE: the EXAMPLES literal blocks, each ended by a line "@@END@@".
blocks() {
    awk '/^\.Sh EXAMPLES/ { e = 1; next }
         /^\.Sh / { e = 0 }
         e && !b && /^\.\\" example-skip:/ { sub(/^\.\\" example-skip: */, ""); why = $0 }
         e && /^\.Bd/ { b = 1; if (why != "") print "@@SKIP@@ " why; why = ""; next }
         e && b && /^\.Ed/ { b = 0; print "@@END@@"; next }
         e && b { print }
         e && !b && /^\.Dl / { sub(/^\.Dl /, ""); print; print "@@END@@" }' "$1" |
        sed -e 's/\\e/\\/g' -e "s/\\\\(aq/'/g" -e 's/\\(dq/"/g' -e 's/\\-/-/g' \
            -e 's/\\&//g' -e 's/\\(ti/~/g' -e 's/\\(ha/^/g' -e 's/\\(ga/`/g'
}

# script FILE: a block as a script: "$ " prompts removed and, when there are
# prompts, the lines that are not commands or their continuations dropped.
script() {
    if grep -q '^\$ ' "$1"; then
        awk '/^\$ / { sub(/^\$ /, ""); print; c = /(\||\\|&&)[ \t]*$/; next }
             c { print; c = /(\||\\|&&)[ \t]*$/ }' "$1"
    else
        cat "$1"
    fi
}

# is_command WORD: a shell command, an assignment or one of our tools.
is_command() {
    case $1 in
    "") return 1 ;;
    *=*) return 0 ;;
    esac
    case " $TOOLS " in *" $1 "*) return 0 ;; esac
    command -v "$1" >/dev/null 2>&1
}

npages=0
for page in "$TOP"/man/*.[1-9]; do
    name=$(basename "$page")
    tool=${name%.*}
    if ! grep -q '^\.Sh EXAMPLES' "$page"; then
        skip "$name: no EXAMPLES section"
        continue
    fi
    case " $TOOLS " in
    *" $tool "*)
        if ! built "$tool"; then
            skip "$name: $tool not built yet"
            continue
        fi ;;
    esac
    npages=$((npages + 1))
    rm -rf "run-$name" && cp -RP world "run-$name" && cd "run-$name" || exit 2
    blocks "$page" >all.blocks
    k=0
    : >block
    while IFS= read -r line; do
        if [ "$line" != "@@END@@" ]; then
            printf '%s\n' "$line" >>block
            continue
        fi
        k=$((k + 1))
        why=$(sed -n 's/^@@SKIP@@ //p' block)
        sed -i '/^@@SKIP@@ /d' block
        script block >block.sh
        : >block
        if [ -n "$why" ]; then
            skip "$name example $k: $why"
            continue
        fi
        first=$(awk 'NF { print $1; exit }' block.sh)
        if ! is_command "$first"; then
            echo "# $name example $k: not a command ($first), not run"
            continue
        fi
        missing=""
        for t in $TOOLS; do
            grep -q "\(^\|[^-a-z]\)$t\([^-a-z]\|$\)" block.sh && ! built "$t" &&
                missing="$missing $t"
        done
        if [ -n "$missing" ]; then
            skip "$name example $k: needs$missing, not built yet"
            continue
        fi
        if grep -q '\.\./shared' block.sh; then
            if [ ! -d "$SHARED" ]; then
                skip "$name example $k: needs ../shared ($SHARED absent)"
                continue
            fi
            sed -i "s|\.\./shared|$SHARED|g" block.sh
        fi
        rm -f "$SCRATCH/failures"
        if timeout 60 sh -e block.sh >ex.out 2>ex.err && [ ! -f "$SCRATCH/failures" ]; then
            ok "$name example $k runs"
        elif [ ! -f "$SCRATCH/failures" ] && grep -q ': not found$' ex.err; then
            skip "$name example $k: needs $(sed -n 's/.*: \([^:]*\): not found$/\1/p' ex.err | head -n 1)"
        elif grep -q "ModuleNotFoundError\|No module named" ex.err; then
            skip "$name example $k: $(grep -o "No module named [^ ]*" ex.err | head -n 1)"
        else
            notok "$name example $k"
            sed 's/^/    | /' block.sh
            [ -f "$SCRATCH/failures" ] && sed 's/^/    /' "$SCRATCH/failures"
            tail -n 8 ex.err | sed 's/^/    /'
        fi
    done <all.blocks
    cd .. || exit 2
done
check "man page examples: some pages have examples" [ "$npages" -ge 1 ]
