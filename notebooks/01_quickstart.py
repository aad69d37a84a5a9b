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
# # hydrax quickstart: Hydragen shared-prefix inference in JAX
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/hydrax-dev/hydrax/blob/main/notebooks/01_quickstart.ipynb)
#
# Requests in a batch often start with the same tokens: a system prompt, a document, few-shot
# examples. **Hydragen** (arXiv 2402.05099) computes attention over such a batch *exactly*,
# but in parts: each shared prefix is stored once and attended by all the sequences that
# share it in one matrix-matrix product, each sequence's own suffix on its own, and the parts
# are merged through their log-sum-exps. **hydrax** implements it in JAX.
#
# This notebook:
#
# 1. builds a *sharing plan* from a few prompts and draws its tree and its sharing mask;
# 2. runs `hydrax.engine.generate` with `attention="hydragen"` and with
#    `attention="replicated"` (the baseline: the prefix copied into every sequence's cache);
# 3. compares their outputs, KV-cache memory and time.
#
# Attention runs on hydrax's kernels where the runtime has them: the Mosaic TPU kernels
# (`backend="pallas_tpu"`) on a TPU, the Pallas GPU kernels on a GPU; XLA on CPU.
#
# Run it top to bottom. On Colab the first cell installs hydrax; it picks its sizes from the
# runtime it finds (CPU: a tiny model, seconds; GPU/TPU: a 4-layer model of Llama-3-8B's
# shape with random weights, a minute or two). Token ids are synthetic: only the sharing
# structure matters for memory and speed.

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
# `jax.default_backend()` says where we run. On CPU the sizes shrink (a tiny 2-layer model);
# `HYDRAX_NOTEBOOK_SMALL=1` (what CI sets) shrinks them further.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle

from hydrax import engine, sharing
from hydrax.attention import backends
from hydrax.models import LlamaConfig, llama, num_params

PLATFORM = jax.default_backend()  # "cpu", "gpu" or "tpu"
DEVICE = jax.devices()[0]
CI_SMALL = os.environ.get("HYDRAX_NOTEBOOK_SMALL", "") not in ("", "0")
SIZE = "ci" if CI_SMALL else ("cpu" if PLATFORM == "cpu" else "accelerator")

