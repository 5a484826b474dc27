#!/usr/bin/env python3
"""merge_ref.py: the peft reference for lora-merge (tests/golden/merge-s260-peft.json).

For each adapter that `test_merge --make-fixtures DIR` wrote (seeded, with
random B so that merging changes the model), on stories260K in float32:

  * peft: PeftModel.from_pretrained(base, adapter).merge_and_unload(), and
    the logits of a fixed 48-token input: the golden reference our own
    merged model must match in CI (tests/unit/test_merge.c, ABS_TOL_PEFT);
  * ours: transformers loads our merged directories (F32 in one file; BF16
    sharded with an index) as plain models; their weights and logits are
    compared with peft's and the differences recorded in the JSON.

Exits 1 when transformers' logits on our F32 merge differ from peft's by
more than TOL_F32, or when our F32 weights differ from peft's by more than
TOL_W_F32. Needs torch, transformers, peft, safetensors; runs on the CPU.

    build/tests/test_merge --make-fixtures fx
    python3 tests/torch/merge_ref.py --base ../shared/models/stories260K \\
        --fixtures fx --out tests/golden/merge-s260-peft.json
"""
import argparse
import json
import os
import re
import sys

import torch
import transformers
import peft
from safetensors.torch import load_file

TOL_F32 = 1e-4    # logits, ours (F32) in transformers vs peft's merge
TOL_W_F32 = 1e-6  # weights, ours (F32) vs peft's merge
CASES = ["qv", "all-rslora"]
ROWS = [0, 1, 23, 47]
N = 48


def input_ids():
    # the same formula as input_ids() in tests/unit/test_merge.c
    return [1] + [(t * 37 + 11) % 509 + 3 for t in range(1, N)]


def load(path):
    kw = {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch.float32
    m = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    return m.eval()


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


def weights(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def max_abs(a, b):
    return float((a - b).abs().max())


def f9(x):
    return float("%.9g" % x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    ids = input_ids()
    with open(os.path.join(a.fixtures, "adapter-sums.json")) as f:
        sums = json.load(f)
    out = {
        "made_by": "tests/torch/merge_ref.py",
        "versions": {"torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "model": "stories260K, float32, CPU",
        "input_ids": ids,
        "rows": ROWS,
        "cases": [],
    }
    bad = 0
    for name in CASES:
        adir = os.path.join(a.fixtures, "adapter-" + name)
        st = load_file(os.path.join(adir, "adapter_model.safetensors"))
        s = sum(float(t.double().sum()) for t in st.values())
        s2 = sum(float((t.double() ** 2).sum()) for t in st.values())
        assert abs(s - sums[name]["sum"]) <= 1e-9 * max(1, abs(s)), name
        assert abs(s2 - sums[name]["sumsq"]) <= 1e-9 * max(1, s2), name

        base = load(a.base)
        plain = logits_of(base, ids)
        pm = peft.PeftModel.from_pretrained(base, adir).eval()
        unmerged = logits_of(pm, ids)
        merged = pm.merge_and_unload().eval()
        ref = logits_of(merged, ids)
        ref_w = weights(merged)

        ours = load(os.path.join(a.fixtures, "merged-%s-f32" % name))
        got = logits_of(ours, ids)
        ours_w = weights(ours)
        keys = sorted(set(ref_w) & set(ours_w))
        assert set(ref_w) == set(ours_w), set(ref_w) ^ set(ours_w)
        w_diff = max(max_abs(ref_w[k], ours_w[k]) for k in keys)

        # BF16, sharded: against peft's fp32 merge rounded to bf16
        ours16 = load(os.path.join(a.fixtures, "merged-%s-bf16" % name))
        o16 = weights(ours16)
        flips = sum(int((ref_w[k].bfloat16().float() != o16[k]).sum())
                    for k in keys)
        total = sum(ref_w[k].numel() for k in keys)
        for k in keys:
            merged.state_dict()[k].copy_(ref_w[k].bfloat16().float())
        ref16 = logits_of(merged, ids)
        got16 = logits_of(ours16, ids)

        rec = {
            "name": name,
            "adapter_sum": s,
            "adapter_sumsq": s2,
            "logits": [[f9(v) for v in ref[r].tolist()] for r in ROWS],
            "argmax": ref.argmax(-1).tolist(),
            "adapter_moves_logits_by": max_abs(plain, ref),
            "peft_unmerged_vs_merged_max_abs_diff": max_abs(unmerged, ref),
            "ours_f32_transformers_vs_peft_max_abs_diff": max_abs(got, ref),
            "ours_f32_weights_vs_peft_max_abs_diff": w_diff,
            "ours_bf16_weights_differing_from_peft_rounded": flips,
            "weights_total": total,
            "ours_bf16_vs_peft_rounded_bf16_logits_max_abs_diff": max_abs(got16, ref16),
        }
        out["cases"].append(rec)
        print(name, {k: v for k, v in rec.items()
                     if k not in ("logits", "argmax")}, flush=True)
        if rec["ours_f32_transformers_vs_peft_max_abs_diff"] > TOL_F32:
            print("FAIL: %s logits differ by more than %g" % (name, TOL_F32))
            bad = 1
        if w_diff > TOL_W_F32:
            print("FAIL: %s weights differ by more than %g" % (name, TOL_W_F32))
            bad = 1
    with open(a.out, "w") as f:
        f.write(dumps(out))
    return bad


def dumps(obj):
    """JSON with indent 1, but each list of numbers on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[([-0-9.e+,\s]+)\]",
                  lambda m: "[" + ", ".join(x.strip() for x in
                                           m.group(1).split(",")) + "]",
                  text) + "\n"


if __name__ == "__main__":
    sys.exit(main())
