"""Does a new sharing tree of the same signature reuse the compiled engine? (H200 check)

  python experiments/engine_signature.py [PRESET [PREFIX]]     (default llama3-8b 4096)

Generates twice with random bf16 weights: 256 prompts under 4 roots of about PREFIX tokens,
then 256 other prompts under 4 other roots (100 tokens shorter, other group sizes), each with
100..119 own tokens and 128 new tokens. Prints per tree the compile seconds (the second should
be 0: same `engine.Signature`, new tree), decode tokens/s and whether the signatures match;
writes the rows to $OUT/engine_signature.json (or ./ without $OUT).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from hydrax import engine
from hydrax.models import configs, llama


def tree(vocab: int, groups: int, batch: int, prefix: int, seed: int) -> list:
  """`batch` prompts under `groups` roots of about `prefix` tokens; group sizes from `seed`."""
  rng = np.random.default_rng(seed)
  roots = [rng.integers(3, vocab, prefix - 37 * g) for g in range(groups)]
  which = np.sort(rng.integers(0, groups, batch))
  return [np.concatenate([roots[w], rng.integers(3, vocab, 100 + i % 20)])
          for i, w in enumerate(which)]


def main(preset: str = "llama3-8b", prefix: int = 4096) -> list:
  config = configs.LlamaConfig.from_preset(preset)
  net = llama.init(config, dtype=jax.numpy.bfloat16)
  rows = []
  for name, root_tokens in (("A: 4 roots", prefix), ("B: 4 other roots", prefix - 100)):
    gen = engine.generate(net, tree(config.vocab_size, 4, 256, root_tokens, len(rows)),
                          max_new_tokens=128)
    rows.append(dict(tree=name, compile_s=round(gen.compile_seconds, 2),
                     decode_tokens_per_s=round(gen.decode_tokens_per_second),
                     signature=str(gen.signature)))
  out = os.environ.get("OUT", ".")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "engine_signature.json"), "w") as f:
    json.dump(rows, f, indent=1)
  for r in rows:
    print(f"{r['tree']:18s} compile {r['compile_s']:7.2f} s  decode "
          f"{r['decode_tokens_per_s']:9,d} tok/s  same signature as A: "
          f"{r['signature'] == rows[0]['signature']}")
  return rows


if __name__ == "__main__":
  main(*(sys.argv[1:2] or ["llama3-8b"]), *[int(x) for x in sys.argv[2:3]])
