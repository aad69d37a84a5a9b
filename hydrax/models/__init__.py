"""Model definitions: Llama-family decoders (NNX parameter modules + a pure forward pass).

  LlamaConfig, RopeScaling, PRESETS, num_params      (hydrax.models.configs)
  Llama, init, abstract, forward, logits, apply      (hydrax.models.llama)
"""

from hydrax.models import llama
from hydrax.models.configs import PRESETS, LlamaConfig, RopeScaling, num_params
from hydrax.models.llama import Llama, abstract, apply, forward, init, logits

__all__ = ["llama", "LlamaConfig", "RopeScaling", "PRESETS", "num_params", "Llama", "init",
           "abstract", "forward", "logits", "apply"]
