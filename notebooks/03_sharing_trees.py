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
# # Sharing trees: few-shot prefix, problems, samples
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/hydrax-dev/hydrax/blob/main/notebooks/03_sharing_trees.ipynb)
#
# Sharing is often hierarchical. In the paper's competitive-programming setting (Hydragen,
# arXiv 2402.05099, section 4.3) every prompt starts with the same few-shot examples, then one
# of several problem statements, and each problem is sampled many times. The prompts form a
# tree: the few-shot prefix is shared by all sequences, each problem by its samples.
#
# hydrax stores every node of such a tree once and attends to it with one batched product per
# node (a *level* per depth). This notebook builds the tree with
# `hydrax.sharing.hierarchy`, reads its statistics, counts the KV memory it saves, and
# compares the full tree with a single shared level (the few-shot prefix only; each problem
# copied into every one of its samples) and with no sharing at all, in memory and in time.

# %%
# The one setting to edit once the repository is published (see notebooks/README.md).
HYDRAX_REPO = "https://github.com/hydrax-dev/hydrax"

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
    colab_install(f"git+{HYDRAX_REPO}")

# %% [markdown]
# ## The runtime and the sizes
#
# CPU: the tiny 2-layer model and a small tree; GPU/TPU: a 4-layer model of Llama-3-8B's shape
# (random weights) and a tree of paper-like proportions. `HYDRAX_NOTEBOOK_SMALL=1` (CI)
# shrinks everything further.

# %%
import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle

from hydrax import engine, sharing
from hydrax.models import LlamaConfig, llama, num_params

PLATFORM = jax.default_backend()  # "cpu", "gpu" or "tpu"
DEVICE = jax.devices()[0]
CI_SMALL = os.environ.get("HYDRAX_NOTEBOOK_SMALL", "") not in ("", "0")
SIZE = "ci" if CI_SMALL else ("cpu" if PLATFORM == "cpu" else "accelerator")
SIZES = {
    # few-shot prefix tokens, problems, tokens per problem, samples per problem, new tokens
    "ci": dict(preset="tiny", layers=None, prefix=48, problems=3, problem_tokens=24,
               samples=4, new_tokens=6, sweep=[1, 8, 32]),
    "cpu": dict(preset="tiny", layers=None, prefix=512, problems=8, problem_tokens=128,
                samples=8, new_tokens=32, sweep=[1, 4, 16, 64]),
    "accelerator": dict(preset="llama3-8b", layers=4, prefix=2048, problems=16,
                        problem_tokens=384, samples=8, new_tokens=64, sweep=[1, 4, 16, 64]),
}
S = SIZES[SIZE]


def pick_dtype():
    if PLATFORM == "cpu":
        return jnp.float32
    capability = getattr(DEVICE, "compute_capability", None)
    if PLATFORM == "gpu" and capability is not None and float(capability) < 8:
        return jnp.float16                # e.g. a T4: no bfloat16 tensor cores
    return jnp.bfloat16


DTYPE = pick_dtype()
memory = (DEVICE.memory_stats() or {}).get("bytes_limit")
CONFIG = LlamaConfig.from_preset(S["preset"], **({"num_layers": S["layers"]} if S["layers"]
                                                 else {}))
print(f"jax {jax.__version__} | platform {PLATFORM} | {DEVICE.device_kind}"
      + (f" ({memory / 2**30:.1f} GiB)" if memory else "")
      + f" | sizes: {SIZE} | {jnp.dtype(DTYPE).name}")

# %% [markdown]
# ## The tree
#
# `hierarchy(prefix, problems, samples_per_problem)` builds the plan of
# `Node(prefix, [Node(problem, [sample] * n) for problem in problems])` directly, without
# searching for shared prefixes. A segment given as an int is that many synthetic token ids.
# With `sample_tokens=0` (the default) the samples of a problem are identical prompts, told
# apart only by what they generate, as in the paper.

