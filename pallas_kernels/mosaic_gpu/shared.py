"""What the Mosaic GPU kernels share: the shared-memory layout WGMMA reads, the flat GEMM's
transposed product over a TMA pipeline (float weights, and int8 / int4 weights dequantized in
the K loop), and how a kernel is asked to run in Mosaic GPU's interpret mode."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.quantized import GROUP, unpack_int4

QUANT_STEP = GROUP // 2  # stored rows a quantized step reads: 64 (int8: 64 K rows; int4: a group)
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


def quantized_product(x_parts, v_gmem, scales, out, o_smem, w_smem, s_smem, s_bar, *, rows,
                      block_n, steps, stages, group_steps, x_block, v_block):
  """transposed_product for an int8 / int4 weight read as its stored bytes
  (pallas_kernels/common/quantized.py's format): out^T [block_n, rows] = sum over `steps` steps
  of QUANT_STEP stored rows. Each step turns its integers into x's dtype (exact: |q| <= 127) in
  w_smem [parts, QUANT_STEP, block_n], multiplies each part against its x part by WGMMA, and
  adds the float32 product times the step's scale row: row j // group_steps of `scales` (a
  global-memory ref of the [G, block_n] scale rows the steps use, copied to s_smem once ahead
  of the pipeline; int8's one row, int4's one per group = step). An int4 byte holds K rows 2r
  (low nibble) and 2r + 1 (high): two parts, against x's even and odd columns (x_parts: one
  [1, M, K'] ref per part), so no nibbles are interleaved. x_block(j) / v_block(j): step j's
  block indices into an x part / v_gmem."""
  parts, dtype = len(x_parts), x_parts[0].dtype
  plgpu.copy_gmem_to_smem(scales, s_smem, s_bar)
  plgpu.barrier_wait(s_bar)

  def step(idx, *refs):
    *x_smem, v_smem, acc = refs
    q = v_smem[...]
    ints = (q,) if parts == 1 else unpack_int4(q)
    for p in range(parts):
      w_smem[p] = ints[p].astype(dtype)  # exact: |q| <= 127
    plgpu.commit_smem()  # the MMA reads them through the async proxy

    def product(tile_ref):  # w^T [block_n, QUANT_STEP] @ x_p^T [QUANT_STEP, rows], summed
      for p in range(parts):
        plgpu.wgmma(tile_ref, w_smem.at[p].T, x_smem[p].T)
      return tile_ref[...]

    tile = pl.run_scoped(product, plgpu.ACC((block_n, rows), jnp.float32))
    scale = plgpu.load(s_smem.at[idx[0] // group_steps], layout=plgpu.Layout.WGMMA.reduce(1))
    return acc + tile * jax.lax.broadcast_in_dim(scale.astype(jnp.float32), tile.shape, [0])

  x_spec = plgpu.BlockSpec((None, rows, QUANT_STEP), x_block,
                           transforms=transforms(QUANT_STEP, dtype))
  acc = plgpu.emit_pipeline(
      step, grid=(steps,), max_concurrent_steps=stages,
      in_specs=[*[x_spec] * parts, plgpu.BlockSpec((QUANT_STEP, block_n), v_block)],
      init_carry=plgpu.layout_cast(jnp.zeros((block_n, rows), jnp.float32),
                                   plgpu.Layout.WGMMA),
  )(*x_parts, v_gmem)
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, out)
  plgpu.wait_smem_to_gmem(0)


def quantized_scratch(parts: int, rows: int, block_n: int, scale_rows: int, dtype) -> list:
  """quantized_product's scratch: o_smem, w_smem, s_smem, s_bar."""
  return [plgpu.SMEM((block_n, rows), jnp.float32),
          plgpu.SMEM((parts, QUANT_STEP, block_n), dtype, transforms=transforms(block_n, dtype)),
          plgpu.SMEM((scale_rows, block_n), dtype),
          plgpu.Barrier()]


def quantized_parts(x, bits: int):
  """x [M, K] as quantized_product's parts [P, M, K']: itself (int8), or its even and odd
  columns (int4: a byte's low and high nibbles)."""
  return x[None] if bits == 8 else jnp.stack([x[:, 0::2], x[:, 1::2]])
