# tests/cli/crash-resume.sh: lora-train survives kill -9 (CPU).
#
#   - A run killed with SIGKILL at seeded random moments and continued
#     each time with --resume ends with an adapter byte-identical (cmp) to
#     an uninterrupted run's. CRASH_SEED picks other moments.
#   - A checkpoint whose files were damaged after it was written (one byte
#     of the optimizer state, of the adapter, of trainer_state.json) is
#     refused on --resume: exit 2, one line, naming the checkpoint.
#   - Numerical guards: a base model that makes the loss non-finite never
#     gives a silent NaN adapter: training stops (exit 2, one line saying
#     the loss or gradient is not finite; on_nonfinite=stop, the default),
#     or with on_nonfinite=skip the steps are skipped, counted in the
#     metrics (skipped_steps) and the adapter written is finite.
. "$TOP/tests/cli/lib.sh"

for t in lora-train dolly-fmt tok pack; do
    if [ ! -x "$TOP/bin/$t" ]; then
        skip "crash-resume: $t not built"
        exit 0
    fi
done
if ! have_shared; then
    skip "crash-resume: no shared data in '$SHARED'"
    exit 0
fi
S260=$SHARED/models/stories260K
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 20 | dolly-fmt |
    tok -m "$S260/tokenizer.model" | pack -q -l all -n 128 >t.packed ||
    { notok "crash-resume: fixture"; exit 0; }

# 10 steps of about 0.1-0.3 s each, a checkpoint after every step
SETS="-s max_steps=10 -s save_steps=1 -s per_device_train_batch_size=2 -s logging_steps=1 -s lora_dropout=0.1"
train() { # OUTDIR [args...]
    d=$1; shift
    lora-train -q -m "$S260" -o "$d" $SETS "$@" t.packed
}
# the adapter's tensor data as floats, one a line
floats() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +$((9 + n)) "$1" | od -An -v -f | tr -s ' ' '\n' | grep -v '^$'
}

train ref >ref.jsonl 2>ref.err || { notok "crash-resume: uninterrupted run: $(cat ref.err)"; exit 0; }

# --- kill -9 at seeded random moments, then --resume --------------------------
# Round i waits until the run has saved checkpoint k_i (k = 1 or 2, 3 or 4,
# 5 or 6, 7 or 8, drawn from the seed), then lets it run a random 0-250 ms
# more (into the next step, or into writing a checkpoint) and kills it.
seed=${CRASH_SEED:-11}
plan=$(awk -v s="$seed" 'BEGIN { srand(s)
    for (i = 0; i < 4; i++) printf "%d %.3f\n", 2 * i + 1 + int(rand() * 2), rand() * 0.25 }')
echo "$plan" >plan
crash_loop 0.02 lora-train -q -m "$S260" -o run $SETS
r=
has_checkpoint run && r=--resume
if [ "$kills" -eq 0 ]; then
    notok "crash-resume: no kill landed (seed $seed)"
elif train run $r >/dev/null 2>>run.err; then
    ok "crash-resume: resumed after $kills kills (seed $seed: after checkpoint, delay: $(echo $(cat plan)))"
else
    notok "crash-resume: final --resume failed"
    sed 's/^/    /' run.err | tail -n 5
fi
check "crash-resume: adapter identical to the uninterrupted run's (cmp)" \
    cmp -s ref/adapter_model.safetensors run/adapter_model.safetensors
check "crash-resume: adapter_config.json identical" \
    cmp -s ref/adapter_config.json run/adapter_config.json

# --- damaged checkpoints are refused ---------------------------------------------
# resume from checkpoint 6 of the reference run, after damaging a copy
ck=ref/checkpoint-6
if [ ! -f "$ck/trainer_state.json" ]; then
    notok "crash-resume: no $ck to damage"
