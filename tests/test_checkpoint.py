"""hydrax.checkpoint: orbax round trip, HF conversion and its errors, CLI, tokenizers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrax import checkpoint
from hydrax.models import LlamaConfig, RopeScaling, llama

_apply = jax.jit(llama.apply, static_argnums=0)


@pytest.fixture(scope="module")
def tiny():
  config = LlamaConfig.from_preset("tiny")
  return config, llama.init(config, seed=5)


def _hf_config(config: LlamaConfig, **overrides) -> dict:
  """A transformers-4.x style config.json dict for `config`."""
  out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
         "intermediate_size": config.intermediate_size,
         "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.num_kv_heads, "rope_theta": config.rope_theta,
         "rope_scaling": None, "max_position_embeddings": config.max_position_embeddings,
         "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
         "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
  out.update(overrides)
  return out


def _write_hf_dir(directory, config, model, *, drop=(), extra=None, reshape=None,
                  dtype=np.float32, cast=None, **cfg):
  """Writes a HF Llama directory (config.json + model.safetensors) holding `model`'s weights
  in `dtype` (the tensors named in `cast` in the dtype given there)."""
  from safetensors.numpy import save_file
  tensors = {"model.embed_tokens.weight": model.embed.embedding[...],
             "model.norm.weight": model.norm.weight[...]}
  if model.lm_head is not None:
    tensors["lm_head.weight"] = model.lm_head.kernel[...].T
  block = model.layers                   # every parameter stacked [L, ...]
  q, k, v = llama.split_qkv(np.asarray(block.attn.qkv.kernel[...]))
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    for hf, kernel in (("self_attn.q_proj", q), ("self_attn.k_proj", k),
                       ("self_attn.v_proj", v), ("self_attn.o_proj", block.attn.o.kernel),
                       ("mlp.gate_proj", block.mlp.gate.kernel),
                       ("mlp.up_proj", block.mlp.up.kernel),
                       ("mlp.down_proj", block.mlp.down.kernel)):
      tensors[p + hf + ".weight"] = kernel[i].T
    tensors[p + "input_layernorm.weight"] = block.attn_norm.weight[i]
    tensors[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight[i]
  tensors = {k: np.ascontiguousarray(np.asarray(v, (cast or {}).get(k, dtype)))
             for k, v in tensors.items() if k not in drop}
  tensors.update(extra or {})
  for name, shape in (reshape or {}).items():
    tensors[name] = np.zeros(shape, np.float32)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(_hf_config(config, **cfg), f)
  return directory


def _same_params(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip(tmp_path, tiny, dtype):
  config, model = tiny
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), nnx.state(model))
  checkpoint.save(tmp_path / "ckpt", config, params)
  restored_config, restored = checkpoint.restore(tmp_path / "ckpt")
  assert restored_config == config
  _same_params(params, restored)
  graphdef = nnx.split(model)[0]
  toks = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  np.testing.assert_array_equal(np.asarray(_apply(graphdef, params, toks)),
                                np.asarray(_apply(graphdef, restored, toks)))
  rebuilt = checkpoint.as_model(restored_config, restored)
  assert isinstance(rebuilt, llama.Llama) and rebuilt.config == config
  _same_params(restored, nnx.state(rebuilt))
  _, as_f32 = checkpoint.restore(tmp_path / "ckpt", config=config, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree_util.tree_leaves(as_f32)} == {jnp.dtype(jnp.float32)}


def test_orbax_errors(tmp_path, tiny):
  config, model = tiny
  params = nnx.state(model)
  checkpoint.save(tmp_path / "ckpt", config, params)
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(tmp_path / "ckpt", config, params)
  checkpoint.save(tmp_path / "ckpt", config, params, overwrite=True)
  with pytest.raises(ValueError, match="does not match the expected config.*num_layers"):
    checkpoint.restore(tmp_path / "ckpt", config=config.replace(num_layers=3))
  with pytest.raises(ValueError, match="not a hydrax checkpoint"):
    checkpoint.restore(tmp_path)
  with pytest.raises(ValueError, match="params does not match config"):
    checkpoint.save(tmp_path / "other", config.replace(hidden_size=32), params)
  # A checkpoint whose saved config was edited to disagree with its tensors.
  meta_path = tmp_path / "ckpt" / checkpoint.CONFIG_FILE
  meta = json.loads(meta_path.read_text())
  meta["config"]["intermediate_size"] = 96
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="does not match"):
    checkpoint.restore(tmp_path / "ckpt")


def test_from_hf_round_trip_and_tied_head(tmp_path, tiny):
  config, model = tiny
  _write_hf_dir(tmp_path / "hf", config, model)
  got_config, params = checkpoint.from_hf(tmp_path / "hf")
  assert got_config == config.replace(name="hf-llama", bos_token_id=None, eos_token_id=None)
  _same_params(nnx.state(model), params)
  _, bf16 = checkpoint.from_hf(tmp_path / "hf", dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  # Tied: no lm_head in the model; a stray lm_head.weight in the files is ignored.
  tied = config.replace(tie_word_embeddings=True)
  tied_model = llama.init(tied, seed=1)
  extra = {"lm_head.weight": np.zeros((256, 64), np.float32),
           "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros((8,), np.float32)}
  _write_hf_dir(tmp_path / "tied", tied, tied_model, extra=extra)
  got, params = checkpoint.from_hf(tmp_path / "tied")
  assert got.tie_word_embeddings
  _same_params(nnx.state(tied_model), params)


def test_from_hf_stacks_layers_in_their_stored_dtype(tmp_path, tiny):
  """bfloat16 tensors (config.json without a dtype) land in row i of each [L, ...] stack."""
  config, model = tiny
  _write_hf_dir(tmp_path / "bf16", config, model, dtype=jnp.bfloat16, torch_dtype=None)
  _, params = checkpoint.from_hf(tmp_path / "bf16")
  got = nnx.to_pure_dict(params)
  assert got["layers"]["mlp"]["down"]["kernel"].shape == (2, 128, 64)
  assert {x.dtype for x in jax.tree_util.tree_leaves(got)} == {jnp.dtype(jnp.bfloat16)}
  want = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), nnx.state(model))
  _same_params(want, params)
  mixed = {"model.layers.1.self_attn.q_proj.weight": np.float16}
  with pytest.raises(ValueError, match="mixes dtypes.*float16"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "mixed", config, model, dtype=jnp.bfloat16,
                                     cast=mixed, torch_dtype=None))


def test_restore_rejects_a_per_layer_checkpoint(tmp_path, tiny):
  """A checkpoint of the layout before layers were stacked (layers/0/..., layers/1/...)."""
  import orbax.checkpoint as ocp
  config, model = tiny
  pure = nnx.to_pure_dict(nnx.state(model))
  per_layer = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], pure["layers"])
               for i in range(config.num_layers)}
  old = dict(pure, layers=per_layer)
  directory = tmp_path / "old"
  directory.mkdir()
  writer = ocp.StandardCheckpointer()
  writer.save(directory / checkpoint.PARAMS_DIR, old)
  writer.wait_until_finished()
  (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(
      {"format": "hydrax-llama", "dtype": "float32", "config": config.to_dict()}))
  with pytest.raises(ValueError, match=r"one tensor per layer.*re-convert it: python -m "
                     r"hydrax.checkpoint convert"):
    checkpoint.restore(directory)
  assert checkpoint.read_config(directory)[0] == config     # `info` still reads it


def test_restore_fuses_a_checkpoint_with_q_k_v_apart(tmp_path, tiny, capsys):
  """A checkpoint saved before attn.qkv (attn.q, k, v kernels, no "attention" entry) restores
  to the same model, its logits equal to the saved model's."""
  import orbax.checkpoint as ocp
  config, model = tiny
  pure = nnx.to_pure_dict(nnx.state(model))
  attn = dict(pure["layers"]["attn"])
  q, k, v = llama.split_qkv(attn.pop("qkv")["kernel"])
  attn.update(q={"kernel": q}, k={"kernel": k}, v={"kernel": v})
  old = dict(pure, layers=dict(pure["layers"], attn=attn))
  directory = tmp_path / "apart"
  directory.mkdir()
  writer = ocp.StandardCheckpointer()
  writer.save(directory / checkpoint.PARAMS_DIR, checkpoint._stringify_keys(old))
  writer.wait_until_finished()
  (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(
      {"format": "hydrax-llama", "layers": "stacked", "dtype": "float32",
       "config": config.to_dict()}))
  got_config, params = checkpoint.restore(directory)
  assert got_config == config
  assert checkpoint.main(["info", "--ckpt", str(directory)]) == 0
  assert json.loads(capsys.readouterr().out)["attention"] == "q, k, v apart (fused on restore)"
  _same_params(nnx.state(model), params)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % config.vocab_size
  graphdef, state = nnx.split(model)
  np.testing.assert_array_equal(llama.apply(graphdef, params, tokens),
                                llama.apply(graphdef, state, tokens))
  # A q kernel of the wrong width is named, not silently fused.
  attn["q"] = {"kernel": q[..., :-1]}
  writer.save(tmp_path / "bad" / checkpoint.PARAMS_DIR,
              checkpoint._stringify_keys(dict(old, layers=dict(old["layers"], attn=attn))))
  writer.wait_until_finished()
  (tmp_path / "bad" / checkpoint.CONFIG_FILE).write_text(
      (directory / checkpoint.CONFIG_FILE).read_text())
  with pytest.raises(ValueError, match="layers/attn/q/kernel"):
    checkpoint.restore(tmp_path / "bad")


