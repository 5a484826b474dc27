# lora-train-gpu.sh: lora-train on the GPU (--device cuda) against the CPU
# reference, through the command line: per-step losses within 1e-2
# relative (bf16 against fp32), peak device memory in the metrics, an
# evaluation, checkpoints and --resume on the device. Skips where the tool
# was built without CUDA or no GPU is present; the kernel-level checks are
# the programs of tests/gpu (make test-gpu).
. "$TOP/tests/cli/lib.sh"

if ! have_shared; then
    skip "lora-train-gpu: $SHARED absent"
    exit 0
fi
model="$SHARED/models/stories260K"
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 60 |
    dolly-fmt | tok -m "$model/tokenizer.model" >t.toks &&
    pack -n 128 --eval-fraction 0.2 -o t.pack --eval-out e.pack t.toks 2>/dev/null ||
    pack -n 128 -o t.pack t.toks || { notok "lora-train-gpu: fixture"; exit 0; }
[ -f e.pack ] || cp t.pack e.pack

lora-train -m "$model" -o probe --device cuda -s max_steps=1 t.pack >/dev/null 2>err
if grep -q -e 'not built with CUDA' -e 'no CUDA device' -e 'cannot use CUDA' err; then
    skip "lora-train-gpu: $(cat err)"
    exit 0
fi

run() { # run DEVICE OUTDIR [extra args...]
    dev=$1 dir=$2; shift 2
    lora-train -m "$model" -o "$dir" --device "$dev" -e e.pack \
        -s max_steps=8 -s logging_steps=1 -s save_steps=4 \
        -s per_device_train_batch_size=2 -s gradient_accumulation_steps=2 \
        -s per_device_eval_batch_size=2 -s learning_rate=1e-3 \
        -s lora_dropout=0.1 -s target_modules=all-linear -s r=8 -s lora_alpha=16 \
        -s max_grad_norm=1.0 "$@" t.pack
}

run cuda gpu >gpu.jsonl && ok "lora-train --device cuda runs" || notok "lora-train --device cuda runs"
run cpu cpu >cpu.jsonl && ok "lora-train --device cpu runs" || notok "lora-train --device cpu runs"
jq -s -e '[.[] | select(.loss)] | length == 8' gpu.jsonl >/dev/null &&
    ok "lora-train-gpu: 8 loss lines" || notok "lora-train-gpu: 8 loss lines"
# per-step loss and the evaluation loss, relative to the CPU's
worst=$(jq -s -r --slurpfile c cpu.jsonl '
    [range(0; length) as $i | .[$i] as $g | $c[$i] as $r |
     (if $g.loss then [$g.loss, $r.loss] else [$g.eval_loss, $r.eval_loss] end) |
     select(.[1] != 0) | ((.[0] - .[1]) / .[1] | fabs)] | max' gpu.jsonl)
if [ -n "$worst" ] && awk "BEGIN{exit !($worst <= 1e-2)}"; then
    ok "lora-train-gpu: per-step and eval loss within 1e-2 of the CPU (worst $worst)"
else
    notok "lora-train-gpu: loss differs from the CPU (worst $worst)"
    paste -d' ' gpu.jsonl cpu.jsonl | head -20 | sed 's/^/    /'
fi
jq -s -e '[.[] | select(.loss) | .peak_memory_gib > 0] | all' gpu.jsonl >/dev/null &&
    ok "lora-train-gpu: peak_memory_gib in the metrics" ||
    notok "lora-train-gpu: peak_memory_gib in the metrics"
check "lora-train-gpu: adapter written" test -s gpu/adapter_model.safetensors
check "lora-train-gpu: checkpoint written" test -s gpu/checkpoint-4/optimizer.safetensors
# resume from step 4 on the device: steps 5..8 as in the straight run
cp -r gpu/checkpoint-4 ckpt4
run cuda res --resume="$PWD/ckpt4" >res.jsonl || notok "lora-train-gpu: --resume runs"
worst=$(jq -s -r --slurpfile c gpu.jsonl '
    [.[] | select(.loss) as $g | $c[] | select(.step == $g.step and .loss and .loss != 0) |
     ((.loss - $g.loss) / .loss | fabs)] | max' res.jsonl)
if [ -n "$worst" ] && [ "$worst" != null ] && awk "BEGIN{exit !($worst <= 1e-4)}"; then
    ok "lora-train-gpu: --resume continues the run (worst $worst)"
else
    notok "lora-train-gpu: --resume (worst $worst)"
fi
# activation offload (offload_activations, on by default with gradient
# checkpointing) against recomputing: the same run bit for bit
run cuda ck -v -s gradient_checkpointing=true >ck.jsonl 2>ck.err &&
    run cuda ck0 -s gradient_checkpointing=true -s offload_activations=false >ck0.jsonl ||
    notok "lora-train-gpu: checkpointed runs"
check "lora-train-gpu: activation offload in use (-v)" grep -q 'activation offload:' ck.err
jq -c 'select(.loss) | [.step, .loss, .grad_norm]' ck.jsonl >ck.losses
jq -c 'select(.loss) | [.step, .loss, .grad_norm]' ck0.jsonl >ck0.losses
if [ -s ck.losses ] && cmp -s ck.losses ck0.losses &&
    cmp -s ck/adapter_model.safetensors ck0/adapter_model.safetensors; then
    ok "lora-train-gpu: activation offload changes no bit (losses, norms, adapter)"
else
    notok "lora-train-gpu: activation offload changes results"
    paste -d' ' ck.losses ck0.losses | head -10 | sed 's/^/    /'
fi
