"""Builds each notebook (`NN_name.ipynb`) from its jupytext percent twin (`NN_name.py`).

    python notebooks/build.py            # rewrites every .ipynb from its twin
    python notebooks/build.py --check    # exit 1 if any .ipynb is stale (what the tests check)

The twin is the source: edit the .py, then build. The .ipynb holds no outputs, deterministic
cell ids and fixed metadata (Python 3 kernel; Colab opens it on a GPU runtime), so a rebuild of
an unchanged twin is byte-identical. Twin syntax (jupytext "percent" format): an optional
`# ---` ... `# ---` header, then cells opened by `# %%` (code) or `# %% [markdown]` (markdown,
every line commented out with `# `). Only the standard library is needed; when nbformat is
installed, `check` also validates each notebook against the nbformat schema.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

METADATA = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "toc_visible": True},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def twins(directory: str = HERE) -> list:
  """The percent twins `NN_*.py` of `directory`, sorted."""
  return sorted(glob.glob(os.path.join(directory, "[0-9][0-9]_*.py")))


def parse(text: str) -> list:
  """[(cell_type, source)] of a percent-format script."""
  lines = text.splitlines()
  if lines and lines[0].strip() == "# ---":        # jupytext header: skipped
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "# ---"), None)
    if end is None:
      raise ValueError("unterminated '# ---' header")
    lines = lines[end + 1:]
  cells, kind, body = [], None, []

  def close():
    if kind is None:
      if any(line.strip() for line in body):
        raise ValueError("text before the first '# %%' cell marker")
      return
    src = list(body)
    while src and not src[0].strip():
      src.pop(0)
    while src and not src[-1].strip():
      src.pop()
    if kind == "markdown":
      out = []
      for line in src:
        if line == "#":
          out.append("")
        elif line.startswith("# "):
          out.append(line[2:])
        else:
          raise ValueError(f"markdown cell line not commented out with '# ': {line!r}")
      src = out
    cells.append((kind, "\n".join(src)))

  for line in lines:
    if line.startswith("# %%"):
      close()
      rest = line[4:].strip()
      kind = "markdown" if rest.startswith("[markdown]") else "code"
      body = []
    else:
      body.append(line)
  close()
  return cells


def _source(text: str) -> list:
  return text.splitlines(keepends=True)


def notebook(cells: list) -> dict:
  """The nbformat 4.5 notebook (a dict) of parsed cells, without outputs."""
  out = []
  for i, (kind, text) in enumerate(cells):
    cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": _source(text)}
    if kind == "code":
      cell["execution_count"] = None
      cell["outputs"] = []
    out.append(cell)
  return {"cells": out, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def render(twin_path: str) -> str:
  """The .ipynb text built from a twin (nbformat's own JSON layout: indent 1, sorted keys)."""
  with open(twin_path, encoding="utf-8") as f:
    nb = notebook(parse(f.read()))
  return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def target(twin_path: str) -> str:
  return os.path.splitext(twin_path)[0] + ".ipynb"


def stale(directory: str = HERE) -> list:
  """Notebooks whose .ipynb is missing or differs from what its twin builds."""
  out = []
  for twin in twins(directory):
    path = target(twin)
    current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if current != render(twin):
      out.append(path)
  return out


def validate(path: str) -> None:
  """Validates a notebook against the nbformat schema (needs nbformat)."""
  import nbformat
  nbformat.validate(nbformat.read(path, as_version=4))


def main(argv) -> int:
  if "--check" in argv[1:]:
    bad = stale()
    for path in bad:
      print(f"stale: {os.path.relpath(path)} (run: python notebooks/build.py)")
    try:
      import nbformat  # noqa: F401
    except ImportError:
      pass
    else:
      for twin in twins():
        validate(target(twin))
    return 1 if bad else 0
  for twin in twins():
    path = target(twin)
    text = render(twin)
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
      print(f"wrote {os.path.relpath(path)}")
    else:
      print(f"up to date: {os.path.relpath(path)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