def test_saved_checkpoints_record_the_attention_layout(tmp_path, tiny):
  config, model = tiny
  directory = checkpoint.save(tmp_path / "ckpt", config, nnx.state(model))
  meta = json.loads((tmp_path / "ckpt" / checkpoint.CONFIG_FILE).read_text())
  assert meta["attention"] == checkpoint.ATTENTION_LAYOUT == "qkv"
  assert os.path.isdir(directory)


def test_from_hf_errors(tmp_path, tiny):
  config, model = tiny
  with pytest.raises(ValueError, match="unsupported model_type 'mistral'.*llama"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "a", config, model, model_type="mistral"))
  with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.up_proj.weight"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "b", config, model,
                                     drop=("model.layers.1.mlp.up_proj.weight",)))
  bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros((64,), np.float32)}
  with pytest.raises(ValueError, match="no hydrax counterpart.*q_proj.bias"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "c", config, model, extra=bias))
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(64, 64\).*\(32, 64\)"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "d", config, model,
                                     reshape={"model.layers.0.self_attn.k_proj.weight": (64, 64)}))
  with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "e", config, model,
                                     rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ValueError, match="attention_bias"):
    checkpoint.from_hf(_write_hf_dir(tmp_path / "f", config, model, attention_bias=True))
  with pytest.raises(ValueError, match="no config.json"):
    checkpoint.from_hf(tmp_path)
  bin_dir = _write_hf_dir(tmp_path / "g", config, model)
  os.remove(bin_dir / "model.safetensors")
  (bin_dir / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="no safetensors weights.*safe_serialization"):
    checkpoint.from_hf(bin_dir)


