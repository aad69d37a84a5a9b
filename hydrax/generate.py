"""Offline batch inference of a whole prompts file: text in, completions out.

  python -m hydrax.generate --prompts P.jsonl --out OUT.jsonl (--checkpoint DIR | --hf_dir DIR |
      --preset NAME) [--tokenizer PATH] [--max_new_tokens 128] [--memory_budget BYTES] ...
  run(prompts, out, *, checkpoint=None, hf_dir=None, preset=None, ...) -> RunSummary

Input (see `hydrax.offline.requests`): JSONL with `id`, `prompt` text or `tokens`, optional
per-request `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop` (strings and/or token ids),
`n` (completions of the prompt; default `--n`, 1), `seed` (its random stream, below); or plain
text, one prompt a line. Output: one JSON line per completion, appended per batch (fsync):
`id`, `sample` (0 .. n - 1), `text` (null without a tokenizer), `tokens` (generated ids, stop
id excluded), `finish_reason` ("stop": EOS, a stop id or a stop string ended it; "length":
max_new_tokens), `stop` (what stopped it, or null), `prompt_tokens`, with --logprobs
`logprobs` (each token's log probability under the model, before temperature and truncation),
and `timings` (its batch's index, its completions (`batch_requests`) and padded size,
`prefill` ("packed" or "padded"), prefill / decode / compile seconds, and `at_s`: seconds since
the run started when it was written).

Prefill (`--prefill`, default auto): each batch's unique suffixes are packed into rows by
first-fit bin packing (Prepacking: about sum(lengths) token slots instead of batch x longest)
where that runs fewer slots, else padded; the engine decides per batch from the lengths and
the choice is part of the batch's compile signature.

Planning (`hydrax.offline.schedule`): one radix tree over the whole dataset, batches that keep
sharers together under a KV budget, each planned and run by `hydrax.engine.generate`. Requests
whose sampling settings (temperature, top_k, top_p) differ go to different batches; max_new_tokens
and stop settings are per row (a batch decodes to its longest max_new_tokens; rows are cut to
their own afterwards, and past a stop id or EOS). The engine stops a row at the model's EOS;
other stop ids and stop strings end the completion when the batch is done (their tokens are
decoded, then dropped).

Samples: a prompt's n completions are n rows of the same tokens, which the global plan
shares whole (the prompt is prefilled once for all of them). Each completion draws from its
own random stream: the run's --seed folded with its request's stream (the request's `seed`
if it gives one, else a hash of its id) and with its sample index (`engine.generate(row_seeds=)`).
So a completion depends on the model, the seed, its request and its sample index, not on the
batch it lands in: the same with another max_batch, memory budget or strategy, with other
requests in the file, and on resuming (up to the float rounding of the logits, which batch
shapes move a little: a draw at a near-tie of two tokens can change with them). Requests that
give the same `seed`, prompt and settings draw the same completions, whatever their ids.

Scoring: a request with `continuation` (text or token ids) is scored instead of generated:
its record's `logprob` is log p(continuation | prompt), `logprobs` per token, `greedy` whether
greedy decoding gives it, finish_reason "scored" (`engine.score`). Scored requests run in
batches of their own; --score_method says how their continuations are taken (in the prefill,
the default, or through the decode loop).

Resuming: rerunning with the same --out skips the completions already in it (by id and
sample); an interrupted run loses at most the batch in flight. The schedule is made over every
request of the file (finished or not), so a resumed run runs the same batches as an
uninterrupted one.

Model: a hydrax checkpoint (`--checkpoint`, its tokenizer.json used if present), a local
HuggingFace Llama directory (`--hf_dir`, its tokenizer.json), or a preset with random weights
(`--preset`, for benchmarks). EOS: the model config's (the engine stops rows there), and for
an HF directory every id its config.json / generation_config.json lists (as stop ids). Without
a tokenizer and with text prompts, a byte-level BPE tokenizer is trained on the prompts file
(saved beside --out as OUT.tokenizer.json and reused on resume) and the preset's vocabulary is
resized to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydrax import checkpoint as checkpoint_lib
from hydrax import engine
from hydrax._log import log_once
from hydrax.models import configs, llama
from hydrax.offline import requests as requests_lib
from hydrax.offline import schedule as schedule_lib
from hydrax.offline.writer import ResultWriter

_CPU_BUDGET = 4 << 30      # KV bytes a batch may take where the device reports no memory


@dataclasses.dataclass
class RunSummary:
  """What a run did. requests: good requests in the file; completions: the completions they
  ask for (each request's n); skipped: completions already in the output; completed / failed:
  completions of this run; bad_lines: BadLine list; generated_tokens: by completed ones (after
  cutting); compiles: engine calls that compiled; signatures: distinct batch
  signatures of the schedule; wall_seconds, planning_seconds; prefill_slots: token slots the
  batches' unique-suffix prefill ran (packed or padded), padded_slots: what padding every
  batch would have run, packed_batches: batches prefilled packed; reused_tokens: shared-node
  tokens a batch took from the previous one instead of prefilling them (keep_nodes);
  ahead_compile_seconds: compile time spent in the background (compile_ahead), beside
  compile_seconds, the time batches waited for their programs;
  schedule: the Schedule."""
  requests: int = 0
  completions: int = 0
  skipped: int = 0
  completed: int = 0
  failed: int = 0
  bad_lines: list = dataclasses.field(default_factory=list)
  generated_tokens: int = 0
  batches_run: int = 0
  compiles: int = 0
  signatures: int = 0
  wall_seconds: float = 0.0
  planning_seconds: float = 0.0
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0
  compile_seconds: float = 0.0
  prefill_slots: int = 0
  padded_slots: int = 0
  packed_batches: int = 0
  reused_tokens: int = 0
  ahead_compile_seconds: float = 0.0
  schedule: object = None

  @property
  def ok(self) -> bool:
    """False when everything failed: completions to run and none completed, or a file of bad
    lines only. (Everything already in the output is not a failure.)"""
    if self.requests == 0:
      return not self.bad_lines
    return self.completions == self.skipped or self.completed > 0

  def as_dict(self) -> dict:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("bad_lines",
                                                                          "schedule")}
    out["bad_lines"] = len(self.bad_lines)
    if self.schedule is not None:
      s = self.schedule
      out.update(batches=len(s.batches), prompt_tokens=s.prompt_tokens,
                 tree_tokens=s.tree_tokens, prefill_tokens=s.prefill_tokens,
                 reprefill_tokens=s.reprefill_tokens, shared_fraction=round(s.shared_fraction, 4),
                 memory_budget=s.budget)
    return out


# ----------------------------------------------------------------------------- model


def load_model(*, checkpoint: Optional[str] = None, hf_dir: Optional[str] = None,
               preset: Optional[str] = None, dtype=None, seed: int = 0,
               vocab_size: Optional[int] = None, tokenizer_ids: Optional[dict] = None):
  """(config, params) from exactly one of a hydrax checkpoint, an HF directory or a preset
  (random weights with `seed`; `vocab_size` / `tokenizer_ids` (bos, eos) override the
  preset's for a tokenizer made on the fly). dtype: None = as stored (presets: float32)."""
  given = [n for n, v in (("checkpoint", checkpoint), ("hf_dir", hf_dir), ("preset", preset))
           if v is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of checkpoint, hf_dir, preset; got {given or 'none'}")
  if checkpoint is not None:
    return checkpoint_lib.restore(checkpoint, dtype=dtype)
  if hf_dir is not None:
    return checkpoint_lib.from_hf(hf_dir, dtype=dtype)
  config = configs.LlamaConfig.from_preset(preset)
  changes = dict(tokenizer_ids or {})
  if vocab_size is not None:
    changes["vocab_size"] = int(vocab_size)
  if changes:
    config = config.replace(**changes)
  model = llama.init(config, seed=seed, dtype=jnp.float32 if dtype is None else dtype)
  from flax import nnx
  return config, nnx.split(model)[1]


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 512):
  """A byte-level BPE tokenizer trained on `texts`, with <pad>=0, <s>=1 (added before every
  prompt) and </s>=2, the ids of the `tiny` preset's pad/bos/eos. Deterministic."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tok


def find_tokenizer(tokenizer: Optional[str], checkpoint: Optional[str], hf_dir: Optional[str]):
  """The tokenizer given, or the model directory's tokenizer.json, or None."""
  if tokenizer is not None:
    return checkpoint_lib.load_tokenizer(tokenizer)
  for folder in (checkpoint, hf_dir):
    if folder is not None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
      return checkpoint_lib.load_tokenizer(folder)
  return None


def hf_eos_ids(hf_dir: str) -> set:
  """Every EOS id named by a HuggingFace directory's config.json and generation_config.json
  (Llama 3 lists several; the model config keeps only the first)."""
  ids = set()
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(hf_dir, name)
    if os.path.isfile(path):
      with open(path) as f:
        eos = json.load(f).get("eos_token_id")
      ids.update([eos] if isinstance(eos, int) else [e for e in eos or () if isinstance(e, int)])
  return ids


def device_memory_budget(fraction: float = 0.8) -> Optional[int]:
  """fraction x the free memory of the first device, or None where it reports none (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


# ----------------------------------------------------------------------------- completions


def _first_stop_string(tokenizer, tokens: list, stops: Sequence[str]):
  """(k, text, stop): the fewest leading tokens whose text holds a stop string, that text cut
  where the stop string starts, and the stop string; None when no stop string occurs."""
  text = tokenizer.decode(tokens)
  hits = [(text.find(s), s) for s in stops if s in text]
  if not hits:
    return None
  lo, hi = 1, len(tokens)            # decode(tokens[:k]) holds a stop string for k = hi
  while lo < hi:
    mid = (lo + hi) // 2
    part = tokenizer.decode(tokens[:mid])
    if any(s in part for s in stops):
      hi = mid
    else:
      lo = mid + 1
  at, stop = min(hits)
  return hi, text[:at], stop


def finish(tokens: np.ndarray, *, max_new_tokens: int, stop_ids, stop_strings, tokenizer):
  """(tokens, text, finish_reason, stop) of one row from the engine's generated ids."""
  tokens = [int(t) for t in tokens[:max_new_tokens]]
  reason, stop = "length", None
  for i, t in enumerate(tokens):
    if t in stop_ids:
      tokens, reason, stop = tokens[:i], "stop", t
      break
  text = None
  if tokenizer is not None:
    hit = _first_stop_string(tokenizer, tokens, stop_strings) if stop_strings else None
    if hit is not None:
      k, text, stop = hit
      tokens, reason = tokens[:k], "stop"
    else:
      text = tokenizer.decode(tokens)
  return tokens, text, reason, stop


def _scored_record(request, continuation, scores, j: int, tokenizer, *,
                   prompt_tokens: int) -> dict:
  """The record of a scored request from row j of its batch's `engine.Scores`: its
  continuation's tokens, their log-probabilities and sum, and whether greedy decoding gives
  it."""
  tokens = [int(t) for t in continuation]
  lps = scores.logprobs[j, :len(tokens)]
  return dict(id=request.id, sample=0,
              text=None if tokenizer is None else tokenizer.decode(tokens), tokens=tokens,
              finish_reason="scored", stop=None, prompt_tokens=prompt_tokens,
              logprob=float(scores.total[j]), greedy=bool(scores.greedy[j]),
              logprobs=[float(x) for x in lps])


# ----------------------------------------------------------------------------- run


class _Progress:
  """One line on stderr per finished batch: completions done, tokens/s, ETA."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.t0 = time.perf_counter()
    self.tty = enabled and sys.stderr.isatty()

  def update(self, done: int, tokens: int) -> None:
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.t0
    rate = tokens / elapsed if elapsed > 0 else 0.0
    left = self.total - done
    eta = elapsed / done * left if done else float("nan")
    eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    line = (f"hydrax.generate: {done}/{self.total} completions "
            f"({100 * done / max(self.total, 1):.0f}"
            f"%), {rate:,.0f} tokens/s, ETA {eta_s}")
    sys.stderr.write(("\r" + line + (" " * 8) + ("\n" if done >= self.total else ""))
                     if self.tty else line + "\n")
    sys.stderr.flush()


def _check_defaults(max_new_tokens, temperature, top_k, top_p, max_batch, n):
  def bad(name, value, want):
    raise ValueError(f"{name} must be {want}, got {value!r}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    bad("max_new_tokens", max_new_tokens, "an int >= 1")
  if not isinstance(temperature, (int, float)) or not temperature >= 0:
    bad("temperature", temperature, "a number >= 0")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    bad("top_k", top_k, "None or an int >= 1")
  if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
    bad("top_p", top_p, "None or a number in (0, 1]")
  if not isinstance(max_batch, int) or max_batch < 1:
    bad("max_batch", max_batch, "an int >= 1")
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    bad("n", n, "an int >= 1")


def id_hash(request_id: str) -> int:
  """A request id's stable 32-bit hash (blake2b): the first word of its completions' row
  seeds (unless the request gives its `seed`), so that a completion's random stream follows
  its request, not its batch row."""
  return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=4).digest(),
                        "little")


def run(prompts: str, out: str, *, checkpoint: Optional[str] = None,
        hf_dir: Optional[str] = None, preset: Optional[str] = None,
        tokenizer: Optional[str] = None, dtype=None, seed: int = 0,
        max_new_tokens: int = 128, temperature: float = 0.0, top_k: Optional[int] = None,
        top_p: Optional[float] = None, stop: Sequence = (), n: int = 1,
        ignore_eos: bool = False, add_special_tokens: bool = True,
        memory_budget: Optional[int] = None, memory_fraction: float = 0.8,
        max_batch: int = 256, strategy: str = "global",
        attention: str = "hydragen", backend="auto", min_shared_tokens: float = 256,
        merge_cost: float = 16, max_levels: Optional[int] = 2, prefill_chunk: int = 2048,
        prefill: str = "auto", keep_nodes: bool = True, compile_ahead: bool = True,
        check_every: int = 1, nucleus: str = "sort", logprobs: bool = False,
        score_method: str = "prefill", on_bad_line: str = "error",
        progress: bool = True, on_batch: Optional[Callable] = None, model=None) -> RunSummary:
  """Runs every completion of `prompts` not yet in `out` and appends it to `out`.

  Model: one of checkpoint / hf_dir / preset, or `model=(config, params)` already loaded;
  seed: a preset's random weights and the sampling's base key (see the module docstring).
  Defaults for requests that leave them out: max_new_tokens, temperature, top_k, top_p, stop
  (strings and/or ids), n (completions of each prompt). ignore_eos: do not stop at the
  model's EOS. add_special_tokens: let the tokenizer add BOS as its template says.
  memory_budget: KV bytes per batch (default: memory_fraction of the device's free memory;
  4 GiB where it reports none, logged). max_batch: most completions per batch (the KV budget
  may cut smaller ones). 256 by default: on the H200 a llama3-8b decode step's products stop
  being bound by the weights' reads near 256 rows
  (experiments/results/engine/layers_batch_sweep: 64 rows 4.41 ms, 256 rows 6.66 ms); larger
  batches still pay where the budget holds them (full-size samples workload: 133 s at 256,
  110 s at 1024; experiments/results/offline_h200/run4). strategy: "global" (tree grouping,
  BatchLLM order) or "arrival" (input order; the baseline).
  attention / backend / prefill_chunk / prefill: the engine's (prefill "auto" packs a batch's
  unique suffixes into rows where that runs fewer token slots than padding each to the
  longest; "packed" / "padded" force one way).
  min_shared_tokens / merge_cost / max_levels: the per-batch sharing plan's cost model.
  keep_nodes (hydragen): pass each batch's shared levels to the next batch, which takes the
  nodes it shares with it from there instead of prefilling them again (`engine.KeptNodes`;
  the schedule runs such batches back to back). The levels are handed over in place, so no
  batch holds more memory than it would alone.
  compile_ahead: compile the programs of the batch running and the next ones in background
  threads (`engine.compile_jobs`, at most two batches ahead), side by side and beside the
  first batch's prefill, which the run compiles itself, instead of stalling on each new
  program; the seconds they compiled are `RunSummary.ahead_compile_seconds`. On by default:
  on an H200 it shortened every full-size run it was measured in
  (experiments/results/offline_h200/run5).
  check_every: decode steps between the decode loop's checks whether every row is done
  (`engine.Runtime.check_every`): the same completions; more saves the device's wait on each
  check's copy to the host at the price of up to check_every - 1 discarded steps a batch.
  nucleus: how top_p's cutoff is found (`engine.Runtime.nucleus`): "sort" (every row's
  vocabulary sorted) or "search" (8 passes over the logits); the same completions up to the
  float rounding of the probability sums at the cutoff.
  logprobs: each record also gets `logprobs`, its tokens' log-probabilities under the model's
  own distribution (the logits' log-softmax, before temperature, top_k and top_p).
  score_method: how scored requests' continuations are taken (`engine.score`'s method:
  "prefill" or "decode"); the same scores up to float rounding.
  on_bad_line: "error" (raise BadInput naming every bad line) or "skip" (report and go on).
  on_batch(index, records): called after each batch is written (tests use it to interrupt).
  Returns a RunSummary; raises ValueError for bad arguments.
  """
  t_start = time.perf_counter()
  _check_defaults(max_new_tokens, temperature, top_k, top_p, max_batch, n)
  if score_method not in engine.SCORE_METHODS:
    raise ValueError(f"score_method must be one of {list(engine.SCORE_METHODS)}, got "
                     f"{score_method!r}")
  if strategy not in schedule_lib.STRATEGIES:
    raise ValueError(f"strategy must be one of {list(schedule_lib.STRATEGIES)}, got "
                     f"{strategy!r}")
  if attention not in engine.ATTENTION_MODES:
    raise ValueError(f"attention must be one of {list(engine.ATTENTION_MODES)}, got "
                     f"{attention!r}")
  if prefill not in engine.PREFILL_MODES:
    raise ValueError(f"prefill must be one of {list(engine.PREFILL_MODES)}, got {prefill!r}")
  runtime = engine.Runtime.build(backend, check_every=check_every, nucleus=nucleus)
  summary = RunSummary()
  reqs, bad = requests_lib.read_requests(prompts, on_bad_line=on_bad_line)
  writer = ResultWriter(out)
  tok = find_tokenizer(tokenizer, checkpoint, hf_dir)
  if model is None:
    vocab, ids = None, None
    if tok is None and preset is not None and any(r.prompt is not None for r in reqs):
      tok_path = out + ".tokenizer.json"
      if os.path.isfile(tok_path):
        tok = checkpoint_lib.load_tokenizer(tok_path)
      else:
        tok = train_tokenizer([r.prompt for r in reqs if r.prompt is not None])
        tok.save(tok_path)
      vocab, ids = tok.get_vocab_size(), dict(bos_token_id=1, eos_token_id=2)
    config, params = load_model(checkpoint=checkpoint, hf_dir=hf_dir, preset=preset,
                                dtype=dtype, seed=seed, vocab_size=vocab, tokenizer_ids=ids)
  else:
    config, params = model
  param_dtype = jax.tree_util.tree_leaves(params)[0].dtype
  seqs, more_bad = requests_lib.tokenize(
      reqs, tok, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
      default_max_new_tokens=max_new_tokens, add_special_tokens=add_special_tokens)
  conts, cont_bad = requests_lib.tokenize_continuations(
      reqs, seqs, tok, vocab_size=config.vocab_size,
      max_positions=config.max_position_embeddings, add_special_tokens=add_special_tokens)
  index_of = {r.line: i for i, r in enumerate(reqs)}
  for b in cont_bad:       # a request whose continuation is bad is bad
    seqs[index_of[b.line]] = None
  more_bad += cont_bad
  if more_bad and on_bad_line == "error":
    raise requests_lib.BadInput(prompts, more_bad)
  bad = sorted(bad + more_bad, key=lambda b: b.line)
  summary.bad_lines = bad
  for b in bad:
    sys.stderr.write(f"hydrax.generate: skipping {prompts} {b}\n")
  good = [i for i, s in enumerate(seqs) if s is not None]
  reqs = [reqs[i] for i in good]
  # The rows the run schedules: one a completion (or a scored continuation), `of[row]` its
  # request, `sample[row]` its index among the request's n.
  copies = [1 if r.scored else r.n or n for r in reqs]
  of = [i for i, c in enumerate(copies) for _ in range(c)]
  sample = [k for c in copies for k in range(c)]
  conts = [conts[good[i]] for i in of]
  seqs = [seqs[good[i]] for i in of]
  summary.requests = len(reqs)
  summary.completions = len(of)
  summary.skipped = sum((reqs[i].id, k) in writer.done for i, k in zip(of, sample))
  if not reqs:
    summary.wall_seconds = time.perf_counter() - t_start
    return summary

  defaults = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
  keys = [tuple((k, getattr(r, k) if getattr(r, k) is not None else v)
                for k, v in defaults.items()) for r in reqs]
  keys = [k if dict(k)["temperature"] > 0 else (("temperature", 0.0), ("top_k", None),
                                                ("top_p", None)) for k in keys]
  greedy_copies = [r.id for r, k, c in zip(reqs, keys, copies)
                   if c > 1 and dict(k)["temperature"] == 0]
  # Scored requests run in batches of their own (forced tokens, greedy draws).
  keys = [(("temperature", 0.0), ("top_k", None), ("top_p", None), ("score", True))
          if r.scored else k for r, k in zip(reqs, keys)]
  if greedy_copies:
    log_once("offline-greedy-samples", "hydrax.generate: %d request(s) ask for n > 1 greedy "
             "completions (temperature 0), which are all the same (first: %r); set a "
             "temperature to sample", len(greedy_copies), greedy_copies[0])
  keys = [keys[i] for i in of]
  own_new = [len(c) if c is not None else reqs[i].max_new_tokens or max_new_tokens
             for i, c in zip(of, conts)]
  streams = [id_hash(r.id) if r.seed is None else r.seed for r in reqs]
  eos = None if ignore_eos else config.eos_token_id
  run_stop_strings = tuple(s for s in stop if isinstance(s, str))
  run_stop_ids = tuple(int(s) for s in stop if not isinstance(s, str))
  if hf_dir is not None and not ignore_eos:
    run_stop_ids += tuple(sorted(hf_eos_ids(hf_dir)))
  if memory_budget is None:
    memory_budget = device_memory_budget(memory_fraction)
    if memory_budget is None:
      memory_budget = _CPU_BUDGET
      log_once("offline-cpu-budget", "hydrax.generate: the device reports no memory limit; "
               "using a KV budget of %d bytes per batch (set memory_budget)", memory_budget)
  sharing_options = dict(min_shared_tokens=min_shared_tokens, merge_cost=merge_cost,
                         max_levels=max_levels)
  batch_options = dict(config=config, dtype=param_dtype, max_batch=max_batch,
                       attention=attention, sharing_options=sharing_options, pad=True,
                       max_positions=config.max_position_embeddings, prefill=prefill,
                       prefill_chunk=prefill_chunk)
  plan = schedule_lib.schedule(seqs, own_new, keys, memory_budget=memory_budget,
                               strategy=strategy, **batch_options)
  summary.schedule = plan
  summary.signatures = plan.signatures
  summary.planning_seconds = plan.seconds
  todo = summary.completions - summary.skipped
  bar = _Progress(todo, progress)
  done_here = 0

  keep = keep_nodes and attention == "hydragen"
  kept = [None]        # the last batch's shared levels (engine.KeptNodes), for the next one

  def engine_options(batch) -> dict:
    """The engine keywords of `batch` beyond the run's: its sampling settings and, for scored
    continuations, their tokens forced (padding rows force none)."""
    options = dict(batch.key)
    if options.pop("score", False):
      forced = [conts[row] for row in batch.rows] + [()] * (batch.size - len(batch.rows))
      return dict(options, forced=forced, stop_after_forced=True, logprobs=True,
                  forced_in=score_method)
    return dict(options, logprobs=logprobs)

  def run_batch(index, batch):
    """Runs `batch` (splitting it on out-of-memory); returns the records of its rows."""
    reuse, kept[0] = kept[0], None
    options = engine_options(batch)
    scored = "forced" in options
    # Each completion's random stream: (its request's seed or id hash, its sample index);
    # padding rows (past batch.rows) draw from (0, 0), and their tokens are dropped.
    row_seeds = np.zeros((batch.size, 2), np.int64)
    row_seeds[:len(batch.rows)] = [(streams[of[row]], sample[row]) for row in batch.rows]
    try:
      gen = engine.generate(config, params, batch.plan, max_new_tokens=batch.max_new_tokens,
                            attention=attention, eos_id=None if scored else eos, seed=seed,
                            row_seeds=row_seeds, prefill_chunk=prefill_chunk,
                            runtime=runtime, prefill=prefill, keep=keep, reuse=reuse,
                            **options)
    except engine.OutOfMemoryError as e:
      if len(batch.rows) == 1:
        row = batch.rows[0]
        sys.stderr.write(f"hydrax.generate: request {reqs[of[row]].id!r} (sample "
                         f"{sample[row]}) failed: {e}\n")
        summary.failed += 1
        return []
      half = len(batch.rows) // 2
      sys.stderr.write(f"hydrax.generate: batch {index} ({len(batch.rows)} completions) ran "
                       f"out of memory; splitting it in two\n")
      return [r for part in (batch.rows[:half], batch.rows[half:])
              for r in run_batch(index, schedule_lib.make_batch(
                  seqs, part, batch.key, own_new, **batch_options))]
    kept[0] = gen.kept
    summary.reused_tokens += gen.reused_tokens
    summary.compiles += gen.compile_seconds > 0
    summary.prefill_seconds += gen.prefill_seconds
    summary.decode_seconds += gen.decode_seconds
    summary.compile_seconds += gen.compile_seconds
    summary.prefill_slots += gen.prefill_slots
    summary.padded_slots += gen.padded_slots
    summary.packed_batches += gen.prefill == "packed"
    timings = dict(batch=index, batch_requests=len(batch.rows), batch_size=batch.size,
                   prefill=gen.prefill, prefill_s=round(gen.prefill_seconds, 4),
                   decode_s=round(gen.decode_seconds, 4),
                   compile_s=round(gen.compile_seconds, 4))
    records = []
    scores = engine.Scores.of(gen, [len(f) for f in options["forced"]]) if scored else None
    for j, row in enumerate(batch.rows):
      r = reqs[of[row]]
      if scored:
        records.append(dict(_scored_record(r, conts[row], scores, j, tok,
                                           prompt_tokens=int(seqs[row].size)),
                            timings=dict(timings)))
        continue
      stop_ids = set(r.stop_ids) | set(run_stop_ids) | ({eos} if eos is not None else set())
      tokens, text, reason, why = finish(
          gen.tokens[j, :gen.lengths[j]], max_new_tokens=own_new[row], stop_ids=stop_ids,
          stop_strings=r.stop + run_stop_strings, tokenizer=tok)
      record = dict(id=r.id, sample=sample[row], text=text, tokens=tokens,
                    finish_reason=reason, stop=why, prompt_tokens=int(seqs[row].size))
      if logprobs:
        record["logprobs"] = [float(x) for x in gen.logprobs[j, :len(tokens)]]
      records.append(dict(record, timings=dict(timings)))
    return records

  def run_and_write(index, batch):
    nonlocal done_here
    records = run_batch(index, batch)
    now = round(time.perf_counter() - t_start, 3)
    for rec in records:
      rec["timings"]["at_s"] = now
    writer.write(records)
    summary.batches_run += 1
    summary.completed += len(records)
    summary.generated_tokens += sum(len(rec["tokens"]) for rec in records)
    done_here += len(batch.rows)
    bar.update(done_here, summary.generated_tokens)
    if on_batch is not None:
      on_batch(index, records)

  todo = []
  for index, batch in enumerate(plan.batches):
    rows = tuple(r for r in batch.rows if (reqs[of[r]].id, sample[r]) not in writer.done)
    if not rows:
      continue
    if len(rows) < len(batch.rows):   # partly written before (an interrupted write): re-plan
      batch = schedule_lib.make_batch(seqs, rows, batch.key, own_new, **batch_options)
    todo.append((index, batch))
  ahead = _CompileAhead(todo, config, params, engine_options, keep=keep, attention=attention,
                        prefill_chunk=prefill_chunk, runtime=runtime, prefill=prefill) \
      if compile_ahead else None
  try:
    for position, (index, batch) in enumerate(todo):
      if ahead is not None:
        ahead.reached(position)
      run_and_write(index, batch)
  finally:
    if ahead is not None:
      summary.ahead_compile_seconds = ahead.stop()
  summary.wall_seconds = time.perf_counter() - t_start
  return summary


class _CompileAhead:
  """Compiles the programs of the batches to come while the current one runs
  (`engine.compile_jobs`; the host is idle while the device runs a batch, and each new
  program would otherwise stall the run for its compile), at most LOOKAHEAD batches ahead (the
  engine's cache holds 8 programs of a kind). A planner thread walks the batches in order,
  with keep following the chain of kept levels as the batches will hand them on (their shapes
  are traced, so it waits for no compile), and hands each program to one of WORKERS compiling
  threads (XLA compiles without the GIL): a batch's decode compiles beside its prefill, the
  next batch's programs beside both. The prefill of a batch the main loop has reached is left
  to it (it compiles that right then; a worker would only make it wait), and so is any
  program another thread is compiling. A failure is logged once and ends it: the batches then
  compile their own programs, as without it."""
  LOOKAHEAD = 2
  WORKERS = 2     # the decode of the batch running and the next batch's prefill at once

  def __init__(self, todo, config, params, options_of, *, keep: bool, **options):
    self._todo, self._config, self._params = todo, config, params
    self._options_of = options_of     # batch -> its own engine keywords
    self._keep, self._options = keep, options
    self._cond = threading.Condition()
    self._position, self._stopped = 0, False
    self.seconds = 0.0
    self._pool = concurrent.futures.ThreadPoolExecutor(
        self.WORKERS, thread_name_prefix="hydrax-compile-ahead")
    self._thread = threading.Thread(target=self._plan, name="hydrax-compile-ahead",
                                    daemon=True)
    self._thread.start()

  def reached(self, position: int) -> None:
    """The main loop starts the batch at `position` of todo."""
    with self._cond:
      self._position = position
      self._cond.notify_all()

  def stop(self) -> float:
    """Ends the threads (after the compiles in progress); returns the seconds they compiled."""
    with self._cond:
      self._stopped = True
      self._cond.notify_all()
    self._thread.join()
    self._pool.shutdown(wait=True, cancel_futures=True)
    return self.seconds

  def _plan(self) -> None:
    reuse = None
    for i, (_, batch) in enumerate(self._todo):
      with self._cond:
        self._cond.wait_for(lambda: self._stopped or i <= self._position + self.LOOKAHEAD)
        if self._stopped:
          return
        reached = i <= self._position
      try:
        jobs = engine.compile_jobs(
            self._config, self._params, batch.plan, max_new_tokens=batch.max_new_tokens,
            keep=self._keep, reuse=reuse, **self._options, **self._options_of(batch))
      except Exception as e:    # noqa: BLE001 (any failure: the batches compile themselves)
        self._fail(i, e)
        return
      for job in (jobs.decode,) if reached else (jobs.prefill, jobs.decode):
        if job is not None:
          self._pool.submit(self._compile, i, job)
      reuse = jobs.kept

  def _compile(self, i: int, job) -> None:
    with self._cond:
      if self._stopped:
        return
    try:
      seconds = job()
    except Exception as e:    # noqa: BLE001 (as in _plan)
      self._fail(i, e)
      return
    with self._cond:
      self.seconds += seconds

  def _fail(self, i: int, error: Exception) -> None:
    log_once("offline-compile-ahead", "hydrax.generate: compiling ahead stopped at batch %d "
             "(%s: %s); each batch compiles its own programs", i, type(error).__name__, error)
    with self._cond:
      self._stopped = True
      self._cond.notify_all()


# ----------------------------------------------------------------------------- command line


def _parse_stop(values):
  out = []
  for v in values or ():
    out.append(int(v[3:]) if v.startswith("id:") else v)
  return tuple(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m hydrax.generate",
      description="Completions for every prompt of a file (JSONL or plain text), appended to "
                  "a JSONL file; reruns skip finished ids.")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="hydrax checkpoint directory")
  model.add_argument("--hf_dir", help="local HuggingFace Llama directory")
  model.add_argument("--preset", help="a preset with random weights (e.g. tiny, llama3-8b)")
  p.add_argument("--prompts", required=True, help="JSONL (id, prompt|tokens, ...) or text")
  p.add_argument("--out", required=True, help="output JSONL (appended; finished ids skipped)")
  p.add_argument("--tokenizer", help="tokenizer.json (default: the model directory's)")
  p.add_argument("--dtype", default=None, help="parameter dtype (default: as stored; presets "
                 "float32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--stop", action="append", help="a stop string (repeatable); 'id:N' for a "
                 "stop token id")
  p.add_argument("--n", type=int, default=1,
                 help="completions of each prompt that gives no n of its own (each its own "
                 "sample; records carry `sample`)")
  p.add_argument("--ignore_eos", action="store_true")
  p.add_argument("--no_special_tokens", action="store_true",
                 help="do not let the tokenizer add BOS")
  p.add_argument("--memory_budget", type=float, default=None,
                 help="KV-cache bytes per batch (default: a fraction of free device memory)")
  p.add_argument("--memory_fraction", type=float, default=0.8)
  p.add_argument("--max_batch", type=int, default=256,
                 help="most completions per batch (the KV budget may cut batches smaller)")
  p.add_argument("--strategy", choices=schedule_lib.STRATEGIES, default="global")
  p.add_argument("--attention", choices=engine.ATTENTION_MODES, default="hydragen")
  p.add_argument("--backend", default="auto")
  p.add_argument("--min_shared_tokens", type=float, default=256)
  p.add_argument("--merge_cost", type=float, default=16)
  p.add_argument("--max_levels", type=int, default=2)
  p.add_argument("--prefill_chunk", type=int, default=2048)
  p.add_argument("--prefill", choices=engine.PREFILL_MODES, default="auto",
                 help="unique-suffix prefill: packed into rows (Prepacking), padded to the "
                 "longest, or auto (packed where it runs fewer token slots)")
  p.add_argument("--no_keep_nodes", action="store_true",
                 help="prefill every batch's shared nodes itself, even those the previous "
                 "batch holds (an ablation)")
  p.add_argument("--no_compile_ahead", action="store_true",
                 help="compile each batch's programs when it starts instead of in background "
                 "threads while earlier batches run (the default; an ablation)")
  p.add_argument("--check_every", type=int, default=1,
                 help="decode steps between the decode loop's checks whether every row is "
                 "done (the same completions; fewer waits on the host)")
  p.add_argument("--nucleus", choices=engine.NUCLEUS_METHODS, default="sort",
                 help="how top_p's cutoff is found: by sorting every row's vocabulary (the "
                 "default) or by a search of 8 passes over the logits (the same completions)")
  p.add_argument("--logprobs", action="store_true",
                 help="write each token's log-probability under the model (before "
                 "temperature and truncation) as `logprobs`")
  p.add_argument("--score_method", choices=engine.SCORE_METHODS, default="prefill",
                 help="how scored requests' continuations are taken: in the prefill (the "
                 "default) or forced through the decode loop")
  p.add_argument("--on_bad_line", choices=requests_lib.ON_BAD_LINE, default="error")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  a = p.parse_args(argv)
  try:
    summary = run(
        a.prompts, a.out, checkpoint=a.checkpoint, hf_dir=a.hf_dir, preset=a.preset,
        tokenizer=a.tokenizer, dtype=a.dtype, seed=a.seed, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, stop=_parse_stop(a.stop),
        n=a.n, ignore_eos=a.ignore_eos, add_special_tokens=not a.no_special_tokens,
        memory_budget=None if a.memory_budget is None else int(a.memory_budget),
        memory_fraction=a.memory_fraction, max_batch=a.max_batch, strategy=a.strategy,
        attention=a.attention, backend=a.backend, min_shared_tokens=a.min_shared_tokens,
        merge_cost=a.merge_cost, max_levels=a.max_levels, prefill_chunk=a.prefill_chunk,
        prefill=a.prefill, keep_nodes=not a.no_keep_nodes, compile_ahead=not a.no_compile_ahead,
        check_every=a.check_every, nucleus=a.nucleus, logprobs=a.logprobs,
        score_method=a.score_method, on_bad_line=a.on_bad_line, progress=not a.quiet)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary.as_dict()), file=sys.stderr)
  return 0 if summary.ok else 1


if __name__ == "__main__":
  sys.exit(main())
