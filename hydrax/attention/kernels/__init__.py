"""Attention kernels behind the backend registry.

pallas_gpu: grouped flash attention in Pallas (Triton lowering on GPUs, interpret mode
elsewhere), registered lazily as backend "pallas" (imported only when asked for by name, or by
backend="auto" on a GPU). mosaic_gpu: the Mosaic GPU (Hopper) kernel that pallas_gpu uses for
stacked shared levels. path_gpu: the one-launch small-shape path that pallas_gpu's cost rule
picks when sharing saves little. flash: the online-softmax step, finish and split merge both
share. grouping: the row layout (rows sorted by node, cut in tiles)
the grouped kernels run on. pallas_tpu, fused_triton (+ fused_triton_kernel, fused_worklist):
the TPU kernels and the fused native-Triton decode kernel, registered lazily too.
"""
