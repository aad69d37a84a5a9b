"""hydrax: exact shared-prefix (Hydragen) attention and LLM inference in JAX.

Subpackages are imported lazily by the user (`import hydrax.sharing`, ...); importing
`hydrax` itself only pulls in the attention core, never jax_triton or a GPU runtime.
"""

from hydrax import attention

__version__ = "0.1.0"
__all__ = ["attention", "__version__"]
