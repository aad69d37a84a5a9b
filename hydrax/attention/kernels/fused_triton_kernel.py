"""The fused decode kernel in native Triton (imported only by `fused_triton`, never by hydrax).

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim
(DP: padded to a power of two >= 16), S a level's key capacity, W work items, NP partial
results per query (sum of the levels' key splits), TGP = T*G padded to a power of two, M rows
of an item (C sequences x TGP), BN keys per block.

One persistent launch runs the whole call: program p takes items p, p + NPROG, ... of the work
list (`fused_worklist.work_list`, heaviest first). An item attends the rows of `count`
sequences (one node) of one level to a key range of that node, with an online softmax in
float32 (base 2), and writes its normalised partial output and natural-log lse per row to a
scratch slot (b, kh, part). Then it takes a ticket per sequence (an atomic add on a counter per
(b, kh), acquire-release at GPU scope, after a block barrier so every thread's partial stores
are ordered before it). The program that draws the NP-th ticket of a sequence merges its NP
partials (loads through L2, `.cg`) into out [B,T,H,D] and lse [B,T,H]. No program ever waits
for another, so residency of the grid does not matter and Triton's interpreter (sequential
programs) runs it too. With NP == 1 the single item writes out and lse directly.

Keys past a row's limit never reach the output: blocks are loaded only below the item's key
end (<= the largest limit of its rows <= the node's length; masked loads give 0) and scores at
or past each row's own limit are -inf before the exponent, so neither NaN keys nor NaN values
stored past a length are ever read. A row that sees no key gets lse = -inf and out = 0.

DOT_UPCAST (Triton's interpreter only, whose dot multiplies bfloat16 bit patterns as
integers): the dots' bf16/fp16 operands are widened to float32 first, which gives the same
products (exact in float32) with float32 accumulation, as on the GPU.

Levels are static (up to 4, pointer arguments k0..k3, v0..v3; unused ones repeat k0, v0 and
are never read): each has its own rows per item (M*, constexpr), capacity (S*), keys per
split (CHUNK*) and first part index (PBASE*).
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)   # a constexpr: Triton reads no other globals


@triton.jit
def _attend_item(node, start, count, kh, split, key_end, lvl_row0, S, CHUNK, PBASE, NP,
                 order_ptr, limits_ptr, q_ptr, k_ptr, v_ptr,
                 out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
                 T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr, TGP: tl.constexpr, BN: tl.constexpr,
                 SCALE_LOG2: tl.constexpr, EXACT: tl.constexpr, DOT_UPCAST: tl.constexpr,
                 OFF64: tl.constexpr, M: tl.constexpr):
  C: tl.constexpr = M // TGP
  rows = tl.arange(0, M)
  slot = rows // TGP
  within = rows % TGP
  t = within // G
  g = within % G
  row_ok = (slot < count) & (within < T * G)
  b = tl.load(order_ptr + lvl_row0 + start + slot, mask=row_ok, other=0)
  lim = tl.load(limits_ptr + (lvl_row0 + b) * T + t, mask=row_ok, other=0)
  k_begin = split * CHUNK
  k_end = key_end              # <= the largest limit of the rows <= the node's length

  dofs = tl.arange(0, DP)
  d_ok = dofs < D
  qrow = ((b.to(tl.int64) * T + t) * H + kh * G + g) * D
  q = tl.load(q_ptr + qrow[:, None] + dofs[None, :], mask=row_ok[:, None] & d_ok[None, :],
              other=0.0)
  # Key s of (node, kh) sits at ((node * S + s) * K + kh) * D; 64-bit: stacked caches are large.
  kv_base = (node.to(tl.int64) * S * K + kh) * D
  if OFF64:
    k_node = k_ptr
    v_node = v_ptr
  else:
    k_node = k_ptr + kv_base
    v_node = v_ptr + kv_base
  m_i = tl.full([M], float("-inf"), tl.float32)
  l_i = tl.zeros([M], tl.float32)
  acc = tl.zeros([M, DP], tl.float32)
  for s0 in range(k_begin, k_end, BN):
    keys = s0 + tl.arange(0, BN)
    k_ok = keys < k_end
    # Offsets within a node in 32 bits unless OFF64 (S*K*D >= 2^31, or float32): half the
    # address registers and integer work of 64-bit ones (sm_90 compile of the bf16 shared
    # tiles: spills 32 B -> 0; float32's 3-level tiles spill more with them, 516 B vs 128 B).
    # The node's base (kv_base) is 64-bit either way.
    if OFF64:
      kv_off = kv_base + keys.to(tl.int64)[:, None] * (K * D) + dofs[None, :]
    else:
      kv_off = keys[:, None] * (K * D) + dofs[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kb = tl.load(k_node + kv_off, mask=kv_mask, other=0.0)
    vb = tl.load(v_node + kv_off, mask=kv_mask, other=0.0)
    if EXACT:
      s = tl.dot(q, tl.trans(kb), input_precision="ieee")
    elif DOT_UPCAST:
      s = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)))
    else:
      s = tl.dot(q, tl.trans(kb))
    s = tl.where(keys[None, :] < lim[:, None], s * SCALE_LOG2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EXACT:
      pv = tl.dot(p, vb, input_precision="ieee")
    elif DOT_UPCAST:
      pv = tl.dot(p.to(vb.dtype).to(tl.float32), vb.to(tl.float32))
    else:
      pv = tl.dot(p.to(vb.dtype), vb)
    acc = acc * alpha[:, None] + pv
    m_i = m_new

  has = l_i > 0.0
  l_safe = tl.where(has, l_i, 1.0)
  o = acc / l_safe[:, None]
  lse = tl.where(has, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
  hrow = (b * T + t) * H + kh * G + g
  if NP == 1:     # one part per query: written directly
    tl.store(out_ptr + qrow[:, None] + dofs[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + hrow, lse, mask=row_ok)
  else:
    seq_kh = b * K + kh
    prow = ((seq_kh.to(tl.int64) * NP + PBASE + split) * TGP + within)
    tl.store(part_o_ptr + prow[:, None] * DP + dofs[None, :], o, mask=row_ok[:, None])
    tl.store(part_lse_ptr + prow, lse, mask=row_ok)
    # Every thread's partial stores happen before the ticket (release at GPU scope).
    tl.debug_barrier()
    first = row_ok & (within == 0)
    old = tl.atomic_add(ticket_ptr + seq_kh, tl.full([M], 1, tl.int32), mask=first,
                        sem="acq_rel", scope="gpu")
    last_first = (first & (old == NP - 1)).to(tl.int32)
    # Per sequence slot of the tile: did this item draw its last ticket (flag on its 1st row)?
    per_seq = tl.max(tl.reshape(last_first, [C, TGP]), axis=1)
    if tl.sum(per_seq, axis=0) > 0:
      tl.debug_barrier()
      r = tl.arange(0, TGP)
      r_t = r // G
      r_g = r % G
      r_ok = r < T * G
      slots = tl.arange(0, C)
      # One sequence at a time ([TGP, DP] tiles): the merge needs few registers, so the
      # attention loop above keeps them.
      for i in range(0, C):
        if tl.sum(tl.where(slots == i, per_seq, 0), axis=0) > 0:
          b_i = tl.load(order_ptr + lvl_row0 + start + i)
          base = ((b_i * K + kh).to(tl.int64) * NP) * TGP + r
          m_a = tl.full([TGP], float("-inf"), tl.float32)
          l_a = tl.zeros([TGP], tl.float32)
          o_a = tl.zeros([TGP, DP], tl.float32)
          for part in range(NP):     # a loop, not unrolled: NP can reach the tens
            prow_p = base + part * TGP
            lse_p = tl.load(part_lse_ptr + prow_p, mask=r_ok, other=float("-inf"),
                            cache_modifier=".cg")
            o_p = tl.load(part_o_ptr + prow_p[:, None] * DP + dofs[None, :],
                          mask=r_ok[:, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_a, lse_p)
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
            a = tl.exp(m_a - m_use)
            w_p = tl.exp(lse_p - m_use)
            l_a = l_a * a + w_p
            o_a = o_a * a[:, None] + w_p[:, None] * o_p
            m_a = m_new
          has_a = l_a > 0.0
          l_as = tl.where(has_a, l_a, 1.0)
          out = o_a / l_as[:, None]
          lse_out = tl.where(has_a, m_a + tl.log(l_as), float("-inf"))
          orow = ((b_i.to(tl.int64) * T + r_t) * H + kh * G + r_g) * D
          tl.store(out_ptr + orow[:, None] + dofs[None, :], out.to(out_ptr.dtype.element_ty),
                   mask=r_ok[:, None] & d_ok[None, :])
          tl.store(lse_ptr + (b_i * T + r_t) * H + kh * G + r_g, lse_out, mask=r_ok)


@triton.jit
def fused_decode_kernel(items_ptr, order_ptr, limits_ptr, q_ptr,
                        k0, v0, k1, v1, k2, v2, k3, v3,
                        W, NPROG, B, NP, S0, S1, S2, S3, CHUNK0, CHUNK1, CHUNK2, CHUNK3,
                        PBASE0, PBASE1, PBASE2, PBASE3,
                        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
                        NUM_LEVELS: tl.constexpr, T: tl.constexpr, H: tl.constexpr,
                        K: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        TGP: tl.constexpr, BN: tl.constexpr, SCALE_LOG2: tl.constexpr,
                        EXACT: tl.constexpr, DOT_UPCAST: tl.constexpr, OFF64: tl.constexpr,
                        M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                        M3: tl.constexpr):
  """items [W, 7] int32 (level, node, start, count, kv head, split, key end); order [Lv*B];
  limits [Lv*B*T] int32; q [B,T,H,D]; k*, v* [N*,S*,K,D] (stacked caches flattened: the
  items' nodes carry the layer offset); out [B,T,H,D]; lse [B,T,H] f32; part_o [B*K*NP*TGP,
  DP] f32, part_lse [B*K*NP*TGP] f32 (scratch; size 1 when NP == 1); ticket [B*K] int32,
  zero on entry. Sizes that only enter address arithmetic and loop bounds (W, NPROG, B, NP,
  S*, CHUNK*, PBASE*) are run-time integers, so one compiled kernel serves every batch and
  cache size; block shapes and head layout are constexpr."""
  pid = tl.program_id(0)
  for w in range(pid, W, NPROG):
    it = items_ptr + w * 7
    lvl = tl.load(it)
    node = tl.load(it + 1)
    start = tl.load(it + 2)
    count = tl.load(it + 3)
    kh = tl.load(it + 4)
    split = tl.load(it + 5)
    key_end = tl.load(it + 6)
    if count > 0:
      # One branch per level slot, written out: a Triton kernel cannot index a list of
      # pointers, and the slots differ only in their level's arguments.
      if lvl == 0:
        _attend_item(node, start, count, kh, split, key_end, 0, S0, CHUNK0, PBASE0, NP,
                     order_ptr, limits_ptr, q_ptr, k0, v0, out_ptr, lse_ptr, part_o_ptr,
                     part_lse_ptr, ticket_ptr, T, H, K, G, D, DP, TGP, BN, SCALE_LOG2, EXACT,
                     DOT_UPCAST, OFF64, M0)
      if NUM_LEVELS > 1:
        if lvl == 1:
          _attend_item(node, start, count, kh, split, key_end, B, S1, CHUNK1, PBASE1, NP,
                       order_ptr, limits_ptr, q_ptr, k1, v1, out_ptr, lse_ptr, part_o_ptr,
                       part_lse_ptr, ticket_ptr, T, H, K, G, D, DP, TGP, BN, SCALE_LOG2, EXACT,
                       DOT_UPCAST, OFF64, M1)
      if NUM_LEVELS > 2:
        if lvl == 2:
          _attend_item(node, start, count, kh, split, key_end, 2 * B, S2, CHUNK2, PBASE2, NP,
                       order_ptr, limits_ptr, q_ptr, k2, v2, out_ptr, lse_ptr, part_o_ptr,
                       part_lse_ptr, ticket_ptr, T, H, K, G, D, DP, TGP, BN, SCALE_LOG2, EXACT,
                       DOT_UPCAST, OFF64, M2)
      if NUM_LEVELS > 3:
        if lvl == 3:
          _attend_item(node, start, count, kh, split, key_end, 3 * B, S3, CHUNK3, PBASE3, NP,
                       order_ptr, limits_ptr, q_ptr, k3, v3, out_ptr, lse_ptr, part_o_ptr,
                       part_lse_ptr, ticket_ptr, T, H, K, G, D, DP, TGP, BN, SCALE_LOG2, EXACT,
                       DOT_UPCAST, OFF64, M3)
