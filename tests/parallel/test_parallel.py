"""hydrax.parallel on 8 simulated CPU devices: mesh, rules, node placement, sharded attention
equal to unsharded, sharded forward and greedy generation equal to single-device, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrax import engine, parallel, sharing
from hydrax.attention import KVLevel, hydragen_attention
from hydrax.models import LlamaConfig, llama

MESHES = [(1, 8), (2, 4), (8, 1)]

# 8 KV heads so that every model axis size of MESHES divides them.
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=16, num_kv_heads=8, head_dim=8, name="tp-test")


@pytest.fixture(scope="module")
def net():
  return llama.init(CONFIG, seed=1)


def _prompts():
  """8 prompts under two root prefixes: A (rows 0-2; prompt 0 is A itself, so its suffix is
  empty) and B (rows 3-7). In plan order node B spans both data shards of a (2, 4) mesh."""
  rng = np.random.default_rng(0)
  a, b = rng.integers(3, 256, 20), rng.integers(3, 256, 26)
  out = [a.copy()]
  out += [np.concatenate([a, rng.integers(3, 256, 2 + i)]) for i in range(2)]
  out += [np.concatenate([b, rng.integers(3, 256, 1 + i)]) for i in range(5)]
  return [p.astype(np.int32) for p in out]


@pytest.fixture(scope="module")
def plan():
  return sharing.plan(_prompts(), min_shared_tokens=0, merge_cost=0)


@pytest.fixture(scope="module")
def reference(net, plan):
  return engine.generate(net, None, plan, max_new_tokens=4)


# ----------------------------------------------------------------------------- mesh and rules


def test_make_mesh_specs():
  for spec, shape in [((1, 8), (1, 8)), ("2x4", (2, 4)), ({"data": 8}, (8, 1)),
                      ((-1, 2), (4, 2)), ({"model": 4}, (2, 4))]:
    mesh = parallel.make_mesh(spec)
    assert parallel.axis_sizes(mesh) == shape
    assert tuple(mesh.axis_names) == ("data", "model")
  assert parallel.make_mesh(mesh) is mesh
  assert parallel.axis_sizes(parallel.make_mesh()) == (1, 8)      # one process: all on model
  for bad in [(3, 3), (0, 8), (2, 2, 2), "axb", {"pipe": 8}, (-1, -1)]:
    with pytest.raises(ValueError):
      parallel.make_mesh(bad)


def test_param_specs_and_placement(net):
  mesh = parallel.make_mesh((2, 4))
  _, params = nnx.split(net)
  specs = nnx.to_pure_dict(parallel.param_specs(params, CONFIG, mesh))
  layer = specs["layers"]                                        # stacked [L, ...]
  assert layer["attn"]["qkv"]["kernel"] == P(None, None, "model", None, None)
  assert layer["attn"]["o"]["kernel"] == P(None, "model", None)
  assert layer["mlp"]["up"]["kernel"] == P(None, None, "model")
  assert layer["mlp"]["down"]["kernel"] == P(None, "model", None)
  assert layer["attn_norm"]["weight"] == P()
  assert specs["embed"]["embedding"] == P()
  assert specs["lm_head"]["kernel"] == P(None, "model")          # 256 % 4 == 0
  placed = nnx.to_pure_dict(parallel.shard_params(params, CONFIG, mesh))
  qkv = placed["layers"]["attn"]["qkv"]["kernel"]
  g = CONFIG.num_heads // CONFIG.num_kv_heads
  # K/M = 2 KV heads a shard, each with its G query heads, key and value.
  assert {s.data.shape for s in qkv.addressable_shards} == {(2, 64, 2, g + 2, 8)}
  odd = CONFIG.replace(vocab_size=250)
  assert not parallel.vocab_sharded(odd, mesh)


def test_init_creates_sharded_params_equal_to_llama_init():
  mesh = parallel.make_mesh((2, 4))
  config = CONFIG.replace(num_layers=1)
  got = nnx.state(parallel.init(config, mesh, seed=5))
  want = nnx.state(llama.init(config, seed=5))
  # The same random stream: equal to float32 rounding. (The sharded and the single-device
  # programs are compiled apart; XLA's CPU elemental emitters, which the tests select in
  # conftest.py, may then round the truncated normal's transcendental functions 1 ulp apart
  # in a few elements. A wrong key or stream would differ everywhere.)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=4e-7, atol=0)
  qkv = nnx.to_pure_dict(got)["layers"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "model", None, None)),
                                       5)


def test_head_count_not_divisible_is_a_clear_error():
  tiny = LlamaConfig.from_preset("tiny")                # 4 query heads, 2 KV heads
  model = llama.init(tiny)
  for shape in [(1, 8), (2, 4)]:
    mesh = parallel.make_mesh(shape)
    with pytest.raises(ValueError, match=rf"num_kv_heads=2 \(num_heads=4\).*model axis of "
                       rf"size {shape[1]}"):
      parallel.check_model(tiny, mesh)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
      parallel.generate(model, None, [[5, 6, 7]] * 8, mesh=mesh, max_new_tokens=2)
  parallel.check_model(tiny, parallel.make_mesh((4, 2)))  # 2 divides 2: fine


def test_place_nodes_policy():
  owner = np.array([0, 0, 0, 1, 1, 1, 1, 2])
  place = parallel.place_nodes(owner, 2)
  np.testing.assert_array_equal(place.nodes, [[0, 1], [1, 2]])   # node 1 on both shards
  np.testing.assert_array_equal(place.owner, [[0, 0, 0, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(place.count, [2, 2])
  assert place.replication == 4 / 3
  place = parallel.place_nodes(np.zeros(8, int), 8)                  # a root on all 8 shards
  assert place.replication == 8 and place.nodes.shape == (8, 1)
  with pytest.raises(ValueError, match="split evenly"):
    parallel.place_nodes(owner, 3)


def test_layout_over_data_places_sharers(plan):
  seqs = [np.asarray(s) for s in plan.sequences]
  lay = engine.layout(plan, seqs, data=2, max_new_tokens=4)
  assert len(lay.levels) == 1 and lay.levels[0].rows == 2
  assert lay.replication == (1.5,)        # node B (rows 3-7) is stored on both shards
  # Owners are per-shard local node indices, runtime data sharded over data (no per-shard
  # program). Plan order puts B's 5 rows first: shard 0 holds B (and an unused slot), shard 1
  # holds B (row 4) and A (rows 5-7).
  np.testing.assert_array_equal(lay.seq_owner[0], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(lay.main.anc[0], lay.seq_owner[0])
  np.testing.assert_array_equal(lay.levels[0].lengths, [26, 0, 26, 20])
  np.testing.assert_array_equal(lay.plan_row, [[0, 1, 2, 3], [4, 5, 6, 7]])
  uneven = engine.layout(plan, seqs, data=3, max_new_tokens=4)       # 3 + 3 + 2 rows
  np.testing.assert_array_equal(uneven.real.sum(axis=1), [3, 3, 2])
  assert uneven.plan_row[2, 2] == uneven.plan_row[2, 1]              # a repeated row
  assert lay.signature() != uneven.signature()


# ----------------------------------------------------------------------------- attention


def _levels(rng, b, t, k, d, dtype=jnp.float32):
  """Root (1 node), a middle level (3 nodes, node 1 shared by rows 3-6), per-row suffixes."""
  def kv(n, s):
    return (jnp.asarray(rng.normal(size=(n, s, k, d)), dtype),
            jnp.asarray(rng.normal(size=(n, s, k, d)), dtype))
  root, mid, suf = kv(1, 12), kv(3, 9), kv(b, 6)
  return [KVLevel(*root, jnp.array([11], jnp.int32), np.zeros(b, np.int32)),
          KVLevel(*mid, jnp.array([9, 4, 0], jnp.int32),
                  np.array([0, 0, 0, 1, 1, 1, 1, 2], np.int32)),
          KVLevel(*suf, jnp.asarray(rng.integers(t, 7, size=b), jnp.int32), None)]


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_attention_equals_unsharded(shape):
  rng = np.random.default_rng(sum(shape))
  b, t, h, k, d = 8, 2, 16, 8, 8
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  levels = _levels(rng, b, t, k, d)
  mesh = parallel.make_mesh(shape)
  owners = [lvl.owner for lvl in levels]            # static: closed over, not traced

  def with_owners(levels):
    return [lvl._replace(owner=o) for lvl, o in zip(levels, owners)]

  arrays = [lvl._replace(owner=None) for lvl in levels]
  out, lse = jax.jit(lambda q, lv: parallel.hydragen_attention(
      q, with_owners(lv), mesh=mesh, backend="xla"))(q, arrays)
  want_out, want_lse = jax.jit(lambda q, lv: hydragen_attention(
      q, with_owners(lv), backend="xla"))(q, arrays)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, parallel.QUERY_SPEC), 4)


def test_sharded_attention_errors():
  rng = np.random.default_rng(0)
  q = jnp.zeros((8, 1, 16, 8))
  levels = _levels(rng, 8, 1, 8, 8)
  with pytest.raises(ValueError, match="data axis of size 3"):
    parallel.hydragen_attention(jnp.zeros((8, 1, 12, 8)), [KVLevel(
        jnp.zeros((8, 4, 6, 8)), jnp.zeros((8, 4, 6, 8)), jnp.full((8,), 4), None)],
        mesh=parallel.make_mesh((3, 2), devices=jax.devices()[:6]))
  with pytest.raises(ValueError, match="KV heads"):
    parallel.hydragen_attention(q, [KVLevel(jnp.zeros((8, 4, 2, 8)), jnp.zeros((8, 4, 2, 8)),
                                            jnp.full((8,), 4), None)],
                                mesh=parallel.make_mesh((2, 4)))
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda o: parallel.hydragen_attention(
        q, [levels[0]._replace(owner=o)] + levels[2:], mesh=parallel.make_mesh((2, 4)))
    )(jnp.zeros(8, jnp.int32))


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("shape,vocab", [((2, 4), 256), ((1, 8), 250)])
def test_sharded_forward_equals_unsharded(shape, vocab):
  config = CONFIG.replace(vocab_size=vocab, num_layers=1)   # 250: head replicated over model
  model = llama.init(config, seed=2)
  tokens = np.random.default_rng(3).integers(0, vocab, size=(4, 7)).astype(np.int32)
  got = parallel.apply(model, None, tokens, mesh=parallel.make_mesh(shape))
  want = llama.apply(*nnx.split(model), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# One xdist worker for the tests of `reference`, and one for the two meshes of the hand plan
# (their single-device run compiles once).
@pytest.mark.xdist_group("test_parallel.reference")
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_greedy_generation_equals_single_device(net, plan, reference, shape):
  # (2, 4): prefill in chunks of 16 query tokens per device (a scan over chunks).
  chunk = 16 if shape == (2, 4) else 2048
  got = parallel.generate(net, None, plan, mesh=parallel.make_mesh(shape), max_new_tokens=4,
                          prefill_chunk=chunk)
  np.testing.assert_array_equal(got.tokens, reference.tokens)
  np.testing.assert_array_equal(got.lengths, reference.lengths)
  assert got.decode_steps == reference.decode_steps
  if shape[0] > 1:          # shared nodes spanning data shards are stored once per shard
    assert got.kv_bytes > reference.kv_bytes
  assert got.kv_bytes == engine.estimate_kv_bytes(CONFIG, plan, max_new_tokens=4, mesh=shape,
                                                  prefill_chunk=chunk, dtype=jnp.float32)


@pytest.mark.xdist_group("test_parallel.reference")
def test_sharded_decode_with_steps_between_checks(net, plan, reference):
  """Two decode steps an iteration of the loop (`Runtime.check_every`) on a (2, 4) mesh: the
  single-device tokens; the "all done?" psum once an iteration, so one step past the end."""
  runtime = engine.Runtime.build(mesh=(2, 4), check_every=2)
  got = engine.generate(net, None, plan, runtime=runtime, max_new_tokens=4)
  np.testing.assert_array_equal(got.tokens, reference.tokens)
  np.testing.assert_array_equal(got.lengths, reference.lengths)
  assert reference.decode_steps == 3 and got.decode_steps == 4


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["replicated", "none"])
def test_sharded_baselines_and_uneven_batch(net, attention):
  prompts = _prompts()[:7]                           # 7 rows over 2 data shards: 4 + 3
  options = dict(min_shared_tokens=0, merge_cost=0)   # shared nodes copied per row (replicated)
  want = engine.generate(net, None, prompts, max_new_tokens=3, attention=attention,
                         sharing_options=options)
  got = parallel.generate(net, None, prompts, mesh=parallel.make_mesh((2, 4)), max_new_tokens=3,
                          attention=attention, sharing_options=options)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  assert got.kv_bytes >= want.kv_bytes


def test_sharded_sampling_and_eos(net):
  mesh = parallel.make_mesh((2, 4))
  prompts = _prompts()
  run = dict(mesh=mesh, max_new_tokens=5, attention="none", temperature=0.9,
             top_k=50, seed=3, logprobs=True)
  first = parallel.generate(net, prompts, **run)       # generate(module, prompts) shorthand
  assert first.tokens.shape == (8, 5) and first.tokens.min() >= 0 and first.tokens.max() < 256
  np.testing.assert_array_equal(first.lengths, 5)
  # Each row draws from its own keys: the single-device tokens.
  one = engine.generate(net, prompts, **{k: v for k, v in run.items() if k != "mesh"})
  np.testing.assert_array_equal(first.tokens, one.tokens)
  np.testing.assert_allclose(first.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)
  eos = int(first.tokens[4, 1])                     # row 4 stops after 2 tokens
  again = parallel.generate(net, None, prompts, eos_id=eos, pad_id=0, **run)
  assert again.compile_seconds == 0                 # same shapes: executables reused
  assert again.lengths[4] <= 2 and again.tokens[4, again.lengths[4]:].max(initial=0) == 0
  np.testing.assert_array_equal(again.tokens[:, 0], first.tokens[:, 0])
  # top_p's cutoff searched on the mesh (`Runtime.nucleus`), sorted on one device.
  nucleus = dict(max_new_tokens=5, attention="none", temperature=0.9, top_p=0.9, seed=3)
  searched = engine.generate(net, prompts, runtime=engine.Runtime.build(
      "auto", (2, 4), nucleus="search"), **nucleus)
  np.testing.assert_array_equal(searched.tokens, engine.generate(net, prompts, **nucleus).tokens)


def test_score_on_a_mesh_equals_single_device(net, plan):
  """Forced tokens and their log-probabilities (`engine.score`) sharded with the rows."""
  rng = np.random.default_rng(1)
  conts = [rng.integers(3, 256, 1 + b % 3).tolist() for b in range(8)]
  one = engine.score(net, None, plan, conts)
  got = engine.score(net, None, plan, conts, mesh=(2, 4))
  np.testing.assert_allclose(got.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.greedy, one.greedy)
  np.testing.assert_array_equal(got.generation.drawn, one.generation.drawn)
  # Taken in the prefill on the mesh (each data shard's suffixes with their forced tokens).
  pre = engine.score(net, None, plan, conts, mesh=(2, 4), method="prefill")
  assert pre.generation.decode_steps == 0
  np.testing.assert_allclose(pre.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pre.generation.drawn, one.generation.drawn)


def test_mesh_decode_collectives_and_cache_sharding(net, plan):
  """One loop on a (2, 4) mesh: the decode step holds two all-reduces of [B_l,1,E] per layer
  (attention output, MLP down), one (max, argmax) gather per row for greedy sampling over the
  vocab-sharded head, and the scalar "all done?" psum over data; caches stay split over
  (data, model) and are never all-gathered."""
  engine.clear_compiled_cache()
  engine.generate(net, None, plan, mesh=(2, 4), max_new_tokens=3)
  _, decode = list(engine._EXECUTABLES.items.values())[-1]
  text = decode.as_text()
  reduces = re.findall(r"= f32\[(\d+),1,64\][^ ]* all-reduce\(", text)
  # The layers run under lax.scan: the one compiled layer body holds both all-reduces.
  assert len(reduces) == 2 and set(reduces) == {"4"}                          # B_l = 8 / 2
  assert len(re.findall(r"= s32\[\] all-reduce\(", text)) >= 1              # all done?
  gathers = re.findall(r"= [fs]32\[([\d,]+)\][^ ]* all-gather\(", text)
  assert sorted(gathers) == ["4,4", "4,4"]                                    # (max, argmax)
  suffix = decode.input_shardings[0][2]
  assert suffix.k.spec == P(None, "data", None, "model")


def test_one_model_for_one_or_many_devices():
  """The sharded step is llama.forward (no second copy of the layers), its hooks are
  hashable values, and step does not import generate (no import cycle)."""
  import ast
  import inspect

  from hydrax.parallel import step
  tree = ast.parse(inspect.getsource(step))
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert "hydrax.parallel.generate" not in imported
  assert not any(isinstance(n, ast.FunctionDef) and n.name in ("_attention_layer", "_mlp")
                 for n in ast.walk(tree))
  owners = [np.array([0, 0, 1, 1], np.int32)]
  one = step.TableAttention(step.OwnerTable.build([owners, [np.array([0, 1, 1, 1])]]))
  same = step.TableAttention(step.OwnerTable.build([owners, [np.array([0, 1, 1, 1])]]))
  other = step.TableAttention(step.OwnerTable.build([owners, owners]))
  assert one == same and hash(one) == hash(same) and one != other


@pytest.mark.xdist_group("test_parallel.hand_plan")
@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_three_level_tree_on_a_mesh_equals_single_device(net, shape):
  """The hand-built 3-level tree (a prompt ending inside a shared node, empty nodes, a
  permuted row order): per-shard ancestor tables and last-token sources are runtime data;
  (4, 2) cuts 6 rows into 2 + 2 + 1 + 1 with repeated rows."""
  from tests.test_engine import _hand_plan
  plan = _hand_plan()
  want = engine.generate(net, None, plan, max_new_tokens=3)
  got = engine.generate(net, None, plan, mesh=shape, max_new_tokens=3)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert got.signature.data == shape[0] and len(got.signature.levels) == 3


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_packed_prefill_on_a_mesh_equals_padded(net, plan, shape):
  """Prepacking on a mesh: each data shard packs its own sequences (their caches live on it;
  packing across shards would move keys between devices), segment ids are shard-local rows.
  Ragged suffixes (one empty), a node spanning two shards: greedy tokens equal the
  single-device padded prefill's."""
  want = engine.generate(net, None, plan, max_new_tokens=3, prefill="padded")
  got = engine.generate(net, None, plan, mesh=shape, max_new_tokens=3, prefill="packed")
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  seqs = [np.asarray(s) for s in plan.sequences]
  lay = engine.layout(plan, seqs, data=shape[0], max_new_tokens=3, prefill="packed")
  per_shard = lay.main.segments.reshape(shape[0], -1, lay.main.segments.shape[1])
  rows = lay.plan_row.shape[1]
  for s in range(shape[0]):        # every shard holds its own rows' suffix tokens, once each
    ids, counts = np.unique(per_shard[s][per_shard[s] >= 0], return_counts=True)
    lengths = np.asarray(plan.suffix_lengths)[lay.plan_row[s]]
    np.testing.assert_array_equal(counts, lengths[ids])
    assert ids.max(initial=0) < rows
  assert got.prefill_slots == lay.main.slots < lay.padded_slots
  auto = engine.generate(net, None, plan, mesh=shape, max_new_tokens=3)
  assert auto.prefill == "packed" and auto.compile_seconds == 0.0     # the same signature


@pytest.mark.slow
def test_kept_levels_on_a_mesh_are_reused_per_shard(net, reference):
  # The hand prompts on a (2, 4) mesh: node B spans both data shards, so each shard keeps its
  # own copy; a second call of the same prompts takes every node from its own shard.
  mesh = parallel.make_mesh((2, 4))
  options = dict(min_shared_tokens=0, merge_cost=0)
  first = parallel.generate(net, None, _prompts(), mesh=mesh, max_new_tokens=4, keep=True,
                            sharing_options=options)
  again = parallel.generate(net, None, _prompts(), mesh=mesh, max_new_tokens=4,
                            reuse=first.kept, sharing_options=options)
  assert first.kept.data == 2 and again.reused_tokens > 0
  assert all(spec[0] == 0 for spec in again.signature.levels)   # nothing prefilled again
  for got in (first, again):
    np.testing.assert_array_equal(got.tokens, reference.tokens)
    np.testing.assert_array_equal(got.lengths, reference.lengths)
