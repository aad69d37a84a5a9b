"""Checkpoints: orbax save/restore of Llama params with their config, HuggingFace conversion,
and local tokenizers. Nothing here downloads anything.

  save(directory, config, params, *, overwrite=False)
  restore(directory, *, config=None, dtype=None) -> (LlamaConfig, params)
  from_hf(hf_dir, *, dtype=None) -> (LlamaConfig, params)
  config_from_hf(hf_config: dict) -> LlamaConfig
  load_tokenizer(path) -> tokenizers.Tokenizer

`params` is the `nnx.State` of a `hydrax.models.Llama` (`nnx.split(model)[1]`); rebuild the
module with `nnx.merge(nnx.split(hydrax.models.abstract(config))[0], params)` or `as_model`.

Command line:
  python -m hydrax.checkpoint convert --hf_dir DIR --out DIR [--dtype bf16|fp16|fp32] [--overwrite]
  python -m hydrax.checkpoint info --ckpt DIR
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrax.models import llama as llama_lib
from hydrax.models.configs import LlamaConfig, RopeScaling

CONFIG_FILE = "hydrax_config.json"
PARAMS_DIR = "params"
LAYER_LAYOUT = "stacked"   # every per-layer tensor is one array with a leading [L] axis
# attn.qkv [L, E, K, G+2, D] (`llama.Attention`); checkpoints saved before it hold attn.q, k
# and v apart (no "attention" entry), and `restore` fuses them.
ATTENTION_LAYOUT = "qkv"
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


# ----------------------------------------------------------------------------- helpers


def _abstract_state(config: LlamaConfig, dtype):
  graphdef, state = nnx.split(llama_lib.abstract(config, dtype=dtype))
  return graphdef, state


def as_model(config: LlamaConfig, params) -> llama_lib.Llama:
  """The `Llama` module holding `params` (an nnx.State or its pure-dict form)."""
  graphdef, state = _abstract_state(config, jnp.float32)
  if not isinstance(params, nnx.State):
    nnx.replace_by_pure_dict(state, params)
    params = state
  return nnx.merge(graphdef, params)


def _flat_pure(params) -> dict:
  """{'a/b/c': leaf} for an nnx.State or a nested pure dict."""
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(f"{prefix}/{key}" if prefix else str(key), value)
    else:
      flat[prefix] = node
  walk("", pure)
  return flat


def _dtype_of(params) -> jnp.dtype:
  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(params) if isinstance(params, nnx.State)
                                     else params)
  if not leaves:
    raise ValueError("params has no arrays")
  return jnp.dtype(leaves[0].dtype)


def _check_against_config(config: LlamaConfig, params, what: str, expected=None) -> None:
  """Raises ValueError listing tensors whose names or shapes do not match `config` (or the
  pure dict `expected`, when given)."""
  if expected is None:
    expected = _abstract_state(config, jnp.float32)[1]
  want = {k: tuple(v.shape) for k, v in _flat_pure(expected).items()}
  got = {k: tuple(v.shape) for k, v in _flat_pure(params).items()}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    lines = [f"{what} does not match config {config.name!r}:"]
    if missing:
      lines.append(f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
      lines.append(f"  unexpected: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    for k in wrong[:10]:
      lines.append(f"  {k}: shape {got[k]}, config expects {want[k]}")
    raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------- orbax


def save(directory: str, config: LlamaConfig, params, *, overwrite: bool = False) -> str:
  """Saves `params` (nnx.State or pure dict) and `config` under `directory` (orbax + JSON).

  Returns the absolute directory. Raises ValueError if it exists and overwrite is False, or if
  params do not match config.
  """
  import orbax.checkpoint as ocp
  if not isinstance(config, LlamaConfig):
    raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
  _check_against_config(config, params, "params")
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    if not overwrite:
      raise ValueError(f"checkpoint directory {directory!r} already exists; pass "
                       "overwrite=True to replace it")
    shutil.rmtree(directory)
  os.makedirs(directory)
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  pure = _stringify_keys(pure)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), pure)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"format": "hydrax-llama", "layers": LAYER_LAYOUT, "attention": ATTENTION_LAYOUT,
               "dtype": str(_dtype_of(params)), "config": config.to_dict()}, f, indent=2,
              sort_keys=True)
  return directory


def _stringify_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _stringify_keys(v) for k, v in tree.items()}
  return tree


def _intify_keys(tree):
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _intify_keys(v)
            for k, v in tree.items()}
  return tree


def _read_meta(directory: str) -> dict:
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{directory!r} is not a hydrax checkpoint: {CONFIG_FILE} not found "
                     "(write one with hydrax.checkpoint.save or `python -m hydrax.checkpoint "
                     "convert`)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != "hydrax-llama":
    raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
  return meta


def _config_of(meta: dict) -> tuple[LlamaConfig, jnp.dtype]:
  return LlamaConfig.from_dict(meta["config"]), jnp.dtype(meta["dtype"])


def read_config(directory: str) -> tuple[LlamaConfig, jnp.dtype]:
  """The config and parameter dtype saved in a hydrax checkpoint directory."""
  return _config_of(_read_meta(directory))


def restore(directory: str, *, config: Optional[LlamaConfig] = None, dtype=None):
  """Restores (config, params) saved by `save`.

  config: if given, the checkpoint's config must equal it (ValueError naming the differing
  fields otherwise). dtype: cast the parameters to it (default: as saved). params is an
  nnx.State placed on the default device.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  meta = _read_meta(directory)
  saved, saved_dtype = _config_of(meta)
  if meta.get("layers") != LAYER_LAYOUT:
    raise ValueError(f"checkpoint {directory!r} stores one tensor per layer (hydrax before "
                     "layers were stacked [L, ...]); re-convert it: python -m "
                     "hydrax.checkpoint convert --hf_dir HF_DIR --out NEW_DIR")
  if config is not None:
    if not isinstance(config, LlamaConfig):
      raise ValueError(f"config must be a LlamaConfig or None, got {type(config).__name__}")
    if config != saved:
      diff = {f: (getattr(saved, f), getattr(config, f)) for f in saved.to_dict()
              if getattr(saved, f) != getattr(config, f)}
      raise ValueError(f"checkpoint {directory!r} does not match the expected config; "
                       f"differing fields (saved, expected): {diff}")
  graphdef, abstract = _abstract_state(saved, saved_dtype)
  expected = nnx.to_pure_dict(abstract)
  apart = meta.get("attention") != ATTENTION_LAYOUT
  if apart:
    expected = _qkv_apart(saved, expected)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      _stringify_keys(expected))
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(directory, PARAMS_DIR)
  try:
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    _check_against_config(saved, _intify_keys(_as_plain_tree(tree)), f"checkpoint {directory!r}",
                          expected)
  except (AttributeError, TypeError):
    pass  # metadata layout differs between orbax versions; restore below still checks.
  try:
    pure = _intify_keys(checkpointer.restore(path, target))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {directory!r} does not match its config "
                     f"{saved.name!r}: {e}") from e
  if apart:
    attn = pure["layers"]["attn"]
    attn["qkv"] = {"kernel": llama_lib.fuse_qkv(
        attn.pop("q")["kernel"], attn.pop("k")["kernel"], attn.pop("v")["kernel"],
        saved.num_kv_heads)}
  nnx.replace_by_pure_dict(abstract, pure)
  params = abstract
  if dtype is not None:
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  return saved, params


