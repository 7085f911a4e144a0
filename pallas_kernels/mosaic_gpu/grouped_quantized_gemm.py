"""The grouped GEMM over int8 / int4 experts on Mosaic GPU: a mixture of experts' tiles, each
multiplied by its own expert's quantized weight, read as its stored bytes and dequantized in
the K loop.

x [T, R, K] (tile t's rows), experts [T] int32 (tile t's expert; negative: an empty tile,
nothing read, its output left to the caller to drop), values [E, K', N] and scales [E, ...]
(each expert in pallas_kernels/common/quantized.py's format) -> [T, R, N] float32.

grouped_gemm.py's grid (column blocks, tiles: a tile's expert picks which weight blocks the TMA
pipeline copies, an expert no token chose is never read) over quantized_gemm.py's step
(shared.quantized_product): half (int8) or a quarter (int4) of the bytes the float kernel
moves, each step's integers turned into x's dtype in shared memory for WGMMA and the product
scaled by the step's scale row (int8: one per column; int4: one per 128 K rows, a step).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.quantized import BITS, GROUP, stored_shapes
from pallas_kernels.mosaic_gpu import grouped_gemm as mgg
from pallas_kernels.mosaic_gpu import shared


@dataclasses.dataclass(frozen=True)
class Settings:
  block_n: int = 64   # output columns per program: WGMMA's 64 rows of w^T
  stages: int = 4     # pipeline steps (of QUANT_STEP stored rows) in flight


def unsupported(rows: int, k: int, n: int, dtype, bits: int,
                settings: Settings = Settings()) -> str | None:
  """Why the kernel cannot take tiles of `rows` rows times int`bits` [K, N] experts (None: it
  can)."""
  why = mgg.unsupported(rows, GROUP, n, dtype, mgg.Settings(block_n=settings.block_n))
  if why:
    return why
  if bits not in BITS:
    return f"bits={bits} is not one of {BITS}"
  if k % GROUP:
    return f"K={k} is not a multiple of {GROUP}"
  return None


def _kernel(experts_gmem, x_gmem, v_gmem, s_gmem, o_gmem, *scratch, parts, block_n, steps,
            stages, scale_rows):
  n_idx, t = jax.lax.axis_index("n"), jax.lax.axis_index("t")
  e = experts_gmem[t]

  @pl.when(e >= 0)  # an empty tile reads nothing and writes nothing
  def _():
    shared.quantized_product(
        [x_gmem.at[p:p + 1] for p in range(parts)], v_gmem,
        s_gmem.at[pl.ds(e * scale_rows, scale_rows), pl.ds(n_idx * block_n, block_n)],
        o_gmem.at[t, pl.ds(n_idx * block_n, block_n)], *scratch,
        rows=o_gmem.shape[2], block_n=block_n, steps=steps, stages=stages,
        group_steps=steps if scale_rows == 1 else 1,
        x_block=lambda j: (0, t, j), v_block=lambda j: (e * steps + j, n_idx))


@functools.partial(jax.jit, static_argnames=("bits", "settings", "interpret"))
def grouped_gemm(x, experts, values, scales, *, bits: int, settings: Settings = Settings(),
                 interpret=False):
  """x [T, R, K] tiles, experts [T] int32 (< 0: empty), the int`bits` experts (values [E, K',
  N], scales [E, N] or [E, K / 128, N], in x's dtype) -> [T, R, N] float32 (an empty tile's
  rows undefined). `interpret`: True (or a plgpu.InterpretGPUParams) runs Mosaic GPU's
  interpreter on the CPU."""
  op = f"grouped_gemm_int{bits}"
  if x.ndim != 3 or values.ndim != 3 or experts.shape != x.shape[:1]:
    raise ValueError(f"{op}: expected x [T, R, K], experts [T], values [E, K', N]; got "
                     f"x{tuple(x.shape)}, experts{tuple(experts.shape)}, "
                     f"values{tuple(values.shape)}")
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f"{op}: experts must be integers, got {experts.dtype}")
  (tiles, rows, k), (e, _, n) = x.shape, values.shape
  why = unsupported(rows, k, n, x.dtype, bits, settings)
  if why:
    raise ValueError(f"{op} (Mosaic GPU): {why}")
  want_v, want_s = stored_shapes(bits, k, n)
  if values.shape[1:] != want_v or scales.shape != (e,) + want_s:
    raise ValueError(f"{op}: int{bits} experts for K={k} must be values {(e,) + want_v} and "
                     f"scales {(e,) + want_s}, got {tuple(values.shape)} and "
                     f"{tuple(scales.shape)}")
  if values.dtype != (jnp.int8 if bits == 8 else jnp.uint8) or scales.dtype != x.dtype:
    raise ValueError(f"{op}: values must be {'int8' if bits == 8 else 'uint8'} and scales "
                     f"x's {x.dtype}, got {values.dtype} and {scales.dtype}")
  experts = jnp.where(experts < 0, -1, jnp.minimum(experts, e - 1)).astype(jnp.int32)
  s = settings
  steps = want_v[0] // shared.QUANT_STEP
  scale_rows = 1 if bits == 8 else steps
  parts = shared.quantized_parts(x.reshape(tiles * rows, k), bits)

  def fdjax_mgpu_grouped_gemm_quantized(*refs):  # the compiled kernel's name
    _kernel(*refs, parts=parts.shape[0], block_n=s.block_n, steps=steps,
            stages=min(s.stages, steps), scale_rows=scale_rows)

  out = plgpu.kernel(
      fdjax_mgpu_grouped_gemm_quantized,
      out_type=jax.ShapeDtypeStruct((tiles, n, rows), jnp.float32),
      grid=(n // s.block_n, tiles), grid_names=("n", "t"),
      scratch_types=shared.quantized_scratch(parts.shape[0], rows, s.block_n, scale_rows,
                                             x.dtype),
      **shared.interpret_kwargs(interpret),
  )(experts, parts, values.reshape(e * want_v[0], n), scales.reshape(e * scale_rows, n))
  return out.transpose(0, 2, 1)
