"""Measure functions for the paper-reproduction configs (experiments/configs/reproduce_*.gin).

`scoped_point(scope=..., **generation_point arguments)` is `points.generation_point` run inside
the gin scope `scope`: a sweep point can then vary a binding that is not an argument of
`generation_point` (the samples per problem of `hierarchy_prompts`), with the values written
in the config as `spp64/hierarchy_prompts.samples_per_problem = 64` and recorded in config.gin.
"""

from __future__ import annotations

import inspect

import gin

from experiments import points


def scoped_point(*, scope: str, **kwargs) -> dict:
  """generation_point(**kwargs) with the gin scope `scope` active (a scope with no binding in
  the config is a ValueError: a misspelt scope would silently measure the unscoped values)."""
  if not isinstance(scope, str) or not scope:
    raise ValueError(f"scoped_point: scope must be a non-empty string, got {scope!r}")
  if f"{scope}/" not in gin.config_str():
    raise ValueError(f"scoped_point: scope={scope!r} has no binding in the config (write e.g. "
                     f"'{scope}/hierarchy_prompts.samples_per_problem = 8')")
  with gin.config_scope(scope):
    return points.generation_point(**kwargs)


# The runner checks every grid key against the measure's signature: advertise generation_point's
# keyword arguments plus `scope`, so a misspelt key is still a config error before any point runs.
_base = inspect.signature(points.generation_point)
scoped_point.__signature__ = _base.replace(parameters=[
    *_base.parameters.values(),
    inspect.Parameter("scope", inspect.Parameter.KEYWORD_ONLY, annotation=str)])
scoped_point = gin.configurable(scoped_point)


# Gin bindings that shrink every reproduce_*.gin to the `tiny` model on CPU (seconds per
# point): used by tests/experiments/test_reproduce.py and by `REPRODUCE_TINY=1
# experiments/reproduce_h200.sh` (the script's smoke test). Batch sizes and the point lists
# stay as configured; only the model, lengths and memory limits change.
TINY_BINDINGS = (
    'H_MODEL = "tiny"', 'H_DTYPE = "float32"', "H_INSTRUCTIONS = 48", "H_PROBLEM = 32",
    "H_NEW = 3",
    'D_MODEL = "tiny"', 'D_DTYPE = "float32"', "D_DOCUMENT = 64", "D_QUESTION = 4", "D_NEW = 2",
    'T13_MODEL = "tiny"', 'T13_DTYPE = "float32"', "T13_LONG = 96", "T13_SHORT = 32",
    "T13_SUFFIX = 4", "T13_NEW = 3",
    'T8_MODEL = "tiny"', 'T8_DTYPE = "float32"', "T8_LONG = 96", "T8_SHORT = 32",
    "T8_SUFFIX = 4", "T8_NEW = 3",
    # The tiny prompts are far below the default 1024-token sharing threshold.
    "generation_point.min_shared_tokens = 0",
)
