# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Throughput curves: tokens/s against batch size
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/hydrax-dev/hydrax/blob/main/notebooks/02_throughput_curves.ipynb)
#
# The paper's headline experiment (Hydragen, arXiv 2402.05099, fig. 3): many sequences share
# one long prefix; how many tokens per second does decoding reach as the batch grows, with
# Hydragen attention and with the prefix replicated into every sequence's KV cache?
#
# This notebook runs a small version of the sweep on whatever runtime it finds, through the
# repository's gin experiment runner (`experiments/run.py`, config
# `experiments/configs/throughput_curves.gin`), plots it, and then loads the committed H200
# results (`experiments/results/throughput_curves*/`) and plots them beside it.
#
# The runner lives in the repository's `experiments/` folder, which `pip install` does not
# install: on Colab the first cell clones the repository to `/content/hydrax` and installs
# hydrax from that clone; elsewhere the notebook finds the checkout it sits in (or the one
# named by the `HYDRAX_ROOT` environment variable).

# %%
# The one setting to edit once the repository is published (see notebooks/README.md).
HYDRAX_REPO = "https://github.com/hydrax-dev/hydrax"
HYDRAX_DIR = "/content/hydrax"  # where Colab clones the repository (holds experiments/)

import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules


def colab_install(*targets):
    """Installs jax for this runtime's accelerator, then `targets` (pip requirement strings)."""
    if os.path.exists("/dev/nvidia0"):
        jax_requirement = "jax[cuda12]>=0.10,<0.12"
    elif (os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR")
          or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
        jax_requirement = "jax[tpu]>=0.10,<0.12"
    else:
        jax_requirement = "jax>=0.10,<0.12"
    if "jax" in sys.modules:
        print("jax was imported before the install: restart the session (Runtime > Restart "
              "session) and run the notebook again from the top.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", jax_requirement, *targets],
                   check=True)


if IN_COLAB:
    if not os.path.isdir(os.path.join(HYDRAX_DIR, ".git")):
        subprocess.run(["git", "clone", "--depth", "1", HYDRAX_REPO, HYDRAX_DIR], check=True)
    colab_install(HYDRAX_DIR)


def find_root():
    """The hydrax checkout holding experiments/: $HYDRAX_ROOT, the Colab clone, or the first
    folder at or above the working directory that has experiments/run.py."""
    candidates = [os.environ.get("HYDRAX_ROOT"), HYDRAX_DIR if IN_COLAB else None]
    here = os.path.abspath(os.getcwd())
    while True:
        candidates.append(here)
        if os.path.dirname(here) == here:
            break
        here = os.path.dirname(here)
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "experiments", "run.py")):
            return os.path.abspath(folder)
    raise FileNotFoundError("no hydrax checkout with experiments/run.py found: clone the "
                            "repository and set HYDRAX_ROOT to its folder")


ROOT = find_root()
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)        # makes `experiments` importable
print("repository:", ROOT)

# %% [markdown]
# ## The runtime and the sweep
#
# `jax.default_backend()` picks the sizes. CPU: the tiny 2-layer model, short prefixes, small
# batches (a minute or two; `HYDRAX_NOTEBOOK_SMALL=1`, what CI sets, shrinks it to seconds).
# GPU/TPU: a 4-layer model of Llama-3-8B's shape (random weights), prefixes of 1K and 4K
# tokens and batches up to 512: a few minutes on a Colab GPU. Points whose KV cache would not
# fit in half of the device's free memory are recorded as out of memory (OOM) instead of run.

# %%
import csv
import glob
import json
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from hydrax.models import LlamaConfig, num_params

# experiments/plots.py calls matplotlib.use("Agg") when imported, which would stop figures
# from showing in the notebook: that call is made a no-op while the runner is imported.
_use, matplotlib.use = matplotlib.use, lambda *args, **kwargs: None
try:
    from experiments import run as runner
finally:
    matplotlib.use = _use

PLATFORM = jax.default_backend()  # "cpu", "gpu" or "tpu"
DEVICE = jax.devices()[0]
CI_SMALL = os.environ.get("HYDRAX_NOTEBOOK_SMALL", "") not in ("", "0")
SIZE = "ci" if CI_SMALL else ("cpu" if PLATFORM == "cpu" else "accelerator")
SIZES = {
    # ci: one prefix, two batches, both modes (4 points, each a compile): every line and ratio
    # of the plots below; the committed results further down draw several prefixes.
    "ci": dict(model="tiny", layers=None, prefixes=[128], batches=[2, 8],
               modes=["hydragen", "replicated"], suffix=4, new_tokens=4, min_shared_tokens=0),
    "cpu": dict(model="tiny", layers=None, prefixes=[256, 1024, 2048], batches=[4, 16, 64],
                modes=["hydragen", "replicated"], suffix=8, new_tokens=32,
                min_shared_tokens=0),
    "accelerator": dict(model="llama3-8b", layers=4, prefixes=[1024, 4096],
                        batches=[32, 128, 512], modes=["hydragen", "replicated", "none"],
                        suffix=16, new_tokens=64, min_shared_tokens=None),
}
S = SIZES[SIZE]