def _qkv_apart(config: LlamaConfig, pure: dict) -> dict:
  """`pure` (a Llama's abstract pure dict) with attn.qkv replaced by the q, k and v kernels
  of checkpoints saved before `ATTENTION_LAYOUT` ([L, E, H*D], [L, E, K*D] twice)."""
  qkv = pure["layers"]["attn"]["qkv"]["kernel"]
  lead, d = qkv.shape[:2], config.head_dim
  attn = {key: value for key, value in pure["layers"]["attn"].items() if key != "qkv"}
  for name, heads in zip("qkv", (config.num_heads,) + (config.num_kv_heads,) * 2):
    attn[name] = {"kernel": jax.ShapeDtypeStruct(lead + (heads * d,), qkv.dtype)}
  return {**pure, "layers": {**pure["layers"], "attn": attn}}


def _as_plain_tree(tree):
  if isinstance(tree, dict):
    return {k: _as_plain_tree(v) for k, v in tree.items()}
  if hasattr(tree, "shape"):
    return jax.ShapeDtypeStruct(tuple(tree.shape), tree.dtype)
  raise TypeError(f"unexpected metadata node {type(tree).__name__}")


# ----------------------------------------------------------------------------- HuggingFace


def config_from_hf(hf: dict) -> LlamaConfig:
  """LlamaConfig from a HuggingFace Llama `config.json` dict (transformers 4.x or 5.x form)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                     f"{list(SUPPORTED_MODEL_TYPES)}")
  archs = hf.get("architectures") or []
  if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
    raise ValueError(f"unsupported architectures {archs}; supported: "
                     f"{list(SUPPORTED_ARCHITECTURES)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"unsupported {flag}=True; hydrax Llama has no biases")
  rope = hf.get("rope_parameters")
  if isinstance(rope, dict) and "rope_theta" not in rope and any(
      isinstance(v, dict) for v in rope.values()):
    raise ValueError(f"unsupported per-layer-type rope_parameters {rope}")
  theta = (rope or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling_spec = rope if rope is not None else hf.get("rope_scaling")
  rope_type = None
  if scaling_spec:
    rope_type = scaling_spec.get("rope_type", scaling_spec.get("type", "default"))
  if rope_type not in (None,) + SUPPORTED_ROPE_TYPES:
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: "
                     f"{list(SUPPORTED_ROPE_TYPES)}")
  scaling = None
  if rope_type == "llama3":
    try:
      scaling = RopeScaling(
          factor=float(scaling_spec["factor"]),
          low_freq_factor=float(scaling_spec["low_freq_factor"]),
          high_freq_factor=float(scaling_spec["high_freq_factor"]),
          original_max_position_embeddings=int(
              scaling_spec["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}: {scaling_spec}") from None
  eos = hf.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    eos = eos[0] if eos else None
  try:
    heads = int(hf["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
        name=str(hf.get("_name_or_path") or "hf-llama"))
  except KeyError as e:
    raise ValueError(f"HF config.json lacks the required field {e.args[0]!r}") from None


class _Slot(NamedTuple):
  """Where one HuggingFace tensor goes in the hydrax pure dict."""
  path: tuple                      # the leaf
  transpose: bool                  # HF stores a Linear's weight [out, in]
  layer: Optional[int]             # row of a leaf stacked over layers [L, ...], or None
  view: Optional[tuple] = None     # (shape, index): the tensor reshaped, at [index] of its row


def _hf_names(config: LlamaConfig) -> dict[str, _Slot]:
  """HF tensor name -> its `_Slot`.

  Per-layer tensors (model.layers.{i}.*) are row i of a leaf stacked over layers [L, ...];
  q_proj, k_proj and v_proj are parts of that row of attn.qkv [L, E, K, G+2, D]."""
  names = {"model.embed_tokens.weight": _Slot(("embed", "embedding"), False, None),
           "model.norm.weight": _Slot(("norm", "weight"), False, None)}
  if not config.tie_word_embeddings:
    names["lm_head.weight"] = _Slot(("lm_head", "kernel"), True, None)
  e, kh, d = config.hidden_size, config.num_kv_heads, config.head_dim
  g = config.num_heads // kh
  every = (slice(None), slice(None))
  qkv = ("attn", "qkv", "kernel")
  per_layer = {"self_attn.q_proj.weight": (qkv, True, ((e, kh, g, d), every + (slice(0, g),))),
               "self_attn.k_proj.weight": (qkv, True, ((e, kh, 1, d), every + (slice(g, g + 1),))),
               "self_attn.v_proj.weight": (qkv, True,
                                           ((e, kh, 1, d), every + (slice(g + 1, g + 2),))),
               "self_attn.o_proj.weight": (("attn", "o", "kernel"), True, None),
               "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), True, None),
               "mlp.up_proj.weight": (("mlp", "up", "kernel"), True, None),
               "mlp.down_proj.weight": (("mlp", "down", "kernel"), True, None),
               "input_layernorm.weight": (("attn_norm", "weight"), False, None),
               "post_attention_layernorm.weight": (("mlp_norm", "weight"), False, None)}
  for i in range(config.num_layers):
    for suffix, (path, transpose, view) in per_layer.items():
      names[f"model.layers.{i}.{suffix}"] = _Slot(("layers",) + path, transpose, i, view)
  return names


_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _safetensors_files(hf_dir: str) -> list[str]:
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted({os.path.join(hf_dir, v) for v in weight_map.values()})
    absent = [p for p in files if not os.path.isfile(p)]
    if absent:
      raise ValueError(f"{index} lists shards that are not in {hf_dir!r}: "
                       f"{[os.path.basename(p) for p in absent]}")
    return files
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    bins = glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(os.path.join(hf_dir, "*.pt"))
    hint = (" (found PyTorch .bin/.pt weights: re-save them with save_pretrained("
            "safe_serialization=True))" if bins else "")
    raise ValueError(f"no safetensors weights in {hf_dir!r}{hint}")
  return files


def _at(tree: dict, path: tuple):
  """The node of nested dict `tree` at `path`."""
  for key in path:
    tree = tree[key]
  return tree


def from_hf(hf_dir: str, *, dtype=None):
  """Converts a local HuggingFace Llama directory (config.json + safetensors) to hydrax.

  dtype: parameter dtype (default: config's torch_dtype / dtype, else the tensors' own dtype).
  Returns (LlamaConfig, params nnx.State). Raises ValueError for an unsupported architecture,
  a tensor with no hydrax counterpart, a missing tensor or a wrong shape.
  """
  from safetensors import safe_open
  hf_dir = os.fspath(hf_dir)
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{hf_dir!r} has no config.json; expected a HuggingFace model directory")
  with open(config_path) as f:
    hf = json.load(f)
  config = config_from_hf(hf)
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype")
  dtype = None if dtype is None else jnp.dtype(dtype)
  names = _hf_names(config)
  graphdef, abstract = _abstract_state(config, dtype or jnp.float32)
  pure = nnx.to_pure_dict(abstract)
  # Every leaf is assembled on the host (one device transfer per leaf, not per layer).
  host: dict[tuple, np.ndarray] = {}
  found, unmapped, dtypes = set(), [], set()
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    for path in _safetensors_files(hf_dir):
      with safe_open(path, framework="flax") as f:    # "flax" reads bfloat16, "numpy" cannot
        for name in f.keys():
          if name not in names:
            if _IGNORED.match(name) or (name == "lm_head.weight" and
                                        config.tie_word_embeddings):
              continue
            unmapped.append(name)
            continue
          if name in found:
            raise ValueError(f"tensor {name!r} appears in more than one safetensors shard")
          target, transpose, layer, view = names[name]
          want = tuple(_at(pure, target).shape)
          row = want if layer is None else want[1:]
          # The tensor's own shape (as hydrax reads it: [in, out]) is its row's or its view's
          # with the viewed axes after the first flattened.
          flat = row if view is None else (view[0][0], int(np.prod(view[0][1:])))
          value = np.asarray(f.get_tensor(name))
          dtypes.add(str(value.dtype))
          stored = tuple(value.shape)
          if transpose:
            value = value.T
          if tuple(value.shape) != flat:
            implied = flat[::-1] if transpose else flat
            raise ValueError(f"tensor {name!r} has shape {stored}; config.json implies "
                             f"{implied}")
          if layer is None:
            host[target] = value
          else:
            if target not in host:
              host[target] = np.empty(want, np.dtype(dtype or value.dtype))
            if view is None:
              host[target][layer] = value
            else:
              host[target][layer][view[1]] = value.reshape(view[0])
          found.add(name)
  if unmapped:
    raise ValueError(f"{len(unmapped)} tensors in {hf_dir!r} have no hydrax counterpart "
                     f"(unsupported architecture variant?): {sorted(unmapped)[:10]}")
  missing = sorted(set(names) - found)
  if missing:
    raise ValueError(f"{len(missing)} tensors are missing from {hf_dir!r}: {missing[:10]}")
  if dtype is None and len(dtypes) > 1:
    raise ValueError(f"the checkpoint mixes dtypes {sorted(dtypes)}; pass dtype=")
  for target, value in host.items():
    _at(pure, target[:-1])[target[-1]] = jnp.asarray(value, dtype or value.dtype)
  nnx.replace_by_pure_dict(abstract, pure)
  return config, abstract


# ----------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: str):
  """A `tokenizers.Tokenizer` from a local tokenizer.json (or a directory holding one)."""
  import tokenizers
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer file {path!r} not found (a local tokenizer.json is required; "
                     "nothing is downloaded)")
  return tokenizers.Tokenizer.from_file(path)


# ----------------------------------------------------------------------------- command line


# The --dtype names the command line accepts -> the dtype they mean.
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                 "float16": "float16", "half": "float16", "fp32": "float32",
                 "float32": "float32", "float": "float32"}


class _CliError(Exception):
  """A command-line error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise _CliError(f"{message} (see {self.prog} --help)")


