r"""Mutation check: plants known bugs one at a time and shows the exactness tests catch each.

  python -m tests.mutation_check [--only NAME ...] [--backends xla,pallas,...] [--out F.md]

For every mutation and every backend it applies to, a subprocess runs pytest on the core's
exactness tests for that backend (tests/attention/test_core.py) with this module loaded as a
pytest plugin (`-p tests.mutation_check`) and HYDRAX_MUTATION naming the bug: the plugin
replaces one function of hydrax by its source with one expression changed, before any test
runs. A mutation is "caught" when pytest reports failures (exit code 1), "missed" when every
test passes, "error" for anything else (the bug could not be planted, a crash, a timeout).
The first row plants nothing: every backend must pass it, or the other rows mean nothing.

Prints a table mutation x backend and exits 1 when anything was missed or errored. It is a
script, not part of the pytest run (minutes: it runs the suite once per cell).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import time
from typing import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "HYDRAX_MUTATION"


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  what: str
  module: str                 # where the function lives
  function: str               # its name in the module
  old: str                    # exact source text replaced (must occur once)
  new: str
  backends: tuple             # backends whose tests must catch it


ALL = ("xla", "pallas", "mosaic", "mosaic_folded", "mosaic_in_place",
       "mosaic_suffix_warpgroup", "pallas_path", "pallas_path_grouped", "pallas_merge_in_kernel")
# The backends whose tests run the core's level loop and merge. The Mosaic case's test
# (two levels, one of them fixing the row order) runs through `grouped_levels`, one merge in
# packed rows, since that became the default (Config.finish "once"): not the loop.
LEVEL_BY_LEVEL = ("xla", "pallas")
# Every column of the table: the backends, and "prepared" (calls through
# `hydrax.attention.prepare`, and the model's use of it).
COLUMNS = ALL + ("prepared",)
MUTATIONS = [
    Mutation("none", "nothing planted (every backend must pass)", "", "", "", "", COLUMNS),
    Mutation("causal_off_by_one", "causal limit one key short (query misses its own key)",
             "hydrax.attention.hydragen", "_limits",
             "[:, None] + tt + 1, 0,", "[:, None] + tt, 0,", COLUMNS),
    Mutation("swapped_owner", "owners of a shared level reversed before the backend",
             "hydrax.attention.hydragen", "_run_level",
             "None if level.owner is None else level.owner,",
             "None if level.owner is None else level.owner[::-1],", LEVEL_BY_LEVEL),
    Mutation("merge_weights", "merge weights exp((lse - m) / 2) instead of exp(lse - m)",
             "hydrax.attention.merge", "merge",
             "w = jnp.exp(lses - m)", "w = jnp.exp(0.5 * (lses - m))", LEVEL_BY_LEVEL),
    Mutation("xla_lse_log2", "XLA backend: lse = m + log2(l) (base 2 for the sum)",
             "hydrax.attention.xla", "_attend",
             "m[..., 0] + jnp.log(l_safe)", "m[..., 0] + jnp.log2(l_safe)", ("xla",)),
    Mutation("xla_reads_past_length", "XLA backend: keys/values past the limits not zeroed",
             "hydrax.attention.xla", "level_attention",
             "k = jnp.where(seen, k, jnp.zeros((), k.dtype))\n  v = jnp.where(seen, v, "
             "jnp.zeros((), v.dtype))", "pass", ("xla",)),
    Mutation("flash_lse_log2", "Pallas kernels' shared finish: lse left in base 2 (no * ln 2)",
             "hydrax.attention.kernels.flash", "finish",
             "(m + jnp.log2(l_safe)) * LN2", "(m + jnp.log2(l_safe))", ("pallas", "pallas_path")),
    Mutation("pallas_last_block_dropped", "Triton kernel: key-block bound rounds down (the "
             "last partial key block is dropped)",
             "hydrax.attention.kernels.pallas_gpu", "_tile_body",
             "lax.div(hi + block_n - 1, block_n)", "lax.div(hi, block_n)", ("pallas",)),
    Mutation("pallas_first_block_dropped", "Triton kernel: every split starts one key block "
             "late", "hydrax.attention.kernels.pallas_gpu", "_tile_body",
             "b_first = j * spec.blocks_per_split", "b_first = j * spec.blocks_per_split + 1",
             ("pallas",)),
    Mutation("pallas_loads_past_limit", "Triton kernel: masked key/value loads bounded by the "
             "capacity S instead of the tile's largest limit",
             "hydrax.attention.kernels.pallas_gpu", "_tile_body",
             "kv_ok = (keys < hi)[:, None]", "kv_ok = (keys < s_cap)[:, None]", ("pallas",)),
    Mutation("path_last_block_dropped", "path kernel: key-block bound rounds down (the last "
             "partial key block of each level is dropped)",
             "hydrax.attention.kernels.path_gpu", "_kernel",
             "lax.div(hi + bn - 1, bn)", "lax.div(hi, bn)", ("pallas_path",)),
    Mutation("path_row_limit_ignored", "path kernel: scores masked at the largest limit of "
             "the node's rows, not each row's own (and rows of other nodes not masked)",
             "hydrax.attention.kernels.path_gpu", "_kernel",
             "visible=keys[None, :] < lim_j[:, None])", "visible=keys[None, :] < hi)",
             ("pallas_path",)),
    Mutation("path_wrong_node", "path kernel: every sequence of a program's group reads a "
             "shared level at the group's first sequence's node, not its own owner's",
             "hydrax.attention.kernels.path_gpu", "_kernel",
             "flash.level_node(refs, pos, s, s,", "flash.level_node(refs, pos, seqs[0], s,",
             ("pallas_path_grouped",)),
    Mutation("path_shared_node_read_twice", "path kernel: two sequences of a group on one "
             "node both walk its keys (their rows count them twice)",
             "hydrax.attention.kernels.path_gpu", "_kernel",
             "active = active & (nodes[i] != nodes[j])", "active = active",
             ("pallas_path_grouped",)),
    Mutation("pallas_merge_split_dropped", "Triton kernel, the levels' merge in the kernel: "
             "the last key split of every earlier level is left out",
             "hydrax.attention.kernels.pallas_gpu", "_merge_and_store",
             "for s in range(o_prior.shape[0]):", "for s in range(o_prior.shape[0] - 1):",
             ("pallas_merge_in_kernel",)),
    Mutation("pallas_regular_wrong_row", "Triton kernel, regular tiles: a tile's first row "
             "ignores its run (every sequence reads the first's queries)",
             "hydrax.attention.kernels.pallas_gpu", "_regular_tile",
             "start = run * reg.rows_per_node + j * block_m", "start = j * block_m",
             ("pallas",)),
    Mutation("mosaic_lse_log2", "Mosaic GPU kernel: lse left in base 2 (no * ln 2)",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "(m_i + jnp.log2(l_safe)) * LN2", "(m_i + jnp.log2(l_safe))",
             ("mosaic", "mosaic_folded")),
    Mutation("mosaic_fold_group_mask", "Mosaic GPU kernel, folded suffix: rows of later "
             "groups also see a sequence's suffix keys",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "row_hi = jnp.where(suffix_start <= first, suffix_end - first, 0)",
             "row_hi = suffix_end - first", ("mosaic_folded",)),
    Mutation("mosaic_fold_values_not_zeroed", "Mosaic GPU kernel, folded suffix: value rows "
             "past a sequence's suffix are not zeroed (0 * NaN reaches the output)",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "@pl.when(seq_hi < HALF)", "@pl.when(seq_hi < 0)", ("mosaic_folded",)),
    Mutation("mosaic_fold_transposed_group_widened", "Mosaic GPU kernel, transposed suffix "
             "steps: the columns of the next sequence's first rows also see a sequence's keys",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "(x_of + base < first + seq_rows)", "(x_of + base < first + seq_rows + 4)",
             ("mosaic_folded",)),
    Mutation("mosaic_fold_transposed_unweighted", "Mosaic GPU kernel, transposed suffix steps: "
             "a block's o^T merged without its weight against the row's running maximum",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "(ot * lax.broadcast_in_dim(w, ot.shape, [1]))", "(ot)", ("mosaic_folded",)),
    Mutation("mosaic_fold_transposed_window_unclamped", "Mosaic GPU kernel, transposed suffix "
             "steps: the 16-row window of the warpgroup's last groups runs past its 64 rows",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "jnp.minimum(lax.div(first, jnp.int32(8)) * 8, BLOCK_Q - cols)",
             "lax.div(first, jnp.int32(8)) * 8", ("mosaic_folded",)),
    Mutation("mosaic_fold_split_group_dropped", "Mosaic GPU kernel, folded suffix: each key "
             "split leaves out the last row group of its share",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "nsj = jnp.clip(groups - j0, 0, per_split)",
             "nsj = jnp.clip(groups - j0, 0, per_split - 1)", ("mosaic_folded",)),
    Mutation("mosaic_fold_order_ignored", "pallas backend, folded suffix: a tile row's "
             "sequence taken as its position in the packed order (rows sorted by node), not "
             "the sequence at that position",
             "hydrax.attention.kernels.pallas_gpu", "_suffix_tables",
             "seq = jnp.take(jnp.asarray(order, jnp.int32), seq)", "seq = seq",
             ("mosaic_folded",)),
    Mutation("mosaic_layer_ignored", "Mosaic GPU kernel: a stacked cache read at layer 0 "
             "whatever the layer (the tables' nodes not moved by layer * N)",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "node = node + layer_ref[0] * layer_nodes[0]", "node = node", ("mosaic_folded",)),
    Mutation("mosaic_fold_suffix_layer_ignored", "Mosaic GPU kernel, folded suffix: the "
             "suffix cache read at layer 0 whatever its layer",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "snode0 = slayer_ref[0] * layer_nodes[1] if layer_nodes[1] else 0", "snode0 = 0",
             ("mosaic_folded",)),
    Mutation("prepared_limits_swapped", "a call with `prepared=` takes its levels' key limits "
             "in reverse level order", "hydrax.attention.hydragen", "hydragen_attention",
             "all_limits, tables = list(prepared.limits), prepared.tables",
             "all_limits, tables = list(prepared.limits)[::-1], prepared.tables",
             ("prepared",)),
    Mutation("prepared_suffix_lengths_stale", "llama.forward prepares the per-sequence "
             "level with the lengths before this call's T new keys",
             "hydrax.models.llama", "_prepare_attention",
             "suffix.lengths.astype(jnp.int32) + t,", "suffix.lengths.astype(jnp.int32),",
             ("prepared",)),
    Mutation("mosaic_overlap_unscaled", "Mosaic GPU kernel, software-pipelined node steps: "
             "the accumulator not moved to a step's new maximum (alpha)",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "lax.optimization_barrier((acc, l_new, m_new, p_new))",
             "lax.optimization_barrier((acc / lax.broadcast_in_dim(alpha, acc.shape, [0]), "
             "l_new, m_new, p_new))", ("mosaic_folded",)),
    Mutation("mosaic_in_place_row_groups", "Mosaic GPU kernel, q read in place: a folded "
             "suffix's row groups taken as in packed rows (consecutive rows of a sequence)",
             "hydrax.attention.kernels.mosaic_gpu", "_row_group", "if not heads:", "if True:",
             ("mosaic_in_place",)),
    Mutation("mosaic_in_place_out_head", "Mosaic GPU kernel, out written in place: every "
             "query head of a KV head written to its first",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "pl.ds(pl.multiple_of((kvh * heads + gi) * d, d), d)])",
             "pl.ds(pl.multiple_of(kvh * heads * d, d), d)])", ("mosaic_in_place",)),
    Mutation("query_rows_lse_order", "pallas backend, q read in place: the kernel's lse rows "
             "put in query order with heads and rows swapped",
             "hydrax.attention.kernels.pallas_gpu", "_query_rows",
             "lse.reshape(p, kh, -1, g, n).transpose(0, 2, 4, 1, 3)",
             "lse.reshape(p, kh, -1, n, g).transpose(0, 2, 3, 1, 4)", ("mosaic_in_place",)),
    Mutation("swg_row_group", "Mosaic GPU kernel, suffix warpgroup: every sequence of a "
             "split taken as its first row group's", "hydrax.attention.kernels."
             "mosaic_suffix_warpgroup", "run", "h, j = lax.div(s, nsj), j0 + lax.rem(s, nsj)",
             "h, j = lax.div(s, nsj), j0 + 0 * lax.rem(s, nsj)", ("mosaic_suffix_warpgroup",)),
    Mutation("swg_values_past_suffix", "Mosaic GPU kernel, suffix warpgroup: value rows past "
             "a sequence's suffix not zeroed (0 * NaN)",
             "hydrax.attention.kernels.mosaic_suffix_warpgroup", "_jnp_steps",
             "v = jnp.where((key < seq_hi)[..., None], v, 0.0)", "v = v + 0 * seq_hi",
             ("mosaic_suffix_warpgroup",)),
    Mutation("swg_no_rescale", "Mosaic GPU kernel, suffix warpgroup: a warp's running out not "
             "rescaled to a new maximum", "hydrax.attention.kernels.mosaic_suffix_warpgroup",
             "_jnp_steps", "st[...] = st[...] * alpha[..., None] + ", "st[...] = st[...] + ",
             ("mosaic_suffix_warpgroup",)),
    Mutation("swg_lse_rows_in_place", "Mosaic GPU kernel, suffix warpgroup, q in place: a "
             "sequence's lse rows of head gi put T rows apart instead of 64 / G",
             "hydrax.attention.kernels.mosaic_suffix_warpgroup", "_jnp_steps",
             "pl.ds(row0 + gi * n, t)", "pl.ds(row0 + gi * t, t)", ("mosaic_suffix_warpgroup",)),
    Mutation("mosaic_fold_stagger_first_chunk", "Mosaic GPU kernel, staggered suffix steps: "
             "the node steps before the first suffix step skipped (the warpgroups then wait "
             "for keys never loaded: a deadlock, ended by the tests' hang guard)",
             "hydrax.attention.kernels.mosaic_gpu", "_kernel",
             "return jnp.where(u == 0, 0, root_before(u))", "return root_before(u)",
             ("mosaic_folded",)),
]

# The exactness tests run for each backend (pytest node ids of tests/attention/test_core.py).
_CORE = ["test_hydragen_matches_dense_float32[{b}]", "test_hydragen_matches_dense_bfloat16[{b}]",
         "test_causal_query_longer_than_last_level[{b}]", "test_head_dim_128[{b}-3-bfloat16]",
         "test_keys_past_limits_never_reach_output[{b}-False]",
         "test_jit_with_static_and_traced_owners[{b}]", "test_empty_levels_never_nan[{b}]"]


def node_ids(backend: str) -> list[str]:
  path = "tests/attention/test_core.py::"
  if backend == "mosaic":
    return [path + "test_mosaic_kernel_exact"]
  if backend == "prepared":          # calls through `prepare` (and the model's use of it)
    return ["tests/attention/test_prepared.py::test_prepared_layers_match_dense[xla]",
            "tests/attention/test_prepared.py::test_prepared_layers_match_dense[pallas]",
            "tests/models/test_llama.py::test_prefill_then_decode_equals_full_forward",
            "tests/models/test_llama.py::test_shared_prefix_cache_equals_full_forward"]
  if backend == "mosaic_folded":     # (and the kernel's own cases: stacked, staggered)
    return [path + "test_mosaic_folded_exact",
            "tests/attention/test_mosaic.py::test_folded_kernel_interpret_matches_split_reference"]
  mosaic_tests = "tests/attention/test_mosaic.py::"
  if backend == "mosaic_in_place":   # q read and out written in place (MosaicConfig.q_in_place)
    return [mosaic_tests + "test_in_place_kernel_interpret_matches_split_reference",
            mosaic_tests + "test_q_in_place_through_interpreted_kernel[False]"]
  if backend == "mosaic_suffix_warpgroup":   # MosaicConfig.suffix_warpgroup
    return [mosaic_tests + "test_suffix_warpgroup_interpret_matches_split_reference",
            mosaic_tests + "test_q_in_place_through_interpreted_kernel[True]"]
  return [path + t.format(b=backend) for t in _CORE]


# --- planting (in the pytest subprocess) ----------------------------------------------------

def plant(mutation: Mutation) -> None:
  """Replaces `mutation.function` of its module by its source with `old` -> `new`, and every
  reference to the original function object in loaded hydrax modules (`from x import f`) and
  in the backend registry."""
  if not mutation.module:
    return
  module = importlib.import_module(mutation.module)
  original = getattr(module, mutation.function)
  source = textwrap.dedent(inspect.getsource(original))
  if source.count(mutation.old) != 1:
    raise RuntimeError(f"mutation {mutation.name}: {mutation.old!r} occurs "
                       f"{source.count(mutation.old)} times in {mutation.module}."
                       f"{mutation.function} (the code changed: update the mutation)")
  scope = dict(vars(module))
  exec(compile(source.replace(mutation.old, mutation.new), module.__file__, "exec"), scope)
  mutant = scope[mutation.function]
  for name, mod in list(sys.modules.items()):
    if name.startswith(("hydrax", "tests")) and mod is not None:
      for attr, value in list(vars(mod).items()):
        if value is original:
          setattr(mod, attr, mutant)
  from hydrax.attention import backends       # registered Backend values hold functions too
  for key, backend in list(backends._REGISTRY.items()):
    if backend.level_attention is original:
      backends._REGISTRY[key] = dataclasses.replace(backend, level_attention=mutant)


def pytest_configure(config):  # the plugin hook: plants $HYDRAX_MUTATION before any test
  name = os.environ.get(ENV)
  if name:
    # The same examples as the loaded profile, without shrinking a failure (a caught
    # mutation only needs one failing example; shrinking recompiles many new shapes).
    from hypothesis import Phase, settings
    settings.register_profile("mutation", parent=settings(),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutation")
    plant(by_name(name))


def by_name(name: str) -> Mutation:
  for m in MUTATIONS:
    if m.name == name:
      return m
  raise ValueError(f"no mutation {name!r}; known: {[m.name for m in MUTATIONS]}")


# --- running and the table ------------------------------------------------------------------

def run_cell(mutation: Mutation, backend: str, timeout: float) -> tuple[str, float]:
  """(outcome, seconds): pytest on the backend's tests with the mutation planted."""
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p",
         "tests.mutation_check", *node_ids(backend)]
  env = {**os.environ, ENV: mutation.name, "PYTHONPATH": ROOT}
  start = time.perf_counter()
  try:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return "error (timeout)", time.perf_counter() - start
  seconds = time.perf_counter() - start
  return outcome(mutation.name == "none", done.returncode), seconds


