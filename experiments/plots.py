"""Plots of sweep rows (matplotlib; files only, so any backend works; run.main picks Agg)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib.pyplot as plt


def line_plot(rows: Sequence[dict], x: str, y: str, series: Sequence[str], path: str,
              *, title: str = "", logx: bool = True, logy: bool = False) -> str | None:
  """One line per distinct value of the `series` columns; OOM points drawn as 'x' at the
  bottom of the axis (as in the paper). Returns the file written, or None if nothing to plot."""
  ok = [r for r in rows if r.get("status") == "ok" and r.get(y) is not None]
  if not ok:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  keys = []
  for r in rows:
    key = tuple(r.get(s) for s in series)
    if key not in keys:
      keys.append(key)
  for key in keys:
    mine = [r for r in rows if tuple(r.get(s) for s in series) == key]
    pts = sorted((r[x], r[y]) for r in mine if r.get("status") == "ok" and r.get(y) is not None)
    label = ", ".join(f"{s}={v}" for s, v in zip(series, key))
    line = None
    if pts:
      line, = ax.plot(*zip(*pts), marker="o", label=label)
    ooms = sorted(r[x] for r in mine if r.get("status") == "OOM")
    if ooms:
      ax.plot(ooms, [0] * len(ooms), "x", ms=9, color=line.get_color() if line else "k",
              label=None if line else f"{label} (OOM)")
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
