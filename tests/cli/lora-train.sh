# lora-train.sh: CLI tests of lora-train(1): usage errors, configuration
# (defaults, YAML, overrides, --print-config), then training on stories260K:
# metrics, eval loss, the adapter directory, checkpoints, exact resumption
# after a stop (byte-identical adapter), gradient checkpointing and thread
# count changing nothing, the NF4 base, and bad inputs.
. "$TOP/tests/cli/lib.sh"

if [ ! -x "$TOP/bin/lora-train" ]; then
    notok "lora-train: not built"
    exit 1
fi
jqe() { jq -e "$@" >/dev/null; }

# --- usage -------------------------------------------------------------------

usage_error() {
    n=$1; shift
    lora-train "$@" >out 2>err </dev/null; rc=$?
    if [ $rc -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q '^lora-train: ' &&
        grep -q '^usage: lora-train ' err; then
        ok "$n"
    else
        notok "$n: exit $rc"; sed 's/^/    /' err
    fi
}
usage_error "bad flag exits 2 with the usage" --no-such-flag
usage_error "--set without '=' exits 2" -s lora_alpha
usage_error "two packed files exit 2" -m x a.pack b.pack
usage_error "no model exits 2" x.pack

expect_exit 2 "an unknown key is refused" lora-train -s lora_alfa=3 --print-config
check "  ... with a hint" grep -q "did you mean 'lora_alpha'" err
expect_exit 2 "a value of the wrong type is refused" lora-train -s r=many --print-config
expect_exit 2 "an unknown scheduler is refused" lora-train -s lr_scheduler_type=wsd --print-config
expect_exit 2 "an unknown target module is refused" lora-train -s target_modules=q_proj,lm_head --print-config
printf 'r: 4\nlora_alpha: [1, 2]\n' >bad.yaml
expect_exit 2 "a YAML value of the wrong type is refused" lora-train -c bad.yaml --print-config
check "  ... naming file and line" grep -q "bad.yaml:2" err
expect_exit 2 "a missing configuration file is refused" lora-train -c nonexistent.yaml --print-config

# --- configuration -------------------------------------------------------------

lora-train --print-config >out 2>err
check "--print-config prints one JSON object" jqe 'type == "object"' out
check "defaults are peft's and transformers'" jqe '.r == 8 and .lora_alpha == 8 and
    .target_modules == ["q_proj","v_proj"] and .learning_rate == 5e-05 and
    .lr_scheduler_type == "linear" and .max_grad_norm == 1 and .seed == 42 and
    .num_train_epochs == 3 and .max_steps == -1' out
printf 'r: 4\nlora_alpha: 32\ntarget_modules:\n  - q_proj\n  - o_proj\nlearning_rate: 1e-3\n' >c.yaml
lora-train -c c.yaml -s r=16 -m /some/model -o outdir --print-config >out
check "YAML, then --set, -m and -o" jqe '.r == 16 and .lora_alpha == 32 and
    .target_modules == ["q_proj","o_proj"] and .learning_rate == 0.001 and
    .model_name_or_path == "/some/model" and .output_dir == "outdir"' out
lora-train -c "$TOP/examples/seed.yaml" --print-config >out
check "examples/seed.yaml: the seed's hyper-parameters" jqe '.r == 64 and
    .lora_alpha == 16 and .lora_dropout == 0.1 and
    .target_modules == ["q_proj","v_proj"] and .num_train_epochs == 3 and
    .per_device_train_batch_size == 6 and .gradient_accumulation_steps == 2 and
    .learning_rate == 0.0002 and .lr_scheduler_type == "constant" and
    .max_grad_norm == 0.3 and .gradient_checkpointing == true' out
# every configuration key is in the man page
lora-train --print-config | jq -r 'keys[]' >keys
missing=""
while read -r k; do
    grep -q "^\.It Cm $k\$" "$TOP/man/lora-train.1" || missing="$missing $k"
done <keys
check "every configuration key is in lora-train(1)${missing:+ (missing:$missing)}" test -z "$missing"

# --- training ----------------------------------------------------------------------

M=$SHARED/models/stories260K
if [ ! -d "$M" ] || ! have_shared; then
    skip "training: $SHARED absent"
    exit 0
fi
# four records: 8 rows of 64 tokens to train on (2 steps of 2x2 rows an
# epoch, so 6 steps cross two epoch boundaries), 4 rows to evaluate on
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -4 |
    dolly-fmt | tok -m "$M/tokenizer.model" >t.toks
pack -n 64 --loss all --overlong split -s 1 --eval-fraction 0.34 \
    --eval-out eval.pack -o all.pack t.toks
cat >small.yaml <<EOF
r: 4
lora_alpha: 8
lora_dropout: 0.1
target_modules: all-linear
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 0.005
lr_scheduler_type: cosine
warmup_steps: 1
weight_decay: 0.01
max_grad_norm: 0.5
logging_steps: 1
save_steps: 2
max_steps: 6
seed: 3
EOF
check "made a packed file" test -s all.pack -a -s eval.pack

lora-train -c small.yaml -m "$M" -o a -e eval.pack all.pack >metrics 2>err
rc=$?
check "training runs (exit 0, quiet)" test $rc -eq 0 -a ! -s err
check "a metrics line per step" test "$(jq -s 'map(select(.loss)) | length' metrics)" = 6
check "metrics: step, epoch, loss, learning_rate, grad_norm, tokens_per_s" \
    jqe -s 'map(select(.loss)) | all(has("step") and has("epoch") and
        (.loss | type == "number") and has("learning_rate") and
        has("grad_norm") and .tokens_per_s > 0)' metrics
