"""The Colab notebooks (notebooks/*.ipynb): built from their percent twins, no outputs, and
each one executed top to bottom on CPU at its smallest size (HYDRAX_NOTEBOOK_SMALL=1).

Execution: the .ipynb itself through a Jupyter kernel (nbclient + ipykernel) when those are
installed; otherwise its percent twin (`notebooks/NN_name.py`, the same code cell for cell, as
the build check below guarantees) with `python`, figures drawn with the Agg backend.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TIMEOUT_S = 420          # per notebook; each takes well under a minute on a loaded 2-core CPU
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/hydrax-dev/hydrax/blob/main/notebooks/{})")


def _load_build():
  spec = importlib.util.spec_from_file_location("notebooks_build",
                                                os.path.join(NOTEBOOKS, "build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build = _load_build()
TWINS = build.twins(NOTEBOOKS)
NAMES = [os.path.splitext(os.path.basename(t))[0] for t in TWINS]


def _notebook(name):
  with open(os.path.join(NOTEBOOKS, f"{name}.ipynb"), encoding="utf-8") as f:
    return json.load(f)


def _has_kernel():
  try:
    import ipykernel  # noqa: F401
    import nbclient  # noqa: F401
    import nbformat  # noqa: F401
  except ImportError:
    return False
  return True


def test_the_three_notebooks_exist():
  assert NAMES == ["01_quickstart", "02_throughput_curves", "03_sharing_trees"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_built_from_its_twin(name):
  path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
  assert os.path.exists(path), f"{path} missing: run python notebooks/build.py"
  with open(path, encoding="utf-8") as f:
    stored = f.read()
  assert stored == build.render(os.path.join(NOTEBOOKS, f"{name}.py")), (
      f"{name}.ipynb is stale or was edited by hand: edit {name}.py, then run "
      "python notebooks/build.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_holds_no_outputs_and_is_valid(name):
  nb = _notebook(name)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code
  for cell in code:
    assert cell["outputs"] == [] and cell["execution_count"] is None, cell["id"]
  try:
    import nbformat
  except ImportError:
    return
  nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_badge_colab_only_install_and_platform_switch(name):
  nb = _notebook(name)
  first = "".join(nb["cells"][0]["source"])
  assert BADGE.format(f"{name}.ipynb") in first
  code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  assert 'HYDRAX_REPO = "https://github.com/hydrax-dev/hydrax"' in code
  assert 'IN_COLAB = "google.colab" in sys.modules' in code and "if IN_COLAB:" in code
  assert "jax.default_backend()" in code and "HYDRAX_NOTEBOOK_SMALL" in code
  compile(code, f"{name}.ipynb", "exec")     # valid Python: no shell escapes or magics


def _synthetic_committed_results(folder):
  """A throughput_curves results folder in the harness's format, for the notebook's
  committed-results branch when the repository has none yet (numbers are made up)."""
  run = os.path.join(folder, "throughput_curves", "20250101-000000")
  os.makedirs(run)
  rows = []
  for prefix in (1024, 4096):
    for batch in (32, 256, 2048):
      for mode, speed in (("hydragen", 1.0), ("replicated", 0.4), ("none", 1.2)):
        row = {"model": "llama3-8b", "prefix": prefix, "batch": batch, "attention": mode}
        if mode == "replicated" and prefix * batch > 2**20:
          row["status"] = "OOM"
        else:
          row.update(status="ok", decode_tokens_per_s=batch * 90 * speed,
                     e2e_tokens_per_s=batch * 60 * speed, kv_bytes=prefix * batch)
        rows.append(row)
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  with open(os.path.join(run, "rows.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(run, "env.json"), "w") as f:
    json.dump({"device_kind": "synthetic test device"}, f)


def _has_committed_results():
  results = os.path.join(ROOT, "experiments", "results")
  return os.path.isdir(results) and any(n.startswith("throughput_curves")
                                        for n in os.listdir(results))


_RUN_TWIN = r"""
import runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

def show(*args, **kwargs):          # draws every open figure (as the inline backend would)
  for number in plt.get_fignums():
    plt.figure(number).canvas.draw()
  plt.close("all")

plt.show = show
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
show()
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu(name, tmp_path, monkeypatch):
  # The kernel (or the subprocess) inherits this environment.
  monkeypatch.setenv("HYDRAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HYDRAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's inline backend draws figures
  if name.startswith("02") and not _has_committed_results():
    _synthetic_committed_results(str(tmp_path / "results"))
    monkeypatch.setenv("HYDRAX_RESULTS_DIR", str(tmp_path / "results"))
  before = set(os.listdir(NOTEBOOKS))
  if _has_kernel():
    import nbclient
    import nbformat
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.get("output_type") == "stream")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells
                 if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, f"{name}: only {images} figures displayed"
  else:
    proc = subprocess.run([sys.executable, "-c", _RUN_TWIN, f"{name}.py"], cwd=NOTEBOOKS,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{name}.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    text = proc.stdout
  assert "sizes: ci" in text
  if name.startswith("02"):
    assert "this runtime: 4 points {'ok': 4" in text, text[-3000:]
    assert " run(s) (throughput_curves" in text, text[-3000:]
  assert set(os.listdir(NOTEBOOKS)) - before <= {"__pycache__", ".ipynb_checkpoints"}, (
      "the notebook wrote into notebooks/")
