"""The Mosaic GPU kernel (`kernels/mosaic_gpu.py`) and its wrapper in the pallas backend.

On CPU the kernel runs in jax's Mosaic GPU interpret mode, which costs 3-5 s per program (one
tile x one key split x one KV head) on a 2-core machine: the interpret-mode tests below make
three kernel calls of tiny shapes (6 programs in all). Everything else replaces the kernel
with `emulate_tile_attention`, a plain jnp implementation of its contract written here from
the docstring (sharing no code with the kernel), which also checks the tile table it is given
and poisons with NaN what the wrapper must never use: rows and tiles that break the contract.

* direct kernel calls vs a float64 NumPy reference of each key split (and the emulator on the
  same cases, so that the emulator itself is checked without the oracle);
* `hydragen_attention(backend=configure(lowering="mosaic"))` with the emulator, vs the
  float64 oracle (hypothesis: ragged, empty and padded nodes, splits; static owners, and
  traced owners with a stacked cache read at a traced layer);
* interpret-mode runs of the whole path: a stacked cache read in place here, in bfloat16; a
  padded shared level and a per-sequence level with an empty suffix, in float16, in
  tests/attention/test_core.py::test_mosaic_kernel_exact (the mutation check's Mosaic case);
* the static decisions (`_use_mosaic`), the logged fallbacks and a bad `lowering`.
"""

import contextlib
import logging

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from hypothesis import event, given, strategies as st

from hydrax import _log
from hydrax.attention import KVLevel, hydragen_attention, prepare
from hydrax.attention.kernels import mosaic_gpu
from hydrax.attention.kernels import mosaic_suffix_warpgroup as suffix_wg
from hydrax.attention.kernels import pallas_gpu as pg
from tests import oracle

TILE = 128                                  # rows per tile (the kernel's contract)
TOL = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


# --- float64 reference of one kernel call, split by split ----------------------------------

def _f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _suffix_group(row, seq_rows, splits):
  """(warpgroup, row group, key split that attends its suffix) of tile row `row`."""
  groups = 64 // seq_rows
  h, grp = (row % TILE) // 64, (row % 64) // seq_rows
  return h, grp, grp // -(-groups // splits)