SIZES = {
    # system prompt tokens, document tokens (one per document), sequences per document,
    # sequences with no document, question tokens (min, max), new tokens, cost model.
    "ci": dict(preset="tiny", layers=None, system=48, docs=(32, 24), per_doc=3, no_doc=2,
               question=(4, 9), new_tokens=8, min_shared_tokens=16, merge_cost=1),
    "cpu": dict(preset="tiny", layers=None, system=384, docs=(256, 192), per_doc=12,
                no_doc=4, question=(8, 24), new_tokens=64, min_shared_tokens=64, merge_cost=2),
    "accelerator": dict(preset="llama3-8b", layers=4, system=2048, docs=(1536, 1024),
                        per_doc=48, no_doc=16, question=(16, 48), new_tokens=128,
                        min_shared_tokens=1024, merge_cost=16),
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
# Attention kernels: on a TPU the Mosaic TPU kernels (backend "pallas_tpu"); "auto" picks the
# Pallas kernels on a GPU and the XLA backend on CPU.
BACKEND = "pallas_tpu" if PLATFORM == "tpu" else "auto"
memory = (DEVICE.memory_stats() or {}).get("bytes_limit")
print(f"jax {jax.__version__} | platform {PLATFORM} | {len(jax.devices())} x "
      f"{DEVICE.device_kind}" + (f" ({memory / 2**30:.1f} GiB)" if memory else "")
      + f" | sizes: {SIZE} | dtype: {jnp.dtype(DTYPE).name} | attention: "
      + backends.get(BACKEND).name)

# %% [markdown]
# ## Prompts that share prefixes
#
# A system prompt shared by every request; two documents, each shared by a group of requests;
# a few requests with no document; and each request's own question. Input order is shuffled,
# as requests would arrive.

# %%
CONFIG = LlamaConfig.from_preset(S["preset"], **({"num_layers": S["layers"]} if S["layers"]
                                                 else {}))
rng = np.random.default_rng(0)


def tokens(n):
    return rng.integers(3, CONFIG.vocab_size, size=n)   # ids 0..2 left to pad/bos/eos


system = tokens(S["system"])
documents = [tokens(n) for n in S["docs"]]
prompts = []
for doc in documents:
    for _ in range(S["per_doc"]):
        prompts.append(np.concatenate([system, doc, tokens(rng.integers(*S["question"]))]))
for _ in range(S["no_doc"]):
    prompts.append(np.concatenate([system, tokens(rng.integers(*S["question"]))]))
prompts = [prompts[i].astype(np.int32) for i in rng.permutation(len(prompts))]
lengths = [len(p) for p in prompts]
print(f"{len(prompts)} prompts, {min(lengths)}..{max(lengths)} tokens, "
      f"{sum(lengths):,} tokens in all")

# %% [markdown]
# ## The sharing plan
#
# `hydrax.sharing.plan` builds the radix tree of the prompts and keeps the nodes that pay
# under its cost model: a node of `L` tokens shared by `n` sequences is kept iff
# `(n - 1) * L >= min_shared_tokens + merge_cost * n`. The defaults (1024, 16) suit real
# model sizes; the CPU sizes here are smaller, so the thresholds are too. Kept nodes become
# *levels*: level 0 holds the root's nodes, level 1 their children, and so on; what is left of
# each prompt is its *suffix*.

# %%
PLAN_OPTIONS = dict(min_shared_tokens=S["min_shared_tokens"], merge_cost=S["merge_cost"])
plan = sharing.plan(prompts, **PLAN_OPTIONS)
print(plan.render(max_lines=24))
st = plan.stats
print(f"\nstored tokens: {st.stored_tokens:,} of {st.total_tokens:,} "
      f"({st.ratio:.2f}x less KV memory for the prompts); "
      f"key reads saved per decode step and layer: {st.saved_key_reads:,}")

# %% [markdown]
# ### The tree as a picture
#
# An icicle drawing: x is the token position, y the sequences (in plan order, which groups
# the sequences of a node together; tick labels are input indices). Each shared node is **one
# box** spanning every sequence that attends to it: that is what Hydragen stores and reads
# once. Grey boxes are the sequences' own suffixes.

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
    ax.set_title(title)


fig, ax = plt.subplots(figsize=(9, 4))
draw_tree(plan, ax, f"sharing tree: {plan.num_sequences} sequences, "
          f"{plan.stats.levels} shared levels")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The sharing mask
#
# `plan.dense_mask()` is a boolean matrix, sequences x stored tokens: entry `[i, c]` says that
# sequence `i` attends to stored token `c`. Columns are level 0's nodes, then level 1's, then
# the suffixes (red lines mark the boundaries). Left: the replicated layout, where every
# sequence holds a copy of its whole prompt; middle: the plan's layout, on the same x scale
# (the width of each picture is the KV memory of the prompts); right: the plan's layout
# zoomed in.

# %%


def replicated_mask(plan):
    """[B, total tokens]: each sequence (plan order) attends to its own copy of its prompt."""
    lengths = np.array([len(plan.sequences[i]) for i in plan.order])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cols = np.arange(lengths.sum())
    return (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])


def draw_mask(plan, ax, title, width=None):
    mask = plan.to_plan_order(plan.dense_mask())            # rows in plan order
    level = plan.stored_layout().level
    ax.imshow(mask, aspect="auto", interpolation="nearest", cmap="Greys",
              extent=(0, mask.shape[1], mask.shape[0], 0))
    edges = [0, *(np.flatnonzero(np.diff(level)) + 1), level.size]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo:
            ax.axvline(lo, color="tab:red", lw=1)
        if hi - lo < 0.04 * (width or mask.shape[1]):
            continue                                         # too narrow to label
        name = "suffixes" if level[lo] == len(plan.levels) else f"level {level[lo]}"
        ax.text((lo + hi) / 2, 0.97, name, transform=ax.get_xaxis_transform(), rotation=90,
                ha="center", va="top", fontsize=7, color="tab:red",
                bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.8))
    ax.set_xlim(0, width or mask.shape[1])
    ax.set_xlabel("stored token (column)")
    ax.set_ylabel("sequence (plan order)")
    ax.set_title(title)