def pick_dtype():
    if PLATFORM == "cpu":
        return "float32"
    capability = getattr(DEVICE, "compute_capability", None)
    if PLATFORM == "gpu" and capability is not None and float(capability) < 8:
        return "float16"                  # e.g. a T4: no bfloat16 tensor cores
    return "bfloat16"


DTYPE = pick_dtype()
memory = (DEVICE.memory_stats() or {}).get("bytes_limit")
config = LlamaConfig.from_preset(S["model"], **({"num_layers": S["layers"]} if S["layers"]
                                                else {}))
weights = num_params(config) * jnp.dtype(DTYPE).itemsize
memory_limit = int(0.5 * (memory - weights)) if memory else None
print(f"jax {jax.__version__} | platform {PLATFORM} | {DEVICE.device_kind}"
      + (f" ({memory / 2**30:.1f} GiB)" if memory else "") + f" | sizes: {SIZE} | {DTYPE}")
print(f"model {config.name}, {config.num_layers} layers ({weights / 2**30:.2f} GiB of weights);"
      f" prefixes {S['prefixes']}, batches {S['batches']}, {S['new_tokens']} new tokens, "
      f"{S['suffix']} own prompt tokens per sequence; KV limit "
      + (f"{memory_limit / 2**30:.1f} GiB" if memory_limit else "none"))

# %% [markdown]
# ## Run the sweep
#
# `runner.run(gin files, bindings, results_root)` is what `python experiments/run.py` does: it
# runs `generation_point` for every (prefix, batch, attention) point, records OOM points and
# writes a results folder (`rows.csv`, `env.json`, the operative `config.gin`, plots). The
# bindings below override `throughput_curves.gin`'s H200 sizes. Results go to a temporary
# folder (or `$HYDRAX_NOTEBOOK_RUNS`), never into the repository.

# %%
fixed = {"model": S["model"], "num_layers": S["layers"], "dtype": DTYPE, "suffix": S["suffix"],
         "max_new_tokens": S["new_tokens"], "eos_id": None,
         "min_shared_tokens": S["min_shared_tokens"]}
bindings = [f"experiment.name = 'notebook_{PLATFORM}'",
            f"grid.prefix = {S['prefixes']!r}",
            f"grid.batch = {S['batches']!r}",
            f"grid.attention = {S['modes']!r}",
            f"experiment.fixed = {fixed!r}",
            f"generation_point.memory_limit_bytes = {memory_limit!r}"]
runs_root = os.environ.get("HYDRAX_NOTEBOOK_RUNS") or tempfile.mkdtemp(prefix="hydrax_nb_")
folder = runner.run(["throughput_curves.gin"], bindings, runs_root, ["02_throughput_curves"])

# %% [markdown]
# ## Tokens/s against batch size, on this runtime
#
# Left: decode throughput (generated tokens per second of the compiled decode loop), colour
# by prefix length, line style by attention mode; `x` marks an out-of-memory point. Right:
# Hydragen's throughput over the replicated baseline's at the same point.

# %%
NUMERIC = ("decode_tokens_per_s", "e2e_tokens_per_s", "prefill_s", "decode_s", "kv_bytes",
           "decode_tokens_per_s_vs_none")
STYLES = {"hydragen": ("-", "o"), "replicated": ("--", "s"), "none": (":", "^")}