def split_reference(q, k, v, tab, row_limits, *, scale, block_kv, splits, blocks_per_split,
                    suffix=None, suffix_warpgroup=False):
  """NumPy float64: row r (tile r // TILE, node tab[tile, 0]) over the keys of its node below
  row_limits[r] in split j's key range [j * bps * block_kv, (j + 1) * bps * block_kv), and,
  with `suffix` (a mosaic_gpu.Suffix), in the split that takes its row group (groups of
  seq_rows rows in each 64-row half of a tile, ceil(J / P) groups a split), the keys of its
  group's node in the suffix cache below its suffix limit.
  suffix_warpgroup: every row's suffix keys alone in one more split (plane P).
  Returns out [P,K,R,D], lse [P,K,R] (0 and -inf where a row sees no key of the split)."""
  q, k, v = _f64(q), _f64(k), _f64(v)
  tab, row_limits = np.asarray(tab), np.asarray(row_limits)
  kh, r, d = q.shape
  planes = splits + bool(suffix_warpgroup)
  out = np.zeros((planes, kh, r, d))
  lse = np.full((planes, kh, r), -np.inf)
  span = blocks_per_split * block_kv
  for j in range(planes):
    for row in range(r):
      node = int(tab[row // TILE, 0])
      k0, k1 = j * span, min((j + 1) * span, int(row_limits[row]), k.shape[1])
      keys, values = [k[node, k0:max(k0, k1)]], [v[node, k0:max(k0, k1)]]
      if suffix is not None:
        h, grp, owner_split = _suffix_group(row, suffix.seq_rows, splits)
        if suffix_warpgroup:
          owner_split = splits
        if owner_split == j:
          seq = int(np.asarray(suffix.table)[row // TILE, h, grp, 0])
          n = int(np.asarray(suffix.row_limits)[row])
          keys.append(_f64(suffix.k)[seq, :n])
          values.append(_f64(suffix.v)[seq, :n])
      keys, values = np.concatenate(keys), np.concatenate(values)
      if not len(keys):
        continue
      s = np.einsum("hd,shd->hs", q[:, row], keys) * scale               # [K, keys]
      m = s.max(axis=1, keepdims=True)
      p = np.exp(s - m)
      out[j, :, row] = np.einsum("hs,shd->hd", p, values) / p.sum(1, keepdims=True)
      lse[j, :, row] = m[:, 0] + np.log(p.sum(1))
  return out, lse


# --- the kernel's contract in jnp (stands in for the kernel in the wrapper tests) ----------

CALLS = []          # one dict per (traced) call of the emulator


def packed_row_of_tile_row(r: int, heads: int) -> np.ndarray:
  """[r]: the packed row (query row x G + head) of each tile row of a kernel that reads q in
  place with G = heads: within each warpgroup's 64 rows, row gi*n + x (n = 64 // G) is query
  row x at head gi (the contract, written here apart from the kernel's helper)."""
  i = np.arange(r)
  n = 64 // heads
  return i // 64 * 64 + (i % 64 % n) * heads + (i % 64) // n


def packed_q(q, heads: int):
  """q [B*T,H,D] -> [K, B*T*G, D], row x*G + gi of KV head kh = query x at head kh*G + gi."""
  bt, h, d = q.shape
  return q.reshape(bt, h // heads, heads, d).transpose(1, 0, 2, 3).reshape(h // heads, -1, d)


def unpacked_out(out, heads: int):
  """Inverse of `packed_q` with a leading split axis: [P,K,B*T*G,D] -> [P,B*T,H,D]."""
  p, kh, r, d = out.shape
  return out.reshape(p, kh, r // heads, heads, d).transpose(0, 2, 1, 3, 4).reshape(
      p, r // heads, kh * heads, d)


def emulate_tile_attention(q, k, v, tab, row_limits, *, heads=None, **kw):
  """`mosaic_gpu.tile_attention`'s contract (`emulate_packed`); with `heads`, q [B*T,H,D] is
  read in place and out [P,B*T,H,D] written in place, the row arrays (row_limits, lse, the
  suffix's) in the kernel's tile rows (`packed_row_of_tile_row`)."""
  if heads is None:
    return emulate_packed(q, k, v, tab, row_limits, **kw)
  assert heads in (1, 2, 4, 8) and not kw.get("transposed")
  r = q.shape[0] * heads
  to_packed = np.argsort(packed_row_of_tile_row(r, heads))
  suffix = kw.get("suffix")
  if suffix is not None:
    assert suffix.seq_rows % heads == 0
    kw["suffix"] = suffix._replace(row_limits=suffix.row_limits[to_packed])
  out, lse = emulate_packed(packed_q(q, heads), k, v, tab, row_limits[to_packed], **kw)
  CALLS[-1]["heads"] = heads
  return unpacked_out(out, heads), lse[:, :, packed_row_of_tile_row(r, heads)]


def emulate_packed(q, k, v, tab, row_limits, *, scale, block_kv, stages, splits,
                   blocks_per_split, interpret=False, suffix=None, stagger=False,
                   lead=0, layer=None, transposed=False, overlap=False,
                   suffix_warpgroup=False, suffix_stages=2, registers=(216, 24, 56)):
  """`mosaic_gpu.tile_attention`'s contract with q packed: out [P,K,R,D] in q's dtype
  (normalised per split), lse [P,K,R] float32 (natural log; -inf and out 0 for a row that sees no key of the split).

  Static arguments are asserted. Values: a tile whose (node, lo, hi) is not (a node, <= the
  smallest positive limit of its rows, the largest limit of its rows) is poisoned with NaN, and
  so are rows of limit 0 in tiles with lo > 0 (they must be padding: the kernel runs blocks
  below lo unmasked, so their results are garbage the wrapper has to drop).

  With `suffix` (a mosaic_gpu.Suffix): row r also sees, in the split that takes its row group
  (`_suffix_group`), the keys of its group's node in the suffix cache below its suffix limit;
  a tile whose 4th column is not the largest suffix limit of its rows, and a group whose
  table entry is not (a node, the largest suffix limit of its rows), are poisoned.
  Stacked caches ([L,N,S,K,D]) are read at `layer` (suffix.layer), nodes within the layer.
  suffix_warpgroup: out and lse get one plane more, P, where every row sees its suffix keys
  alone; planes [0, P) hold the node's keys alone."""
  assert (k.ndim == 5) == (layer is not None), "a stacked cache and its layer go together"
  stacked = (layer is not None, suffix is not None and suffix.layer is not None)
  if layer is not None:
    k, v = (lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in (k, v))
  if suffix is not None:
    assert (suffix.k.ndim == 5) == (suffix.layer is not None)
    if suffix.layer is not None:
      suffix = suffix._replace(layer=None, **{
          f: lax.dynamic_index_in_dim(getattr(suffix, f), suffix.layer, 0, keepdims=False)
          for f in ("k", "v")})
  kh, r, d = q.shape
  n, s, kh2, d2 = k.shape
  assert q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == v.dtype == q.dtype
  assert d in (64, 128) and (kh2, d2) == (kh, d) and v.shape == k.shape
  assert r % TILE == 0 and s > 0 and s % block_kv == 0 and block_kv % 64 == 0
  assert tab.shape == (r // TILE, 4) and row_limits.shape == (r,)
  assert tab.dtype == jnp.int32 and row_limits.dtype == jnp.int32
  nblk = s // block_kv
  assert stages >= 1 and splits >= 1 and blocks_per_split >= 1 and isinstance(stagger, bool)
  assert isinstance(transposed, bool) and isinstance(overlap, bool)
  assert lead is None or (isinstance(lead, int) and lead >= 0)
  assert not transposed or (suffix is not None and suffix.seq_rows <= mosaic_gpu.SUFFIX_COLS)
  assert splits * blocks_per_split >= nblk, "some key blocks belong to no split"
  assert (splits - 1) * blocks_per_split < nblk, "an empty split"
  assert not suffix_warpgroup or (suffix is not None and not transposed
                                  and suffix.seq_rows in (1, 2, 4, 8) and suffix_stages >= 1
                                  and suffix.k.shape[-3] % 32 == 0
                                  and 2 * registers[0] + registers[1] + registers[2] <= 512)
  swg = suffix_warpgroup and suffix_wg.Layout(
      suffix.seq_rows, 0, d, suffix_stages, splits, 0.0, interpret)
  assert mosaic_gpu.smem_bytes(block_kv, stages, d, q.dtype, fold=suffix is not None,
                               transposed=transposed, swg=swg or None) <= mosaic_gpu.SMEM_BYTES
  planes = splits + bool(suffix_warpgroup)
  CALLS.append(dict(shape=(kh, r, d, n, s), block_kv=block_kv, splits=splits,
                    bps=blocks_per_split, interpret=interpret, suffix=suffix is not None,
                    stacked=stacked, stagger=stagger, lead=lead, transposed=transposed,
                    overlap=overlap, suffix_warpgroup=bool(suffix_warpgroup)))
  tn = r // TILE
  node, lo, hi = tab[:, 0], tab[:, 1], tab[:, 2]
  lim = row_limits.reshape(tn, TILE)
  min_pos = jnp.min(jnp.where(lim > 0, lim, jnp.iinfo(jnp.int32).max), axis=1)
  ok = ((node >= 0) & (node < n) & (hi == lim.max(axis=1)) & (hi <= s) & (lo >= 0)
        & (lo <= hi) & ((hi == 0) | (lo <= min_pos)))
  bad_row = ~ok[:, None] | ((lo[:, None] > 0) & (lim == 0))              # [Tn, TILE]
  kt = jnp.take(k, jnp.clip(node, 0, n - 1), axis=0).astype(jnp.float32)  # [Tn,S,K,D]
  vt = jnp.take(v, jnp.clip(node, 0, n - 1), axis=0).astype(jnp.float32)
  qt = q.astype(jnp.float32).reshape(kh, tn, TILE, d)
  sc = jnp.einsum("htrd,tshd->htrs", qt, kt) * scale                       # [K,Tn,TILE,S]
  key = jnp.arange(s)
  split_of_key = key // (blocks_per_split * block_kv)
  vis = ((key[None, None, None, :] < lim[None, :, :, None])
         & (split_of_key[None, None, None, :] == jnp.arange(planes)[:, None, None, None]))
  vis = vis[:, None]                                                       # [P,1,Tn,TILE,S]
  sc = jnp.where(vis, sc[None], -jnp.inf)
  if suffix is not None:
    # Each row's suffix keys appended to its node's: [P,K,Tn,TILE,S+Ss], values per row.
    ns, ss = suffix.k.shape[:2]
    rows = suffix.seq_rows
    assert suffix.k.shape == suffix.v.shape == (ns, ss, kh, d) and ss % 64 == 0
    assert block_kv == 128 and 64 % rows == 0
    groups = 64 // rows
    assert suffix.table.shape == (tn, 2, groups, 2) and suffix.row_limits.shape == (r,)
    slim = suffix.row_limits.reshape(tn, 2, groups, rows)
    snode = suffix.table[..., 0]
    ok_s = ((tab[:, 3] == slim.reshape(tn, -1).max(axis=1))[:, None, None]
            & (suffix.table[..., 1] == slim.max(axis=-1)) & (snode >= 0) & (snode < ns))
    bad_row = bad_row | jnp.repeat(~ok_s, rows, axis=-1).reshape(tn, TILE)
    row_node = jnp.repeat(jnp.clip(snode, 0, ns - 1), rows, axis=-1).reshape(tn, TILE)
    ks = jnp.take(suffix.k, row_node, axis=0).astype(jnp.float32)         # [Tn,TILE,Ss,K,D]
    vs = jnp.take(suffix.v, row_node, axis=0).astype(jnp.float32)
    sc_s = jnp.einsum("htrd,trshd->htrs", qt, ks) * scale                  # [K,Tn,TILE,Ss]
    split_of_row = (jnp.arange(TILE) % 64) // rows // -(-groups // splits)  # [TILE]
    if suffix_warpgroup:
      split_of_row = jnp.full((TILE,), splits)
    vis_s = ((jnp.arange(ss)[None, None, None, :]
              < suffix.row_limits.reshape(tn, TILE)[None, :, :, None])
             & (split_of_row[None, None, :, None] == jnp.arange(planes)[:, None, None, None]))
    sc = jnp.concatenate([sc, jnp.where(vis_s[:, None], sc_s[None], -jnp.inf)], axis=-1)
    vis = jnp.concatenate([jnp.broadcast_to(vis, sc.shape[:-1] + (s,)),
                           jnp.broadcast_to(vis_s[:, None], sc.shape[:-1] + (ss,))], axis=-1)
  m = jnp.max(sc, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(vis, jnp.exp(sc - m_safe[..., None]), 0.0)
  l = p.sum(-1)
  has = l > 0
  o = jnp.einsum("phtrs,tshd->phtrd", p[..., :s], vt)
  if suffix is not None:
    o = o + jnp.einsum("phtrs,trshd->phtrd", p[..., s:], vs)
  o = o / jnp.where(has, l, 1.0)[..., None]
  lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
  o = jnp.where(bad_row[None, None, :, :, None], jnp.nan, o)
  lse = jnp.where(bad_row[None, None], jnp.nan, lse)
  return (o.reshape(planes, kh, r, d).astype(q.dtype),
          lse.reshape(planes, kh, r).astype(jnp.float32))


# --- direct calls: cases, checks -----------------------------------------------------------

def _direct_case(name):
  """q, k, v, tab, row_limits, real rows, kwargs of one direct kernel call (see DIRECT)."""
  rng = np.random.default_rng(len(name))
  cfg = DIRECT[name]
  dtype, kh, n, s, d = cfg["dtype"], cfg["kh"], cfg["n"], cfg["s"], cfg["d"]
  tiles = cfg["tiles"]
  q = jnp.asarray(rng.standard_normal((kh, len(tiles) * TILE, d)), dtype)
  k = jnp.asarray(rng.standard_normal((n, s, kh, d)), dtype)
  v = jnp.asarray(rng.standard_normal((n, s, kh, d)), dtype)
  lim = np.zeros(len(tiles) * TILE, np.int32)
  real = np.zeros(len(tiles) * TILE, bool)
  tab = np.zeros((len(tiles), 4), np.int32)
  for i, (node, count, low, high, fixed) in enumerate(tiles):
    rows = slice(i * TILE, i * TILE + count)
    lim[rows] = rng.integers(low, high + 1, size=count)
    for j, x in enumerate(fixed):          # the interesting limits, placed at the tile's start
      lim[i * TILE + j] = x
    real[rows] = True
    tab[i] = (node, lim[rows].min(), lim[rows].max(), 0) if count else (node, 0, 0, 0)
  kwargs = {key: cfg[key] for key in ("block_kv", "stages", "splits", "blocks_per_split")}
  if cfg.get("overlap"):
    kwargs["overlap"] = True
  return q, k, v, jnp.asarray(tab), jnp.asarray(lim), real, dict(kwargs, scale=cfg["scale"])


DIRECT = {
    # One tile (node 1) of 110 real rows with ragged limits 0..256, some 0 (so lo = 0: every
    # block masked), 192 and 193 on both sides of the split boundary (192 sees no key of split
    # 1, 193 sees one), and 18 padding rows. Split 0 runs 3 blocks with 2 stages: the memory
    # warpgroup's reload loop runs.
    "d64_bf16_stages2_splits2": dict(
        dtype=jnp.bfloat16, kh=1, n=2, s=256, d=64, scale=64 ** -0.5, block_kv=64, stages=2,
        splits=2, blocks_per_split=3,
        tiles=[(1, 110, 0, 256, (0, 256, 192, 193, 1, 63, 64, 65, 0, 131, 255))]),
    # Two KV heads, D = 128, fp16, one split of 4 blocks with 3 stages (reload loop), lo >= 128
    # (two unmasked blocks), then masked ragged limits; 38 padding rows.
    "d128_fp16_stages3_kv2": dict(
        dtype=jnp.float16, kh=2, n=2, s=256, d=128, scale=0.6 / np.sqrt(128), block_kv=64,
        stages=3, splits=1, blocks_per_split=4,
        tiles=[(1, 90, 129, 256, (129, 256, 200, 193))]),
    # The unmasked node steps software-pipelined (`overlap`), 3 stages, 2 splits of 4 blocks:
    # tile 0 (lo = 400) runs split 0's 4 blocks unmasked (the first step, two pipelined, the
    # last) and split 1's first 2 before its masked ones; tile 1 (lo = 100) one unmasked
    # step (first and last, no pipelined one), then masked; tile 2 (a limit 0) none.
    "d128_bf16_overlap_stages3_splits2": dict(
        dtype=jnp.bfloat16, kh=1, n=2, s=512, d=128, scale=128 ** -0.5, block_kv=64,
        stages=3, splits=2, blocks_per_split=4, overlap=True,
        tiles=[(1, 128, 400, 512, (400, 512, 449)), (0, 70, 100, 300, (100, 300)),
               (1, 30, 0, 512, (0,))]),
}


def _check_splits(out, lse, ref_out, ref_lse, rows, dtype, out_tol=2e-2, lse_tol=1e-2):
  """out/lse of a kernel call vs the split reference on `rows` (a [R] bool mask)."""
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
  out, lse, ref_out, ref_lse = (x[:, :, rows] for x in (out, lse, ref_out, ref_lse))
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  assert np.all(lse[~finite] == -np.inf)
  np.testing.assert_array_equal(out[~finite], 0.0)          # exactly 0, not just close
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=out_tol)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0, atol=lse_tol)


def _rows_to_check(tab, real):
  """Real rows, and padding rows of tiles with lo == 0 (all masked: they must give 0, -inf).
  Padding rows of a tile with lo > 0 see the unmasked blocks: unspecified, never used."""
  lo = np.repeat(np.asarray(tab)[:, 1], TILE)
  return real | (lo == 0)


@pytest.mark.parametrize("name", list(DIRECT))
def test_emulator_matches_split_reference(name):
  """The stand-in used below is itself exact (checked against the direct formula)."""
  q, k, v, tab, lim, real, kw = _direct_case(name)
  fn = jax.jit(lambda *a: emulate_tile_attention(*a, **kw))
  out, lse = fn(q, k, v, tab, lim)
  ref = split_reference(q, k, v, tab, lim, **{x: kw[x] for x in
                                              ("scale", "block_kv", "splits",
                                               "blocks_per_split")})
  _check_splits(out, lse, *ref, real, q.dtype, out_tol=1e-2, lse_tol=1e-4)
  bad = tab.at[0, 2].add(-1)                     # a wrong hi: the emulator must poison it
  assert np.isnan(np.asarray(fn(q, k, v, bad, lim)[1][:, :, :TILE])).all()


@pytest.mark.parametrize("name", list(DIRECT))
def test_kernel_interpret_matches_split_reference(name, hang_guard):
  q, k, v, tab, lim, real, kw = _direct_case(name)
  out, lse = mosaic_gpu.tile_attention(q, k, v, tab, lim, interpret=True, **kw)
  # No NaN anywhere, not even in padding rows whose results are unspecified.
  assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
  assert not np.isnan(np.asarray(lse)).any()
  ref = split_reference(q, k, v, tab, lim, **{x: kw[x] for x in
                                              ("scale", "block_kv", "splits",
                                               "blocks_per_split")})
  _check_splits(out, lse, *ref, _rows_to_check(tab, real), q.dtype)


def _folded_case(long_root: bool = False, rows: int = 8, kh: int = 1):
  """q, k, v, tab, row_limits, suffix, real rows, kwargs of a direct call with a folded
  suffix: tile 0 (node 1) full, 16 sequences of 8 rows, root limits 200..384 (the first key
  block unmasked); tile 1 (node 0) 5 sequences and 88 padding rows; a root of 3 key blocks
  in 2 splits; suffix nodes out of order in a cache of 25, capacity 192 (three half blocks),
  lengths with 0, 192, 70, each sequence's rows limited causally below its length, NaN past
  every suffix length and past each node's largest limit.

  long_root: a root of 6 key blocks (limits 641..768: 3 blocks each split), 32 rows a
  sequence (one row group a split), suffixes of one half block (capacity 64): a split runs
  one suffix step among three node steps, so a staggered CTA (tile 1, split 1: phase 12 of
  16) runs a node step before its first suffix step.
  rows: rows a sequence otherwise (8; 4: decode at G = 4, 32 sequences of tile 0, 10 of tile
  1, whose row groups start at odd multiples of 4: the transposed steps' windows of 16 rows
  start 4 rows before the group, or 12 at the warpgroup's last group). kh: KV heads."""
  rng = np.random.default_rng(21)
  d, n, s, ss, ns = 64, 2, 384, 192, 45
  counts, nodes, low = (128, 40), (1, 0), (200, 1)
  if long_root:
    s, ss, rows, counts, low = 768, 64, 32, (128, 64), (641, 641)
  dtype = jnp.bfloat16
  q = jnp.asarray(rng.standard_normal((kh, 2 * TILE, d)), dtype)
  k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  ks = rng.standard_normal((ns, ss, kh, d)).astype(np.float32)
  vs = rng.standard_normal((ns, ss, kh, d)).astype(np.float32)
  lim, slim = np.zeros(2 * TILE, np.int32), np.zeros(2 * TILE, np.int32)
  real = np.zeros(2 * TILE, bool)
  seq_node = rng.permutation(ns).astype(np.int32)
  lengths = rng.integers(0, ss + 1, size=ns).astype(np.int32)
  lengths[seq_node[:3]] = (0, ss, min(70, ss - 3))
  tab = np.zeros((2, 4), np.int32)
  table = np.zeros((2, 2, 64 // rows, 2), np.int32)
  seq = 0
  for x, (count, node) in enumerate(zip(counts, nodes)):
    span = slice(x * TILE, x * TILE + count)
    lim[span] = rng.integers(low[x], s + 1, size=count)
    real[span] = True
    for row0 in range(x * TILE, x * TILE + count, rows):
      length = lengths[seq_node[seq]]
      slim[row0:row0 + rows] = np.maximum(length - np.arange(rows)[::-1] // 4, 0)
      h, grp = (row0 % TILE) // 64, (row0 % 64) // rows
      table[x, h, grp] = (seq_node[seq], slim[row0:row0 + rows].max())
      seq += 1
    tab[x] = (node, lim[span].min(), lim[span].max(), slim[x * TILE:(x + 1) * TILE].max())
    k[node, tab[x, 2]:] = np.nan
    v[node, tab[x, 2]:] = np.nan
  for node in range(ns):
    ks[node, lengths[node]:] = np.nan
    vs[node, lengths[node]:] = np.nan
  suffix = mosaic_gpu.Suffix(jnp.asarray(ks, dtype), jnp.asarray(vs, dtype), jnp.asarray(slim),
                             jnp.asarray(table), rows)
  kw = dict(scale=d ** -0.5, block_kv=128, stages=2, splits=2,
            blocks_per_split=3 if long_root else 2)
  return (q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(tab), jnp.asarray(lim),
          suffix, real, kw)


def _caches(k, v, suffix, stacked: bool):
  """tile_attention's k, v, suffix and layer: as given, or both caches stacked [2,...] and
  read at layer 1 (layer 0 all NaN)."""
  if not stacked:
    return dict(k=k, v=v, suffix=suffix, layer=None)
  layer = jnp.int32(1)
  on_nan = lambda x: jnp.stack([jnp.full_like(x, jnp.nan), x])
  return dict(k=on_nan(k), v=on_nan(v), layer=layer,
              suffix=suffix._replace(k=on_nan(suffix.k), v=on_nan(suffix.v), layer=layer))


def _folded_reference(q, k, v, tab, lim, suffix, kw):
  # (keys past limits are NaN here: the reference slices below them, never reads them)
  return split_reference(q, k, v, tab, lim, suffix=suffix,
                         **{x: kw[x] for x in ("scale", "block_kv", "splits",
                                               "blocks_per_split")})


def test_emulator_folded_matches_split_reference():
  q, k, v, tab, lim, suffix, real, kw = _folded_case()
  fn = jax.jit(lambda tab, table: emulate_tile_attention(
      q, jnp.nan_to_num(k), jnp.nan_to_num(v), tab, lim, **kw,
      suffix=suffix._replace(k=jnp.nan_to_num(suffix.k), v=jnp.nan_to_num(suffix.v),
                             table=table)))
  out, lse = fn(tab, suffix.table)
  _check_splits(out, lse, *_folded_reference(q, k, v, tab, lim, suffix, kw),
                _rows_to_check(tab, real), q.dtype, out_tol=1e-2, lse_tol=1e-4)
  # A wrong suffix hi of a tile, or of a group, poisons the tile / the group's rows.
  assert np.isnan(np.asarray(fn(tab.at[1, 3].add(1), suffix.table)[1][:, :, TILE:])).all()
  bad = np.asarray(fn(tab, suffix.table.at[0, 1, 2, 1].add(-1))[1])
  assert np.isnan(bad[:, :, 64 + 16:64 + 24]).all() and not np.isnan(bad[:, :, :64]).any()


@pytest.mark.slow
@pytest.mark.parametrize("stages,stagger,stacked,long_root,transposed,rows,overlap,lead", [
    (2, False, False, False, False, 8, False, 0), (3, True, True, False, False, 8, False, None),
    (2, True, False, True, False, 8, False, 0), (2, False, False, False, True, 4, False, None),
    (3, True, True, False, True, 8, False, 1), (2, False, False, True, False, 8, True, None),
    (2, False, False, False, False, 4, False, None)])
def test_folded_kernel_interpret_matches_split_reference(stages, stagger, stacked, long_root,
                                                         transposed, rows, overlap, lead,
                                                         hang_guard):
  """The kernel with a folded suffix (interpret mode, 4 programs): each split's rows over
  their node's keys of the split and the suffixes of the split's row groups; with 3 stages,
  the suffix steps staggered between CTAs, and both caches stacked [2,...] read at layer 1
  (layer 0 all NaN) too; a staggered long root (node steps before the first suffix step);
  the suffix steps transposed, at 4 and 8 rows a sequence; a long root's unmasked node
  steps software-pipelined between suffix steps; the suffix steps first (lead 0, the
  default), after one node step, or after `stages` of them (None; in the three-block root
  that is all of a split's node steps)."""
  q, k, v, tab, lim, suffix, real, kw = _folded_case(long_root, rows)
  kw = dict(kw, stages=stages, transposed=transposed, overlap=overlap, lead=lead)
  out, lse = mosaic_gpu.tile_attention(q, tab=tab, row_limits=lim, interpret=True,
                                       stagger=stagger, **_caches(k, v, suffix, stacked), **kw)
  assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
  assert not np.isnan(np.asarray(lse)).any()
  _check_splits(out, lse, *_folded_reference(q, k, v, tab, lim, suffix, kw),
                _rows_to_check(tab, real), q.dtype)


def _in_place_case(rows: int, heads: int, kh: int = 1):
  """`_folded_case(rows=rows)` with q read in place at G = heads (T = rows // heads): q
  [B*T,H,D] and the row arrays in the kernel's tile rows, and what turns the kernel's
  outputs back into packed rows (for the packed split reference)."""
  q, k, v, tab, lim, suffix, real, kw = _folded_case(rows=rows, kh=kh)
  r = q.shape[1]
  tile_rows = packed_row_of_tile_row(r, heads)
  q_in = unpacked_out(q[None], heads)[0]                                  # [B*T, H, D]
  suffix_in = suffix._replace(row_limits=suffix.row_limits[tile_rows])

  def packed(out, lse):
    return (jnp.stack([packed_q(split, heads) for split in out]),
            lse[:, :, np.argsort(tile_rows)])

  return q, q_in, k, v, tab, lim[tile_rows], suffix, suffix_in, real, kw, packed


@pytest.mark.slow
@pytest.mark.parametrize("rows,heads,kh", [(8, 4, 1), (4, 4, 2), (8, 8, 1)])
def test_in_place_kernel_interpret_matches_split_reference(rows, heads, kh, hang_guard):
  """q read and out written in place (`heads`; interpret mode, 4 programs a KV head):
  decode at G = 4 with 2 KV heads (head kvh*G + gi), two queries a sequence at G = 4 (a
  sequence's rows 16 apart in its warpgroup: row gi*16 + x is query row x at head gi), and
  G = 8; a folded suffix whose row groups the kernel finds through that order, padding rows
  in tile 1; the emulator on the same case."""
  q, q_in, k, v, tab, lim_in, suffix, suffix_in, real, kw, packed = _in_place_case(rows, heads,
                                                                                   kh)
  ref = _folded_reference(q, k, v, tab, jnp.asarray(np.asarray(lim_in)[np.argsort(
      packed_row_of_tile_row(q.shape[1], heads))]), suffix, kw)
  out, lse = mosaic_gpu.tile_attention(q_in, k, v, tab, lim_in, interpret=True, heads=heads,
                                       suffix=suffix_in, **kw)
  assert out.shape == (kw["splits"],) + q_in.shape and lse.shape == (kw["splits"],) + q.shape[:2]
  assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
  _check_splits(*packed(out, lse), *ref, _rows_to_check(tab, real), q.dtype)
  clean = lambda x: jnp.nan_to_num(x)
  emu = emulate_tile_attention(q_in, clean(k), clean(v), tab, lim_in, heads=heads, **kw,
                               suffix=suffix_in._replace(k=clean(suffix.k), v=clean(suffix.v)))
  _check_splits(*packed(*emu), *ref, _rows_to_check(tab, real), q.dtype, out_tol=1e-2,
                lse_tol=1e-4)


def test_in_place_static_checks():
  q, q_in, k, v, tab, lim_in, _, suffix_in, _, kw, _ = _in_place_case(8, 4)
  call = lambda **a: mosaic_gpu.tile_attention(**dict(dict(
      q=q_in, k=k, v=v, tab=tab, row_limits=lim_in, heads=4, suffix=suffix_in), **a), **kw)
  with pytest.raises(ValueError, match="heads=3"):
    call(heads=3)
  with pytest.raises(ValueError, match="transposed"):
    call(transposed=True)
  with pytest.raises(ValueError, match=r"must be \[B\*T,H,D\]"):
    call(q=q)
  _, q4, *_, suffix4, _, _, _ = _in_place_case(4, 4)
  with pytest.raises(ValueError, match="seq_rows 4 is not T \\* heads"):   # 4 rows, G 8
    call(q=q4.reshape(q4.shape[0] // 2, -1, q4.shape[-1]), heads=8, suffix=suffix4)
  assert list(mosaic_gpu.tile_rows_in_place(4)[:5]) == [0, 4, 8, 12, 16]
  assert list(mosaic_gpu.tile_rows_in_place(4)[16:18]) == [1, 5]


@pytest.mark.slow
@pytest.mark.parametrize("rows,heads,kh,stacked,suffix_stages", [
    (8, None, 1, False, 2), (4, None, 1, True, 3), (8, 4, 1, False, 1), (4, 4, 2, False, 2),
    (8, 8, 1, True, 2)])
def test_suffix_warpgroup_interpret_matches_split_reference(rows, heads, kh, stacked,
                                                            suffix_stages, hang_guard):
  """The folded suffix on a fourth warpgroup (`suffix_warpgroup`; interpret mode runs its
  steps in jnp on the same buffers, loop, copies and barriers): plane P holds every row's
  suffix alone, planes [0, P) the node's splits alone. Packed q at 8 and 4 rows a sequence;
  q read in place at G = 4 (one and two KV heads) and G = 8; 1, 2 or 3 suffix slots (the
  copies run ahead across sequences); both caches stacked [2,...] and read at layer 1 (layer 0
  all NaN); NaN past every suffix length and node limit, padding rows in tile 1."""
  if heads is None:
    q, k, v, tab, lim, suffix, real, kw = _folded_case(rows=rows, kh=kh)
    q_in, lim_in, suffix_in, packed = q, lim, suffix, lambda out, lse: (out, lse)
  else:
    q, q_in, k, v, tab, lim_in, suffix, suffix_in, real, kw, packed = _in_place_case(
        rows, heads, kh)
    lim = jnp.asarray(np.asarray(lim_in)[np.argsort(packed_row_of_tile_row(q.shape[1], heads))])
  ref = split_reference(q, k, v, tab, lim, suffix=suffix, suffix_warpgroup=True,
                        **{x: kw[x] for x in ("scale", "block_kv", "splits",
                                              "blocks_per_split")})
  out, lse = mosaic_gpu.tile_attention(q_in, tab=tab, row_limits=lim_in, interpret=True,
                                       heads=heads, suffix_warpgroup=True,
                                       suffix_stages=suffix_stages,
                                       **_caches(k, v, suffix_in, stacked), **kw)
  assert out.shape[0] == lse.shape[0] == kw["splits"] + 1
  assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
  assert not np.isnan(np.asarray(lse)).any()
  _check_splits(*packed(out, lse), *ref, _rows_to_check(tab, real), q.dtype)
  clean = jnp.nan_to_num
  emu = emulate_tile_attention(q_in, clean(k), clean(v), tab, lim_in, heads=heads, **kw,
                               suffix=suffix_in._replace(k=clean(suffix.k), v=clean(suffix.v)),
                               suffix_warpgroup=True, suffix_stages=suffix_stages)
  _check_splits(*packed(*emu), *ref, _rows_to_check(tab, real), q.dtype, out_tol=1e-2,
                lse_tol=1e-4)


def test_suffix_warpgroup_static_checks():
  q, k, v, tab, lim, suffix, _, kw = _folded_case(rows=8)
  call = lambda **a: mosaic_gpu.tile_attention(**dict(dict(
      q=q, k=k, v=v, tab=tab, row_limits=lim, suffix=suffix, suffix_warpgroup=True), **a), **kw)
  with pytest.raises(ValueError, match="suffix_warpgroup: there is no suffix"):
    call(suffix=None)
  with pytest.raises(ValueError, match="suffix_warpgroup: transposed"):
    call(transposed=True)
  q16, _, _, tab16, lim16, suffix16, _, _ = _folded_case(rows=16)
  with pytest.raises(ValueError, match="16 query rows a sequence .*takes \\(1, 2, 4, 8\\)"):
    call(q=q16, tab=tab16, row_limits=lim16, suffix=suffix16)
  with pytest.raises(ValueError, match="registers=\\(232, 40, 40\\)"):
    call(registers=(232, 40, 40))             # 2 * 232 + 40 + 40 > 512
  # D = 128 at 3 node stages leaves no room for the suffix's slots (227 KiB a CTA); at 2, 3
  # suffix slots overflow it by 176 bytes with 4 rows a sequence (the H200, run 18, call 4)
  why = mosaic_gpu.suffix_warpgroup_reason(128, 3, 2, 4, 128, 128)
  assert "exceed 232448" in why and "stages=3" in why
  assert "232624 bytes" in mosaic_gpu.suffix_warpgroup_reason(128, 2, 3, 4, 128, 128)
  assert mosaic_gpu.suffix_warpgroup_reason(128, 2, 2, 8, 128, 128) is None
  assert mosaic_gpu.suffix_warpgroup_reason(128, 2, 3, 4, 128, 64) is None
  assert "capacity 80" in mosaic_gpu.suffix_warpgroup_reason(128, 2, 2, 4, 80, 128)
  for bad in (dict(suffix_stages=0), dict(registers=(216, 24)), dict(registers=(216, 20, 64)),
              dict(suffix_warpgroup=True, suffix_transposed=True)):
    with pytest.raises(ValueError, match="suffix_stages|registers|suffix_transposed"):
      mosaic_gpu.MosaicConfig(**bad)
  assert mosaic_gpu.MosaicConfig(registers=[208, 32, 64]).registers == (208, 32, 64)


def test_wrapper_suffix_warpgroup_and_its_fallback(monkeypatch, caplog):
  """Through `hydragen_attention` with the emulated kernel: the fold runs on the suffix
  warpgroup when asked, against the oracle; at 16 rows a sequence (more than it takes) the
  fold runs as wgmma steps instead, logged once."""
  rng = np.random.default_rng(5)
  for t, g, taken in ((1, 4, True), (2, 8, False)):
    b, kh, d = 16, 2, 64
    q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
    levels = [(rng.standard_normal((1, 300, kh, d)).astype(np.float32),
               rng.standard_normal((1, 300, kh, d)).astype(np.float32),
               np.array([257], np.int32), np.zeros(b, np.int32)),
              (rng.standard_normal((b, 128, kh, d)).astype(np.float32),
               rng.standard_normal((b, 128, kh, d)).astype(np.float32),
               rng.integers(0, 129, size=b).astype(np.int32), None)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hydrax"), emulated() as calls:
      out, lse = _run(q, levels, True, jnp.bfloat16, pg.configure(
          lowering="mosaic", mosaic=dict(suffix_warpgroup=True, splits=2)))
    _check(out, lse, *_expect(q, levels, True, jnp.bfloat16), jnp.bfloat16)
    assert [(c["suffix"], c["suffix_warpgroup"]) for c in calls] == [(True, taken)]
    assert ("suffix_warpgroup asked for, but 16 query rows" in caplog.text) == (not taken)


def test_folded_static_checks():
  assert mosaic_gpu.suffix_unsupported_reason(128, 4, 192) is None
  assert "block_kv 64" in mosaic_gpu.suffix_unsupported_reason(64, 4, 192)
  assert "3 query rows" in mosaic_gpu.suffix_unsupported_reason(128, 3, 192)
  assert "128 query rows" in mosaic_gpu.suffix_unsupported_reason(128, 128, 192)
  assert "capacity 100" in mosaic_gpu.suffix_unsupported_reason(128, 4, 100)
  assert "capacity 0" in mosaic_gpu.suffix_unsupported_reason(128, 4, 0)
  q, k, v, tab, lim, suffix, _, kw = _folded_case()
  with pytest.raises(ValueError, match="suffix.table shape"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix._replace(table=suffix.table[:1]),
                              **kw)
  with pytest.raises(ValueError, match="suffix.row_limits shape"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim,
                              suffix=suffix._replace(row_limits=suffix.row_limits[:5]), **kw)
  with pytest.raises(ValueError, match="suffix.v float32"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim,
                              suffix=suffix._replace(v=suffix.v.astype(jnp.float32)), **kw)
  with pytest.raises(ValueError, match="suffix: block_kv 64"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix, **dict(kw, block_kv=64))
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match=f"lead must be a non-negative int or None, got {bad}"):
      mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix, lead=bad, **kw)
    with pytest.raises(ValueError, match=f"suffix_lead must be None or an int >= 0, got {bad}"):
      pg.configure(lowering="mosaic", mosaic={"suffix_lead": bad})
  q, k, v, tab, lim, suffix, _, kw = _folded_case(long_root=True)
  with pytest.raises(ValueError, match="suffix: 32 query rows a sequence; transposed suffix "
                                       "steps take at most 16"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix, transposed=True, **kw)


def test_kernel_static_checks_and_budget():
  q = jnp.zeros((1, TILE, 64), jnp.bfloat16)
  k = jnp.zeros((1, 100, 1, 64), jnp.bfloat16)
  tab, lim = jnp.zeros((1, 4), jnp.int32), jnp.zeros((TILE,), jnp.int32)
  kw = dict(scale=0.1, block_kv=64, stages=2, splits=1, blocks_per_split=2, interpret=True)
  with pytest.raises(ValueError, match="multiple of block_kv"):
    mosaic_gpu.tile_attention(q, k, k, tab, lim, **kw)
  with pytest.raises(ValueError, match="multiple of 128"):
    mosaic_gpu.tile_attention(q[:, :100], k[:, :64], k[:, :64], tab, lim[:100], **kw)
  k64 = k[:, :64]
  with pytest.raises(ValueError, match=r"k \[2, 1, 64, 1, 64\] is stacked .*: pass its layer"):
    mosaic_gpu.tile_attention(q, jnp.stack([k64] * 2), jnp.stack([k64] * 2), tab, lim, **kw)
  with pytest.raises(ValueError, match=r"k \[1, 64, 1, 64\] is not stacked: layer must be None"):
    mosaic_gpu.tile_attention(q, k64, k64, tab, lim, layer=jnp.int32(0), **kw)
  assert mosaic_gpu.unsupported_reason(jnp.bfloat16, 128, 128) is None
  assert mosaic_gpu.unsupported_reason(jnp.float16, 64, 64) is None
  assert "float32" in mosaic_gpu.unsupported_reason(jnp.float32, 128, 128)
  assert "head dim 80" in mosaic_gpu.unsupported_reason(jnp.bfloat16, 80, 128)
  assert "block_kv" in mosaic_gpu.unsupported_reason(jnp.bfloat16, 64, 96)
  # The default configuration fits a Hopper CTA (227 KiB of shared memory).
  mc = mosaic_gpu.MosaicConfig()
  assert mosaic_gpu.smem_bytes(mc.block_kv, mc.stages, 128) <= 227 * 1024


# --- the wrapper (`pallas_gpu._forward_mosaic`) with the emulated kernel --------------------

@contextlib.contextmanager
def emulated():
  """The kernel replaced by the emulator, with no stale traces of `_forward_jit` either way
  (its cache is keyed by shapes and config, not by the kernel function)."""
  pg.clear_jit_caches()
  CALLS.clear()
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(pg.mosaic_gpu, "tile_attention", emulate_tile_attention)
      yield CALLS
  finally:
    pg.clear_jit_caches()


def _expect(q, levels, causal, dtype):
  rnd = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  keys, values = oracle.concat_levels(
      [(rnd(k), rnd(v), lengths, owner) for k, v, lengths, owner in levels])
  return oracle.dense(rnd(q), keys, values, causal=causal)


def _run(q, levels, causal, dtype, backend="pallas", traced=False, layers=None,
         prepared=False):
  """hydragen_attention(backend=...) under jit. Owners closed over (static) or, with `traced`,
  jit arguments; with `layers` (int L), each level's k, v are stored as layer L-1 of a stacked
  [L,...] cache (other layers random) and read at a traced layer index; with `prepared`,
  through `hydrax.attention.prepare` of the levels at layer 0 (the engine's form)."""
  owners = [owner for *_, owner in levels]

  def fn(q, arrays, owners_dyn, layer):
    lv = [KVLevel(k, v, n, od if traced else o, None if layers is None else layer)
          for (k, v, n), o, od in zip(arrays, owners, owners_dyn)]
    prep = None
    if prepared:
      at0 = [x if x.layer is None else x._replace(layer=0) for x in lv]
      prep = prepare(q, at0, causal_last=causal, backend=backend)
    return hydragen_attention(q, lv, causal_last=causal, backend=backend, prepared=prep)

  def stack(x):
    x = jnp.asarray(x, dtype)
    if layers is None:
      return x
    rest = jax.random.normal(jax.random.key(x.size), (layers - 1,) + x.shape, dtype)
    return jnp.concatenate([rest, x[None]])

  arrays = [(stack(k), stack(v), jnp.asarray(n, jnp.int32)) for k, v, n, _ in levels]
  owners_dyn = [None if o is None else jnp.asarray(o) for o in owners]
  return jax.jit(fn)(jnp.asarray(q, dtype), arrays, owners_dyn,
                     jnp.int32(0 if layers is None else layers - 1))


def _check(out, lse, ref_out, ref_lse, dtype):
  assert out.dtype == dtype and lse.dtype == jnp.float32
  out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  tol = TOL[dtype]
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_array_equal(out[~finite], 0.0)
  np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)


@st.composite
def mosaic_trees(draw):
  """q and 1..3 levels: shared levels with random (non-contiguous) owners and empty nodes,
  capacities 0..320 (mostly not multiples of 64), ragged and zero lengths; the last level
  per sequence or not; bf16/fp16, D 64/128, GQA 1..8, forced splits 1..3, the per-sequence
  level folded or not (on the suffix warpgroup or not), q read in place asked for or not
  (taken where the rows fill whole tiles in order); owners static, or traced (jit arguments) with every level in a
  stacked cache read at a traced layer; through `prepare` (prepared=) or not."""
  # Half the cases are shaped for the fold (one or two shared levels, then the per-sequence
  # level of whole 64-key halves, T*G dividing 64, 128-key blocks); the rest are any tree,
  # with the fold asked for or not (taken where the kernel can).
  shaped = draw(st.booleans())
  b = draw(st.integers(1, 9))
  t = draw(st.integers(1, 2) if shaped else st.integers(1, 3))
  kh = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2, 4, 8]) if shaped else st.integers(1, 8))
  d = draw(st.sampled_from([64, 128]))
  dtype = draw(st.sampled_from([jnp.bfloat16, jnp.float16]))
  n_levels = draw(st.integers(2, 3)) if shaped else draw(st.integers(1, 3))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  levels = []
  for i in range(n_levels):
    per_seq = i == n_levels - 1 and (shaped or draw(st.booleans()))
    n = b if per_seq else draw(st.integers(1, 4))
    if shaped and per_seq:
      s = draw(st.sampled_from([64, 128, 192]))
    else:
      s = draw(st.one_of(st.integers(1, 320),
                         st.sampled_from([0, 1, 63, 64, 65, 128, 129])))
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    if draw(st.booleans()):
      lengths[rng.integers(0, n)] = s                       # a full node
    if draw(st.booleans()):
      lengths[rng.integers(0, n)] = 0                       # an empty node / suffix
    owner = None if per_seq else rng.integers(0, n, size=b).astype(np.int32)
    k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    levels.append((k, v, lengths, owner))
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  mosaic = dict(splits=draw(st.sampled_from([3, 2, 1])),
                block_kv=128 if shaped else draw(st.sampled_from([64, 128])),
                fold_suffix=shaped or draw(st.booleans()),
                suffix_stagger=draw(st.booleans()), suffix_transposed=draw(st.booleans()),
                node_overlap=draw(st.booleans()), q_in_place=draw(st.booleans()),
                suffix_lead=draw(st.sampled_from([None, 0, 1, 5])))
  # (3 stages of 128 keys at D = 128 overflow a CTA's shared memory: `tile_attention` refuses)
  mosaic["stages"] = draw(st.sampled_from(
      [2, 3] if d == 64 or mosaic["block_kv"] == 64 else [2]))
  if draw(st.booleans()):       # (the suffix warpgroup and transposed steps exclude each other)
    mosaic.update(suffix_warpgroup=True, suffix_transposed=False,
                  suffix_stages=draw(st.sampled_from([1, 2])))
  return q, levels, draw(st.booleans()), dtype, mosaic, draw(st.booleans()), draw(st.booleans())


@pytest.mark.slow
@given(mosaic_trees())
def test_wrapper_with_emulated_kernel_matches_oracle(case):
  q, levels, causal, dtype, mosaic, traced, prepared = case
  with emulated() as calls:
    out, lse = _run(q, levels, causal, dtype, pg.configure(lowering="mosaic", mosaic=mosaic),
                    traced=traced, layers=3 if traced else None, prepared=prepared)
  _check(out, lse, *_expect(q, levels, causal, dtype), dtype)
  # Every level with keys ran on the (emulated) Mosaic kernel, its keys padded to whole
  # blocks and cut in at most the forced number of splits; a stacked cache (traced case) of
  # whole key blocks goes to the kernel whole with its layer, else its layer is sliced and
  # padded (a folded suffix's stack, of whole 64-key halves, always goes whole).
  # A per-sequence level beside one shared level is folded into its launch when asked and
  # the kernel takes it (128-key blocks, T*G dividing 64, a capacity of whole 64-key halves).
  # Calls with two levels whose owners spread over several nodes run level by level, unfolded.
  live = [lv for lv in levels if lv[0].shape[1] > 0]
  t, g = q.shape[1], q.shape[2] // live[0][0].shape[2] if live else 1
  fixing = [lv for lv in live if lv[3] is not None and lv[0].shape[0] != 1]
  folded = bool(mosaic["fold_suffix"] and mosaic["block_kv"] == 128 and len(live) >= 2
                and len(fixing) <= 1 and live[-1][3] is None
                and all(lv[3] is not None for lv in live[:-1]) and 64 % (t * g) == 0
                and live[-1][0].shape[1] % 64 == 0)
  # (calls are recorded per trace: levels run one by one with equal shapes share one trace)
  assert 0 < len(calls) <= len(live) - folded if live else not calls
  assert sum(c["suffix"] for c in calls) == folded
  event(f"per-sequence level folded: {folded}, levels with keys: {len(live)}")
  # (the level whose nodes fix the row order runs first: calls and levels are matched as sets)
  expect = []
  for k, *_ in live[:len(live) - folded]:
    s = k.shape[1]
    in_place = traced and s % mosaic["block_kv"] == 0
    expect.append((-(-s // mosaic["block_kv"]) * mosaic["block_kv"], k.shape[0], in_place))
  assert {(c["shape"][4], c["shape"][3], c["stacked"][0]) for c in calls} == set(expect)
  for call in calls:
    assert call["stacked"][1] == (call["suffix"] and traced)
    assert call["stagger"] == (call["suffix"] and mosaic["suffix_stagger"])
    assert call["transposed"] == (call["suffix"] and mosaic["suffix_transposed"]
                                  and t * g <= mosaic_gpu.SUFFIX_COLS)
    assert call["overlap"] == mosaic["node_overlap"]
    assert call.get("heads") in ((None, g) if mosaic["q_in_place"] else (None,))
    if call.get("heads"):
      event("q read in place")
    assert call["lead"] == mosaic["suffix_lead"]
    swg = (call["suffix"] and mosaic.get("suffix_warpgroup", False)
           and mosaic_gpu.suffix_warpgroup_reason(
               128, mosaic["stages"], mosaic["suffix_stages"], t * g, live[-1][0].shape[1],
               q.shape[-1], dtype) is None)
    assert call["suffix_warpgroup"] == swg
    if swg:
      event("suffix on its own warpgroup")
    assert call["block_kv"] == mosaic["block_kv"]
    assert call["splits"] <= min(mosaic["splits"], call["shape"][4] // mosaic["block_kv"])


@pytest.mark.parametrize("fold", [False, True])
def test_wrapper_full_tiles_in_place_and_combine(fold, monkeypatch, caplog):
  """Tiles exactly full (the in-place path: no gather; the tiles' and row groups' bounds taken
  from the sequences' limits), several tiles per node, 3 splits; the suffix folded in or
  not (the emulator poisons a tile or group whose bound is wrong)."""
  rng = np.random.default_rng(11)
  b, t, kh, g, d = 8, 4, 2, 8, 64            # 32 rows per sequence: 4 sequences per tile
  cap = 128 if fold else 70
  owner = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  levels = [(rng.standard_normal((2, 300, kh, d)), rng.standard_normal((2, 300, kh, d)),
             np.array([300, 177], np.int32), owner),
            (rng.standard_normal((b, cap, kh, d)), rng.standard_normal((b, cap, kh, d)),
             rng.integers(0, cap + 1, size=b).astype(np.int32), None)]
  q = rng.standard_normal((b, t, kh * g, d))
  mosaic = {"splits": 3, "block_kv": 128 if fold else 64, "fold_suffix": fold}
  for causal in (True, False):
    with emulated() as calls:
      out, lse = _run(q, levels, causal, jnp.bfloat16,
                      pg.configure(lowering="mosaic", mosaic=mosaic))
    _check(out, lse, *_expect(q, levels, causal, jnp.bfloat16), jnp.bfloat16)
    # (the suffix has only 2 blocks; a folded one runs in the root's 3 splits)
    assert [(c["splits"], c["suffix"]) for c in calls] == ([(3, True)] if fold
                                                           else [(3, False), (2, False)])
  if fold:
    # Transposed suffix steps asked for: 32 rows a sequence is more than they take, so the
    # steps run untransposed, and the log says so once.
    monkeypatch.setattr(_log, "_seen", set())
    with caplog.at_level(logging.WARNING, logger="hydrax"):
      for _ in range(2):
        with emulated() as calls:
          _run(q, levels, True, jnp.bfloat16, pg.configure(
              lowering="mosaic", mosaic=dict(mosaic, suffix_transposed=True)))
        assert [(c["suffix"], c["transposed"]) for c in calls] == [(True, False)]
    logged = [r.getMessage() for r in caplog.records if "suffix_transposed" in r.getMessage()]
    assert len(logged) == 1 and "32 query rows" in logged[0]
  # The shared level alone, causal: its rows' limits differ within a tile (T = 4).
  with emulated() as calls:
    out, lse = _run(q, levels[:1], True, jnp.bfloat16,
                    pg.configure(lowering="mosaic", mosaic=mosaic))
  _check(out, lse, *_expect(q, levels[:1], True, jnp.bfloat16), jnp.bfloat16)
  assert len(calls) == 1


@pytest.mark.parametrize("b,t,kh,g,nodes,cap,fold", [
    (32, 1, 2, 4, 1, 128, True), (8, 4, 2, 8, 2, 128, True), (16, 2, 1, 4, 1, 64, True),
    (128, 1, 1, 1, 1, 64, True), (64, 1, 1, 2, 1, 70, False)])
def test_wrapper_q_in_place(b, t, kh, g, nodes, cap, fold, monkeypatch, caplog):
  """`MosaicConfig.q_in_place`: the shared level's kernel takes q [B*T,H,D] as the model
  made it (no packing) and writes out in place, its suffix folded in or not (the per-sequence
  level then runs packed, logged once: its tiles are not full), merged with the other parts
  in query order; against the oracle, and against the same call without it; through
  `prepare` too (the tables, with the kernel's row order, built once)."""
  rng = np.random.default_rng(b + t + g)
  d = 64
  owner = np.repeat(np.arange(nodes), b // nodes).astype(np.int32)
  levels = [(rng.standard_normal((nodes, 300, kh, d)), rng.standard_normal((nodes, 300, kh, d)),
             rng.integers(150, 301, size=nodes).astype(np.int32), owner),
            (rng.standard_normal((b, cap, kh, d)), rng.standard_normal((b, cap, kh, d)),
             rng.integers(0, cap + 1, size=b).astype(np.int32), None)]
  q = rng.standard_normal((b, t, kh * g, d))
  monkeypatch.setattr(_log, "_seen", set())
  seen = {}
  for in_place, prepared in ((False, False), (True, False), (True, True)):
    mosaic = {"splits": 2, "block_kv": 128 if fold else 64, "fold_suffix": fold,
              "q_in_place": in_place}
    with caplog.at_level(logging.WARNING, logger="hydrax"), emulated() as calls:
      out, lse = _run(q, levels, True, jnp.bfloat16, pg.configure(lowering="mosaic",
                                                                   mosaic=mosaic),
                      prepared=prepared)
    _check(out, lse, *_expect(q, levels, True, jnp.bfloat16), jnp.bfloat16)
    seen[in_place, prepared] = (np.asarray(out.astype(jnp.float32)),
                                [c.get("heads") for c in calls])
  assert seen[False, False][1] == [None] * (1 if fold else 2)
  for prepared in (False, True):
    assert seen[True, prepared][1] == ([g] if fold else [g, None])
    np.testing.assert_allclose(seen[True, prepared][0], seen[False, False][0], atol=1e-2,
                               rtol=0)
  logged = [r.getMessage() for r in caplog.records if "q_in_place" in r.getMessage()]
  assert len(logged) == (0 if fold else 1)


def test_q_in_place_reasons():
  cfg = pg.Config(mosaic=mosaic_gpu.MosaicConfig(q_in_place=True))
  assert pg._q_in_place_reason(True, None, 4, cfg, True) is None
  assert "whole tiles" in pg._q_in_place_reason(False, None, 4, cfg, True)
  assert "order" in pg._q_in_place_reason(True, np.arange(4), 4, cfg, True)
  assert "G = 3" in pg._q_in_place_reason(True, None, 3, cfg, True)
  transposed = pg.Config(mosaic=mosaic_gpu.MosaicConfig(q_in_place=True, suffix_transposed=True))
  assert "transposed" in pg._q_in_place_reason(True, None, 4, transposed, True)
  assert pg._q_in_place_reason(True, None, 4, transposed, False) is None


def test_q_in_place_program_for_cuda_has_no_packing():
  """The whole call as the H200 runs it (the pallas backend, Mosaic GPU kernel not
  interpreted, exported for CUDA on this CPU) at 4K/256 with the suffix folded: packed, q
  and out are transposed around the kernel; with q_in_place the only transpose left is of
  the kernel's lse ([P,K,R] f32 into query order), none of a [.., D] array."""
  from jax import export
  sds = jax.ShapeDtypeStruct
  b, p, u, h, kh, d = 256, 4096, 128, 32, 8, 128
  args = (sds((b, 1, h, d), jnp.bfloat16), sds((1, p, kh, d), jnp.bfloat16),
          sds((1, p, kh, d), jnp.bfloat16), sds((b, u, kh, d), jnp.bfloat16),
          sds((b, u, kh, d), jnp.bfloat16), sds((1,), jnp.int32), sds((b,), jnp.int32),
          sds((b,), jnp.int32))
  operands = {}
  for in_place in (False, True):
    cfg = pg.configure(lowering="mosaic", interpret=False, path="off",
                       mosaic=dict(q_in_place=in_place, splits=2))

    def fn(q, k, v, ks, vs, lengths, suffix_lengths, owner):
      return hydragen_attention(q, [KVLevel(k, v, lengths, owner),
                                    KVLevel(ks, vs, suffix_lengths)], backend=cfg)

    text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text
    operands[in_place] = [line.split(": (")[1].split(")")[0] for line in text.splitlines()
                          if "stablehlo.transpose" in line]
  assert any(f"x{d}xbf16" in x for x in operands[False])      # q packed before the kernel
  assert any(f"x{d}x" in x for x in operands[False] if "bf16" not in x)   # out unpacked
  assert operands[True] and all(f"x{d}x" not in x and x.endswith("f32>")
                                for x in operands[True]), operands[True]


# --- end to end in interpret mode (the real kernel) ----------------------------------------

@pytest.mark.parametrize("swg", [False, True])
def test_q_in_place_through_interpreted_kernel(swg, monkeypatch, hang_guard):
  """The real kernel (interpret mode) reading q in place through `hydragen_attention`: one
  shared node of 256 keys for 32 sequences (G = 4: one tile), their suffixes folded in (on
  the suffix warpgroup too), 2 splits merged in query order; vs the oracle. Eager, static
  owners (see below)."""
  heads = []
  real = mosaic_gpu.tile_attention

  def spy(*args, **kwargs):
    heads.append((kwargs["heads"], args[0].shape, kwargs["suffix_warpgroup"]))
    return real(*args, **kwargs)

  pg.clear_jit_caches()
  monkeypatch.setattr(pg.mosaic_gpu, "tile_attention", spy)
  rng = np.random.default_rng(16)
  b, kh, g, d = 32, 1, 4, 64
  levels = [(rng.standard_normal((1, 256, kh, d)), rng.standard_normal((1, 256, kh, d)),
             np.array([230], np.int32), np.zeros(b, np.int32)),
            (rng.standard_normal((b, 64, kh, d)), rng.standard_normal((b, 64, kh, d)),
             rng.integers(0, 65, size=b).astype(np.int32), None)]
  q = rng.standard_normal((b, 1, kh * g, d))
  cfg = pg.configure(lowering="mosaic", mosaic=dict(splits=2, q_in_place=True,
                                                    suffix_warpgroup=swg))
  lv = [KVLevel(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), jnp.asarray(n), o)
        for k, v, n, o in levels]
  try:
    out, lse = hydragen_attention(jnp.asarray(q, jnp.bfloat16), lv, backend=cfg)
  finally:
    pg.clear_jit_caches()
  assert heads == [(g, (b, kh * g, d), swg)]
  _check(out, lse, *_expect(q, levels, True, jnp.bfloat16), jnp.bfloat16)


def test_stacked_layer_through_interpreted_kernel(monkeypatch, hang_guard):
  """The real kernel (interpret mode): a shared level of 3 nodes (one empty of sequences) in a
  stacked [2,...] cache read in place at layer 1, vs the oracle. Called eagerly with NumPy
  owners: traced owners around the interpreted kernel (under jit, or as a runtime argument of
  `_forward_jit`) deadlocked jax's Mosaic GPU interpreter on the 2-core CPU, intermittently;
  the wrapper's runtime tile table is covered with the emulator above and on the GPU by
  `experiments/bench_attention.py --check` (tree_traced_* cases)."""
  calls = []
  real = mosaic_gpu.tile_attention

  def spy(*args, **kwargs):
    calls.append((args[1].shape, args[3].shape, kwargs["layer"] is not None))
    return real(*args, **kwargs)

  pg.clear_jit_caches()
  monkeypatch.setattr(pg.mosaic_gpu, "tile_attention", spy)
  rng = np.random.default_rng(15)
  b, t, kh, g, d, n, s = 2, 1, 1, 2, 64, 3, 64
  ks = jnp.asarray(rng.standard_normal((2, n, s, kh, d)), jnp.bfloat16)
  vs = jnp.asarray(rng.standard_normal((2, n, s, kh, d)), jnp.bfloat16)
  lengths = np.array([64, 0, 41], np.int32)
  owner = np.array([2, 0], np.int32)
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.bfloat16)
  limits = jnp.asarray(lengths[owner][:, None])
  cfg = pg.Config(lowering="mosaic", mosaic=mosaic_gpu.MosaicConfig(block_kv=64, stages=2))
  try:
    out, lse = pg.level_attention(q, ks, vs, jnp.asarray(lengths), owner, limits,
                                  scale=d ** -0.5, config=cfg, layer=jnp.int32(1))
  finally:
    pg.clear_jit_caches()
  assert calls == [((2, n, s, kh, d), (2, 4), True)]   # the stack in place; a tile per node
  keys, values = oracle.concat_levels([(_f64(ks[1]), _f64(vs[1]), lengths, owner)])
  ref = oracle.dense(_f64(q), keys, values, causal=False)
  _check(out.astype(jnp.bfloat16), lse, *ref, jnp.bfloat16)


# --- static decisions -----------------------------------------------------------------------

def _uses(q_shape, k_shape, owner, dtype, **cfg):
  return pg._use_mosaic(q_shape, k_shape, owner, dtype, pg.Config(**cfg))


def test_use_mosaic_decisions_and_logged_fallbacks(monkeypatch, caplog):
  monkeypatch.setattr(_log, "_seen", set())
  owner = np.array([1, 0, 1], np.int32)
  qs, ks = (3, 2, 4, 64), (2, 256, 2, 64)
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    assert _uses(qs, ks, owner, jnp.bfloat16, lowering="mosaic")
    assert _uses(qs, ks, None, jnp.float16, lowering="mosaic")           # per sequence, forced
    assert _uses(qs, (2, 100, 2, 64), owner, jnp.bfloat16, lowering="mosaic")   # S padded
    assert not _uses(qs, ks, owner, jnp.bfloat16, lowering="triton")
    assert not _uses(qs, ks, owner, jnp.bfloat16)       # "auto" off Hopper / in interpret mode
    assert not any("Mosaic" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for _ in range(2):                                  # each reason is logged once
      assert not _uses(qs, ks, owner, jnp.float32, lowering="mosaic")
      assert not _uses((3, 2, 4, 80), (2, 256, 2, 80), owner, jnp.bfloat16, lowering="mosaic")
      seen = []
      jax.jit(lambda o: seen.append(_uses(qs, ks, o, jnp.bfloat16, lowering="mosaic")) or o)(
          jnp.asarray(owner))
      assert seen == [True]                             # traced owners: a runtime table
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs
    assert any("float32" in m for m in msgs) and any("head dim 80" in m for m in msgs)
    assert all(r.levelno == logging.WARNING and r.name == "hydrax" for r in caplog.records)
    # One node: traced owners do not matter (every sequence owns node 0).
    seen = []
    jax.jit(lambda o: seen.append(_uses(qs, (1, 256, 2, 64), o, jnp.bfloat16,
                                        lowering="mosaic")) or o)(jnp.zeros(3, jnp.int32))
    assert seen == [True]


def test_configure_mosaic_dict_is_a_value():
  backend = pg.configure(lowering="mosaic", mosaic={"splits": 2})
  c = backend.config
  assert c.lowering == "mosaic" and c.mosaic.splits == 2
  assert c.mosaic.block_kv == mosaic_gpu.MosaicConfig().block_kv
  assert isinstance(c.mosaic, mosaic_gpu.MosaicConfig) and hash(backend)
  assert pg.configure().config == pg.Config()           # nothing global changed


def test_auto_rows_per_node_rule_reads_static_shapes_only(monkeypatch):
  """On Hopper, "auto" sends a shared level to the Mosaic kernel when T*G*B / min(N, B) >= 96
  rows per node and KV head, whether the owners are concrete or traced."""
  monkeypatch.setattr(pg, "_is_hopper", lambda: True)
  monkeypatch.setattr(pg, "_interpret", lambda cfg: False)
  k = (4, 256, 2, 128)
  for b, t, h, expect in [(192, 1, 4, True), (95, 2, 4, False), (190, 1, 8, True),
                          (64, 1, 4, False)]:
    # rows per node: T * (H/K) * B / min(N, B) = 96, 95, 190, 64
    seen = []
    owner = np.arange(b, dtype=np.int32) % 4
    jax.jit(lambda o: seen.append(_uses((b, t, h, 128), k, o, jnp.bfloat16)) or o)(
        jnp.asarray(owner))
    assert seen == [expect] and _uses((b, t, h, 128), k, owner, jnp.bfloat16) == expect
  assert not _uses((192, 1, 4, 128), (192, 256, 2, 128), None, jnp.bfloat16)  # per sequence


def test_fallback_to_triton_runs_and_never_calls_the_kernel(monkeypatch, caplog):
  """float32 with lowering="mosaic": the level runs on the Triton kernel (interpret mode)."""
  def boom(*args, **kwargs):
    raise AssertionError("the Mosaic kernel must not be called for float32")

  pg.clear_jit_caches()
  monkeypatch.setattr(pg.mosaic_gpu, "tile_attention", boom)
  monkeypatch.setattr(_log, "_seen", set())
  rng = np.random.default_rng(13)
  levels = [(rng.standard_normal((2, 9, 1, 64)), rng.standard_normal((2, 9, 1, 64)),
             np.array([9, 4], np.int32), np.array([1, 0], np.int32))]
  q = rng.standard_normal((2, 1, 2, 64))
  try:
    with caplog.at_level(logging.WARNING, logger="hydrax"):
      out, lse = _run(q, levels, False, jnp.float32, pg.configure(lowering="mosaic"))
  finally:
    pg.clear_jit_caches()
  ref_out, ref_lse = _expect(q, levels, False, jnp.float32)
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-5)
  assert sum("Mosaic GPU kernel cannot take" in r.getMessage() for r in caplog.records) == 1


def test_bad_lowering_is_a_value_error():
  rng = np.random.default_rng(14)
  levels = [(rng.standard_normal((1, 8, 1, 64)), rng.standard_normal((1, 8, 1, 64)),
             np.array([8], np.int32), np.zeros(2, np.int32))]
  q = rng.standard_normal((2, 1, 1, 64))
  with pytest.raises(ValueError, match="lowering must be"):
    _run(q, levels, True, jnp.bfloat16, pg.configure(lowering="bogus"))


def test_fold_decisions_and_logged_reason(monkeypatch, caplog):
  """Which levels are folded into one launch (`_fold_levels`: the per-sequence level into the
  first shared level on the Mosaic kernel), and the one reason logged when the kernel cannot
  take the per-sequence level."""
  monkeypatch.setattr(_log, "_seen", set())
  owner = np.array([1, 0, 1], np.int32)
  q = (3, 1, 8, 64)                          # G = 4 with 2 KV heads: 4 rows a sequence

  def fold(q_shape=q, caps=(256, 128), owners=(owner, None), suffix_dtype=jnp.bfloat16,
           **cfg):
    kvl = [(jax.ShapeDtypeStruct((3 if o is None else 2, s, 2, 64),
                                 suffix_dtype if o is None else jnp.bfloat16),)
           for s, o in zip(caps, owners)]
    cfg = {"lowering": "mosaic", **cfg}
    cfg["mosaic"] = mosaic_gpu.MosaicConfig(**{"block_kv": 128, **cfg.get("mosaic", {})})
    return pg._fold_levels(q_shape, jnp.bfloat16, kvl, list(owners), pg.Config(**cfg))

  assert fold() == ((0, 1), None)
  assert fold(owners=(None, owner)) == ((1, 0), None)           # the order of levels is free
  assert fold(q_shape=(3, 16, 8, 64)) == ((0, 1), None)         # 64 rows a sequence
  assert fold(caps=(256, 64, 128), owners=(owner, owner, None)) == ((0, 2), None)
  assert fold(mosaic={"fold_suffix": False}) == (None, "fold_suffix is off")
  assert "not one per-sequence" in fold(owners=(owner, owner))[1]
  assert "not one per-sequence" in fold(caps=(128,), owners=(None,))[1]
  assert "level_stream" in fold(level_stream=1)[1]
  assert "no shared level runs on the Mosaic" in fold(lowering="triton")[1]
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    assert "block_kv 64" in fold(mosaic={"block_kv": 64})[1]
    assert "block_kv 64" in fold(mosaic={"block_kv": 64})[1]
    assert "capacity 100" in fold(caps=(256, 100))[1]
    assert "12 query rows" in fold(q_shape=(3, 3, 8, 64))[1]
    assert "float32, the queries bfloat16" in fold(suffix_dtype=jnp.float32)[1]
  logged = [r.getMessage() for r in caplog.records]
  assert len(logged) == 4 and sum("block_kv 64" in m for m in logged) == 1   # once each


def _export_for_cuda(fn, *args):
  """`jax.export` of fn for CUDA from this CPU: Pallas lowers the kernel to Mosaic GPU's
  module (TMA, wgmma, barriers, layouts) as it would for the H200; only the final PTX
  compile waits for a GPU. Returns the exported StableHLO text."""
  from jax import export
  return export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()


def _abstract_kernel_args(d: int, rows: int, heads, *, stacked: bool = False, fold: bool = True,
                          dtype=jnp.bfloat16) -> list:
  """`tile_attention`'s arguments as shapes for `_export_for_cuda`: q (packed, or [B*T,H,D]
  read in place at G = heads), two nodes of 256 keys (K = 2), 2 tiles' tab and limits, the
  layer; with `fold`, a suffix cache of 16 nodes of 128 keys and its tables for `rows` rows a
  sequence. Caches stacked [2,...] when `stacked`."""
  kh, r, s, n, u = 2, 2 * TILE, 256, 2, 128
  sds = jax.ShapeDtypeStruct
  stack = (lambda shape: (2,) + shape) if stacked else (lambda shape: shape)
  q_shape = (kh, r, d) if heads is None else (r // heads, kh * heads, d)
  args = [sds(q_shape, dtype), sds(stack((n, s, kh, d)), dtype),
          sds(stack((n, s, kh, d)), dtype), sds((r // TILE, 4), jnp.int32),
          sds((r,), jnp.int32), sds((), jnp.int32)]
  if fold:
    args += [sds(stack((16, u, kh, d)), dtype), sds(stack((16, u, kh, d)), dtype),
             sds((r,), jnp.int32), sds((r // TILE, 2, 64 // rows, 2), jnp.int32)]
  return args


@pytest.mark.parametrize("fold,stacked,stagger,d,transposed,rows,overlap,heads", [
    (False, False, False, 128, False, 4, False, None),
    (False, True, False, 64, False, 4, False, None),
    (True, False, False, 128, False, 4, False, None),
    (True, True, True, 128, False, 4, False, None),
    (True, False, False, 128, True, 4, False, None),
    (True, True, False, 64, True, 8, False, None),
    (True, False, True, 128, True, 16, False, None),
    (True, False, False, 128, True, 1, False, None),
    (False, False, False, 128, False, 4, True, None),
    (False, True, False, 64, False, 4, True, None),
    (True, False, False, 128, False, 4, True, None),
    (False, False, False, 128, False, 4, False, 4), (False, True, False, 64, False, 4, False, 1),
    (True, False, False, 128, False, 4, False, 4), (True, True, False, 64, False, 8, False, 4),
    (True, False, False, 128, False, 8, True, 8), (True, False, False, 128, False, 2, False, 2)])
def test_kernel_lowers_for_the_gpu(fold, stacked, stagger, d, transposed, rows, overlap, heads):
  """The kernel as the H200 runs it (not the interpreter's path: its wgmma on transposed
  shared memory, register layouts, warpgroup roles) lowers for CUDA on this CPU: plain and
  folded, caches stacked at a traced layer, staggered suffix steps, head dims 64 and 128,
  transposed suffix steps at 1, 4, 8 and 16 rows a sequence, the node steps software-
  pipelined (the interpret-mode tests replace wgmma by dot_general and cannot see a lowering error);
  q read and out written in place at G = 1, 2, 4, 8, two queries a sequence at G = 4."""
  args = _abstract_kernel_args(d, rows, heads, stacked=stacked, fold=fold)

  def fn(q, k, v, tab, lim, layer, *suf):
    suffix = None
    if fold:
      suffix = mosaic_gpu.Suffix(suf[0], suf[1], suf[2], suf[3], rows,
                                 layer if stacked else None)
    return mosaic_gpu.tile_attention(q, k, v, tab, lim, scale=d ** -0.5, block_kv=128,
                                     stages=2, splits=2, blocks_per_split=1,
                                     layer=layer if stacked else None, suffix=suffix,
                                     stagger=stagger, transposed=transposed, overlap=overlap,
                                     heads=heads)

  text = _export_for_cuda(fn, *args)
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("suffix,d,stages,rows,heads,suffix_stages", [
    ("none", 128, 2, 4, None, 2), ("fold", 128, 2, 4, None, 2), ("fold", 64, 3, 4, None, 2),
    ("transposed", 128, 2, 8, None, 2), ("swg", 128, 2, 4, None, 2),
    ("swg", 128, 2, 1, None, 3), ("swg", 64, 3, 8, 8, 3), ("swg", 128, 2, 8, 8, 2)])
def test_smem_bytes_is_what_the_lowering_allocates(monkeypatch, suffix, d, stages, rows, heads,
                                                   suffix_stages):
  """`mosaic_gpu.smem_bytes` (what the wrapper and `tile_attention` check against the CTA's
  227 KiB before launching) counts exactly the shared memory Mosaic GPU gives the kernel when
  it is lowered for CUDA on this CPU: every buffer, its alignment, the barriers and the
  reductions' scratch. Seen by a spy on Mosaic GPU's own count (`core._smem_tree_size`, a
  private function: if jax renames it, this test fails at the spy)."""
  from jax.experimental.mosaic.gpu import core
  counted = []
  count = core._smem_tree_size
  monkeypatch.setattr(core, "_smem_tree_size", lambda tree: counted.append(count(tree))
                      or counted[-1])
  args = _abstract_kernel_args(d, rows, heads)

  def fn(q, k, v, tab, lim, layer, ks, vs, slim, stab):
    sfx = None if suffix == "none" else mosaic_gpu.Suffix(ks, vs, slim, stab, rows, None)
    return mosaic_gpu.tile_attention(q, k, v, tab, lim, scale=d ** -0.5, block_kv=128,
                                     stages=stages, splits=2, blocks_per_split=1, suffix=sfx,
                                     heads=heads, transposed=suffix == "transposed",
                                     suffix_warpgroup=suffix == "swg",
                                     suffix_stages=suffix_stages)

  _export_for_cuda(fn, *args)
  swg = suffix == "swg" and suffix_wg.Layout(rows, heads or 0, d, suffix_stages, 2, 0.0, False)
  expected = mosaic_gpu.smem_bytes(128, stages, d, fold=suffix != "none",
                                   transposed=suffix == "transposed", swg=swg or None)
  assert counted == [expected]
  assert expected <= mosaic_gpu.SMEM_BYTES


def test_tile_attention_refuses_what_overflows_shared_memory():
  """Three stages of 128 keys at D = 128 (234,632 bytes with a folded suffix: the H200 refused
  it in run 11) and the suffix warpgroup's 3 slots at 4 rows a sequence (232,624: refused on
  the H200 in run 18) are refused before any lowering, naming the argument."""
  q, k, v, tab, lim, suffix, _, kw = _folded_case(rows=4)
  pad = lambda x: jnp.concatenate([x, x], axis=-1)          # D 64 -> 128
  q, k, v = pad(q), pad(k), pad(v)
  suffix = suffix._replace(k=pad(suffix.k), v=pad(suffix.v))
  kw = dict(kw, scale=0.1, stages=3)
  with pytest.raises(ValueError, match=r"stages=3 \(MosaicConfig.stages\): the CTA would take "
                     r"234632 bytes"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix, **kw)
  with pytest.raises(ValueError, match="suffix_warpgroup: 232624 bytes"):
    mosaic_gpu.tile_attention(q, k, v, tab, lim, suffix=suffix, **dict(kw, stages=2),
                              suffix_warpgroup=True, suffix_stages=3)
  assert mosaic_gpu.smem_bytes(128, 2, 128, fold=True) == 169064     # the default launch


@pytest.mark.parametrize("stacked,d,rows,heads,dtype", [
    (False, 128, 4, None, jnp.bfloat16), (False, 128, 4, 4, jnp.bfloat16),
    (True, 64, 8, None, jnp.float16), (False, 128, 1, 1, jnp.bfloat16),
    (True, 128, 8, 8, jnp.bfloat16), (False, 64, 2, 2, jnp.bfloat16)])
def test_suffix_warpgroup_lowers_for_the_gpu(stacked, d, rows, heads, dtype):
  """The suffix warpgroup as the GPU runs it: its steps written per thread
  (`plgpu.inline_mgpu`: MLIR's arith, vector and memref ops, PTX's ex2 and shuffles), which
  the interpreter replaces by jnp, lower for CUDA on this CPU beside the four warpgroups'
  register split: packed q and q in place at 1, 2, 4 and 8 rows a sequence, D 64 and 128,
  fp16, caches stacked at a traced layer."""
  args = _abstract_kernel_args(d, rows, heads, stacked=stacked, dtype=dtype)

  def fn(q, k, v, tab, lim, layer, ks, vs, slim, stab):
    suffix = mosaic_gpu.Suffix(ks, vs, slim, stab, rows, layer if stacked else None)
    return mosaic_gpu.tile_attention(q, k, v, tab, lim, scale=d ** -0.5, block_kv=128,
                                     stages=2, splits=2, blocks_per_split=1,
                                     layer=layer if stacked else None, suffix=suffix,
                                     heads=heads, suffix_warpgroup=True)

  text = _export_for_cuda(fn, *args)
  assert "mosaic_gpu" in text
