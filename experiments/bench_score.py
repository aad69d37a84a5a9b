"""Scoring benchmark: an evaluation's answer choices under one few-shot header, scored by
`engine.score` with the header and each question shared (hydragen) against the prefix copied
into every row's cache (replicated).

  python experiments/bench_score.py --out DIR                  (GPU: llama3-8b, bf16)
  python experiments/bench_score.py --out DIR --smoke          (CPU: tiny, float32, toy sizes)

The workload is shaped like a multiple-choice evaluation: a few-shot header of --header
tokens, --questions questions of --question tokens each, --choices answer choices a question
of 1..--choice_tokens tokens. A row is one (question, choice): its prompt is header +
question, its continuation the choice, so the plan's tree is the header (shared by every
row), each question (shared by its choices) and empty suffixes. Rows run in batches of
--batch (a question's choices together), every mode on the same batches and model:
  hydragen    `engine.score(..., attention="hydragen")`: the header and the questions stored
              once as shared levels;
  replicated  the same with each row's whole prompt copied into its own cache;
each with every --methods of `score`: "decode" (the choices' tokens forced through the decode
loop, a step a token) and "prefill" (after each prompt's suffix in the prefill's pass).
Each (mode, method) runs the whole set twice; the second pass is timed (its programs compiled by the
first): wall time of the batches' `score` calls back to back, host work (planning, layout,
transfers) included, as a user's evaluation run spends it; no device-only time. Reported:
seconds, rows/s, the KV bytes of a batch, and each variant's agreement with the first (the
largest gap between their log-probabilities, and the rows whose greedy flags differ; bf16
may round apart near ties). Writes DIR/rows.csv and DIR/env.json; prints a short table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hydrax import engine  # noqa: E402
from hydrax.models import configs, llama  # noqa: E402

MODES = ("hydragen", "replicated")
FIELDS = ["mode", "method", "rows", "batches", "seconds", "rows_per_s", "compile_s_first_pass",
          "kv_bytes_per_batch", "decode_steps_per_batch", "max_logprob_gap", "greedy_differs"]


def workload(vocab: int, *, header: int, questions: int, question: int, choices: int,
             choice_tokens: int, seed: int = 0):
  """(prompts, continuations, question of each row): every question's choices in turn."""
  rng = np.random.default_rng(seed)
  head = rng.integers(3, vocab, header)
  prompts, conts, of = [], [], []
  for q in range(questions):
    prompt = np.concatenate([head, rng.integers(3, vocab, question)]).astype(np.int32)
    for _ in range(choices):
      prompts.append(prompt)
      conts.append(rng.integers(3, vocab, int(rng.integers(1, choice_tokens + 1))).tolist())
      of.append(q)
  return prompts, conts, np.asarray(of)


def batches(n_rows: int, choices: int, batch: int):
  """Row ranges of at most `batch` rows that keep a question's choices together."""
  per = max(batch // choices, 1) * choices
  return [(a, min(a + per, n_rows)) for a in range(0, n_rows, per)]


def run_mode(model, prompts, conts, cuts, mode: str, sharing_options: dict,
             method: str = "prefill"):
  """(seconds of the timed pass, compile seconds of the first, Scores per batch, KV bytes,
  decode steps of a batch)."""
  def one_pass():
    out = []
    for a, b in cuts:
      out.append(engine.score(model, None, prompts[a:b], conts[a:b], attention=mode,
                              sharing_options=sharing_options, method=method))
    jax.effects_barrier()
    return out
  first = one_pass()
  compile_s = sum(s.generation.compile_seconds for s in first)
  t0 = time.perf_counter()
  timed = one_pass()
  seconds = time.perf_counter() - t0
  return seconds, compile_s, timed, timed[0].generation.kv_bytes, \
      timed[0].generation.decode_steps


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--header", type=int, default=2048, help="few-shot header tokens")
  p.add_argument("--questions", type=int, default=256)
  p.add_argument("--question", type=int, default=64, help="tokens a question")
  p.add_argument("--choices", type=int, default=4)
  p.add_argument("--choice_tokens", type=int, default=4, help="most tokens a choice")
  p.add_argument("--batch", type=int, default=256, help="rows a batch")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--methods", default="decode,prefill",
                 help="engine.score's methods, each run with every mode")
  p.add_argument("--smoke", action="store_true",
                 help="tiny model, float32, toy sizes (CPU): what its test runs")
  a = p.parse_args(argv)
  if a.smoke:
    a.model, a.dtype = "tiny", "float32"
    a.header, a.questions, a.question, a.choices, a.batch = 48, 6, 5, 3, 9
  modes, methods = a.modes.split(","), a.methods.split(",")
  for flag, given, known in (("modes", modes, MODES), ("methods", methods, engine.SCORE_METHODS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise SystemExit(f"--{flag}: unknown {unknown}; known: {list(known)}")
  for name in ("header", "questions", "question", "choices", "choice_tokens", "batch"):
    if getattr(a, name) < 1:
      raise SystemExit(f"--{name} must be >= 1, got {getattr(a, name)}")
  os.makedirs(a.out, exist_ok=True)
  config = configs.LlamaConfig.from_preset(a.model)
  model = llama.init(config, seed=0, dtype=jnp.dtype(a.dtype))
  prompts, conts, _ = workload(config.vocab_size, header=a.header, questions=a.questions,
                               question=a.question, choices=a.choices,
                               choice_tokens=a.choice_tokens)
  cuts = batches(len(prompts), a.choices, a.batch)
  # Share the question too (a question's C rows: (C-1) x question tokens saved).
  sharing_options = dict(min_shared_tokens=0, merge_cost=0)
  env = dict(device=str(jax.devices()[0]), jax=jax.__version__, model=a.model, dtype=a.dtype,
             rows=len(prompts), batches=len(cuts), argv=sys.argv)
  with open(os.path.join(a.out, "env.json"), "w") as f:
    json.dump(env, f, indent=1)
  print(json.dumps(env), flush=True)
  rows, scores = [], []
  for mode in modes:
    for method in methods:
      seconds, compile_s, got, kv, steps = run_mode(model, prompts, conts, cuts, mode,
                                                    sharing_options, method)
      lp = np.concatenate([s.logprobs for s in got])
      greedy = np.concatenate([s.greedy for s in got])
      scores.append((lp, greedy))
      rows.append(dict(mode=mode, method=method, rows=len(prompts), batches=len(cuts),
                       seconds=round(seconds, 4), rows_per_s=round(len(prompts) / seconds, 1),
                       compile_s_first_pass=round(compile_s, 2), kv_bytes_per_batch=kv,
                       decode_steps_per_batch=steps,
                       max_logprob_gap=float(f"{np.nanmax(np.abs(lp - scores[0][0])):.3g}"),
                       greedy_differs=int((greedy != scores[0][1]).sum())))
      print(f"{mode} / {method}: {seconds:.3f} s, {len(prompts) / seconds:,.1f} rows/s, KV "
            f"{kv:,} B a batch", flush=True)
  with open(os.path.join(a.out, "rows.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
  print(f"\n| mode | method | rows | s | rows/s | KV B/batch | steps/batch | lp gap to "
        f"{rows[0]['mode']}/{rows[0]['method']} | greedy differs |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mode']} | {r['method']} | {r['rows']} | {r['seconds']} | {r['rows_per_s']} | "
          f"{r['kv_bytes_per_batch']:,} | {r['decode_steps_per_batch']} | "
          f"{r['max_logprob_gap']} | {r['greedy_differs']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
