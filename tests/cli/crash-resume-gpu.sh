# crash-resume-gpu.sh: lora-train --device cuda survives kill -9, as
# crash-resume.sh checks on the CPU.
#
#   - Two uninterrupted GPU runs give byte-identical adapters: the device
#     path is reproducible run to run, which resuming needs. (Should this
#     fail, the same pair is run again with KN_LORA_FUSED=0 and with
#     KN_ATTN_FWD_V1=1, and the comment lines say which kernel path makes
#     the difference; tests/gpu/nonfinite.c does the same per gradient.)
#   - A GPU run killed with SIGKILL at seeded random moments (during a
#     step, while a checkpoint is written, while CUDA starts) and continued
#     each time with --resume ends with an adapter byte-identical (cmp) to
#     the uninterrupted run's, and the same optimizer state in its last
#     checkpoint. CRASH_SEED picks other moments; CRASH_SETS adds settings
#     (e.g. "-s gradient_checkpointing=true", which offloads activations).
# Skips where the tool was built without CUDA or no GPU is present.
. "$TOP/tests/cli/lib.sh"

for t in lora-train dolly-fmt tok pack; do
    if [ ! -x "$TOP/bin/$t" ]; then
        skip "crash-resume-gpu: $t not built"
        exit 0
    fi
done
if ! have_shared; then
    skip "crash-resume-gpu: no shared data in '$SHARED'"
    exit 0
fi
S260=$SHARED/models/stories260K
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 20 | dolly-fmt |
    tok -m "$S260/tokenizer.model" | pack -q -l all -n 128 >t.packed ||
    { notok "crash-resume-gpu: fixture"; exit 0; }

lora-train -m "$S260" -o probe --device cuda -s max_steps=1 t.packed >/dev/null 2>err
if grep -q -e 'not built with CUDA' -e 'no CUDA device' -e 'cannot use CUDA' err; then
    skip "crash-resume-gpu: $(head -n 1 err)"
    exit 0
fi

# 40 steps, each of two micro-batches through every linear, LoRA dropout
# on, a checkpoint after every step (steps take milliseconds on a GPU:
# many checkpoints give the kills something to land in)
N=40
SETS="-s max_steps=$N -s save_steps=1 -s per_device_train_batch_size=2
 -s gradient_accumulation_steps=2 -s logging_steps=1 -s lora_dropout=0.1
 -s target_modules=all-linear -s r=8 -s lora_alpha=16 -s max_grad_norm=1.0
 ${CRASH_SETS:-}"
train() { # OUTDIR [args...]
    d=$1; shift
    lora-train -q -m "$S260" --device cuda -o "$d" $SETS "$@" t.packed
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# the first float (index, both values) where two adapters differ
first_diff() {
    for f in "$1" "$2"; do
        n=$(od -An -t u8 -N 8 "$f" | tr -d ' ')
        tail -c +$((9 + n)) "$f" | od -An -v -f | tr -s ' ' '\n' | grep -v '^$' >"$f.floats"
    done
    paste "$1.floats" "$2.floats" | awk '$1 != $2 { print "float " NR - 1 ": " $1 " vs " $2; exit }'
}

# --- uninterrupted, twice: the step time, and run-to-run reproducibility --------
t0=$(now_ms)
(exec lora-train -q -m "$S260" --device cuda -o ref $SETS t.packed >ref.jsonl 2>ref.err) &
pid=$!
while [ ! -f ref/checkpoint-1/trainer_state.json ] && kill -0 "$pid" 2>/dev/null; do
    sleep 0.01
done
t1=$(now_ms)
wait "$pid" || { notok "crash-resume-gpu: uninterrupted run: $(cat ref.err)"; exit 0; }
t2=$(now_ms)
# a step and its checkpoint, in ms (at least 1)
step_ms=$(((t2 - t1) / (N - 1)))
[ "$step_ms" -ge 1 ] || step_ms=1
echo "# crash-resume-gpu: start to checkpoint 1 $((t1 - t0)) ms, then $step_ms ms a step"
train ref2 >/dev/null 2>ref2.err || { notok "crash-resume-gpu: second run: $(cat ref2.err)"; exit 0; }
if cmp -s ref/adapter_model.safetensors ref2/adapter_model.safetensors; then
    ok "crash-resume-gpu: two uninterrupted GPU runs give the same adapter (cmp)"
else
    notok "crash-resume-gpu: the GPU run is not reproducible run to run ($(first_diff \
        ref/adapter_model.safetensors ref2/adapter_model.safetensors))"
    for e in KN_LORA_FUSED=0 KN_ATTN_FWD_V1=1; do
        env "$e" lora-train -q -m "$S260" --device cuda -o "a-$e" $SETS t.packed >/dev/null 2>&1
        env "$e" lora-train -q -m "$S260" --device cuda -o "b-$e" $SETS t.packed >/dev/null 2>&1
        if cmp -s "a-$e/adapter_model.safetensors" "b-$e/adapter_model.safetensors"; then
            echo "# with $e: reproducible"
        else
            echo "# with $e: not reproducible either"
        fi
    done
fi

# --- kill -9 at seeded random moments, then --resume ----------------------------
# Round i of 6 waits until the run has saved a checkpoint k_i drawn from
# the i-th sixth of the steps, then lets it run a random 0 to 3 step times
# more (into the next step, or into writing a checkpoint) and kills it.
# Since a resumed run first starts CUDA and loads the model, a kill whose
# checkpoint already exists lands during that start.
seed=${CRASH_SEED:-11}
plan=$(awk -v s="$seed" -v n="$N" -v ms="$step_ms" 'BEGIN { srand(s)
    for (i = 0; i < 6; i++)
        printf "%d %.3f\n", int(i * (n - 2) / 6) + 1 + int(rand() * (n - 2) / 6), rand() * 3 * ms / 1000 }')
echo "$plan" >plan
crash_loop 0.005 lora-train -q -m "$S260" --device cuda -o run $SETS
r=
has_checkpoint run && r=--resume
if [ "$kills" -eq 0 ]; then
    notok "crash-resume-gpu: no kill landed (seed $seed)"
elif train run $r >/dev/null 2>>run.err; then
    ok "crash-resume-gpu: resumed after $kills kills (seed $seed${CRASH_SETS:+, $CRASH_SETS}: after checkpoint, delay s: $(echo $(cat plan)))"
else
    notok "crash-resume-gpu: final --resume failed"
    sed 's/^/    /' run.err | tail -n 5
fi
if cmp -s ref/adapter_model.safetensors run/adapter_model.safetensors; then
    ok "crash-resume-gpu: adapter identical to the uninterrupted run's (cmp)"
else
    notok "crash-resume-gpu: adapter differs from the uninterrupted run's ($(first_diff \
        ref/adapter_model.safetensors run/adapter_model.safetensors))"
fi
check "crash-resume-gpu: adapter_config.json identical" \
    cmp -s ref/adapter_config.json run/adapter_config.json
last=checkpoint-$((N - 1))
check "crash-resume-gpu: the last checkpoint's optimizer state identical (cmp)" \
    cmp -s "ref/$last/optimizer.safetensors" "run/$last/optimizer.safetensors"
