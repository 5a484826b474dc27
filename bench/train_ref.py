#!/usr/bin/env python3
"""bench/train_ref.py: the Python QLoRA stack that lora-train is measured
against, on a Llama 2 7B-shaped model with random weights.

The seed's recipe: from_pretrained with bitsandbytes NF4, double
quantization, bf16 compute; prepare_model_for_kbit_training with gradient
checkpointing; peft LoRA r=64, alpha 16, dropout 0.1; paged AdamW 32-bit,
lr 2e-4, max grad norm 0.3; micro-batch 6 of 2048 tokens, gradient
accumulation 2; SDPA attention; bf16 autocast. The random checkpoint is
written once to --ckpt (bf16 safetensors) so loading goes through the same
path as a real one.

Prints one JSON line: stack, targets, tokens_per_s, step_s, peak_gib
(torch.cuda.max_memory_allocated after setup, as the reference anchors in
REFERENCE.md were measured), steps.
"""
import argparse
import json
import os
import sys
import time

import torch


def make_checkpoint(path, layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/llama2-7b-random")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not os.path.exists(os.path.join(a.ckpt, "config.json")):
        t = time.time()
        make_checkpoint(a.ckpt, a.layers)
        print(f"# random checkpoint written in {time.time() - t:.0f} s", file=sys.stderr)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.time()
    kw = dict(quantization_config=q, device_map={"": 0}, attn_implementation="sdpa")
    try:
        model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.bfloat16, **kw)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(a.ckpt, torch_dtype=torch.bfloat16, **kw)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = ("all-linear" if a.targets == "all-linear"
               else a.targets.split(","))
    lc = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none",
                    task_type="CAUSAL_LM", target_modules=targets)
    model = get_peft_model(model, lc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    print(f"# loaded in {time.time() - t:.0f} s, {ntrain} trainable", file=sys.stderr)

    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(3, 32000, (a.batch, a.seq), device="cuda", generator=g)
               for _ in range(a.accum)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t = time.time()
        for ids in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - t
        print(f"# step {s + 1}: {dt:.3f} s loss {loss.item() * a.accum:.4f}", file=sys.stderr)
        if s >= a.warmup:
            times.append(dt)
    step = sum(times) / len(times)
    tokens = a.batch * a.accum * a.seq
    print(json.dumps({"stack": "transformers+peft+bitsandbytes", "targets": a.targets,
                      "tokens_per_s": round(tokens / step, 1), "step_s": round(step, 4),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                      "trainable": ntrain, "steps": a.steps,
                      "device": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