# %%
TREE = dict(prefix=S["prefix"], problems=[S["problem_tokens"]] * S["problems"],
            samples_per_problem=S["samples"], vocab_size=CONFIG.vocab_size, seed=0)
full = sharing.hierarchy(**TREE)
print(full.render(max_lines=16, max_leaves=2))

# %% [markdown]
# ### Its statistics
#
# `plan.stats` (a `PlanStats`): `total_tokens` is what replication stores (every prompt in
# full), `stored_tokens` what the plan stores (each node once, plus the suffixes), `ratio` the
# KV memory saved on the prompts; `saved_key_reads` the keys (per layer) that one decode step
# no longer reads; `padded_shapes` the static shapes of the levels after bucketing.

# %%
for field in dataclasses.fields(full.stats):
    value = getattr(full.stats, field.name)
    print(f"{field.name:>18}: {value:,.3f}" if isinstance(value, float)
          else f"{field.name:>18}: {value:,}" if isinstance(value, int)
          else f"{field.name:>18}: {value}")

# %% [markdown]
# ## Full tree, single level, no sharing
#
# The same prompts (same seed, same tokens), three ways:
#
# * **full tree**: the few-shot prefix and every problem are stored once (2 shared levels);
# * **single level**: `max_levels=1`, only the few-shot prefix is shared; each problem is copied
#   into the suffix of every one of its samples;
# * **no sharing**: `max_levels=0`, every prompt stored in full (what `attention="replicated"`
#   holds).
#
# The radix planner `sharing.plan` finds the full tree from the token ids alone (with its cost
# model set to share every node): the last line checks that it stores the same tokens.

# %%
single = sharing.hierarchy(**TREE, max_levels=1)
flat = sharing.hierarchy(**TREE, max_levels=0)
assert all(np.array_equal(a, b) for a, b in zip(full.sequences, single.sequences))
found = sharing.plan(full.sequences, min_shared_tokens=0, merge_cost=0)
variants = {"full tree": full, "single level": single, "no sharing": flat}
big = LlamaConfig.from_preset("llama3-8b")


def kv_bytes(config, plan, mode, dtype, new_tokens):
    return engine.estimate_kv_bytes(config, plan, max_new_tokens=new_tokens, attention=mode,
                                    dtype=dtype)


# KV cache of each variant: Hydragen over the plan; "no sharing" is the replicated cache.
RUN_AS = {"full tree": (full, "hydragen"), "single level": (single, "hydragen"),
          "no sharing": (full, "replicated")}
table = {}
for name, p in variants.items():
    run_plan, mode = RUN_AS[name]
    table[name] = dict(
        levels=p.stats.levels, stored=p.stats.stored_tokens, ratio=p.stats.ratio,
        padded=p.stats.padded_tokens, saved_reads=p.stats.saved_key_reads,
        kv_here=kv_bytes(CONFIG, run_plan, mode, DTYPE, S["new_tokens"]),
        kv_8b=kv_bytes(big, run_plan, mode, jnp.bfloat16, 128))
print(f"{'':>13} {'levels':>6} {'stored tok':>11} {'ratio':>6} {'padded tok':>11} "
      f"{'saved reads':>12} {'KV, this model':>15} {'KV, 8B shape':>13}")
for name, t in table.items():
    print(f"{name:>13} {t['levels']:>6} {t['stored']:>11,} {t['ratio']:>6.2f} "
          f"{t['padded']:>11,} {t['saved_reads']:>12,} {t['kv_here'] / 2**20:>11.2f} MiB "
          f"{t['kv_8b'] / 2**30:>9.2f} GiB")
print(f"\nradix planner on the token ids: {found.stats.levels} levels, "
      f"{found.stats.stored_tokens:,} stored tokens, nodes per level "
      f"{found.stats.nodes_per_level} (full tree: {full.stats.nodes_per_level}); same tokens "
      f"stored: {found.stats.stored_tokens == full.stats.stored_tokens}")

