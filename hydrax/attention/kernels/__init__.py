"""Attention kernels behind the backend registry.

pallas_gpu: grouped flash attention in Pallas (Triton lowering on GPUs, interpret mode
elsewhere), registered lazily as backend "pallas" (imported only when asked for by name, or by
backend="auto" on a GPU). grouping: the row layout (rows sorted by node, cut in tiles) it runs on.
"""