def read_rows(path):
    """The sweep points of a rows.csv (rows with prefix, batch, attention and status), numbers
    parsed (missing values become None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                r["prefix"], r["batch"] = int(r["prefix"]), int(r["batch"])
            except (KeyError, TypeError, ValueError):
                continue
            if not r.get("attention") or not r.get("status"):
                continue
            for key in NUMERIC:
                value = r.get(key)
                r[key] = float(value) if value not in (None, "") else None
            rows.append(r)
    return rows


def prefix_colors(rows):
    prefixes = sorted({r["prefix"] for r in rows})
    return dict(zip(prefixes, plt.cm.viridis(np.linspace(0.0, 0.85, len(prefixes)))))


FILLS = ("full", "none", "left", "bottom")    # one per backend


def series(rows):
    """The (attention, backend) pairs present, in STYLES order; backend is the row's `backend`
    column ("" when the sweep did not record one)."""
    keys = {(r["attention"], r.get("backend") or "") for r in rows}
    return sorted(keys, key=lambda k: (list(STYLES).index(k[0]) if k[0] in STYLES else 9, k))


def plot_curves(ax, rows, title, metric="decode_tokens_per_s"):
    """metric against batch: one line per (prefix, attention, backend); line style and marker
    by attention, marker fill by backend; OOM points as x at the bottom."""
    colors = prefix_colors(rows)
    keys = series(rows)
    backends = sorted({backend for _, backend in keys})
    style = {k: (*STYLES.get(k[0], ("-.", "*")), FILLS[backends.index(k[1]) % len(FILLS)])
             for k in keys}
    for prefix, color in colors.items():
        for key in keys:
            mine = [r for r in rows if r["prefix"] == prefix
                    and (r["attention"], r.get("backend") or "") == key]
            ok = sorted((r["batch"], r[metric]) for r in mine
                        if r["status"] == "ok" and r[metric])
            if ok:
                ax.plot(*zip(*ok), ls=style[key][0], marker=style[key][1], ms=5, color=color,
                        fillstyle=style[key][2])
            oom = [r["batch"] for r in mine if r["status"] == "OOM"]
            if oom:
                ax.plot(oom, [0.03] * len(oom), "x", ms=8, color=color,
                        transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences sharing the prefix)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=c, label=f"prefix {p}") for p, c in colors.items()]
    handles += [Line2D([], [], color="k", ls=style[k][0], marker=style[k][1], ms=5,
                       fillstyle=style[k][2], label=k[0] + (f" [{k[1]}]" if k[1] else ""))
                for k in keys]
    ax.legend(handles=handles, fontsize=7)


def ratios(rows, over="replicated", metric="decode_tokens_per_s"):
    """{prefix: [(batch, hydragen / `over`)]} at the points where both ran (each mode's best
    value over backends)."""
    at = {}
    for r in rows:
        if r["status"] == "ok" and r[metric]:
            key = (r["attention"], r["prefix"], r["batch"])
            at[key] = max(at.get(key, 0.0), r[metric])
    out = {}
    for (mode, prefix, batch), value in sorted(at.items()):
        if mode == "hydragen" and (over, prefix, batch) in at:
            out.setdefault(prefix, []).append((batch, value / at[over, prefix, batch]))
    return out


def baseline_oom(rows):
    """(prefix, batch) points where hydragen ran and the replicated baseline ran out of memory."""
    ran = {(r["prefix"], r["batch"]) for r in rows
           if r["attention"] == "hydragen" and r["status"] == "ok"}
    return sorted(ran & {(r["prefix"], r["batch"]) for r in rows
                         if r["attention"] == "replicated" and r["status"] == "OOM"})


def plot_speedup(ax, rows, title):
    """Hydragen over replicated decode tokens/s; x at the top: the baseline ran out of memory."""
    colors = prefix_colors(rows)
    pairs = ratios(rows)
    for prefix, color in colors.items():
        if prefix in pairs:
            ax.plot(*zip(*pairs[prefix]), "-", marker="o", ms=4, color=color,
                    label=f"prefix {prefix}")
    for prefix, batch in baseline_oom(rows):
        ax.plot([batch], [0.97], "x", ms=8, color=colors[prefix],
                transform=ax.get_xaxis_transform())
    if not pairs:
        ax.text(0.5, 0.3, "no point where both ran" + (
            "\n(x: replicated out of memory where hydragen ran)" if baseline_oom(rows) else ""),
            transform=ax.transAxes, ha="center", va="center", fontsize=9)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("hydragen / replicated decode tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if pairs:
        ax.legend(fontsize=7)


def summary(rows):
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "OOM", "error")}
    parts = [f"{len(rows)} points {counts}"]
    pairs = [(v, p, b) for p, pts in ratios(rows).items() for b, v in pts]
    if pairs:
        best = max(pairs)
        parts.append(f"hydragen / replicated up to {best[0]:.2f}x (prefix {best[1]}, batch "
                     f"{best[2]})")
    oom = baseline_oom(rows)
    if oom:
        parts.append(f"replicated out of memory at {len(oom)} points where hydragen ran")
    bound = [v for pts in ratios(rows, over="none").values() for _, v in pts]
    if bound:
        parts.append(f"hydragen at {min(bound):.0%}..{max(bound):.0%} of the no-attention "
                     "upper bound")
    return "; ".join(parts)


mine = read_rows(os.path.join(folder, "rows.csv"))
here = f"this runtime: {DEVICE.device_kind} ({PLATFORM}), {config.name} x{config.num_layers}L"
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plot_curves(axes[0], mine, here)
plot_speedup(axes[1], mine, here)
fig.tight_layout()
plt.show()
print(f"this runtime: {summary(mine)}\nresults folder: {folder}")
for prefix, points in ratios(mine).items():
    print(f"prefix {prefix:6d}: hydragen / replicated = "
          + ", ".join(f"{s:.2f}x at batch {b}" for b, s in points))

# %% [markdown]
# ## The committed H200 results, beside this runtime's
#
# `experiments/results/throughput_curves*/<run>/rows.csv` are full-size sweeps of the
# `throughput_curves*.gin` kind (8B-13B model shapes, long prefixes, large batches, 128 new
# tokens, random weights) run on an NVIDIA H200; a README there says how each was run. The runs of one model are merged into one
# panel (at most `MAX_PANELS` panels); where a sweep recorded its attention `backend`, each
# backend gets its own marker. `$HYDRAX_RESULTS_DIR` points the notebook at another results
# folder.

# %%
MAX_PANELS = 3
results_dir = os.environ.get("HYDRAX_RESULTS_DIR") or os.path.join(ROOT, "experiments",
                                                                     "results")
found = sorted(glob.glob(os.path.join(results_dir, "throughput_curves*", "**", "rows.csv"),
                         recursive=True))
by_model, runs_of, devices_of = {}, {}, {}
for path in found:
    rows = read_rows(path)
    if not rows:
        print(f"skipped {path}: no sweep points in it")
        continue
    env_path = os.path.join(os.path.dirname(path), "env.json")
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    run_name = os.path.relpath(os.path.dirname(path), results_dir)
    for r in rows:
        model = r.get("model") or "?"
        by_model.setdefault(model, {})
        runs_of.setdefault(model, set()).add(run_name)
        if env.get("device_kind"):
            devices_of.setdefault(model, set()).add(env["device_kind"])
        # Runs of one model are merged; a point measured twice keeps its first "ok" row.
        key = (r["prefix"], r["batch"], r["attention"], r.get("backend") or "")
        if key not in by_model[model] or (r["status"] == "ok"
                                          and by_model[model][key]["status"] != "ok"):
            by_model[model][key] = r
committed = sorted(((model, list(points.values())) for model, points in by_model.items()),
                   key=lambda item: -sum(r["status"] == "ok" for r in item[1]))
if not committed:
    print(f"No committed H200 results found (looked for {results_dir}/throughput_curves*/**/"
          "rows.csv). Run `python experiments/run.py --gin_file=throughput_curves.gin` on an "
          "H200 and commit its results folder to see them here.")
else:
    titles = {}
    for model, rows in committed:
        devices = "/".join(sorted(devices_of.get(model, ()))) or "device not recorded"
        titles[model] = f"committed: {model}, {devices}"
        print(f"{model}: {len(runs_of[model])} run(s) ({', '.join(sorted(runs_of[model]))}); "
              f"{summary(rows)}")
    shown = committed[:MAX_PANELS]
    if len(committed) > MAX_PANELS:
        print(f"plotting the {MAX_PANELS} models with the most points")
    n = 1 + len(shown)
    for plot, height in ((plot_curves, 4.4), (plot_speedup, 4.0)):
        fig, axes = plt.subplots(1, n, figsize=(6 * n, height), squeeze=False)
        plot(axes[0, 0], mine, here)
        for ax, (model, rows) in zip(axes[0, 1:], shown):
            plot(ax, rows, titles[model])
        fig.tight_layout()
        plt.show()

# %% [markdown]
# ## Reading the curves
#
# Replicated attention reads `batch x prefix` keys per step, so its throughput flattens (and
# its cache runs out of memory) as the batch or the prefix grows; Hydragen reads the prefix
# once per step for the whole batch, so its throughput keeps rising with the batch until the
# model's weights and the sequences' own tokens dominate. On a CPU with a tiny model the
# weights are cheap and attention is not memory bound in the same way, so expect small or no
# gains there; the accelerator and the H200 curves show the effect.
#
# To run the full sweep yourself: `python experiments/run.py --gin_file=throughput_curves.gin`
# (see the repository README).
