#!/usr/bin/env python3
"""gen_ref.py: the transformers + peft reference for lora-gen
(tests/golden/gen-s260-peft.json).

On stories260K in float32 on the CPU, with the seeded LoRA adapter (r 8,
alpha 16, all linears, random B) that `test_generate --make-fixtures DIR`
writes to DIR/adapter, greedy generation (do_sample=False, one prompt at a
time, no padding) of max_new_tokens for each prompt of DIR/prompts.json,
stopping at eos_token_id (kept in the output, as generate() does). Records
the new tokens, and per prompt the smallest gap between the two largest
logits over its steps (a near-tie there would make any fp32
implementation's argmax fragile). tests/unit/test_generate.c (CPU) and
tests/gpu/gen.c (GPU) compare lora-gen's completions with it exactly.
Needs torch, transformers, peft, safetensors.

    build/tests/test_generate --make-fixtures fx
    python3 tests/torch/gen_ref.py --base ../shared/models/stories260K \\
        --fixtures fx --out tests/golden/gen-s260-peft.json
"""
import argparse
import json
import os

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    fx = json.load(open(os.path.join(a.fixtures, "prompts.json")))
    n_new, eos = fx["max_new_tokens"], fx["eos_token_id"]
    try:
        base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    except TypeError:
        base = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(a.fixtures, "adapter"))
    model.eval()
    outs, gaps = [], []
    for ids in fx["prompts"]:
        x = torch.tensor([ids])
        with torch.no_grad():
            r = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                               do_sample=False, num_beams=1, max_new_tokens=n_new,
                               eos_token_id=eos, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
        outs.append(r.sequences[0, len(ids):].tolist())
        gaps.append(min(float(v[0] - v[1]) for v in
                        (s[0].topk(2).values for s in r.scores)))
    res = {
        "model": "stories260K",
        "adapter": "test_generate --make-fixtures (r 8, alpha 16, all linears, seed 7)",
        "max_new_tokens": n_new,
        "eos_token_id": eos,
        "prompts": fx["prompts"],
        "completions": outs,
        "min_top2_gap": [round(g, 6) for g in gaps],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(json.dumps({"completions": [len(o) for o in outs], "min_top2_gap": min(gaps)}))


if __name__ == "__main__":
    main()