def outcome(is_baseline: bool, returncode: int) -> str:
  """pytest's exit code -> the cell: 0 all passed, 1 some test failed, else an error."""
  if returncode == 0:
    return "passes" if is_baseline else "missed"
  if returncode == 1:
    return "FAILS" if is_baseline else "caught"
  return f"error (pytest exit {returncode})"


def table(results: Mapping[tuple, str], mutations: Sequence[Mutation],
          backends: Sequence[str]) -> str:
  """Markdown table: one row per mutation, one column per backend; "-" where the mutation
  does not apply to the backend (or was not run)."""
  lines = ["| mutation | what | " + " | ".join(backends) + " |",
           "| --- | --- |" + " --- |" * len(backends)]
  for m in mutations:
    cells = [results.get((m.name, b), "-") for b in backends]
    lines.append(f"| {m.name} | {m.what} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def failed(results: Mapping[tuple, str]) -> list:
  """The cells that make the check fail: a missed mutation, an error, a failing baseline."""
  return [key for key, value in results.items() if value not in ("caught", "passes")]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tests.mutation_check")
  parser.add_argument("--only", nargs="*", default=None, help="mutation names")
  parser.add_argument("--backends", default=",".join(COLUMNS))
  parser.add_argument("--timeout", type=float, default=1200)
  parser.add_argument("--out", default=None, help="also write the table (markdown) here")
  args = parser.parse_args(argv)
  backends = [b for b in args.backends.split(",") if b]
  mutations = [by_name(n) for n in args.only] if args.only else MUTATIONS
  results = {}
  for m in mutations:
    for b in backends:
      if b in m.backends:
        results[(m.name, b)], seconds = run_cell(m, b, args.timeout)
        print(f"{m.name} x {b}: {results[(m.name, b)]} ({seconds:.0f} s)", flush=True)
  text = table(results, mutations, backends)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  bad = failed(results)
  if bad:
    print(f"not caught: {bad}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
