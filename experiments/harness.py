"""The sweep harness: points, results folders, OOM recording, progress and summaries.

A run writes `<results_root>/<experiment>/<timestamp>/` holding
  config.gin     the operative gin config (every bound value that was used)
  env.json       jax / jaxlib versions, platform, devices, hydrax git revision, command line
  rows.csv       one row per sweep point (status "ok", "OOM" or "error")
  rows.json      the same rows as JSON
  columns.md     the definition of every column of rows.csv (from COLUMNS)
  *.png          the experiment's plots
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Iterable, Mapping, Sequence

import gin


# Every column a results row can hold: name -> definition (written to columns.md). The
# parameters of the point (grid axes and experiment.fixed) are columns too, named as bound.
COLUMNS = {
    # harness (every row)
    "status": "ok, OOM (out of device memory; recorded, the sweep goes on), error, or "
              "skipped (time) (not started within experiment.max_seconds)",
    "error": "for status error: the exception's type and message (first 500 characters)",
    "wall_seconds": "wall time of the whole point in the harness (perf_counter around the "
                    "measure call: includes compilation, prompt building and planning)",
    "timing": "how the point's timed columns were measured",
    "*_vs_*": "<metric>_vs_<value>: the row's metric divided by the metric of the baseline "
              "row (experiment.baseline, e.g. attention=none) at the same match columns; "
              "empty when either is missing or not ok",
    # generation_point (end to end)
    "decode_tokens_per_s": "decode_tokens / decode_s: tokens produced by the decode loop "
                           "only (each sequence's first token comes from prefill and is not "
                           "counted), per second of the decode loop",
    "e2e_tokens_per_s": "new_tokens / e2e_s (all generated tokens, prefill + decode time)",
    "prefill_s": "seconds of the compiled prefill call (all tree nodes and suffixes, and the "
                 "first token), synchronised with block_until_ready; compile excluded",
    "decode_s": "seconds of the compiled decode loop (one while_loop), synchronised; compile "
                "excluded",
    "e2e_s": "prefill_s + decode_s",
    "wall_with_compile_s": "seconds of the whole engine.generate call (compile, host work "
                           "and transfers included)",
    "compile_s": "seconds spent compiling prefill and decode (0 when reused from an earlier "
                 "point with the same shapes and plan structure)",
    "kv_bytes": "bytes of key/value cache allocated (shared levels once, per-sequence caches)",
    "peak_bytes": "process-wide peak device memory so far (max over local devices; empty "
                  "where the platform does not report it, e.g. CPU)",
    "new_tokens": "generated tokens, all sequences (each sequence's eos included)",
    "decode_tokens": "tokens produced by the decode loop: new_tokens minus one per sequence",
    "shared_levels": "number of shared levels in the sharing plan",
    # attention_point (micro-benchmark)
    "median_us": "median microseconds of one jitted attention call over `repeats` calls, "
                 "each synchronised (block_until_ready), after one warm-up call",
    "tflops_per_s": "4*B*H*(P+U)*D FLOPs / median time (P prefix, U suffix keys)",
    "tb_per_s": "bytes read once as Hydragen needs them (prefix K/V once, suffix K/V, q, "
                "out) / median time",
    "platform": "jax.default_backend() of the run",
}


def columns_markdown(columns: Sequence[str]) -> str:
  """columns.md: a table of the given columns with their definitions (COLUMNS)."""
  lines = ["# Columns of rows.csv", "",
           "Columns not defined below are the point's parameters (grid axes and "
           "experiment.fixed), named as bound in config.gin.", "",
           "| column | definition |", "| --- | --- |"]
  for name in columns:
    key = "*_vs_*" if name not in COLUMNS and "_vs_" in name else name
    if key in COLUMNS:
      lines.append(f"| {name} | {COLUMNS[key]} |")
  return "\n".join(lines) + "\n"


class OutOfMemory(Exception):
  """A sweep point that does not fit in device memory (recorded as "OOM", the sweep goes on)."""


def is_out_of_memory(error: BaseException) -> bool:
  """True for hydrax's OutOfMemoryError and XLA's RESOURCE_EXHAUSTED errors."""
  if isinstance(error, OutOfMemory):
    return True
  try:
    from hydrax.engine import OutOfMemoryError
    if isinstance(error, OutOfMemoryError):
      return True
  except ImportError:
    pass
  text = f"{type(error).__name__}: {error}"
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


@gin.configurable
def grid(**axes) -> list[dict]:
  """All combinations of the given axes (the first axis varies slowest), as dicts."""
  names = list(axes)
  for name in names:
    if not isinstance(axes[name], (list, tuple)) or not axes[name]:
      raise ValueError(f"grid: axis {name!r} must be a non-empty list, got {axes[name]!r}")
  return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def environment(argv: Sequence[str]) -> dict:
  import jax
  import jaxlib
  devices = jax.devices()
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "hydrax"],
                                capture_output=True, text=True, timeout=10).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    rev, dirty = "unknown", False
  return {
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
      "platform": jax.default_backend(), "device_kind": devices[0].device_kind,
      "device_count": len(devices), "hydrax_git_revision": rev or "unknown",
      "hydrax_dirty": dirty, "command": " ".join(argv),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def _progress(done: int, total: int, label: str) -> None:
  width = 24
  filled = int(width * done / max(total, 1))
  sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:60}")
  sys.stderr.flush()
  if done == total:
    sys.stderr.write("\n")


def _summary(point: Mapping, row: Mapping, keys: Sequence[str]) -> str:
  where = " ".join(f"{k}={v}" for k, v in point.items())
  if row["status"] != "ok":
    return f"{where}: {row['status']}" + (f" ({row.get('error', '')})" if row.get("error") else "")
  return f"{where}: " + ", ".join(f"{k}={_fmt(row[k])}" for k in keys if k in row)


def _fmt(value) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(points: Iterable[Mapping], measure: Callable[..., Mapping], fixed: Mapping,
              summary_keys: Sequence[str] = (), on_row: Callable[[list], None] | None = None,
              max_seconds: float | None = None) -> list[dict]:
  """Calls measure(**fixed, **point) for every point; returns one row per point.

  A point that runs out of memory is recorded with status "OOM"; any other exception is
  printed with the point that caused it and recorded with status "error"; the sweep goes on.
  on_row(rows) is called after every point (to save partial results). Points not started
  within max_seconds of the start are recorded with status "skipped (time)".
  """
  begin = time.perf_counter()
  points = list(points)
  rows = []
  for i, point in enumerate(points):
    _progress(i, len(points), " ".join(f"{k}={v}" for k, v in point.items()))
    row = {**fixed, **point}
    start = time.perf_counter()
    if max_seconds is not None and start - begin > max_seconds:
      row["status"] = "skipped (time)"
      rows.append(row)
      print(_summary(point, row, summary_keys), flush=True)
      continue
    try:
      row.update(measure(**fixed, **point))
      row["status"] = "ok"
    except Exception as error:  # pylint: disable=broad-except
      if is_out_of_memory(error):
        row["status"] = "OOM"
      else:
        row["status"] = "error"
        row["error"] = f"{type(error).__name__}: {error}"[:500]
        sys.stderr.write(f"\npoint {point} failed:\n{traceback.format_exc()}\n")
    row["wall_seconds"] = time.perf_counter() - start
    rows.append(row)
    sys.stderr.write("\r" + " " * 100 + "\r")
    print(_summary(point, row, summary_keys), flush=True)
    if on_row is not None:
      on_row(rows)
  _progress(len(points), len(points), "done")
  return rows


def add_ratio_to_baseline(rows: list[dict], metric: str, baseline_key: str,
                          baseline_value, match: Sequence[str]) -> None:
  """Adds `<metric>_vs_<baseline_value>` = row[metric] / the baseline row's at the same point."""
  name = f"{metric}_vs_{baseline_value}"
  base = {tuple(r.get(k) for k in match): r for r in rows
          if r.get(baseline_key) == baseline_value and r["status"] == "ok"}
  for r in rows:
    b = base.get(tuple(r.get(k) for k in match))
    ok = r["status"] == "ok" and b is not None and b.get(metric)
    r[name] = r[metric] / b[metric] if ok else None


def write_results(directory: str, rows: list[dict], env: Mapping, config: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.gin"), "w") as f:
    f.write(config)
  with open(os.path.join(directory, "env.json"), "w") as f:
    json.dump(env, f, indent=2)
  with open(os.path.join(directory, "rows.json"), "w") as f:
    json.dump(rows, f, indent=2, default=str)
  columns = []
  for r in rows:
    columns += [k for k in r if k not in columns]
  with open(os.path.join(directory, "columns.md"), "w") as f:
    f.write(columns_markdown(columns))
  with open(os.path.join(directory, "rows.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def results_dir(root: str, experiment: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.join(root, experiment, stamp)
  n = 1
  while os.path.exists(path):
    n += 1
    path = os.path.join(root, experiment, f"{stamp}-{n}")
  return path
