"""Mosaic TPU kernels: the same FlashDecoding++ math as the Triton kernels (triton/),
with blocks shaped for the TPU's (8, 128) vector tiles and its MXU, and operands streamed
through VMEM by the pipeline Pallas TPU gives (a double buffer per blocked operand)."""
