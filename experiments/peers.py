"""Other libraries' decode attention on the shapes of hydrax's GPU benchmarks (the peers).

Used by `experiments/bench_attention.py` and `experiments/check_fused_h200.py`, on a
`bench_attention.make_case` case: q [B,1,H,D], prefix k, v [R,1,P,K,D], suffixes k, v
[R,B,U,K,D] (R rotation copies; the peers use copy 0). Axis letters as in hydrax.

- `torch_sdpa`: torch's scaled_dot_product_attention over caches holding a copy of the prefix
  per sequence (GQA through enable_gqa).
- `flashinfer`: FlashInfer's `MultiLevelCascadeAttentionWrapper`, two levels (the prefix pages
  shared by all B queries, then each sequence's suffix pages), page size 16, NHD paged cache.
- `tokamax`: tokamax's `dot_product_attention` over caches with the prefix copied.

Each returns (back-to-back us, device us, how the device time was taken, out [B,H,D] float32
NumPy or None): torch peers back to back with CUDA events around `loop` eager calls, their
device time from a CUDA graph of `loop` calls with one dependent kernel each (`torch_times`:
the same form as hydrax's in-jit loop of dependent calls); tokamax like hydrax's jitted calls
(`bench_attention.bench` and an in-jit loop of dependent calls). None of them is
importable on a CPU-only install; `unavailable(impl)` says why.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

PEERS = {"torch_sdpa": "torch", "flashinfer": "flashinfer", "tokamax": "tokamax"}
PAGE = 16       # FlashInfer's page size here


def unavailable(impl: str) -> Optional[str]:
  """Why the peer `impl` cannot run here (its module does not import), or None."""
  try:
    __import__(PEERS[impl])
    return None
  except Exception as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def torch_times(f, *, loop: int, outer: int, depend=None) -> tuple:
  """(back-to-back us, device us, how the device time was taken) of f(), medians of `outer`.

  Back to back: CUDA events around `loop` eager calls (host dispatch included, as a user's
  loop runs). Device: a CUDA graph of `loop` calls, each followed by `depend(out)` (one small
  kernel that makes the next call's input depend on this call's output, as hydrax's in-jit
  loop does: `bench_attention.dependent_loop`), replayed between CUDA events, so that neither
  side pays host dispatch and both pay one dependent kernel a call. Where the graph cannot
  be captured, the eager events stand in (how: "eager")."""
  import torch
  for _ in range(3):
    f()
  torch.cuda.synchronize()

  def events(run, n):
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    a.record()
    run()
    e.record()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6, a.elapsed_time(e) / n * 1e3

  def eager():
    for _ in range(loop):
      f()

  b2b, dev = zip(*[events(eager, loop) for _ in range(outer)])
  how = "eager"
  if depend is not None:
    try:
      graph = torch.cuda.CUDAGraph()
      side = torch.cuda.Stream()
      side.wait_stream(torch.cuda.current_stream())
      with torch.cuda.stream(side):          # warm up on a side stream, as capture needs
        depend(f())
      torch.cuda.current_stream().wait_stream(side)
      with torch.cuda.graph(graph):
        for _ in range(loop):
          depend(f())
      graph.replay()
      torch.cuda.synchronize()
      dev = [events(graph.replay, loop)[1] for _ in range(outer)]
      how = "graph"
    except Exception as e:      # noqa: BLE001 (any capture failure: the eager time stands)
      print(f"peers: CUDA graph capture failed, eager device time instead: "
            f"{type(e).__name__}: {str(e)[:200]}", flush=True)
  return float(np.median(b2b)), float(np.median(dev)), how


def _torch_case(case):
  import torch
  return tuple(torch.from_dlpack(x[0] if x.ndim == 5 else x) for x in case)


def torch_sdpa_call(b, case):
  """(f, depend): f() -> [B,H,1,D], torch SDPA over caches with the prefix copied into every
  sequence (built here, once; the call reads them); depend(out) adds 1e-30 * out[0,0,0,0] to
  the query in place (numerically nothing; a dependency for `torch_times`)."""
  import torch
  q, kp, vp, ks, vs = _torch_case(case)
  k = torch.cat([kp.expand(b, -1, -1, -1), ks], dim=1).transpose(1, 2).contiguous()
  v = torch.cat([vp.expand(b, -1, -1, -1), vs], dim=1).transpose(1, 2).contiguous()
  qt = q.transpose(1, 2).contiguous()                     # [B,H,1,D]
  f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, k, v, enable_gqa=True)
  return f, lambda out: qt.add_(out[:1, :1, :1, :1], alpha=1e-30)


def torch_sdpa(b, p, u, h, kh, d, case, *, loop, outer):
  f, depend = torch_sdpa_call(b, case)
  out = f()[:, :, 0].float().cpu().numpy()
  return (*torch_times(f, loop=loop, outer=outer, depend=depend), out)


def _paged(x, n, pages, kh, d):
  """[n, L, K, D] rows -> [n * pages, PAGE, K, D] pages (zero-padded past L)."""
  import torch
  buf = torch.zeros((n, pages * PAGE, kh, d), dtype=x.dtype, device=x.device)
  buf[:, :x.shape[1]] = x
  return buf.view(n * pages, PAGE, kh, d)


def flashinfer_call(b, p, u, h, kh, d, case):
  """(f, depend): f() -> [B,H,D], FlashInfer's two-level cascade over a paged copy of the
  caches (planned here, once); depend(out) adds 1e-30 * out[0,0,0] to the query in place."""
  import flashinfer as fi
  import torch
  q, kp, vp, ks, vs = _torch_case(case)
  pre_pages, suf_pages = -(-p // PAGE), -(-u // PAGE)
  total = pre_pages + b * suf_pages
  cache = torch.zeros((total, 2, PAGE, kh, d), dtype=q.dtype, device=q.device)
  for j, (pre, suf) in enumerate(((kp, ks), (vp, vs))):
    cache[:pre_pages, j] = _paged(pre, 1, pre_pages, kh, d)
    cache[pre_pages:, j] = _paged(suf, b, suf_pages, kh, d)
  i32 = dict(dtype=torch.int32, device=q.device)
  workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
  wrapper = fi.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
  last = lambda n: (n - 1) % PAGE + 1
  wrapper.plan([torch.tensor([0, b], **i32), torch.arange(b + 1, **i32)],
               [torch.tensor([0, pre_pages], **i32), torch.arange(b + 1, **i32) * suf_pages],
               [torch.arange(pre_pages, **i32), torch.arange(pre_pages, total, **i32)],
               [torch.tensor([last(p)], **i32), torch.full((b,), last(u), **i32)],
               h, kh, d, PAGE, q_data_type=q.dtype, kv_data_type=q.dtype)
  qf = q[:, 0].contiguous()                               # [B,H,D]
  return (lambda: wrapper.run(qf, cache),
          lambda out: qf.add_(out[:1, :1, :1], alpha=1e-30))


def flashinfer(b, p, u, h, kh, d, case, *, loop, outer):
  f, depend = flashinfer_call(b, p, u, h, kh, d, case)
  out = f().float().cpu().numpy()
  return (*torch_times(f, loop=loop, outer=outer, depend=depend), out)


def tokamax(b, p, u, h, kh, d, case, *, loop, outer):
  import jax
  import jax.numpy as jnp
  import tokamax as tk
  from experiments import bench_attention as ba
  q, kp, vp, ks, vs = case
  k, v = ba.replicated(kp[0], vp[0], ks[0], vs[0])
  f = jax.jit(lambda q, k, v: tk.dot_product_attention(q, k, v))
  t, _, _ = ba.bench(f, [(q, k, v)])
  steps = jax.jit(lambda q, k, v: jax.lax.fori_loop(0, loop, lambda i, q: q + (
      jnp.asarray(1e-30, q.dtype) * f(q, k, v)[:1, :1, :1, :1]).astype(q.dtype), q))
  td, _, _ = ba.bench(steps, [(q, k, v)], min_batch_s=0, outer=outer)
  out = np.asarray(f(q, k, v)[:, 0], np.float32)
  return t * 1e6, td / loop * 1e6, "jit loop", out


RUN = {"torch_sdpa": torch_sdpa, "flashinfer": flashinfer, "tokamax": tokamax}


def run(impl, b, p, u, h, kh, d, case, *, loop: int, outer: int) -> tuple:
  """(back-to-back us, device us, how the device time was taken, out [B,H,D] float32 or
  None) of the peer `impl`."""
  return RUN[impl](b, p, u, h, kh, d, case, loop=loop, outer=outer)
