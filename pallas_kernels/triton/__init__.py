"""Pallas Triton kernels for CUDA GPUs (deprecated by JAX since 0.11; Mosaic GPU takes over):
the async-softmax decode, prefill and CoPE attention, the GEMV, the flat GEMM and their
int8 / int4 versions, and what they share about the GPU (shared)."""