check "the loss falls" jqe -s 'map(select(.loss)) | .[0].loss > .[5].loss' metrics
check "eval_loss at each epoch's end" \
    jqe -s 'map(select(.eval_loss) | .step) == [2, 4, 6]' metrics
check "epochs count steps over steps per epoch" \
    jqe -s 'map(select(.loss)) | .[2].epoch == 1.5' metrics
check "the adapter directory" test -s a/adapter_model.safetensors -a -s a/adapter_config.json
check "adapter_config.json is PEFT's" jqe '.peft_type == "LORA" and
    .task_type == "CAUSAL_LM" and .r == 4 and .lora_alpha == 8 and
    (.target_modules | length) == 7' a/adapter_config.json
check "checkpoints at steps 2 and 4" test -d a/checkpoint-2 -a -d a/checkpoint-4 -a ! -d a/checkpoint-6
check "a checkpoint holds adapter, optimizer state and trainer state" \
    test -s a/checkpoint-4/adapter_model.safetensors -a \
    -s a/checkpoint-4/optimizer.safetensors -a -s a/checkpoint-4/trainer_state.json
check "trainer_state.json: step, RNG, config" jqe '.global_step == 4 and
    .rng.seed == 3 and .config.r == 4' a/checkpoint-4/trainer_state.json
check "no temporary directories left" test -z "$(ls a | grep tmp)"

# resume after a stop at step 2: the same final adapter, byte for byte
mkdir b && cp -r a/checkpoint-2 b/
lora-train -c small.yaml -m "$M" -o b --resume all.pack >metrics.b 2>err
check "--resume from checkpoint-2 runs" test $? -eq 0
check "resumed: byte-identical final adapter" cmp a/adapter_model.safetensors b/adapter_model.safetensors
check "resumed: the same losses for steps 3-6" test \
    "$(jq -c 'select(.loss) | [.step, .loss, .grad_norm]' metrics | tail -n 4)" = \
    "$(jq -c 'select(.loss) | [.step, .loss, .grad_norm]' metrics.b)"
# a real stop: kill the run once it has saved, resume from what is there
lora-train -c small.yaml -m "$M" -o k all.pack >/dev/null 2>&1 &
pid=$!
i=0
while [ ! -d k/checkpoint-2 ] && [ $i -lt 600 ] && kill -0 $pid 2>/dev/null; do
    sleep 0.05; i=$((i + 1))
