"""Attention kernels behind the backend registry.

pallas_gpu: grouped flash attention in Pallas (Triton lowering on GPUs, interpret mode
elsewhere), registered lazily as backend "pallas" (imported only when asked for by name, or by
backend="auto" on a GPU). mosaic_gpu: the Mosaic GPU (Hopper) kernel that pallas_gpu uses for
stacked shared levels. grouping: the row layout (rows sorted by node, cut in tiles) they run on.
"""
