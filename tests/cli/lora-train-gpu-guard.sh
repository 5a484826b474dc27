# lora-train-gpu-guard.sh: the numerical guard of lora-train on the GPU
# (--device cuda) behaves as on the CPU (crash-resume.sh has the CPU's):
#
#   - a base model that makes the loss non-finite (model.norm.weight[0] =
#     3e38: the logits overflow) with on_nonfinite=stop, the default: exit
#     2, one line saying which step's loss is not finite, no adapter; the
#     same step and words as the CPU's;
#   - with on_nonfinite=skip: exit 0, every step skipped and counted in the
#     metrics (skipped_steps), as on the CPU, and the adapter written is the
#     initial one bit for bit on both (nothing was applied);
#   - the count survives a checkpoint: --resume from checkpoint-2 of a
#     skipping run ends with the same count.
# Skips where the tool was built without CUDA or no GPU is present; the
# step-level checks (a skipped step leaves adapter and moments unchanged,
# the next one proceeds) are tests/gpu/nonfinite.c's.
. "$TOP/tests/cli/lib.sh"

for t in lora-train dolly-fmt tok pack; do
    if [ ! -x "$TOP/bin/$t" ]; then
        skip "lora-train-gpu-guard: $t not built"
        exit 0
    fi
done
if ! have_shared; then
    skip "lora-train-gpu-guard: no shared data in '$SHARED'"
    exit 0
fi
S260=$SHARED/models/stories260K
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 20 | dolly-fmt |
    tok -m "$S260/tokenizer.model" | pack -q -l all -n 128 >t.packed ||
    { notok "lora-train-gpu-guard: fixture"; exit 0; }

lora-train -m "$S260" -o probe --device cuda -s max_steps=1 t.packed >/dev/null 2>err
if grep -q -e 'not built with CUDA' -e 'no CUDA device' -e 'cannot use CUDA' err; then
    skip "lora-train-gpu-guard: $(head -n 1 err)"
    exit 0
fi

# model.norm.weight[0] = 3e38 (finite): the logits overflow, the loss is NaN
mkdir big && cp "$S260/config.json" "$S260/tokenizer.model" "$S260/model.safetensors" big/ &&
    chmod u+w big/model.safetensors
n=$(od -An -t u8 -N 8 big/model.safetensors | tr -d ' ')
b=$(tail -c +9 big/model.safetensors | head -c "$n" | jq -r '.["model.norm.weight"].data_offsets[0]')
printf '\346\261\141\177' | dd of=big/model.safetensors bs=1 seek=$((8 + n + b)) conv=notrunc 2>/dev/null

SETS="-s max_steps=3 -s per_device_train_batch_size=2 -s logging_steps=1"
# the adapter's tensor data as floats, one a line
floats() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +$((9 + n)) "$1" | od -An -v -f | tr -s ' ' '\n' | grep -v '^$'
}
lora-train -q --init-only -m big -o init >/dev/null 2>init.err ||
    { notok "lora-train-gpu-guard: --init-only: $(cat init.err)"; exit 0; }
floats init/adapter_model.safetensors >init.floats

for dev in cuda cpu; do
    lora-train -q -m big -o "stop-$dev" --device "$dev" $SETS t.packed \
        >"stop-$dev.jsonl" 2>"stop-$dev.err"
    echo $? >"stop-$dev.rc"
    lora-train -q -m big -o "skip-$dev" --device "$dev" $SETS -s on_nonfinite=skip \
        -s save_steps=2 t.packed >"skip-$dev.jsonl" 2>"skip-$dev.err"
    echo $? >"skip-$dev.rc"
done

# --- on_nonfinite=stop ----------------------------------------------------------
if [ "$(cat stop-cuda.rc)" -eq 2 ] && [ "$(wc -l <stop-cuda.err)" -eq 1 ] &&
    grep -q 'step 1: the loss is not finite' stop-cuda.err; then
    ok "lora-train-gpu-guard: a non-finite loss stops training on the GPU (on_nonfinite=stop)"
else
    notok "lora-train-gpu-guard: GPU non-finite stop: exit $(cat stop-cuda.rc), expected 2 and one line"
    sed 's/^/    /' stop-cuda.err | head -n 5
fi
check "lora-train-gpu-guard: no adapter after a non-finite stop on the GPU" \
    test ! -e stop-cuda/adapter_model.safetensors
# the same message but for the value printed (NaN's sign may differ)
strip() { sed 's/not finite ([^)]*)/not finite (x)/' "$1"; }
if [ "$(cat stop-cuda.rc)" = "$(cat stop-cpu.rc)" ] &&
    [ "$(strip stop-cuda.err)" = "$(strip stop-cpu.err)" ]; then
    ok "lora-train-gpu-guard: the GPU stops as the CPU does (exit status, message)"
else
    notok "lora-train-gpu-guard: the GPU stops otherwise than the CPU"
    cat stop-cuda.err stop-cpu.err | sed 's/^/    /' | head -n 6
fi

# --- on_nonfinite=skip ------------------------------------------------------------
if [ "$(cat skip-cuda.rc)" -eq 0 ] && [ -f skip-cuda/adapter_model.safetensors ]; then
    ok "lora-train-gpu-guard: on_nonfinite=skip runs to the end on the GPU"
else
    notok "lora-train-gpu-guard: on_nonfinite=skip on the GPU: exit $(cat skip-cuda.rc)"
    sed 's/^/    /' skip-cuda.err | head -n 5
fi
check "lora-train-gpu-guard: skipped steps counted on the GPU (skipped_steps 1, 2, 3)" \
    sh -c "jq -e -s '[.[] | select(.loss != null or .skipped_steps != null) | .skipped_steps] == [1, 2, 3]' skip-cuda.jsonl >/dev/null"
counts() { jq -c '[.step, .skipped_steps]' "$1"; }
check "lora-train-gpu-guard: the same metrics' step counts as on the CPU" \
    test "$(counts skip-cuda.jsonl)" = "$(counts skip-cpu.jsonl)"
floats skip-cuda/adapter_model.safetensors >skip-cuda.floats 2>/dev/null
floats skip-cpu/adapter_model.safetensors >skip-cpu.floats 2>/dev/null
check "lora-train-gpu-guard: nothing applied on the GPU: the adapter is the initial one (bits)" \
    cmp -s init.floats skip-cuda.floats
check "lora-train-gpu-guard: nor on the CPU" cmp -s init.floats skip-cpu.floats
check "lora-train-gpu-guard: the checkpoint of a skipping run counts its skipped steps" \
    sh -c "jq -e '.skipped_steps == 2' skip-cuda/checkpoint-2/trainer_state.json >/dev/null"
lora-train -q -m big -o res --device cuda $SETS -s on_nonfinite=skip -s save_steps=2 \
    --resume="$PWD/skip-cuda/checkpoint-2" t.packed >res.jsonl 2>res.err
rc=$?
if [ "$rc" -eq 0 ] && jq -e -s 'last | .skipped_steps == 3' res.jsonl >/dev/null; then
    ok "lora-train-gpu-guard: --resume on the GPU carries the count (skipped_steps 3)"
else
    notok "lora-train-gpu-guard: --resume of a skipping run: exit $rc"
    sed 's/^/    /' res.err | head -n 5
fi
