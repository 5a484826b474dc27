#!/usr/bin/env python3
"""tok_reference.py: what SentencePiece itself says, for tests/cli/tok.sh and
bench/tok. Needs the sentencepiece Python package (pip install sentencepiece).

  tok_reference.py encode MODEL [FILE]   JSON Lines records -> the lines
      `tok --dump` prints for `tok -m MODEL` ({"ids", "completion_start"}):
      ids from SentencePiece's encode of prompt+completion (or text), BOS
      first, EOS last except for prompt-only records; completion_start is
      computed from SentencePiece's normalizer offsets with the rule of
      tok(1): the first token produced (even in part) from a character of
      the completion.
  tok_reference.py decode MODEL [FILE]   `tok --dump` lines -> the lines
      `tok -d` prints, from SentencePiece's decode.
  tok_reference.py seed [FILE]           Dolly records -> the seed template's
      {"prompt", "completion"} (REFERENCE.md section 1), for when dolly-fmt
      is not built.
  tok_reference.py same A B              compare two JSON Lines files value by
      value; exit 1 and show the first difference when they differ.
  tok_reference.py mkmodel KIND OUT       write a small hand-made BPE model
      exercising what the Llama models do not: KIND "ud" has user-defined
      and unused pieces, tied scores, characters that are no piece but occur
      inside pieces, no byte fallback and remove_extra_whitespaces; KIND
      "seg" is "ud" without unused pieces or whitespace removal (so tok may
      encode it segment by segment); KIND "raw" has byte fallback, no dummy
      prefix and unescaped whitespace.
  tok_reference.py fuzz SEED N           N random records over the alphabet
      those models care about ({"text"} and {"prompt", "completion"}).

FILE defaults to stdin; zstd-compressed input is not handled here. With
TOK_REF_CACHE=DIR, encode keeps its output in DIR under a hash of the model,
the input, this script and the sentencepiece version, and reuses it.
"""
import bisect
import hashlib
import itertools
import json
import os
import shutil
import sys

import_error = None
try:
    import sentencepiece as spm
except ImportError as e:  # the caller decides to skip
    import_error = e

SEED = ("### Instruction:\nUse the Input below to create an instruction, which "
        "could have been used to generate the input using an LLM. \n\n"
        "### Input:\n{response}\n\n### Response:\n")


def lines(path):
    f = open(path, encoding="utf-8") if path and path != "-" else sys.stdin
    for line in f:
        if line.strip():
            yield line


def completion_start(sp, text, boundary, pieces, first, byte_ids):
    """Index (counted from `first`) of the first token whose last normalized
    character comes from an input character at or after `boundary` (in
    characters), or len(pieces) when none does."""
    norm, offs = sp.normalize(text, with_offsets=True)
    # offs[k] is the input character of normalized character k (and
    # len(text) at the end); it never decreases.
    nb = bisect.bisect_left(offs, boundary, 0, len(norm))
    # The normalized character each token ends in: a normal token spans
    # len(piece) characters; byte-fallback tokens all end in the character
    # they are bytes of (its lead byte <0xNN> has NN not of the form 10xxxxxx).
    width = [len(p) if pid not in byte_ids else
             1 if (int(p[3:5], 16) & 0xC0) != 0x80 else 0 for p, pid in pieces]
    last = [e - 1 for e in itertools.accumulate(width)]
    return first + bisect.bisect_left(last, nb)


def cached(what, model, path, fn):
    """fn(model, path, out), through TOK_REF_CACHE when set."""
    cache = os.environ.get("TOK_REF_CACHE")
    if not cache or not path:
        fn(model, path, sys.stdout)
        return
    h = hashlib.sha256(what.encode())
    for name in (model, path, __file__):
        with open(name, "rb") as f:
            h.update(f.read())
    h.update(spm.__version__.encode())
    kept = os.path.join(cache, h.hexdigest()[:32] + ".jsonl")
    if not os.path.exists(kept):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{kept}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as out:
            fn(model, path, out)
        os.replace(tmp, kept)
    with open(kept, encoding="utf-8") as f:
        shutil.copyfileobj(f, sys.stdout)


def encode(model, path):
    cached("encode", model, path, encode_to)


def encode_to(model, path, out):
    sp = spm.SentencePieceProcessor(model_file=model)
    bos, eos = sp.bos_id(), sp.eos_id()
    head = [bos] if bos >= 0 else []
    unk = sp.unk_id()
    byte_ids = {i for i in range(sp.vocab_size()) if sp.is_byte(i)}
    recs = []
    for line in lines(path):
        r = json.loads(line)
        if "text" in r:
            recs.append((r["text"], None, "text"))
        elif "completion" in r:
            recs.append((r["prompt"] + r["completion"], len(r["prompt"]), "pc"))
        else:
            recs.append((r["prompt"], None, "prompt"))
    all_ids = sp.encode([t for t, _, _ in recs])  # batched, all cores
    for (text, boundary, kind), ids in zip(recs, all_ids):
        cs = None
        if kind == "pc":
            if unk in ids:
                # out_type=str gives the normalized text of each token (a
                # run of unknown characters is one token)
                texts = sp.encode(text, out_type=str)
            else:
                texts = sp.id_to_piece(ids)
            cs = completion_start(sp, text, boundary, list(zip(texts, ids)), len(head),
                                  byte_ids)
        tail = [eos] if eos >= 0 and kind != "prompt" else []
        out.write(json.dumps({"ids": head + ids + tail, "completion_start": cs},
                             separators=(",", ":")) + "\n")


