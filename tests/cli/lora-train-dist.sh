# lora-train-dist.sh: data-parallel lora-train (--gpus, or a launcher's
# RANK / WORLD_SIZE), through the command line.
#
# Everywhere: usage errors, the job's environment refused when incomplete,
# and NCCL missing (QLORA_NCCL naming nothing) ending in one line and exit
# status 2, for the launcher and for a rank. The unique id's exchange, the
# launcher and sharding have their unit test (tests/unit/test_dist.c).
#
# With 2 GPUs or more (else skipped): on stories260K, 2 ranks of
# micro-batch 2 and accumulation 2 against one GPU with accumulation 4
# (the same global batch, row order and dropout masks): per-step losses,
# gradient norms and the evaluation loss within TOL (bf16 tolerance; the
# sums differ only in order), the adapters too; every rank held the same
# adapter (finish's message); only rank 0 wrote metrics, checkpoints and
# the adapter; a checkpoint resumes on 2 ranks and is refused on 1; the
# ranks started by hand as a launcher would (TCP on 127.0.0.1) give the
# same run.
. "$TOP/tests/cli/lib.sh"
TOL=1e-2

# the tools from PATH: $TOP/bin (lib.sh puts it first), or the packed
# copies that bench/multi-gpu puts on PATH on a GPU machine, where the
# ignored bin/ does not travel
if ! command -v lora-train >/dev/null; then
    notok "lora-train-dist: lora-train is not built (neither in $TOP/bin nor on PATH)"
    exit 1
fi

# --- usage and environment: no GPU needed -----------------------------------

lora-train --gpus 0 -m x x.pack >out 2>err </dev/null
if [ $? -eq 2 ] && grep -q "^lora-train: --gpus needs a number" err && grep -q '^usage: ' err; then
    ok "lora-train-dist: --gpus 0 is a usage error"
else
    notok "lora-train-dist: --gpus 0"; sed 's/^/    /' err
fi
lora-train --gpus two -m x x.pack >out 2>err </dev/null
check "lora-train-dist: --gpus two is a usage error" test $? -eq 2

env WORLD_SIZE=2 RANK=1 lora-train -m x x.pack </dev/null >out 2>err
if [ $? -eq 2 ] && [ "$(wc -l <err)" -eq 1 ] && grep -q "MASTER_ADDR" err; then
    ok "lora-train-dist: WORLD_SIZE without MASTER_ADDR -> one line, exit 2"
else
    notok "lora-train-dist: WORLD_SIZE without MASTER_ADDR"; sed 's/^/    /' err
fi
expect_exit 2 "lora-train-dist: RANK outside WORLD_SIZE refused" \
    env WORLD_SIZE=2 RANK=2 MASTER_ADDR=127.0.0.1 lora-train -m x x.pack

# NCCL is loaded at run time: naming a missing library is one line, exit 2
# (a build without CUDA says so instead, also in one line)
if expect_exit 2 "lora-train-dist: --gpus 2, no NCCL -> one line, exit 2" \
    env QLORA_NCCL=/nonexistent/libnccl.so.2 lora-train --gpus 2 -m x x.pack; then
    if grep -q 'not built with CUDA' err; then
        skip "lora-train-dist: built without CUDA: $(cat err)"
        exit 0
    fi
    check "lora-train-dist:   ... naming NCCL and QLORA_NCCL" grep -q "NCCL.*QLORA_NCCL" err
fi
expect_exit 2 "lora-train-dist: a rank without NCCL -> one line, exit 2" \
    env QLORA_NCCL=/nonexistent/libnccl.so.2 WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 \
    lora-train -m x x.pack
check "lora-train-dist:   ... prefixed with its rank" grep -q '^lora-train\[rank 1\]: ' err
expect_exit 2 "lora-train-dist: --gpus with device cpu refused" \
    lora-train --gpus 2 --device cpu -m x x.pack
