"""Builds tiny random HuggingFace LlamaForCausalLM checkpoints on disk (CPU torch)."""

import os


def llama3_scaling(original_max_position_embeddings=64):
  return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": original_max_position_embeddings}


def make_hf_llama(directory, *, num_heads=4, num_kv_heads=4, rope_scaling=None, tie=False,
                  vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                  rope_theta=10000.0, seed=0):
  """Writes config.json + model.safetensors of a random tiny Llama; returns the torch model.

  Weights are redrawn with a larger spread than HF's init (and non-unit norm weights) so that
  the logits are far from uniform and a layout mistake would show.
  """
  import torch
  import transformers
  kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie)
  if int(transformers.__version__.split(".")[0]) >= 5:
    kwargs["rope_parameters"] = dict(rope_scaling or {"rope_type": "default"},
                                     rope_theta=rope_theta)
  else:
    kwargs["rope_theta"] = rope_theta
    kwargs["rope_scaling"] = rope_scaling
  config = transformers.LlamaConfig(**kwargs)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return model


def hf_logits(model, tokens):
  """float32 NumPy logits [B,T,V] of the torch model for int tokens [B,T]."""
  import numpy as np
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long))
  return out.logits.float().numpy()
