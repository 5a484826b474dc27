#!/usr/bin/env python3
"""make-nf4-refs.py: the bitsandbytes references that tests/unit/test_nf4.c
and tests/cli/nf4-quant.sh compare nf4-quant against, written as hashes
into tests/golden/nf4-refs.json (no binaries in the repository).

Needs a CUDA GPU, torch, transformers and bitsandbytes (0.50.2 was used).

    python3 make-nf4-refs.py STORIES260K_DIR OUT_DIR [OURS_DIR]

For stories260K cast to F32, BF16 and F16 (torch's cast, round to nearest
even; the bf16/f16 checkpoints are saved with save_pretrained), each is
loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute
dtype = the matching dtype, bfloat16 for F32 as the shared golden) and
saved with save_pretrained. Recorded for each output tensor: dtype, shape
and the FNV-1a 64-bit hash of its bytes; also bitsandbytes'
dequantize_4bit() of every 4-bit weight (in the weight's dtype), and
functional.quantize_4bit of the F32 weights with blocksize 128 and without
double quantization. FNV-1a: h = 0xcbf29ce484222325; for each byte b:
h = (h ^ b) * 0x100000001b3 mod 2^64.

With OURS_DIR (nf4-quant's outputs ours-f32, ours-bf16, ours-f16), each is
loaded with a plain AutoModelForCausalLM.from_pretrained(dir) and its logits
compared with the bitsandbytes-quantized model's.

Also written to OUT_DIR, for investigation: probe.json (torch's CUDA mean
of deterministic float32 arrays of many sizes) and the safetensors files
themselves (refs.tar).
"""
import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import bitsandbytes as bnb
import bitsandbytes.functional as F