else
    expect_exit 0 "crash-resume: an intact checkpoint is accepted" train ok6 --resume="$ck"
    check "crash-resume: resuming from step 6 gives the same adapter" \
        cmp -s ref/adapter_model.safetensors ok6/adapter_model.safetensors
    # flip_last FILE: changes the last byte (tensor data, or the JSON's
    # final newline/brace) without changing the size
    flip_last() {
        sz=$(wc -c <"$1")
        b=$(tail -c 1 "$1" | od -An -t u1 | tr -d ' ')
        printf "\\$(printf '%03o' $(((b + 1) % 256)))" |
            dd of="$1" bs=1 seek=$((sz - 1)) conv=notrunc 2>/dev/null
    }
    # flip_mid FILE: changes a byte in the middle of the tensor data
    flip_mid() {
        n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
        sz=$(wc -c <"$1")
        off=$(((8 + n + sz) / 2))
        b=$(tail -c +$((off + 1)) "$1" | head -c 1 | od -An -t u1 | tr -d ' ')
        printf "\\$(printf '%03o' $(((b ^ 4) % 256)))" |
            dd of="$1" bs=1 seek="$off" conv=notrunc 2>/dev/null
    }
    for what in optimizer.safetensors adapter_model.safetensors; do
        rm -rf bad && cp -r "$ck" bad && chmod -R u+w bad
        flip_mid "bad/$what"
        expect_exit 2 "crash-resume: checkpoint with a damaged $what refused" \
            train out-bad --resume=bad
    done
    rm -rf bad && cp -r "$ck" bad && chmod -R u+w bad
    sed 's/"global_step": *6/"global_step": 7/' "$ck/trainer_state.json" >bad/trainer_state.json
    if cmp -s "$ck/trainer_state.json" bad/trainer_state.json; then
        notok "crash-resume: could not edit global_step in trainer_state.json"
    else
        expect_exit 2 "crash-resume: checkpoint with an edited trainer_state.json refused" \
            train out-bad --resume=bad
    fi
    rm -rf bad && cp -r "$ck" bad && chmod -R u+w bad
    head -c 1000 "$ck/optimizer.safetensors" >bad/optimizer.safetensors
    expect_exit 2 "crash-resume: checkpoint with a truncated optimizer state refused" \
        train out-bad --resume=bad
fi

# --- numerical guards -------------------------------------------------------------
# model.norm.weight[0] = 3e38 (finite): the logits overflow, the loss is NaN
mkdir big && cp "$S260/config.json" "$S260/tokenizer.model" "$S260/model.safetensors" big/ &&
    chmod u+w big/model.safetensors
n=$(od -An -t u8 -N 8 big/model.safetensors | tr -d ' ')
b=$(tail -c +9 big/model.safetensors | head -c "$n" | jq -r '.["model.norm.weight"].data_offsets[0]')
printf '\346\261\141\177' | dd of=big/model.safetensors bs=1 seek=$((8 + n + b)) conv=notrunc 2>/dev/null
lora-train -q -m big -o nan -s max_steps=3 -s per_device_train_batch_size=2 \
    -s logging_steps=1 t.packed >nan.jsonl 2>nan.err
rc=$?
if [ "$rc" -eq 2 ] && [ "$(wc -l <nan.err)" -eq 1 ] && grep -q 'not finite' nan.err; then
    ok "crash-resume: a non-finite loss stops training (on_nonfinite=stop, the default)"
else
    notok "crash-resume: a non-finite loss: exit $rc, expected 2 and one line"
    sed 's/^/    /' nan.err | head -n 5
fi
check "crash-resume: no adapter after a non-finite stop" test ! -e nan/adapter_model.safetensors
lora-train -q -m big -o skip -s max_steps=3 -s per_device_train_batch_size=2 \
    -s logging_steps=1 -s on_nonfinite=skip t.packed >skip.jsonl 2>skip.err
rc=$?
if [ "$rc" -eq 0 ] && [ -f skip/adapter_model.safetensors ] &&
    ! floats skip/adapter_model.safetensors | grep -qi 'nan\|inf'; then
    ok "crash-resume: on_nonfinite=skip skips the steps; the adapter is finite"
else
    notok "crash-resume: on_nonfinite=skip: exit $rc or a non-finite adapter"
    sed 's/^/    /' skip.err | head -n 5
fi
check "crash-resume: skipped steps are counted in the metrics" \
    sh -c "jq -e -s 'last | .skipped_steps == 3' skip.jsonl >/dev/null"
