"""`python -m hydrax.checkpoint`: one-line errors (exit 2, no traceback), dtype aliases, the
--overwrite hint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hydrax import checkpoint
from hydrax.models import LlamaConfig, llama
from tests.test_checkpoint import _write_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  config = LlamaConfig.from_preset("tiny")
  return str(_write_hf_dir(tmp_path_factory.mktemp("hf"), config, llama.init(config, seed=1)))


def _error(capsys, argv):
  assert checkpoint.main(argv) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), captured.err
  assert "Traceback" not in captured.err and not captured.out
  return err


@pytest.mark.parametrize("alias, dtype", [("bf16", jnp.bfloat16), ("fp16", jnp.float16),
                                          ("FP32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_dtype_aliases(tmp_path, hf_dir, capsys, alias, dtype):
  out = str(tmp_path / "ckpt")
  assert checkpoint.main(["convert", "--hf_dir", hf_dir, "--out", out, "--dtype", alias]) == 0
  assert jnp.dtype(dtype).name in capsys.readouterr().out
  _, params = checkpoint.restore(out)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(dtype)}


def test_cli_dtype_names():
  assert checkpoint.cli_dtype(None) is None
  assert [checkpoint.cli_dtype(x) for x in ("bf16", "fp16", "fp32", "float32", "half")] == [
      "bfloat16", "float16", "float32", "float32", "float16"]


def test_existing_output_suggests_the_flag(tmp_path, hf_dir, capsys):
  out = tmp_path / "ckpt"
  out.mkdir()
  err = _error(capsys, ["convert", "--hf_dir", hf_dir, "--out", str(out)])
  assert "already exists; pass --overwrite to replace it" in err and "overwrite=True" not in err
  assert checkpoint.main(["convert", "--hf_dir", hf_dir, "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("argv, match", [
    (["convert", "--hf_dir", "H", "--out", "O", "--dtype", "int8"],
     "error: --dtype 'int8' is not one of ['bf16', 'bfloat16', 'float', 'float16', 'float32'"),
    (["convert", "--out", "O"], "error: the following arguments are required: --hf_dir "
                                "(see python -m hydrax.checkpoint convert --help)"),
    (["convert", "--hf_dir", "/no/such/dir", "--out", "O"], "error: "),
    (["info", "--ckpt", "/no/such/ckpt"], "error: "),
    (["frobnicate"], "error: argument command: invalid choice: 'frobnicate'"),
    ([], "error: the following arguments are required: command"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, match):
  argv = [a if a != "O" else str(tmp_path / "o") for a in argv]
  assert _error(capsys, argv).startswith(match)
  assert not os.path.exists(tmp_path / "o")


def test_module_entry_point_exit_code(tmp_path):
  done = subprocess.run([sys.executable, "-m", "hydrax.checkpoint", "convert", "--hf_dir",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "bf16"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert done.returncode == 2
  assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