expect_exit 2 "lora-train-dist: --gpus with the packed file on stdin refused" \
    sh -c 'lora-train --gpus 2 -m x </dev/null'
expect_exit 2 "lora-train-dist: --gpus inside a launcher's job refused" \
    env WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 lora-train --gpus 2 -m x x.pack

# --- two GPUs ----------------------------------------------------------------

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${ngpu:-0}" -lt 2 ]; then
    skip "lora-train-dist: ${ngpu:-0} GPU(s), the run on 2 needs 2"
    exit 0
fi
if ! have_shared; then
    skip "lora-train-dist: $SHARED absent"
    exit 0
fi
for t in dolly-fmt tok pack jq zstd; do
    if ! command -v $t >/dev/null; then
        notok "lora-train-dist: $t is not on PATH (the fixture and the comparison need it)"
        exit 1
    fi
done
export NCCL_NVLS_ENABLE=0 # NVLink multicast stays off
model="$SHARED/models/stories260K"
zstd -dc "$SHARED/data/dolly/databricks-dolly-15k.jsonl.zst" | head -n 60 |
    dolly-fmt | tok -m "$model/tokenizer.model" >t.toks &&
    pack -n 128 --eval-fraction 0.2 -o t.pack --eval-out e.pack t.toks 2>/dev/null ||
    pack -n 128 -o t.pack t.toks || { notok "lora-train-dist: fixture"; exit 0; }
[ -f e.pack ] || cp t.pack e.pack

run() { # run OUTDIR ACCUMULATION [extra args...]
    dir=$1 acc=$2; shift 2
    lora-train -m "$model" -o "$dir" -e e.pack \
        -s max_steps=8 -s logging_steps=1 -s save_steps=4 \
        -s per_device_train_batch_size=2 -s gradient_accumulation_steps="$acc" \
        -s per_device_eval_batch_size=2 -s learning_rate=1e-3 \
        -s lora_dropout=0.1 -s target_modules=all-linear -s r=8 -s lora_alpha=16 \
        -s max_grad_norm=1.0 "$@" t.pack
}
# worst relative difference of loss, grad_norm and eval_loss, line by line
worst() {
    jq -s -r --slurpfile c "$2" '
        [range(0; length) as $i | .[$i] as $g | $c[$i] as $r |
         (if $g.loss then [[$g.loss, $r.loss], [$g.grad_norm, $r.grad_norm]]
          else [[$g.eval_loss, $r.eval_loss]] end) | .[] |
         select(.[1] != 0) | ((.[0] - .[1]) / .[1] | fabs)] | max' "$1"
}
within() { [ -n "$1" ] && [ "$1" != null ] && awk "BEGIN{exit !($1 <= $2)}"; }

run one 4 --device cuda >one.jsonl 2>one.err ||
    { notok "lora-train-dist: the single-GPU run"; sed 's/^/    /' one.err; exit 0; }
run two 2 --gpus 2 -v >two.jsonl 2>two.err
rc=$?
# skipped only when this GPU machine has no NCCL to load (dist_nccl_load's
# message); any other failure is one (at -v, rank 0 names NCCL in an info
# line, so a mere mention of it says nothing)
if [ $rc -ne 0 ] && grep -q 'cannot load NCCL' two.err; then
    skip "lora-train-dist: $(grep -m 1 'cannot load NCCL' two.err)"
    exit 0
fi
check "lora-train-dist: --gpus 2 runs" test $rc -eq 0
[ $rc -eq 0 ] || sed 's/^/    /' two.err
check "lora-train-dist: 8 loss lines and the evaluation, from rank 0 alone" \
    jq -s -e '([.[] | select(.loss)] | length == 8) and ([.[] | select(.eval_loss)] | length >= 1)' two.jsonl
w=$(worst two.jsonl one.jsonl)
if within "$w" $TOL; then
    ok "lora-train-dist: 2 ranks = 1 GPU with the same global batch: losses, norms, eval (worst $w)"