def cli_dtype(name: Optional[str]) -> Optional[str]:
  """The dtype named by --dtype (aliases bf16, fp16, fp32 and the full names), or None."""
  if name is None:
    return None
  dtype = DTYPE_ALIASES.get(name.strip().lower())
  if dtype is None:
    raise _CliError(f"--dtype {name!r} is not one of {sorted(DTYPE_ALIASES)}")
  return dtype


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (see the module docstring). Errors: one line on stderr, exit code 2."""
  parser = _Parser(prog="python -m hydrax.checkpoint",
                   description="Convert and inspect hydrax checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  convert = sub.add_parser("convert", help="HuggingFace Llama directory -> hydrax checkpoint")
  convert.add_argument("--hf_dir", required=True, help="local HF model directory")
  convert.add_argument("--out", required=True, help="output checkpoint directory")
  convert.add_argument("--dtype", default=None,
                       help="parameter dtype: bf16, fp16, fp32 (or bfloat16, float16, "
                            "float32); default: as stored")
  convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  info = sub.add_parser("info", help="print a hydrax checkpoint's config")
  info.add_argument("--ckpt", required=True)
  try:
    args = parser.parse_args(argv)
    if args.command == "convert":
      dtype = cli_dtype(args.dtype)
      if os.path.exists(args.out) and not args.overwrite:
        raise _CliError(f"--out {args.out!r} already exists; pass --overwrite to replace it")
      config, params = from_hf(args.hf_dir, dtype=dtype)
      out = save(args.out, config, params, overwrite=args.overwrite)
      print(f"saved {config.name} ({llama_lib.param_count(params):,} parameters, "
            f"{_dtype_of(params)}) to {out}")
    else:
      meta = _read_meta(args.ckpt)
      config, dtype = _config_of(meta)
      attention = meta.get("attention", "q, k, v apart (fused on restore)")
      print(json.dumps({"dtype": str(dtype), "attention": attention,
                        "config": config.to_dict()}, indent=2))
  except (_CliError, ValueError, OSError, KeyError) as e:
    message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    print(f"error: {message or type(e).__name__}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
