"""What the Mosaic GPU kernels share: the shared-memory layout WGMMA reads, the flat GEMM's
transposed product over a TMA pipeline, and how a kernel is asked to run in Mosaic GPU's
interpret mode."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

H100_SMS = 132  # programs to aim for: two per SM (the Triton kernels' rule)


def transforms(minor: int, dtype):
  """The layout a TMA copy writes a block in so WGMMA can read it: 8-row tiles of the widest
  swizzle the minor dimension fills (128 bytes from 64 bfloat16 on, 32 bytes at 16)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def interpret_kwargs(interpret) -> dict:
  """plgpu.kernel's keyword for `interpret`: False runs the compiled kernel; True (or a
  plgpu.InterpretGPUParams, e.g. with detect_races) Mosaic GPU's interpreter on the CPU."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return dict(interpret=interpret)
  return dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}


def transposed_product(x_gmem, w_gmem, o_smem, out, *, rows, block_n, block_k, k_steps, stages,
                       x_block, w_block):
  """The flat GEMM's step: out^T [block_n, rows] = sum over k_steps K blocks of w^T [block_n,
  block_k] @ x^T [block_k, rows] by WGMMA (the weight fills its 64 rows, x's few rows are the
  narrow side), both blocks copied in their own layout by a `stages`-deep TMA pipeline;
  x_block(j) / w_block(j) give step j's block indices into x_gmem / w_gmem. The float32
  result goes through o_smem [block_n, rows] to `out` (a global-memory ref)."""
  def compute(acc_ref):
    def step(_, x_smem, w_smem):
      plgpu.wgmma(acc_ref, w_smem.T, x_smem.T)
      plgpu.wgmma_wait(0)

    plgpu.emit_pipeline(
        step, grid=(k_steps,), max_concurrent_steps=stages,
        in_specs=[plgpu.BlockSpec((rows, block_k), x_block,
                                  transforms=transforms(block_k, x_gmem.dtype)),
                  plgpu.BlockSpec((block_k, block_n), w_block,
                                  transforms=transforms(block_n, w_gmem.dtype))],
    )(x_gmem, w_gmem)
    return acc_ref[...]

  o_smem[...] = pl.run_scoped(compute, plgpu.ACC((block_n, rows), jnp.float32))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, out)
  plgpu.wait_smem_to_gmem(0)
