#!/bin/sh
# tests/fuzz/valgrind.sh: a CPU training run of lora-train under valgrind's
# memcheck: 3 steps on stories260K with a checkpoint, then a --resume from
# it (so loading a checkpoint is covered too). Fails on any memcheck error
# or definite leak. Slow (about 3 minutes on 2 cores), so not part of
# `make test`; results go in tests/fuzz/RESULTS.md.
#
#   sh tests/fuzz/valgrind.sh        (from the project root, after make)
set -u
TOP=$(pwd)
SHARED=${SHARED:-$(cd .. && pwd)/shared}
S260=$SHARED/models/stories260K
PATH="$TOP/bin:$PATH"
command -v valgrind >/dev/null || { echo "valgrind.sh: no valgrind (apt-get install valgrind)" >&2; exit 2; }
[ -d "$S260" ] || { echo "valgrind.sh: no $S260" >&2; exit 2; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 20 | dolly-fmt |
    tok -m "$S260/tokenizer.model" | pack -q -l all -n 128 >"$W/t.packed" || exit 2

# lora-train re-executes itself to set OMP_WAIT_POLICY unless it is set;
# valgrind cannot follow that exec, so set it here.
export OMP_WAIT_POLICY=passive
vg() {
    name=$1; shift
    start=$(date +%s)
    valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
        --log-file="$W/$name.vg" "$@" >"$W/$name.out" 2>"$W/$name.err"
    rc=$?
    t=$(($(date +%s) - start))
    errs=$(grep -c 'ERROR SUMMARY: [1-9]\|definitely lost: [1-9]' "$W/$name.vg")
    if [ "$rc" -eq 0 ] && [ "$errs" -eq 0 ]; then
        echo "valgrind.sh: $name: clean ($t s)"
    else
        echo "valgrind.sh: $name: exit $rc" >&2
        cat "$W/$name.err" "$W/$name.vg" >&2
        failed=1
    fi
}
failed=0
T="lora-train -m $S260 -o $W/out -s max_steps=3 -s save_steps=2 -s per_device_train_batch_size=2 -s logging_steps=1"
vg train $T "$W/t.packed"
vg resume $T --resume "$W/t.packed"
cmp -s "$W/train.out" /dev/null && { echo "valgrind.sh: no metrics" >&2; failed=1; }
tail -n 1 "$W/train.out"
tail -n 1 "$W/resume.out"
exit "$failed"