rep = replicated_mask(plan)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=True)
axes[0].imshow(rep, aspect="auto", interpolation="nearest", cmap="Greys",
               extent=(0, rep.shape[1], rep.shape[0], 0))
axes[0].set_title(f"replicated: {rep.shape[1]:,} stored tokens")
axes[0].set_xlabel("stored token (column)")
axes[0].set_ylabel("sequence (plan order)")
draw_mask(plan, axes[1], f"Hydragen plan: {plan.stats.stored_tokens:,} stored tokens",
          width=rep.shape[1])
draw_mask(plan, axes[2], "Hydragen plan, zoomed in")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Generation: Hydragen vs the prefix replicated
#
# A Llama-architecture model with random weights (`llama.init`); its tokens are meaningless,
# but both modes must produce the *same* tokens, since Hydragen attention is exact. Each mode
# runs twice: the first call compiles (`compile_seconds`), the second reuses the compiled
# prefill and decode loop and is the one timed. Greedy decoding, no early stop.

# %%
model = llama.init(CONFIG, seed=0, dtype=DTYPE)
print(f"model: {CONFIG.name}, {CONFIG.num_layers} layers, {num_params(CONFIG) / 1e6:,.1f}M "
      f"parameters, {jnp.dtype(DTYPE).name}")

runs = {}
for mode in ("hydragen", "replicated"):
    first = engine.generate(model, plan, max_new_tokens=S["new_tokens"], attention=mode,
                            backend=BACKEND)
    runs[mode] = engine.generate(model, plan, max_new_tokens=S["new_tokens"], attention=mode,
                                 backend=BACKEND)
    runs[mode].compile_seconds = first.compile_seconds
    g = runs[mode]
    print(f"{mode:>10}: prefill {g.prefill_seconds * 1e3:8.1f} ms | decode "
          f"{g.decode_seconds * 1e3:8.1f} ms | compile {g.compile_seconds:5.1f} s | "
          f"{g.decode_tokens_per_second:10,.0f} decode tok/s | {g.tokens_per_second:10,.0f} "
          f"tok/s end to end | KV cache {g.kv_bytes / 2**20:8.2f} MiB")

# %% [markdown]
# ### Same tokens?

# %%
hyd, rep_run = runs["hydragen"], runs["replicated"]
same = hyd.tokens == rep_run.tokens
print(f"identical generations: {int(np.all(same, axis=1).sum())} of {len(prompts)} sequences; "
      f"{same.mean():.1%} of tokens agree")
if not same.all():
    first_diff = np.argmin(same, axis=1)[~np.all(same, axis=1)]
    print("first differing step of the others:", first_diff.tolist(),
          "(low precision can flip a near-tie of random logits; float32 on CPU does not)")
print("sequence 0, first tokens:", hyd.tokens[0, :12].tolist())
if jnp.dtype(DTYPE) == jnp.float32:
    assert same.mean() >= 0.9, "Hydragen and replicated attention disagree in float32"

# %% [markdown]
# On a GPU or TPU the model runs in 16-bit floats. Its random weights make the logits almost
# flat, so many greedy choices are near-ties; the two modes add the same terms in different
# orders (Hydragen merges partial attentions by their log-sum-exps), and 16-bit rounding then
# flips some choices, after which a sequence's continuation differs. The check below runs both
# modes on this device in float32 at full matmul precision, with the tiny model and the first
# 16 prompts (token ids folded into its vocabulary, which keeps their sharing), where they
# agree. (On CPU the whole notebook already ran in float32.)

