#!/usr/bin/env python3
"""train_ref.py: the torch + transformers + peft side of lora-train's
numerical comparison (checks 3 and 4 of the CPU trainer).

    python3 tests/torch/train_ref.py DIR OUT.json [RANDOM.json]

DIR comes from tests/torch/make-inputs.sh: the stories260K model, our
initial adapter (init/), our final adapter (ours/), the packed rows as
`pack --dump` prints them (rows.jsonl), the rows of every micro-batch as
lora-train --dump-batches printed them (batches.jsonl), the resolved
configuration (config.json) and a fixed input (input_ids.json).

From the same initial adapter and the same rows, this trains with peft's
LoRA layers, torch.optim.AdamW, clip_grad_norm_ and transformers'
scheduler, twice: float32 on the GPU (or CPU) and float64 on the CPU. It
builds the training examples from the packed rows itself, by the packed
file's definition (qlora-formats(5)): every span is its own sequence with
positions from 0, and token t of a span is predicted with weight
weights[t]. Running each document as its own sequence is exactly
per-document causal attention with restarting positions, which
transformers' eager/SDPA attention would otherwise need a 4-D mask for.
The loss of a step is sum(w * CE) over its micro-batches over sum(w), as
transformers does with num_items_in_batch.

Dropout must be 0 for this comparison: peft draws its masks from torch's
generator, lora-train from a counter-based SplitMix64 stream (lora.h), and
the two cannot produce the same masks. Both apply it the same way
(inverted dropout on the LoRA input, one mask per adapted linear).

It also loads OUR final adapter with PeftModel.from_pretrained and records
the logits it gives on the fixed input. OUT.json becomes
tests/golden/torch-train-s260.json, which tests/unit/test_train_torch.c
compares against without torch.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

try:
    import peft
except ImportError:  # carried wheel, see make-inputs.sh
    import glob
    import subprocess
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "--no-index", "--no-deps", "--target", "/tmp/site"]
                          + glob.glob(sys.argv[1] + "/whl/*.whl"))
    sys.path.insert(0, "/tmp/site")
    import peft
import transformers
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

STRIDE = 11  # adapter values kept in the fixture: every STRIDE-th


def load_model(d, dtype, device):
    m = AutoModelForCausalLM.from_pretrained(d + "/model", dtype=dtype,
                                             attn_implementation="eager")
    return m.to(device)


def examples(row):
    """The documents of a packed row: (ids, weights) per span."""
    out = []
    for s, n in row["spans"]:
        out.append((row["ids"][s:s + n], row["weights"][s:s + n]))
    return out


def flat_batch(rows):
    """Our flattened micro-batch, rebuilt by the format's definition, to
    check lora-train's own (ids, pos, start, targets, weights)."""
    ids, pos, start, tg, w = [], [], [], [], []
    for r in rows:
        for d_ids, d_w in examples(r):
            first = len(ids)
            for p, t in enumerate(d_ids):
                nw = d_w[p + 1] if p + 1 < len(d_ids) else 0
                ids.append(t)
                pos.append(p)
                start.append(first)
                tg.append(d_ids[p + 1] if nw > 0 else -1)
                w.append(float(nw) if nw > 0 else 0.0)
    return {"ids": ids, "pos": pos, "start": start, "targets": tg,
            "weights": w}


def doc_loss_sum(model, ids, w, device, dtype):
    x = torch.tensor([ids], device=device)
    pos = torch.arange(len(ids), device=device)[None]
    logits = model(input_ids=x, position_ids=pos).logits[0].to(dtype)
    ce = F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
    wt = torch.tensor(w[1:], device=device, dtype=dtype)
    return (ce * wt).sum()


def train(d, cfg, rows, steps, dtype, device):
    torch.manual_seed(0)
    base = load_model(d, dtype, device)
    model = PeftModel.from_pretrained(base, d + "/init", is_trainable=True)
    model = model.to(dtype)  # the adapter too, in the float64 run
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"],
                            betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            eps=cfg["adam_epsilon"],
                            weight_decay=cfg["weight_decay"])
    total = cfg["max_steps"]
    warm = cfg["warmup_steps"] if cfg["warmup_steps"] > 0 else \
        math.ceil(total * cfg["warmup_ratio"])
    sched = get_scheduler(cfg["lr_scheduler_type"], opt,
                          num_warmup_steps=warm, num_training_steps=total)
    res = {"loss": [], "grad_norm": [], "learning_rate": []}
    for micro in steps:
        docs = [examples(rows[r]) for m in micro for r in m]
        wsum = sum(sum(w[1:]) for dd in docs for _, w in dd)
        opt.zero_grad(set_to_none=False)
        total_loss = 0.0
        for m in micro:
            ls = 0
            for r in m:
                for ids, w in examples(rows[r]):
                    if len(ids) > 1 and sum(w[1:]) > 0:
                        ls = ls + doc_loss_sum(model, ids, w, device, dtype)
            if torch.is_tensor(ls):
                (ls / wsum).backward()
                total_loss += ls.item()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"]) \
            if cfg["max_grad_norm"] > 0 else \
            torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
        res["learning_rate"].append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        res["loss"].append(total_loss / wsum)
        res["grad_norm"].append(float(norm))
    sd = get_peft_model_state_dict(model)
    keys = sorted(sd)
    flat = torch.cat([sd[k].detach().double().flatten().cpu() for k in keys])
    res["adapter"] = {
        "stride": STRIDE,
        "keys": keys,
        "norms": [float(sd[k].double().norm()) for k in keys],
        "values": [float("%.9g" % v) for v in flat[::STRIDE].tolist()],
    }
    return res


