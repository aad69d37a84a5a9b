"""hydrax.models: presets, parameter counts, HF logits parity, cached forward == full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrax import cache as cache_lib
from hydrax import checkpoint
from hydrax.models import PRESETS, LlamaConfig, RopeScaling, llama, num_params

# Published parameter counts of the real checkpoints.
KNOWN_COUNTS = {"llama2-7b": 6_738_415_616, "codellama-7b": 6_738_546_688,
                "codellama-13b": 13_016_028_160, "codellama-34b": 33_743_970_304,
                "llama3-8b": 8_030_261_248, "yi-6b": 6_061_035_520}


def test_presets_have_published_parameter_counts():
  for name, count in KNOWN_COUNTS.items():
    assert num_params(LlamaConfig.from_preset(name)) == count, name
  assert set(KNOWN_COUNTS) | {"tiny"} == set(PRESETS)
  llama3 = LlamaConfig.from_preset("llama3-8b")
  assert llama3.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
  assert llama3.rope_theta == 500000.0 and llama3.num_kv_heads == 8


def test_unknown_preset_and_bad_config_raise():
  with pytest.raises(ValueError, match="unknown preset 'llama9'.*tiny"):
    LlamaConfig.from_preset("llama9")
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    LlamaConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1, num_heads=6,
                num_kv_heads=4)
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    LlamaConfig.from_preset("tiny", vocab_size=0)


def test_config_json_round_trip():
  config = LlamaConfig.from_preset("llama3-8b")
  assert LlamaConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("tie", [False, True])
def test_init_dtype_and_count(tie):
  config = LlamaConfig.from_preset("tiny", tie_word_embeddings=tie)
  model = llama.init(config, dtype=jnp.bfloat16, seed=1)
  leaves = jax.tree_util.tree_leaves(nnx.state(model))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert llama.param_count(model) == num_params(config)
  assert (model.lm_head is None) == tie
  graphdef, params = nnx.split(model)
  out = jax.jit(llama.apply, static_argnums=0)(graphdef, params, jnp.ones((2, 5), jnp.int32))
  assert out.shape == (2, 5, config.vocab_size) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


# One xdist worker for the four cases: importing torch and transformers costs ~10 s.
@pytest.mark.xdist_group("torch")
@pytest.mark.parametrize("kv_heads,scaled,tie", [(4, False, False), (4, True, False),
                                                 (2, False, True), (2, True, True)],
                         ids=["mha", "mha-llama3", "gqa-tied", "gqa-tied-llama3"])
def test_logits_match_huggingface(tmp_path, kv_heads, scaled, tie):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests.models import hf_util
  scaling = hf_util.llama3_scaling(16) if scaled else None
  hf_model = hf_util.make_hf_llama(tmp_path, num_kv_heads=kv_heads, rope_scaling=scaling,
                                   tie=tie, seed=kv_heads + 2 * scaled)
  config, params = checkpoint.from_hf(tmp_path)
  assert config.num_kv_heads == kv_heads and config.tie_word_embeddings == tie
  assert (config.rope_scaling is not None) == scaled
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
  want = hf_util.hf_logits(hf_model, tokens)
  graphdef = nnx.split(llama.abstract(config))[0]
  got = np.asarray(llama.apply(graphdef, params, jnp.asarray(tokens, jnp.int32)))
  assert np.abs(want).max() > 1.0   # logits far from uniform: the check is not vacuous
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


_apply = jax.jit(llama.apply, static_argnums=0)


def _full_logits(graphdef, params, seqs):
  """Full-forward logits of each sequence (right-padded into one causal batch): list of [T_b, V]."""
  width = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), width), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  out = np.asarray(_apply(graphdef, params, jnp.asarray(tokens)))
  return [out[b, :len(s)] for b, s in enumerate(seqs)]


@pytest.fixture(scope="module")
def tiny():
  config = LlamaConfig.from_preset("tiny")
  model = llama.init(config, seed=3)
  model.norm.weight[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(0), (64,))
  graphdef, params = nnx.split(model)
  return config, graphdef, params


def _step_fn(graphdef):
  @jax.jit
  def step(params, tokens, positions, cache, valid):
    model = nnx.merge(graphdef, params)
    hidden, cache = llama.forward(model, tokens, positions, cache, valid=valid)
    return llama.logits(model, hidden), cache
  return step


def test_prefill_then_decode_equals_full_forward(tiny):
  """Ragged prefill (row 0 has 5 real tokens of 7) then one token at a time."""
  config, graphdef, params = tiny
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, 256, 12), rng.integers(0, 256, 14)]
  prompt = [5, 7]
  step = _step_fn(graphdef)
  kv = cache_lib.KVCache(cache_lib.empty_level(config.num_layers, 2, 16, config.num_kv_heads,
                                               config.head_dim, jnp.float32))
  tokens = np.zeros((2, 7), np.int32)
  for b in range(2):
    tokens[b, :prompt[b]] = seqs[b][:prompt[b]]
  positions = np.broadcast_to(np.arange(7), (2, 7)).astype(np.int32)
  logits, kv = step(params, tokens, positions, kv, np.asarray(prompt, np.int32))
  np.testing.assert_array_equal(np.asarray(kv.suffix.lengths), prompt)
  full = _full_logits(graphdef, params, seqs)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(logits)[b, :prompt[b]], full[b][:prompt[b]],
                               atol=1e-5)
  pos = np.asarray(prompt)
  for _ in range(6):
    tok = np.asarray([[seqs[b][pos[b]]] for b in range(2)], np.int32)
    logits, kv = step(params, tok, pos[:, None].astype(np.int32), kv, np.ones(2, np.int32))
    for b in range(2):
      np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b][pos[b]], atol=1e-5)
    pos = pos + 1
  np.testing.assert_array_equal(np.asarray(kv.suffix.lengths), pos)


def test_shared_prefix_cache_equals_full_forward(tiny):
  """A prefix stored once as a shared level (owner [0, 0, 1]) + per-sequence suffixes."""
  config, graphdef, params = tiny
  rng = np.random.default_rng(2)
  prefixes = [rng.integers(0, 256, 6), rng.integers(0, 256, 4)]
  suffixes = [rng.integers(0, 256, n) for n in (3, 5, 2)]
  owner = np.array([0, 0, 1])
  seqs = [np.concatenate([prefixes[owner[b]], suffixes[b]]) for b in range(3)]
  step = _step_fn(graphdef)
  # Prefill the prefix nodes as rows of their own (padded to 6).
  node = cache_lib.KVCache(cache_lib.empty_level(config.num_layers, 2, 6, config.num_kv_heads,
                                                 config.head_dim, jnp.float32))
  ptoks = np.zeros((2, 6), np.int32)
  for n, p in enumerate(prefixes):
    ptoks[n, :len(p)] = p
  _, node = step(params, ptoks, np.broadcast_to(np.arange(6), (2, 6)).astype(np.int32), node,
                 np.array([6, 4], np.int32))
  shared = node.suffix
  kv = cache_lib.KVCache(cache_lib.empty_level(config.num_layers, 3, 8, config.num_kv_heads,
                                               config.head_dim, jnp.float32),
                         [shared], [owner])
  stoks = np.zeros((3, 5), np.int32)
  for b, s in enumerate(suffixes):
    stoks[b, :len(s)] = s
  starts = np.array([len(prefixes[o]) for o in owner])
  logits, kv = step(params, stoks, (starts[:, None] + np.arange(5)).astype(np.int32), kv,
                    np.array([len(s) for s in suffixes], np.int32))
  full = _full_logits(graphdef, params, seqs)
  for b in range(3):
    np.testing.assert_allclose(np.asarray(logits)[b, :len(suffixes[b])], full[b][starts[b]:],
                               atol=1e-5)
  assert cache_lib.kv_bytes(kv) == (2 * 2 * 2 * 6 + 2 * 2 * 3 * 8) * 2 * 16 * 4


def test_forward_rejects_bad_inputs(tiny):
  config, graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  kv = cache_lib.KVCache(cache_lib.empty_level(config.num_layers, 1, 4, config.num_kv_heads,
                                               config.head_dim, jnp.float32))
  toks = jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="5 new tokens do not fit"):
    llama.forward(model, toks, toks, kv)
  with pytest.raises(ValueError, match="positions must have the shape"):
    llama.forward(model, toks, toks[:, :2])
  with pytest.raises(ValueError, match="tokens must have shape"):
    llama.forward(model, toks[0], toks[0])
  for unroll in (0, 1.5, False):
    with pytest.raises(ValueError, match=rf"unroll must be a positive int or True \(every "
                       rf"layer\), got {unroll}"):
      llama.forward(model, toks, toks, unroll=unroll)
  with pytest.raises(ValueError, match="reduce must be None or a mesh axis name, got 3"):
    llama.forward(model, toks, toks, reduce=3)
  flat = nnx.merge(graphdef, params)
  flat.layers = llama.Block(config, dtype=jnp.float32, rngs=nnx.Rngs(0))   # one layer, unstacked
  with pytest.raises(ValueError, match=r"L=2 stacked layers.*shape \(64, 2, 4, 16\)"):
    llama.forward(flat, toks, toks)


def test_layers_are_stacked_and_unroll_does_not_change_the_result(tiny):
  config, graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  assert model.layers.attn.qkv.kernel.shape == (config.num_layers, 64, 2, 2 + 2, 16)
  assert model.layers.mlp_norm.weight.shape == (config.num_layers, 64)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (3, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (3, 9))
  run = jax.jit(lambda p, unroll: llama.forward(nnx.merge(graphdef, p), tokens, positions,
                                                unroll=unroll)[0], static_argnums=1)
  want = run(params, 1)
  for unroll in (2, 3, True):
    np.testing.assert_allclose(run(params, unroll), want, rtol=1e-6, atol=1e-6)


def test_qkv_is_hf_q_k_v_fused_and_one_product(tiny):
  """attn.qkv is HF's q, k and v side by side per KV head (`fuse_qkv` / `split_qkv` invert
  each other), and a layer computes q, k and v in one product: its scan body has one
  dot_general a weight (qkv, o, gate, up, down), so XLA has no weights to concatenate."""
  config, graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  qkv = np.asarray(model.layers.attn.qkv.kernel[...])
  q, k, v = llama.split_qkv(qkv)
  l, e, kh, g, d = config.num_layers, 64, 2, 2, 16
  assert q.shape == (l, e, kh * g * d) and k.shape == v.shape == (l, e, kh * d)
  np.testing.assert_array_equal(llama.fuse_qkv(q, k, v, kh), qkv)
  # Query head h = kh_index * G + g reads columns h*D.. of HF's q_proj, KV head h // G.
  np.testing.assert_array_equal(q[..., 3 * d:4 * d], qkv[:, :, 1, 1, :])
  np.testing.assert_array_equal(k[..., d:2 * d], qkv[:, :, 1, g, :])
  np.testing.assert_array_equal(v[..., :d], qkv[:, :, 0, g + 1, :])
  with pytest.raises(ValueError, match=r"K=3"):
    llama.fuse_qkv(q, k, v, 3)
  tokens = jnp.zeros((2, 1), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: llama.forward(nnx.merge(graphdef, p), tokens, tokens,
                                                 skip_attention=True)[0])(params)
  (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
  dots = [eqn for eqn in scan.params["jaxpr"].eqns if eqn.primitive.name == "dot_general"]
  assert len(dots) == 5, [str(eqn.invars[1].aval) for eqn in dots]


def test_rope_scaling_changes_only_low_frequencies():
  base = LlamaConfig.from_preset("llama3-8b", rope_scaling=None)
  plain = llama.rope_frequencies(base)
  scaled = llama.rope_frequencies(LlamaConfig.from_preset("llama3-8b"))
  assert scaled[0] == plain[0]                              # high frequency kept
  np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)   # low frequency / factor
  assert np.all(scaled <= plain)


def test_attention_prepared_once_per_forward(tiny, monkeypatch):
  """The default attend prepares the levels' limits and tables once per forward pass (before
  the layer scan) and every layer's call takes them; an attend without `prepare` (a plain
  callable) gets no `prepared=` and gives the same result."""
  from hydrax import attention as attn_lib
  config, graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(4)
  shared = cache_lib.empty_level(config.num_layers, 2, 6, config.num_kv_heads,
                                 config.head_dim, jnp.float32)
  shared = shared._replace(k=jnp.asarray(rng.standard_normal(shared.k.shape), jnp.float32),
                           v=jnp.asarray(rng.standard_normal(shared.v.shape), jnp.float32),
                           lengths=jnp.array([6, 3], jnp.int32))
  suffix = cache_lib.empty_level(config.num_layers, 3, 8, config.num_kv_heads,
                                 config.head_dim, jnp.float32)
  suffix = suffix._replace(k=jnp.asarray(rng.standard_normal(suffix.k.shape), jnp.float32),
                           v=jnp.asarray(rng.standard_normal(suffix.v.shape), jnp.float32),
                           lengths=jnp.array([2, 0, 5], jnp.int32))
  kv = cache_lib.KVCache(suffix, [shared], [jnp.array([1, 0, 1], jnp.int32)])
  tokens = jnp.asarray(rng.integers(0, 256, (3, 1)), jnp.int32)
  positions = jnp.array([[8], [6], [8]], jnp.int32)
  seen = {"prepare": 0, "calls": []}
  real_prepare, real_attention = attn_lib.prepare, attn_lib.hydragen_attention

  def spy_prepare(*args, **kwargs):
    seen["prepare"] += 1
    return real_prepare(*args, **kwargs)

  def spy_attention(*args, prepared=None, **kwargs):
    seen["calls"].append(prepared)
    return real_attention(*args, prepared=prepared, **kwargs)

  monkeypatch.setattr(attn_lib, "prepare", spy_prepare)
  monkeypatch.setattr(attn_lib, "hydragen_attention", spy_attention)
  hidden, _ = jax.jit(lambda kv: llama.forward(model, tokens, positions, kv))(kv)
  assert seen["prepare"] == 1 and len(seen["calls"]) == 1       # (the scan's body: one trace)
  assert isinstance(seen["calls"][0], attn_lib.Prepared)

  def plain(q, levels, *, backend):
    return attn_lib.hydragen_attention(q, levels, causal_last=True, backend=backend)

  ref, _ = jax.jit(lambda kv: llama.forward(model, tokens, positions, kv, attend=plain))(kv)
  assert seen["prepare"] == 1 and seen["calls"][1] is None
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref), rtol=1e-5, atol=1e-5)