FNV_OFF, FNV_PRIME, MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a(data: bytes) -> str:
    h = FNV_OFF
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return "%016x" % h


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def file_hashes(path):
    """name -> [dtype, shape, fnv] for every tensor of a safetensors file,
    and "(file)" -> ["", [size], fnv] for the whole file."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = [v["dtype"], v["shape"], fnv1a(raw[8 + n + b : 8 + n + e])]
    out["(file)"] = ["", [len(raw)], fnv1a(raw)]
    return out, hashlib.sha256(raw).hexdigest()


def check_ours(odir, name, mq, ids, ref_logits, refs):
    plain = AutoModelForCausalLM.from_pretrained(odir)
    n4 = sum(isinstance(x, bnb.nn.Linear4bit) for x in plain.modules())
    print(name, "plain from_pretrained:", type(plain).__name__, "4-bit layers", n4,
          "device", next(plain.parameters()).device, flush=True)
    refs["ours-" + name + "-plain-4bit-layers"] = n4
    del plain
    mo = AutoModelForCausalLM.from_pretrained(odir, device_map="cuda")
    with torch.no_grad():
        got = mo(ids.cuda()).logits.float().cpu()
    same = torch.equal(got, ref_logits)
    print(name, "logits identical:", same, "max diff", (got - ref_logits).abs().max().item(), flush=True)
    refs["ours-" + name + "-logits-identical"] = bool(same)
    sd_o, sd_r = mo.state_dict(), mq.state_dict()
    diff = [k for k in sd_r if k not in sd_o or sd_r[k].dtype != sd_o[k].dtype
            or not torch.equal(sd_r[k].cpu(), sd_o[k].cpu())]
    print(name, "state_dict entries differing:", len(diff), diff[:3], flush=True)


DTYPES = [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)]


def main():
    src, out = sys.argv[1], sys.argv[2]
    ours = sys.argv[3] if len(sys.argv) > 3 else None
    os.makedirs(out, exist_ok=True)
    refs = {
        "generator": "tests/golden/make-nf4-refs.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "bitsandbytes": bnb.__version__,
            "gpu": torch.cuda.get_device_name(0),
        },
    }
    ids = torch.tensor([[1] + [(37 * i + 11) % 510 + 2 for i in range(63)]])
    for name, dt in DTYPES:
        inp = src
        if name != "f32":
            m = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
            inp = os.path.join(out, "s260-" + name)
            m.save_pretrained(inp)
            refs["input-" + name] = file_hashes(os.path.join(inp, "model.safetensors"))[0]
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if name == "f32" else dt,
        )
        mq = AutoModelForCausalLM.from_pretrained(
            inp, dtype=dt, quantization_config=qc, device_map="cuda"
        )
        qdir = os.path.join(out, "nf4-" + name)
        mq.save_pretrained(qdir)
        h, sha = file_hashes(os.path.join(qdir, "model.safetensors"))
        refs["nf4-" + name] = h
        refs["nf4-" + name + "-sha256"] = sha
        deq, deqh = {}, {}
        for mn, mod in mq.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                d = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                deq[mn + ".weight"] = d.cpu().contiguous()
                deqh[mn + ".weight"] = [str(d.dtype), list(d.shape), fnv1a(tensor_bytes(d))]
        save_file(deq, os.path.join(out, "deq-" + name + ".safetensors"))
        refs["deq-" + name] = deqh
        with torch.no_grad():
            ref_logits = mq(ids.cuda()).logits.float().cpu()
        if ours:
            try:
                check_ours(os.path.join(ours, "ours-" + name), name, mq, ids, ref_logits, refs)
            except Exception as e:  # report, and keep the references coming
                print(name, "loading ours failed:", repr(e), flush=True)
        del mq
    # quantize_4bit variants on the F32 weights
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    func, funch = {}, {}
    for k, w in m.state_dict().items():
        if not k.endswith("_proj.weight"):
            continue
        for tag, bs, dq in [("bs128", 128, True), ("nodq", 64, False), ("bs256nodq", 256, False)]:
            q, st = F.quantize_4bit(w.cuda(), blocksize=bs, compress_statistics=dq, quant_type="nf4")
            parts = {"packed": q, "absmax": st.absmax}
            if dq:
                parts["nested_absmax"] = st.state2.absmax
                parts["offset"] = st.offset.reshape(1)
            for pn, t in parts.items():
                key = "%s.%s.%s" % (k, tag, pn)
                func[key] = t.cpu().contiguous()
                funch[key] = [str(t.dtype), list(t.shape), fnv1a(tensor_bytes(t))]
    save_file(func, os.path.join(out, "func-f32.safetensors"))
    refs["func-f32"] = funch
    with open(os.path.join(out, "nf4-refs.json"), "w") as f:
        json.dump(refs, f, indent=1, sort_keys=True)
        f.write("\n")
    probe(out)


def det_array(n, seed=12345):
    """Deterministic float32 values in [0.01, 0.11): the C side computes the
    same doubles and rounds them the same way."""
    i = torch.arange(n, dtype=torch.int64)
    h = (i * 2654435761 + seed) % 4294967296
    return (h.double() / 4294967296.0 * 0.1 + 0.01).float()


def det_weight(rows, cols, seed):
    i = torch.arange(rows * cols, dtype=torch.int64)
    h = (i * 2654435761 + seed) % 4294967296
    u = h.double() / 4294967296.0 * 2.0 - 1.0
    scale = 0.01 * (1 + (i // cols) % 13).double()
    return (u * scale).float().reshape(rows, cols)


def probe(out):
    """Facts about torch and bitsandbytes that the emulation relies on."""
    sizes = list(range(1, 300)) + [
        383, 384, 385, 511, 512, 513, 1000, 1024, 2047, 2048, 2049, 4095, 4096,
        5000, 8192, 16384, 32768, 65535, 65536, 131071, 131072, 131073, 200000,
        262144, 393216, 524288, 704512, 1000000, 1409024, 2000000, 3670016,
    ]
    means = {}
    for n in sizes:
        x = det_array(n).cuda()
        means[str(n)] = struct.unpack("<I", struct.pack("<f", x.mean().item()))[0]
    big = {}
    for tag, rows, cols, seed in [("w1", 4096, 4096, 7), ("w2", 11008, 4096, 8)]:
        w = det_weight(rows, cols, seed).to(torch.bfloat16)
        q, st = F.quantize_4bit(w.cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
        qb = tensor_bytes(q)
        big[tag] = {
            "packed_fnv": fnv1a(qb[:1 << 20]),  # first MiB (pure Python is slow)
            "packed_sha256": hashlib.sha256(qb).hexdigest(),
            "absmax_sha256": hashlib.sha256(tensor_bytes(st.absmax)).hexdigest(),
            "nested_absmax_sha256": hashlib.sha256(tensor_bytes(st.state2.absmax)).hexdigest(),
            "offset_bits": struct.unpack("<I", struct.pack("<f", st.offset.item()))[0],
        }
        # at most 8 MiB of packed codes come back from the GPU machine
        np.asarray(bytearray(qb[: 8 << 20]), dtype=np.uint8).tofile(
            os.path.join(out, "big-%s-packed.bin" % tag))
        np.asarray(bytearray(tensor_bytes(st.absmax)), dtype=np.uint8).tofile(
            os.path.join(out, "big-%s-absmax.bin" % tag))
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump({"means": means, "big": big}, f, indent=1)


if __name__ == "__main__":
    main()
