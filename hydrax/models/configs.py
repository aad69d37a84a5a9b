"""Llama-family model configurations and the named presets.

Sizes are the published architectures' (HuggingFace `config.json` of each checkpoint). Axis
letters: L layers, H query heads, K KV heads, D head dim, E hidden size, F MLP size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 ("llama3" rope type) frequency scaling of the rotary embedding.

  Wavelengths above original_max_position_embeddings / low_freq_factor are divided by
  `factor`, those below original_max_position_embeddings / high_freq_factor are kept, and the
  band between is interpolated smoothly.
  """
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
          f"low_freq_factor ({self.low_freq_factor})")
    if self.original_max_position_embeddings <= 0:
      raise ValueError("rope_scaling.original_max_position_embeddings must be > 0, got "
                       f"{self.original_max_position_embeddings}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU).

  head_dim defaults to hidden_size // num_heads. tie_word_embeddings: the output head reuses the
  token embedding [V,E] (no separate lm_head). eos_token_id / bos_token_id are informational
  defaults for generation (generate takes its own eos id).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = 1
  eos_token_id: Optional[int] = 2
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{field} must be a positive int, got {value!r}")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads="
                         f"{self.num_heads}; give head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be a positive even int (rotate-half RoPE), "
                       f"got {self.head_dim!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                       f"{self.num_kv_heads}")
    if self.rope_theta <= 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
    if self.rms_norm_eps <= 0:
      raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"LlamaConfig.rope_scaling must be a RopeScaling or None, got "
                       f"{type(self.rope_scaling).__name__}")

  @property
  def num_groups(self) -> int:
    """G = H / K query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "LlamaConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"LlamaConfig.from_dict: unknown fields {unknown}; known: {sorted(known)}")
    data = dict(data)
    if data.get("rope_scaling") is not None:
      data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return cls(**data)

  @classmethod
  def from_json(cls, text: str) -> "LlamaConfig":
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
    """The named preset (see `PRESETS`), with optional field overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def num_params(config: LlamaConfig) -> int:
  """Number of parameters of the model described by `config` (embeddings and head included)."""
  e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  h, k, d = config.num_heads, config.num_kv_heads, config.head_dim
  attention = e * h * d + 2 * e * k * d + h * d * e
  mlp = 3 * e * f
  per_layer = attention + mlp + 2 * e
  head = 0 if config.tie_word_embeddings else v * e
  return v * e + config.num_layers * per_layer + e + head


_LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    # Tests and CPU demos: GQA (4 query heads, 2 KV heads), D = 16.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                        max_position_embeddings=2048, rms_norm_eps=1e-5, name="tiny"),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, name="llama2-7b"),
    # codellama/CodeLlama-{7,13,34}b-hf (the paper's end-to-end models)
    "codellama-7b": LlamaConfig(vocab_size=32016, hidden_size=4096, intermediate_size=11008,
                                num_layers=32, num_heads=32, num_kv_heads=32,
                                rope_theta=1000000.0, max_position_embeddings=16384,
                                rms_norm_eps=1e-5, name="codellama-7b"),
    "codellama-13b": LlamaConfig(vocab_size=32016, hidden_size=5120, intermediate_size=13824,
                                 num_layers=40, num_heads=40, num_kv_heads=40,
                                 rope_theta=1000000.0, max_position_embeddings=16384,
                                 rms_norm_eps=1e-5, name="codellama-13b"),
    "codellama-34b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                                 num_layers=48, num_heads=64, num_kv_heads=8,
                                 rope_theta=1000000.0, max_position_embeddings=16384,
                                 rms_norm_eps=1e-5, name="codellama-34b"),
    # meta-llama/Llama-3.1-8B: GQA 32/8, Llama-3 rope scaling, 128K context.
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                             rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                             rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                             name="llama3-8b"),
    # 01-ai/Yi-6B-200K (the paper's long-document model): GQA 32/4. The 4K base model Yi-6B
    # has the same shapes with rope_theta 5e6 and 4096 positions.
    "yi-6b": LlamaConfig(vocab_size=64000, hidden_size=4096, intermediate_size=11008,
                         num_layers=32, num_heads=32, num_kv_heads=4, rope_theta=10000000.0,
                         max_position_embeddings=262144, rms_norm_eps=1e-5, name="yi-6b"),
}