def test_config_from_hf_rope_forms():
  base = {"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  v4 = checkpoint.config_from_hf(dict(base, rope_theta=5e5,
                                      rope_scaling=dict(scaling, rope_type="llama3")))
  v5 = checkpoint.config_from_hf(dict(base, rope_parameters=dict(
      scaling, rope_type="llama3", rope_theta=5e5)))
  old = checkpoint.config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(scaling,
                                                                               type="llama3")))
  assert v4 == v5 == old
  assert v4.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and v4.rope_theta == 5e5
  plain = checkpoint.config_from_hf(dict(base, rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1e4}))
  assert plain.rope_scaling is None and plain.rope_theta == 1e4
  with pytest.raises(ValueError, match="required field 'hidden_size'"):
    checkpoint.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_cli_convert_and_info(tmp_path, tiny, capsys):
  config, model = tiny
  hf = _write_hf_dir(tmp_path / "hf", config, model)
  out = tmp_path / "out"
  assert checkpoint.main(["convert", "--hf_dir", str(hf), "--out", str(out),
                          "--dtype", "bfloat16"]) == 0
  assert "106,816 parameters" in capsys.readouterr().out
  restored_config, params = checkpoint.restore(out)
  assert restored_config.hidden_size == 64
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert checkpoint.main(["info", "--ckpt", str(out)]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["dtype"] == "bfloat16" and info["attention"] == "qkv"
  assert checkpoint.main(["convert", "--hf_dir", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o2")]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_load_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "hello": 1, "world": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = checkpoint.load_tokenizer(tmp_path)          # a directory holding tokenizer.json
  assert loaded.encode("hello world foo").ids == [1, 2, 0]
  assert checkpoint.load_tokenizer(tmp_path / "tokenizer.json").decode([2, 1]) == "world hello"
  with pytest.raises(ValueError, match="not found"):
    checkpoint.load_tokenizer(tmp_path / "missing.json")