def peft_logits(d, input_ids, device):
    """Our final adapter loaded by peft: logits on the fixed input."""
    base = load_model(d, torch.float32, device)
    model = PeftModel.from_pretrained(base, d + "/ours").eval()
    # every tensor of our file must have landed in a LoRA layer unchanged
    ours = load_file(d + "/ours/adapter_model.safetensors")
    sd = get_peft_model_state_dict(model)
    missing = sorted(set(ours) ^ set(sd))
    diff = max(float((ours[k].to(device) - sd[k]).abs().max()) for k in ours)
    x = torch.tensor([input_ids], device=device)
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    lg = out.logits[0].float().cpu()
    keep = [0, 1, 63, len(input_ids) - 1]
    return {"rows": keep,
            "logits": [[float("%.8g" % v) for v in lg[r].tolist()] for r in keep],
            "loss": float(out.loss),
            "argmax": lg.argmax(-1).tolist(),
            "key_mismatches": missing,
            "load_max_abs_diff": diff}


def random_model_logits(d, device):
    """transformers on the random checkpoint of tests/unit/test_llama_hf.c
    (MHA, head_dim 12, untied head, BF16, two shards)."""
    m = AutoModelForCausalLM.from_pretrained(d + "/random", dtype=torch.float32,
                                             attn_implementation="eager")
    m = m.to(device).eval()
    ids = json.load(open(d + "/random/input_ids.json"))
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = m(input_ids=x, labels=x)
    lg = out.logits[0].float().cpu()
    keep = [0, 1, 20, len(ids) - 1]
    return {"generator": "tests/torch/train_ref.py",
            "rows": keep,
            "logits": [[float("%.8g" % v) for v in lg[r].tolist()] for r in keep],
            "loss": float(out.loss)}


def main():
    d, out_path = sys.argv[1], sys.argv[2]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = json.load(open(d + "/config.json"))
    assert cfg["lora_dropout"] == 0, "the comparison needs lora_dropout: 0"
    rows = {}
    for line in open(d + "/rows.jsonl"):
        r = json.loads(line)
        rows[r["row"]] = r
    dumps = [json.loads(line) for line in open(d + "/batches.jsonl")]
    nsteps = max(b["step"] for b in dumps)
    steps = [[b["rows"] for b in dumps if b["step"] == s]
             for s in range(1, nsteps + 1)]
    mismatches = 0
    for b in dumps:
        want = flat_batch([rows[r] for r in b["rows"]])
        for k in want:
            mismatches += want[k] != b["batch"][k]
    used = sorted({r for st in steps for m in st for r in m})
    fixture = {
        "generator": "tests/torch/train_ref.py",
        "versions": {"torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "device": torch.cuda.get_device_name() if gpu == "cuda" else "cpu",
        "config": cfg,
        "batch_mismatches": mismatches,
        "rows": [{"row": r, "ids": rows[r]["ids"],
                  "weights": rows[r]["weights"], "spans": rows[r]["spans"]}
                 for r in used],
        "steps": steps,
        "ours_loss": [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl")
                      if "loss" in json.loads(l)],
        "runs": {
            "f32": train(d, cfg, rows, steps, torch.float32, gpu),
            "f64": train(d, cfg, rows, steps, torch.float64, "cpu"),
        },
    }
    ids = json.load(open(d + "/input_ids.json"))
    fixture["input_ids"] = ids
    fixture["peft_logits"] = peft_logits(d, ids, gpu)
    with open(out_path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            json.dump(random_model_logits(d, gpu), f, separators=(",", ":"))
            f.write("\n")
    r32, r64 = fixture["runs"]["f32"], fixture["runs"]["f64"]
    print("batch mismatches", mismatches)
    print("ours", fixture["ours_loss"])
    print("f32 ", r32["loss"])
    print("f64 ", r64["loss"])
    print("grad_norm f32", r32["grad_norm"])
    print("peft logits key mismatches", fixture["peft_logits"]["key_mismatches"],
          "load diff", fixture["peft_logits"]["load_max_abs_diff"])


if __name__ == "__main__":
    main()