done
kill -KILL $pid 2>/dev/null
wait $pid 2>/dev/null
rm -f k/adapter_model.safetensors
lora-train -c small.yaml -m "$M" -o k --resume all.pack >/dev/null 2>err
check "killed and resumed: byte-identical final adapter" cmp a/adapter_model.safetensors k/adapter_model.safetensors
expect_exit 2 "resuming with another learning rate is refused" \
    lora-train -c small.yaml -s learning_rate=0.1 -m "$M" -o b --resume=b/checkpoint-2 all.pack
expect_exit 2 "resuming with other data is refused" \
    lora-train -c small.yaml -m "$M" -o b --resume=b/checkpoint-2 eval.pack
expect_exit 2 "resuming without a checkpoint is refused" \
    lora-train -c small.yaml -m "$M" -o nothing-here --resume all.pack

# the same results whatever the memory strategy or thread count
lora-train -c small.yaml -m "$M" -o g -s gradient_checkpointing=true all.pack >/dev/null
check "gradient checkpointing: byte-identical adapter" cmp a/adapter_model.safetensors g/adapter_model.safetensors
OMP_NUM_THREADS=1 lora-train -c small.yaml -m "$M" -o t1 all.pack >/dev/null
check "one thread: byte-identical adapter" cmp a/adapter_model.safetensors t1/adapter_model.safetensors
lora-train -c small.yaml -m "$M" -o l -s save_total_limit=1 all.pack >/dev/null
check "save_total_limit keeps the newest checkpoint only" test -d l/checkpoint-4 -a ! -d l/checkpoint-2

# --dump-batches, --init-only, --progress
lora-train -c small.yaml -m "$M" -o d -s save_steps=0 --dump-batches batches.jsonl all.pack >/dev/null
check "--dump-batches: a line per micro-batch" test "$(wc -l <batches.jsonl)" -eq 12
check "--dump-batches: rows and the flat batch" jqe -s 'all(.rows and .batch.n > 0 and
    (.batch.ids | length) == .batch.n)' batches.jsonl
lora-train -c small.yaml -m "$M" -o i --init-only >out
check "--init-only writes the initial adapter" test -s i/adapter_model.safetensors -a ! -s out
lora-train -c small.yaml -m "$M" -o p -s max_steps=2 --progress all.pack >/dev/null 2>err
check "--progress draws a bar on stderr" grep -q '\] 2/2' err

# the NF4 base
Q=$SHARED/golden/s260-nf4-f32
if [ -d "$Q" ]; then
    lora-train -c small.yaml -m "$Q" -o q -s max_steps=2 all.pack >mq 2>err
    check "training on the NF4 checkpoint" test $? -eq 0 -a -s q/adapter_model.safetensors
    check "  ... with finite losses" jqe -s 'map(select(.loss)) | all(.loss > 0 and .loss < 20)' mq
else
    skip "NF4 training: $Q absent"
fi

# --- bad inputs ----------------------------------------------------------------------

head -c 1000 all.pack >trunc.pack
expect_exit 2 "a truncated packed file is refused" lora-train -c small.yaml -m "$M" -o x trunc.pack
check "  ... and nothing is written" test ! -e x/adapter_model.safetensors
expect_exit 2 "a token stream is not a packed file" lora-train -c small.yaml -m "$M" -o x t.toks
expect_exit 2 "a missing model is refused" lora-train -c small.yaml -m nonexistent -o x all.pack
if ! command -v nvidia-smi >/dev/null 2>&1; then
    expect_exit 2 "--device cuda without a GPU is refused" lora-train --device cuda -m "$M" all.pack
fi

# --- the man page's EXAMPLES ------------------------------------------------------------

lora-train -c "$TOP/examples/seed.yaml" -m "$M" -o reverse-instruct \
    -s max_steps=1 -s per_device_train_batch_size=1 -s gradient_accumulation_steps=1 \
    all.pack >out 2>err
check "EXAMPLES: the seed's configuration (one step)" test -s reverse-instruct/adapter_config.json
