"""Text rendering of a SharingPlan's tree (used by `SharingPlan.render` and `str(plan)`)."""

from __future__ import annotations


def _preview(tokens, start: int, length: int, max_tokens: int) -> str:
  shown = " ".join(str(int(x)) for x in tokens[start:start + min(length, max_tokens)])
  return f"[{shown}{' ...' if length > max_tokens else ''}]"


def render(plan, *, max_lines: int = 60, max_tokens: int = 8, max_leaves: int = 4) -> str:
  """See `SharingPlan.render`."""
  st = plan.stats
  b = plan.num_sequences
  levels = plan._levels
  tokens, offsets, _ = plan._flat
  order = plan.order
  lines = [f"SharingPlan: {b} sequence{'s' * (b != 1)}, {st.levels} shared level"
           f"{'s' * (st.levels != 1)}, {st.stored_tokens} of {st.total_tokens} tokens stored "
           f"({st.ratio:.2f}x; full radix tree: {st.radix_tokens} in {st.radix_nodes} nodes)"]
  for d, lv in enumerate(levels):
    lines.append(f"  level {d}: {lv.seq.size} node{'s' * (lv.seq.size != 1)}, padded "
                 f"[N={lv.num_nodes}, S={lv.capacity}]")
  lines.append(f"  suffixes: {b}, padded [B={b}, S={st.suffix_capacity}]")
  budget = len(lines) + max_lines

  # Open nodes, root first: [hi, is_last_child, leaves shown, leaves hidden]. The first entry
  # is the (unprinted) root.
  stack = [[b, True, 0, 0]]

  def indent():
    return "".join("    " if e[1] else "|   " for e in stack[1:])

  def flush(entry):
    if entry[3]:
      lines.append(f"{indent()}|-- ... {entry[3]} more sequence{'s' * (entry[3] != 1)}")
      entry[3] = 0

  def close_until(p):
    while len(stack) > 1 and stack[-1][0] <= p:
      flush(stack[-1])
      stack.pop()

  for p in range(b):
    close_until(p)
    if len(lines) >= budget:
      lines.append(f"... (output cut at max_lines={max_lines}; {b - p} more sequences)")
      return "\n".join(lines)
    for d in range(len(stack) - 1, len(levels)):
      lv = levels[d]
      j = lv.node_at(p)
      if j < 0:
        break
      flush(stack[-1])
      hi = int(lv.hi[j])
      last = hi == stack[-1][0]
      start, length = int(lv.start[j]), int(lv.length[j])
      lines.append(
          f"{indent()}{'`-- ' if last else '|-- '}L{d}#{j} pos {start}..{start + length - 1} "
          f"({length} tok) x{hi - int(lv.lo[j])} "
          f"{_preview(tokens, int(offsets[lv.seq[j]]) + start, length, max_tokens)}")
      stack.append([hi, last, 0, 0])
    top = stack[-1]
    if top[2] >= max_leaves and p + 1 < top[0]:
      top[3] += 1
      continue
    top[2] += 1
    last = p + 1 == top[0]
    start, length = int(plan.suffix_start[p]), int(plan.suffix_lengths[p])
    shown = (" " + _preview(tokens, int(offsets[order[p]]) + start, length, max_tokens)
             if length else "")
    if last:
      flush(top)
    lines.append(f"{indent()}{'`-- ' if last else '|-- '}seq {int(order[p])}: suffix "
                 f"({length} tok){shown}")
  close_until(b)
  flush(stack[0])
  return "\n".join(lines)