def decode(model, path):
    cached("decode", model, path, decode_to)


def decode_to(model, path, out):
    sp = spm.SentencePieceProcessor(model_file=model)
    recs = [json.loads(line) for line in lines(path)]
    parts = []  # the id lists to decode, batched
    for r in recs:
        ids, cs = r["ids"], r["completion_start"]
        parts += [ids] if cs is None else [ids[:cs], ids[cs:]]
    texts = iter(sp.decode(parts)) if parts else iter(())
    for r in recs:
        if r["completion_start"] is None:
            rec = {"text": next(texts)}
        else:
            rec = {"prompt": next(texts), "completion": next(texts)}
        out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


def seed(path):
    for line in lines(path):
        r = json.loads(line)
        rec = {"prompt": SEED.format(response=r["response"]),
               "completion": r["instruction"] + "\n"}
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


def same(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if fa.read() == fb.read():
            return 0
    with open(a, encoding="utf-8") as fa, open(b, encoding="utf-8") as fb:
        la, lb = fa.readlines(), fb.readlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if json.loads(x) != json.loads(y):
            print(f"line {i + 1} differs:\n  {a}: {x.strip()[:300]}\n  {b}: {y.strip()[:300]}")
            return 1
    if len(la) != len(lb):
        print(f"{a} has {len(la)} lines, {b} has {len(lb)}")
        return 1
    return 0


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 5:
        import struct
        return key + struct.pack("<f", payload)
    return key + varint(len(payload)) + payload


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def mkmodel(kind, out):
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    ws = " " if kind == "raw" else "\u2581"
    if kind == "raw":
        pieces += [("<0x%02X>" % b, 0.0, BYTE) for b in range(256)]
    else:
        pieces += [("<sep>", 0.0, USER_DEFINED), ("ab", 0.0, USER_DEFINED)]
    merges = [(ws + "a", -1), ("bc", -1), ("cd", -2), ("dd", -2), ("ddd", -2),
              ("dddd", -2), ("ce", -0.5), ("cee", -0.6), ("bcd", -3),
              (ws + ws, -5), ("xa", -1.5), (ws + "x", -1), ("ea", -1),
              ("eab", -0.7), ("bb", -4), ("bbb", -4)]
    for text, score in merges:
        unused = kind == "ud" and text in ("ce", "bb")
        pieces.append((text, float(score), UNUSED if unused else NORMAL))
    for i, ch in enumerate([ws, "a", "b", "c", "d", "e"]):
        pieces.append((ch, -100.0 - i, NORMAL))
    body = b""
    for text, score, typ in pieces:
        p = field(1, 2, text.encode()) + field(2, 5, score)
        if typ != NORMAL:
            p += field(3, 0, typ)
        body += field(1, 2, p)
    trainer = field(3, 0, 2) + field(4, 0, len(pieces))
    if kind == "raw":
        trainer += field(35, 0, 1)
    if kind == "ud":
        norm = field(1, 2, b"identity") + field(3, 0, 1) + field(4, 0, 1)
    elif kind == "seg":
        norm = field(1, 2, b"identity") + field(3, 0, 1) + field(4, 0, 0)
    else:
        norm = field(1, 2, b"identity") + field(3, 0, 0) + field(4, 0, 0) + field(5, 0, 0)
    body += field(2, 2, trainer) + field(3, 2, norm)
    with open(out, "wb") as f:
        f.write(body)


def fuzz(seed, n):
    import random
    rng = random.Random(int(seed))
    alphabet = ["a", "b", "c", "d", "e", " ", " ", "x", "\u00e9", "<sep>", "ab",
                "\t", "\u2581", "\U0001F600", "dd", "<s>"]
    def text():
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
    for i in range(int(n)):
        if i % 2:
            rec = {"text": text()}
        else:
            rec = {"prompt": text(), "completion": text()}
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "same":
        return same(*args)
    if cmd == "seed":
        return seed(args[0] if args else None)
    if cmd == "mkmodel":
        return mkmodel(*args)
    if cmd == "fuzz":
        return fuzz(*args)
    if import_error:
        sys.exit(f"tok_reference.py: {import_error}")
    path = args[1] if len(args) > 1 else None
    if cmd == "encode":
        encode(args[0], path)
    elif cmd == "decode":
        decode(args[0], path)
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
