"""The fused Triton kernel in Triton's interpreter against the float64 oracle (run as a script).

    TRITON_INTERPRET=1 python -m tests.attention.fused_interpret_cases
    python -m tests.attention.fused_interpret_cases --compile    (sm_90 cubin, no GPU needed)

Needs triton and CPU torch (not CI dependencies): exits 0 and prints "ok" when every case
passes, 1 on a failure, 3 with "SKIP: reason" when the interpreter cannot run here.
tests/attention/test_fused_kernel.py runs it in a subprocess (TRITON_INTERPRET must be set
before triton is first imported, which a pytest process cannot promise).

Cases: 3-level trees with traced owners and caches stacked [L,...] read at a traced layer,
ragged lengths (empty nodes, empty sequences), NaN stored past every length in keys AND values,
T > 1 causal, GQA, shared and per-sequence modes, forced key splits, the single-part direct
write, head dims that are not powers of two, bf16/fp16/fp32, gradients (XLA recompute), and
a new tree of the same shapes running the same compiled program.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

TOL = {"float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}


def _levels(rng, b, t, kh, d, shared, u, layers, dtype):
  """NumPy levels (k, v, lengths, owner) for the oracle, NaN past every length, and the
  stacked versions [L,...] with the level at `layer`."""
  import ml_dtypes  # noqa: F401  (bfloat16 NumPy dtype, a jax dependency)
  levels, stacked = [], []
  layer = int(rng.integers(0, layers)) if layers else None
  for i, (n, s) in enumerate(shared + [(b, u)]):
    per_seq = i == len(shared)
    k = rng.standard_normal((n, s, kh, d)).astype(dtype)
    v = rng.standard_normal((n, s, kh, d)).astype(dtype)
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    lengths[0] = s
    if n > 2:
      lengths[1] = 0
    for j in range(n):
      k[j, lengths[j]:] = np.nan
      v[j, lengths[j]:] = np.nan
    owner = None if per_seq else rng.integers(0, n, size=b).astype(np.int32)
    levels.append((k, v, lengths, owner))
    if layers:
      sk = rng.standard_normal((layers,) + k.shape).astype(dtype)
      sv = rng.standard_normal((layers,) + k.shape).astype(dtype)
      sk[layer], sv[layer] = k, v
      stacked.append((sk, sv))
  return levels, stacked, layer


def _compare(name, out, lse, ref_out, ref_lse, dtype):
  out = np.asarray(out, np.float64)
  lse = np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any(), f"{name}: NaN in the output"
  empty = np.isneginf(ref_lse)
  assert (np.isneginf(lse) == empty).all(), f"{name}: -inf lse rows differ"
  assert (out[empty] == 0).all(), f"{name}: rows with no key are not 0"
  tol = TOL[dtype]
  err = np.abs(out - ref_out).max()
  lerr = np.abs(np.where(empty, 0, lse - np.where(empty, 0, ref_lse))).max()
  assert err <= tol and lerr <= tol, f"{name}: max error out {err:.2e} lse {lerr:.2e} > {tol}"
  return err, lerr


def run_case(name, *, b, t, kh, g, d, shared, u, layers, dtype, mode, splits, traced, seed,
             causal=True):
  import jax
  import jax.numpy as jnp
  from hydrax.attention import KVLevel, backends, hydragen_attention
  from tests import oracle

  rng = np.random.default_rng(seed)
  np_dtype = jnp.dtype(dtype)
  levels, stacked, layer = _levels(rng, b, t, kh, d, shared, u, layers, np_dtype)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np_dtype)
  keys, vals = oracle.concat_levels([(k.astype(np.float64), v.astype(np.float64), n, o)
                                     for k, v, n, o in levels])
  ref_out, ref_lse = oracle.dense(q.astype(np.float64), keys, vals, causal=causal)
  backend = backends.get("fused", interpret=True, mode=mode, splits=splits)

  def fn(q, kvs, owners, lengths, layer_):
    lv = []
    for i, ((k, v), own, n) in enumerate(zip(kvs, owners, lengths)):
      static_owner = levels[i][3]
      lv.append(KVLevel(k, v, n, own if (traced and own is not None) else static_owner,
                        layer_ if layers else None))
    return hydragen_attention(q, lv, causal_last=causal, backend=backend)

  kvs = [(jnp.asarray(sk), jnp.asarray(sv)) for sk, sv in stacked] if layers else [
      (jnp.asarray(k), jnp.asarray(v)) for k, v, _, _ in levels]
  owners = [None if o is None else jnp.asarray(o) for *_, o in levels]
  lengths = [jnp.asarray(n) for _, _, n, _ in levels]
  t0 = time.time()
  out, lse = jax.jit(fn)(jnp.asarray(q), kvs, owners, lengths,
                         jnp.int32(layer if layers else 0))
  err = _compare(name, out, lse, ref_out, ref_lse, dtype)
  print(f"{name}: max err out {err[0]:.2e} lse {err[1]:.2e} ({time.time() - t0:.1f} s)",
        flush=True)


CASES = [
    dict(name="tree3_traced_layer_f32_T2_g2_split2", b=5, t=2, kh=2, g=2, d=16,
         shared=[(1, 70), (3, 40)], u=20, layers=3, dtype="float32", mode="shared", splits=2,
         traced=True, seed=1),
    dict(name="tree2_bf16_gqa4_shared", b=9, t=1, kh=2, g=4, d=32, shared=[(2, 100)], u=30,
         layers=0, dtype="bfloat16", mode="shared", splits=None, traced=False, seed=2),
    dict(name="tree3_fp16_per_sequence_D24", b=4, t=1, kh=1, g=8, d=24,
         shared=[(1, 50), (2, 33)], u=17, layers=2, dtype="float16", mode="per_sequence",
         splits=None, traced=True, seed=3),
    dict(name="one_level_direct_write_f32", b=3, t=3, kh=1, g=1, d=16, shared=[], u=40,
         layers=0, dtype="float32", mode="auto", splits=1, traced=False, seed=4),
]


def check_grad_and_reuse():
  """Gradients equal the XLA backend's; a new tree of the same shapes reuses the program."""
  import jax
  import jax.numpy as jnp
  from hydrax.attention import KVLevel, backends, hydragen_attention
  from hydrax.attention.kernels import fused_triton

  rng = np.random.default_rng(5)
  b, t, kh, g, d = 4, 1, 1, 2, 16
  levels, _, _ = _levels(rng, b, t, kh, d, [(2, 24)], 12, 0, np.float32)
  levels = [(np.nan_to_num(k), np.nan_to_num(v), n, o) for k, v, n, o in levels]
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)).astype(np.float32))
  fused = backends.get("fused", interpret=True, mode="shared")

  def loss(backend, q, k0, v0, own):
    lv = [KVLevel(k0, v0, jnp.asarray(levels[0][2]), own),
          KVLevel(jnp.asarray(levels[1][0]), jnp.asarray(levels[1][1]),
                  jnp.asarray(levels[1][2]), None)]
    out, lse = hydragen_attention(q, lv, backend=backend)
    return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  args = (q, jnp.asarray(levels[0][0]), jnp.asarray(levels[0][1]), jnp.asarray(levels[0][3]))
  g_fused = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(*args)
  g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(*args)
  for a, r in zip(g_fused, g_xla):
    assert np.allclose(np.asarray(a), np.asarray(r), atol=1e-4), "gradients differ"
  # A new tree (other owners, lengths) of the same shapes: same compiled program.
  f = jax.jit(lambda q, own, n: hydragen_attention(q, [KVLevel(
      args[1], args[2], n, own), KVLevel(jnp.asarray(levels[1][0]), jnp.asarray(levels[1][1]),
                                          jnp.asarray(levels[1][2]), None)], backend=fused))
  f(q, args[3], jnp.asarray(levels[0][2]))
  before = fused_triton._forward_jit._cache_size()
  other = jnp.asarray(np.array([1, 1, 0, 1], np.int32))
  out, _ = f(q, other, jnp.asarray(np.array([5, 24], np.int32)))
  assert fused_triton._forward_jit._cache_size() == before, "a new tree recompiled"
  assert np.isfinite(np.asarray(out)).all()
  print("grad and reuse: ok", flush=True)


