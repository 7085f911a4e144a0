"""Mosaic GPU kernels (`jax.experimental.pallas.mosaic_gpu`), the Pallas GPU backend JAX
keeps, written for Hopper (sm_90a): operands brought into shared memory by TMA copies in a
multi-stage pipeline (`plgpu.emit_pipeline`), multiplied by warpgroup MMA (WGMMA). They run on
a CPU in Mosaic GPU's interpret mode, with its race detector."""