else
    notok "lora-train-dist: 2 ranks differ from 1 GPU (worst $w)"
    paste -d' ' two.jsonl one.jsonl | head -12 | sed 's/^/    /'
fi
check "lora-train-dist: tokens_per_s counts both ranks" \
    jq -s -e '[.[] | select(.loss) | .tokens_per_s > 0] | all' two.jsonl
check "lora-train-dist: every rank held the same adapter" \
    grep -q '2 ranks hold the same adapter and optimizer state' two.err
check "lora-train-dist: adapter and checkpoints written (by rank 0)" \
    test -s two/adapter_model.safetensors -a -s two/checkpoint-4/optimizer.safetensors
check "lora-train-dist: the checkpoint records 2 ranks" \
    jq -e '.world_size == 2' two/checkpoint-4/trainer_state.json
if command -v python3 >/dev/null; then
    d=$(python3 - two/adapter_model.safetensors one/adapter_model.safetensors <<'EOF'
import json, struct, sys
from array import array
def load(p):
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n]); out = {}
    for k, v in h.items():
        if k == '__metadata__': continue
        s, e = v['data_offsets']; a = array('f'); a.frombytes(b[8 + n + s:8 + n + e]); out[k] = a
    return out
x, y = load(sys.argv[1]), load(sys.argv[2])
num = sum((p - q) ** 2 for k in y for p, q in zip(x[k], y[k]))
den = sum(q * q for k in y for q in y[k])
print(f"{(num / den) ** 0.5:.3e}" if set(x) == set(y) else "inf")
EOF
)
    if within "$d" $TOL; then
        ok "lora-train-dist: the adapter equals the single-GPU one (rel err $d)"
    else
        notok "lora-train-dist: the adapter differs from the single-GPU one (rel err $d)"
    fi
fi

# resume on 2 ranks: steps 5..8 as in the straight run; on 1 GPU: refused
cp -r two/checkpoint-4 ckpt4
run res 2 --gpus 2 --resume="$PWD/ckpt4" >res.jsonl 2>res.err
w=$(jq -s -r --slurpfile c two.jsonl '
    [.[] | select(.loss) as $g | $c[] | select(.step == $g.step and .loss and .loss != 0) |
     ((.loss - $g.loss) / .loss | fabs)] | max' res.jsonl)
if within "$w" 1e-4; then
    ok "lora-train-dist: --resume on 2 ranks continues the run (worst $w)"
else
    notok "lora-train-dist: --resume on 2 ranks (worst $w)"; sed 's/^/    /' res.err
fi
expect_exit 2 "lora-train-dist: a 2-rank checkpoint is refused by 1 GPU" \
    run res1 2 --device cuda --resume="$PWD/ckpt4"
check "lora-train-dist:   ... saying how many ranks made it" grep -q "made by 2 ranks, now 1" err

# the ranks started by hand, as torchrun would: rendezvous over TCP
port=$((20000 + $$ % 20000))
for r in 0 1; do
    env WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        QLORA_DIST_TIMEOUT=60 lora-train -m "$model" -o byhand -e e.pack \
        -s max_steps=8 -s logging_steps=1 -s save_steps=4 \
        -s per_device_train_batch_size=2 -s gradient_accumulation_steps=2 \
        -s per_device_eval_batch_size=2 -s learning_rate=1e-3 \
        -s lora_dropout=0.1 -s target_modules=all-linear -s r=8 -s lora_alpha=16 \
        -s max_grad_norm=1.0 t.pack >hand$r.jsonl 2>hand$r.err &
done
wait
w=$(worst hand0.jsonl two.jsonl)
if within "$w" 1e-5 && [ ! -s hand1.jsonl ]; then
    ok "lora-train-dist: ranks from a launcher's variables (TCP) = --gpus 2 (worst $w)"
else
    notok "lora-train-dist: ranks from a launcher's variables (worst $w)"
    sed 's/^/    /' hand0.err hand1.err | head -10
fi
