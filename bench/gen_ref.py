#!/usr/bin/env python3
"""bench/gen_ref.py: the Python stack lora-gen's GPU path is measured
against: transformers generate() on a Llama 2 7B-shaped model with random
weights, every decoder linear a bitsandbytes Linear4bit (NF4, double
quantization, blocksize 64, bf16 compute: what from_pretrained with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
builds), embeddings and head bf16, SDPA attention, KV cache.

The model is built in GPU memory (random bf16 init, then each linear
quantized by bitsandbytes itself) rather than loaded from a checkpoint:
timing depends on the shapes only, and a 13 GB random checkpoint is not
worth writing. Prompts: random ids, 300 tokens, no padding; 100 new tokens
(min_new_tokens=100: EOS cannot end them early), greedy. Prints one JSON
line per batch size: new tokens per second over the whole generate() call
(prefill included), as REFERENCE.md's anchors were measured.
"""
import argparse
import json
import sys
import time

import torch


def build(layers):
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for nm in names:
                lin = getattr(parent, nm)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                             blocksize=64, compress_statistics=True,
                                             quant_type="nf4", module=q).to("cuda")
                setattr(parent, nm, q)
    torch.cuda.empty_cache()
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    t = time.time()
    model = build(a.layers)
    print(f"# model built in {time.time() - t:.1f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    g = torch.Generator(device="cuda").manual_seed(1)
    for b in (int(x) for x in a.batches.split(",")):
        ids = torch.randint(3, 32000, (b, a.prompt), device="cuda", generator=g)
        ids[:, 0] = 1
        mask = torch.ones_like(ids)
        kw = dict(do_sample=False, num_beams=1, pad_token_id=0, attention_mask=mask)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            out = model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, **kw)
            torch.cuda.synchronize()
            dt = time.time() - t
        new = (out.shape[1] - a.prompt) * b
        print(json.dumps({"stack": "transformers+bitsandbytes", "batch": b,
                          "tokens_per_s": round(new / dt, 1), "seconds": round(dt, 3),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                          "device": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