# %%
if jnp.dtype(DTYPE) != jnp.float32:
    tiny = LlamaConfig.from_preset("tiny", max_position_embeddings=8192)
    check_model = llama.init(tiny, seed=1, dtype=jnp.float32)
    check_prompts = [p % check_model.config.vocab_size for p in prompts[:16]]
    check_plan = sharing.plan(check_prompts, **PLAN_OPTIONS)
    with jax.default_matmul_precision("highest"):
        check = [engine.generate(check_model, check_plan, max_new_tokens=16, attention=mode,
                                 backend=BACKEND) for mode in ("hydragen", "replicated")]
    agree = check[0].tokens == check[1].tokens
    print(f"float32 check: {int(np.all(agree, axis=1).sum())} of {agree.shape[0]} sequences "
          f"identical, {agree.mean():.1%} of tokens agree")
    del check_model

# %% [markdown]
# ### Memory and time
#
# `kv_bytes` is the KV cache each mode allocates: Hydragen stores each shared node once, plus
# every sequence's suffix and generated tokens; replicated stores every sequence's whole
# prompt. Times are wall-clock seconds of the compiled prefill and decode loop.

# %%
modes = list(runs)
colors = ["tab:blue", "tab:orange"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
panels = [("KV cache (MiB)", [runs[m].kv_bytes / 2**20 for m in modes]),
          ("decode tokens / s", [runs[m].decode_tokens_per_second for m in modes]),
          ("prefill + decode (s)", [runs[m].prefill_seconds + runs[m].decode_seconds
                                    for m in modes])]
for ax, (label, values) in zip(axes, panels):
    bars = ax.bar(modes, values, color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_title(label)
    ax.margins(y=0.15)
fig.suptitle(f"{len(prompts)} sequences, {S['new_tokens']} new tokens each, "
             f"{DEVICE.device_kind} ({PLATFORM})")
fig.tight_layout()
plt.show()
speedup = hyd.decode_tokens_per_second / rep_run.decode_tokens_per_second
print(f"KV memory: {rep_run.kv_bytes / hyd.kv_bytes:.2f}x less with Hydragen; decode "
      f"throughput: {speedup:.2f}x that of replicated attention")
if speedup < 1.2:
    print("(at this size the model's weights, not attention over the prefix, dominate the "
          "time, and timings of a few milliseconds are noisy: see notebook 02 for larger "
          "batches and prefixes)")

# %% [markdown]
# ### How the memory grows with the batch, for a real model shape
#
# `engine.estimate_kv_bytes` computes what `generate` would allocate without running anything.
# Here: Llama-3-8B's shape (32 layers, 8 KV heads of 128 dims, bfloat16), a 2048-token shared
# prefix, 32 own tokens per sequence and 128 generated tokens. The replicated cache grows with
# batch x prefix; Hydragen's with batch x (suffix + generated tokens) only.

# %%
big = LlamaConfig.from_preset("llama3-8b")
batches = [8, 32, 128] if SIZE == "ci" else [8, 32, 128, 512, 1024]
prefix = rng.integers(3, big.vocab_size, size=2048)
kv = {mode: [] for mode in ("hydragen", "replicated")}
for b in batches:
    requests = [np.concatenate([prefix, rng.integers(3, big.vocab_size, size=32)])
                for _ in range(b)]
    for mode in kv:
        kv[mode].append(engine.estimate_kv_bytes(big, requests, max_new_tokens=128,
                                                 attention=mode, dtype=jnp.bfloat16))
fig, ax = plt.subplots(figsize=(6, 3.6))
for mode, color in zip(kv, colors):
    ax.plot(batches, np.array(kv[mode]) / 2**30, "o-", color=color, label=mode)
if memory:
    ax.axhline(memory / 2**30, color="k", ls=":", lw=1, label=f"this device ({DEVICE.device_kind})")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequences sharing the 2048-token prefix")
ax.set_ylabel("KV cache (GiB)")
ax.set_title("Llama-3-8B shape: KV cache of one batch")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
for b, h, r in zip(batches, kv["hydragen"], kv["replicated"]):
    print(f"batch {b:5d}: hydragen {h / 2**30:7.2f} GiB, replicated {r / 2**30:8.2f} GiB "
          f"({r / h:.1f}x)")

# %% [markdown]
# ## Next
#
# * `02_throughput_curves.ipynb`: tokens/s against batch size for several prefix lengths, on
#   this runtime and on an H200.
# * `03_sharing_trees.ipynb`: hierarchical sharing (few-shot prefix, problems, samples).