# %% [markdown]
# ### The trees as pictures
#
# Icicle drawings (x: token position; y: sequences; a box per stored node, coloured by level;
# grey: each sequence's own suffix). In the single-level plan every problem appears once per
# sample, in the suffixes.

# %%
LEVEL_COLORS = plt.cm.tab10.colors


def draw_tree(plan, ax, title="sharing tree"):
    """Icicle drawing of a plan: a box per shared node (width = its tokens, height = its
    sequences), coloured by level; thin grey boxes are the suffixes."""
    b, longest = plan.num_sequences, plan.stats.longest_sequence
    for d, level in enumerate(plan.levels):
        for j in range(plan.stats.nodes_per_level[d]):
            lo, hi = plan.node_range(d, j)
            start, length = int(level.start[j]), int(level.lengths[j])
            ax.add_patch(Rectangle((start, lo), length, hi - lo, lw=0.6, edgecolor="k",
                                   facecolor=LEVEL_COLORS[d % 10], alpha=0.85))
            if length >= 0.1 * longest and hi - lo >= max(2, 0.08 * b):
                ax.text(start + length / 2, (lo + hi) / 2, f"L{d}#{j}\n{length} tok x {hi - lo}",
                        ha="center", va="center", fontsize=7)
    for p in range(b):
        start, length = int(plan.suffix_start[p]), int(plan.suffix_lengths[p])
        if length:
            ax.add_patch(Rectangle((start, p), length, 1, lw=0.3, edgecolor="k",
                                   facecolor="0.8"))
    ax.set_xlim(0, longest)
    ax.set_ylim(b, 0)
    if b <= 40:
        ax.set_yticks(np.arange(b) + 0.5, [str(i) for i in plan.order], fontsize=6)
    ax.set_xlabel("token position")
    ax.set_ylabel("sequence (input index, plan order)")
    handles = [Patch(color=LEVEL_COLORS[d % 10], label=f"level {d}")
               for d in range(len(plan.levels))] + [Patch(color="0.8", label="suffix")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=10)


fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for ax, name in zip(axes, ("full tree", "single level")):
    p = variants[name]
    draw_tree(p, ax, f"{name}: {p.stats.stored_tokens:,} stored tokens "
              f"({p.stats.ratio:.2f}x)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### KV memory as the number of samples grows
#
# `engine.estimate_kv_bytes` gives what `generate` would allocate, without running anything,
# so it can use real sizes on any runtime: Llama-3-8B's shape (32 layers, 8 KV heads of 128
# dims, bfloat16), the paper-like tree of `experiments/configs/hierarchical.gin` (a
# 2048-token few-shot prefix, problems of 1024 tokens; here 8 of them) and 128 generated
# tokens per sample, with more and more samples per problem. Only the full tree keeps the
# problems' cost independent of the number of samples. Right: this notebook's own tree.

# %%
PAPER = dict(prefix=2048, problems=[1024] * 8, vocab_size=big.vocab_size, seed=0)
sweep = {name: [] for name in variants}
for k in S["sweep"]:
    p_full = sharing.hierarchy(**PAPER, samples_per_problem=k)
    p_single = sharing.hierarchy(**PAPER, samples_per_problem=k, max_levels=1)
    for name, (p, mode) in (("full tree", (p_full, "hydragen")),
                            ("single level", (p_single, "hydragen")),
                            ("no sharing", (p_full, "replicated"))):
        sweep[name].append(kv_bytes(big, p, mode, jnp.bfloat16, 128))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
colors = {"full tree": "tab:blue", "single level": "tab:green", "no sharing": "tab:orange"}
batch = [k * len(PAPER["problems"]) for k in S["sweep"]]
for name, values in sweep.items():
    axes[0].plot(batch, np.array(values) / 2**30, "o-", color=colors[name], label=name)
axes[0].set_xscale("log", base=2)
axes[0].set_yscale("log")
axes[0].set_xlabel("sequences (8 problems x samples per problem)")
axes[0].set_ylabel("KV cache (GiB)")
axes[0].set_title("Llama-3-8B shape, 2048-token prefix, 8 problems of 1024 tokens",
                  fontsize=10)
axes[0].grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
names = list(table)
bars = axes[1].bar(names, [table[n]["kv_8b"] / 2**30 for n in names],
                   color=[colors[n] for n in names])
axes[1].bar_label(bars, fmt="%.2f GiB", fontsize=8)
axes[1].set_title(f"this notebook's tree ({full.num_sequences} sequences), 8B shape",
                  fontsize=10)
axes[1].margins(y=0.15)
fig.tight_layout()
plt.show()
for name, values in sweep.items():
    print(f"{name:>13}: " + ", ".join(f"{v / 2**30:.2f}" for v in values)
          + f" GiB at {batch} sequences")

# %% [markdown]
# ## Generation over the three layouts
#
# The same model, the same prompts, sampled at temperature 1 with the same seed: the full
# tree and the single level run Hydragen attention over their plans; no sharing runs the
# replicated baseline. Exact attention means the same samples (up to low-precision near-ties
# on an accelerator). Each run is repeated once after compiling, and the repeat is timed.

# %%
model = llama.init(CONFIG, seed=0, dtype=DTYPE)
print(f"model: {CONFIG.name}, {CONFIG.num_layers} layers, {num_params(CONFIG) / 1e6:,.1f}M "
      f"parameters")
runs = {}
for name, (p, mode) in RUN_AS.items():
    need = table[name]["kv_here"]
    if memory and need > 0.5 * memory:
        print(f"{name:>13}: skipped, its KV cache ({need / 2**30:.1f} GiB) would not fit")
        continue
    options = dict(max_new_tokens=S["new_tokens"], attention=mode, temperature=1.0, seed=0)
    try:
        engine.generate(model, p, **options)                 # compiles
        runs[name] = g = engine.generate(model, p, **options)
    except engine.OutOfMemoryError as error:
        print(f"{name:>13}: out of memory ({str(error)[:120]}...)")
        continue
    print(f"{name:>13}: prefill {g.prefill_seconds * 1e3:8.1f} ms | decode "
          f"{g.decode_seconds * 1e3:8.1f} ms | {g.decode_tokens_per_second:10,.0f} decode "
          f"tok/s | KV cache {g.kv_bytes / 2**20:9.2f} MiB")

reference = runs.get("no sharing")
for name, g in runs.items():
    if reference is not None and g is not reference:
        agree = (g.tokens == reference.tokens).mean()
        print(f"{name} vs no sharing: {agree:.1%} of sampled tokens agree")
        if jnp.dtype(DTYPE) == jnp.float32:
            assert agree >= 0.9, f"{name} disagrees with the replicated baseline"

# %%
names = list(runs)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for ax, (label, values) in zip(axes, [
        ("KV cache (MiB)", [runs[n].kv_bytes / 2**20 for n in names]),
        ("decode tokens / s", [runs[n].decode_tokens_per_second for n in names])]):
    bars = ax.bar(names, values, color=[colors[n] for n in names])
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_title(label, fontsize=10)
    ax.margins(y=0.15)
fig.suptitle(f"{full.num_sequences} sequences ({S['problems']} problems x {S['samples']} "
             f"samples), {S['new_tokens']} new tokens, {DEVICE.device_kind} ({PLATFORM})",
             fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Takeaways
#
# * A tree stores each node once: the KV memory of the prompts drops by `stats.ratio`, and a
#   decode step reads `stats.saved_key_reads` fewer keys per layer.
# * One shared level already removes the few-shot prefix's copies, but the problems are still
#   copied once per sample: the gap to the full tree grows with the samples per problem.
# * `sharing.plan` recovers the tree from token ids alone; its default cost model
#   (`min_shared_tokens=1024, merge_cost=16`) keeps only the nodes whose saved reads pay for an
#   extra attention pass, and `max_levels` caps the depth.