def _ptxas_for_sm90(triton) -> str:
  """The ptxas Triton itself uses for sm_90: its PTX targets that ptxas's ISA version (Triton
  3.9 writes PTX that only its bundled `ptxas-blackwell`, CUDA 13, accepts; 3.6 has one)."""
  try:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path
  except (ImportError, AttributeError):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_hopper(cases=None):
  """Compiles the kernel for sm_90 with Triton's own toolchain (no GPU needed: TTIR to cubin
  through the bundled ptxas), for the plans of real decode shapes; returns ptxas' register
  and spill counts per case. Catches what the interpreter cannot (globals that are not
  constexpr, layouts, types); run WITHOUT TRITON_INTERPRET."""
  import inspect
  import re
  import subprocess
  import tempfile

  import jax.numpy as jnp
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  from hydrax.attention.kernels import fused_triton as ft
  from hydrax.attention.kernels import fused_triton_kernel as kmod
  from hydrax.attention.kernels import fused_worklist as wl

  kernel = kmod.fused_decode_kernel
  names = list(inspect.signature(kernel.fn).parameters)
  ptxas = _ptxas_for_sm90(triton)
  # (name, B, H, K, dtype, [(N, S) shared], U, mode)
  cases = cases or [("decode_bf16_32K_256_shared", 256, 32, 8, "bfloat16", [(1, 32768)], 128,
                     "shared"),
                    ("decode_bf16_1K_16_per_seq", 16, 32, 8, "bfloat16", [(1, 1024)], 128,
                     "per_sequence"),
                    ("tree_f32_3lv_shared", 33, 8, 8, "float32", [(1, 700), (5, 200)], 64,
                     "shared")]
  out = {}
  for name, b, h, kh, dtype, shared, u, mode in cases:
    shapes = [wl.LevelShape(n, s, True, np.zeros(b, np.int32) if n == 1 else None)
              for n, s in shared] + [wl.LevelShape(b, u, False)]
    cfg = ft.Config(mode=mode)
    plan = ft._plan_for((b, 1, h, 128), kh, jnp.dtype(dtype), shapes, cfg)
    scalars, consts = ft.kernel_params(plan, shapes, (b, 1, h, 128), dtype, 128 ** -0.5, cfg)
    ty = {"bfloat16": "*bf16", "float32": "*fp32"}[dtype]
    sig = dict(items_ptr="*i32", order_ptr="*i32", limits_ptr="*i32", q_ptr=ty,
               out_ptr=ty, lse_ptr="*fp32", part_o_ptr="*fp32", part_lse_ptr="*fp32",
               ticket_ptr="*i32")
    sig.update({f"{x}{i}": ty for x in "kv" for i in range(wl.MAX_LEVELS)})
    ints = names[names.index("v3") + 1:names.index("out_ptr")]
    assert len(ints) == len(scalars), (ints, scalars)
    sig.update({n: "i32" for n in ints})
    sig.update({n: "constexpr" for n in consts})
    # Pointers 16-byte aligned, as jax-triton declares every array argument (JAX buffers
    # are): without it Triton cannot use asynchronous copies and does not pipeline the key
    # loop, and the registers and spills below would not be those of the GPU build.
    src = ASTSource(fn=kernel, signature={n: sig[n] for n in names},
                    constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                           if sig[n].startswith("*")})
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={k: v for k, v in ft.launch_settings(cfg, dtype).items()
                                       if k != "programs_per_sm"})
    with tempfile.TemporaryDirectory() as tmp:
      ptx = os.path.join(tmp, "k.ptx")
      with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
      res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
      raise RuntimeError(f"{name}: {ptxas} failed: {res.stderr.strip()[-500:]}")
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", res.stderr)
    out[name] = dict(registers=int(regs[-1]) if regs else None,
                     spill_bytes=int(spill[-1]) if spill else None,
                     shared_bytes=compiled.metadata.shared, seconds=time.time() - t0)
    print(f"{name}: sm_90 ok, {out[name]}", flush=True)
  return out


def main() -> int:
  try:
    import triton  # noqa: F401
    import torch  # noqa: F401
  except Exception as e:
    print(f"SKIP: {type(e).__name__}: {e}")
    return 3
  from hydrax.attention.kernels import fused_triton
  reason = fused_triton.unavailable_reason(fused_triton.Config(interpret=True))
  if reason and sys.argv[1:] != ["--compile"]:
    print(f"SKIP: {reason}")
    return 3
  if int(np.__version__.split(".")[0]) * 100 + int(np.__version__.split(".")[1]) >= 204 and \
      triton.__version__ < "3.7" and sys.argv[1:] != ["--compile"]:
    print(f"SKIP: Triton {triton.__version__}'s interpreter needs NumPy < 2.4 "
          f"(found {np.__version__})")
    return 3
  if sys.argv[1:] == ["--compile"]:
    compile_hopper()
    print("ok")
    return 0
  only = set(sys.argv[1:])
  for case in CASES:
    if not only or case["name"] in only:
      run_case(**case)
  if not only or "grad" in only:
    check_grad_and_reuse()
  print("ok")
  return 0


if __name__ == "__main__":
  sys.exit(main())
