#!/bin/sh
# own-texts.sh: a folder of one's own texts (mails, posts, answers: one text
# a file) turned into an instruction data set by a trained adapter, which
# writes for each text the instruction that could have produced it; the
# purpose of the reference job.
#
#   sh examples/own-texts.sh [-m model] [-t tokenizer.model] dir adapter > my-dolly.jsonl
#
# The output is Dolly-format JSON Lines, one record a text, in file-name
# order: {"instruction", "context": "", "response", "category": "own",
# "source": file}, ready for dolly-fmt and another round of training. The
# model defaults to the adapter's base_model_name_or_path, the tokenizer to
# the model's tokenizer.model. GEN_FLAGS passes decoding options to
# lora-gen (default: the seed's sampling, top-p 0.9, temperature 0.9, at
# most 100 new tokens) and DEVICE picks cpu or cuda. At its heart, one
# pipeline:
#
#   for f in dir/*; do jq -cRs '{response: .}' "$f"; done |
#       dolly-fmt --prompt-only | tok -m tokenizer.model |
#       lora-gen -m model -a adapter | tok -d -m tokenizer.model
set -eu
TOP=$(cd "$(dirname "$0")/.." && pwd)
PATH=$TOP/bin:$PATH
usage() {
    echo "usage: sh examples/own-texts.sh [-m model] [-t tokenizer.model] dir adapter" >&2
    exit 2
}
model="" tokenizer=""
while getopts m:t: opt; do
    case $opt in
    m) model=$OPTARG ;;
    t) tokenizer=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || usage
dir=$1 adapter=$2
[ -d "$dir" ] || { echo "own-texts: no directory '$dir'" >&2; exit 2; }
[ -f "$adapter/adapter_config.json" ] ||
    { echo "own-texts: no adapter in '$adapter'" >&2; exit 2; }
[ -n "$model" ] || model=$(jq -r '.base_model_name_or_path // empty' "$adapter/adapter_config.json")
[ -n "$model" ] || { echo "own-texts: the adapter names no base model: give -m" >&2; exit 2; }
[ -n "$tokenizer" ] || tokenizer=$model/tokenizer.model
GEN_FLAGS=${GEN_FLAGS:--n 100 --top-p 0.9 --temperature 0.9 --seed 0}
DEVICE=${DEVICE:-cpu}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One record a file; its name rides along (dolly-fmt ignores other members).
for f in "$dir"/*; do
    [ -f "$f" ] && jq -cRs --arg source "$f" '{response: ., source: $source}' "$f"
done >"$tmp/texts.jsonl"
[ -s "$tmp/texts.jsonl" ] || { echo "own-texts: no files in '$dir'" >&2; exit 2; }

dolly-fmt --prompt-only "$tmp/texts.jsonl" | tok -m "$tokenizer" |
    lora-gen --device "$DEVICE" -m "$model" -a "$adapter" $GEN_FLAGS |
    tok -d -m "$tokenizer" >"$tmp/generated.jsonl"

# Each text next to its instruction: the two files line by line, in turn.
paste -d '\n' "$tmp/texts.jsonl" "$tmp/generated.jsonl" |
    jq -c -n 'inputs as $t | input as $g |
        {instruction: (($g.completion // $g.text) | sub("^\\s+"; "") | sub("\\s+$"; "")),
         context: "", response: $t.response, category: "own", source: $t.source}'
