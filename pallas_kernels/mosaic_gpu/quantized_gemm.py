"""Weight-only int8 / int4 flat GEMM on Mosaic GPU: y[M, N] = x[M, K] @ dequantize(w), reading
the weight as its quantized bytes (pallas_kernels/common/quantized.py's format, the Triton
kernels' too) and dequantizing in the K loop.

The Mosaic GPU flat GEMM's scheme (flat_gemm.py: out^T = w^T x^T, the weight filling WGMMA's 64
rows, x padded to 8 rows), with the weight's stored bytes streamed by the TMA pipeline instead
of its 16-bit values: half (int8) or a quarter (int4) of the bytes a step moves. Each step turns
its tile of integers into x's dtype (exact: |q| <= 127) in a shared-memory buffer WGMMA reads,
multiplies, and adds the float32 product times the step's scale row: int8's one scale per
column, or int4's one per group of 128 K rows (a step covers one group exactly). An int4 byte
holds K rows 2r (low nibble) and 2r + 1 (high): its tile is two integer tiles, each against
the matching columns of x (x split into its even and odd columns outside the kernel, as the
Triton kernels do), so no nibbles are interleaved.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import tiling
from pallas_kernels.common.quantized import GROUP, check
from pallas_kernels.mosaic_gpu import flat_gemm as mfg
from pallas_kernels.mosaic_gpu import shared

ROWS_PER_STEP = shared.QUANT_STEP  # stored rows a step reads: 64 (int8: 64 K rows; int4: a group)


MAX_SCALE_ROWS = 256  # a TMA copy's box: at most 256 along a dimension (Mosaic GPU's bound)


@dataclasses.dataclass(frozen=True)
class Settings:
  block_n: int | None = None   # output columns per program (the MMA's 64 rows of w^T)
  stages: int | None = None    # pipeline steps in flight
  split_k: int | None = None   # programs sharing one column block's steps

  @classmethod
  def default(cls, rows: int, n: int, sms: int = shared.H100_SMS) -> Settings:
    """The float flat GEMM's rule over the stored rows (64 a step)."""
    s = mfg.Settings.default(rows, n, sms)
    return cls(block_n=s.block_n, stages=s.stages, split_k=s.split_k)


def unsupported(m: int, k: int, n: int, dtype, bits: int,
                settings: Settings | None = None) -> str | None:
  """Why the kernel cannot take these operands (None: it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in mfg.DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16 (WGMMA's transposed operands)"
  if m > mfg.MAX_M:
    return f"M={m} is more than {mfg.MAX_M}"
  rows = k if bits == 8 else k // 2
  s = tiling.fill(settings, Settings.default(rows, n))
  if n % s.block_n:
    return f"N={n} is not a multiple of block_n={s.block_n}"
  if k % GROUP or rows % (ROWS_PER_STEP * s.split_k):
    return (f"K={k} is not a multiple of {GROUP} with its {rows} stored rows a multiple of "
            f"{ROWS_PER_STEP} x split_k={s.split_k}")
  scale_rows = 1 if bits == 8 else k // GROUP // s.split_k
  if scale_rows > MAX_SCALE_ROWS:
    return (f"K={k} at split_k={s.split_k} gives a program {scale_rows} int4 scale rows; its "
            f"one TMA copy of them takes at most {MAX_SCALE_ROWS}")
  return None


def _kernel(x_gmem, v_gmem, s_gmem, o_gmem, *scratch, parts, block_n, steps, stages,
            group_steps):
  n_idx, k_idx = jax.lax.axis_index("n"), jax.lax.axis_index("k")
  first = k_idx * steps  # this program's first step
  scale_rows = scratch[2].shape[0]  # every scale row the program's steps use
  shared.quantized_product(
      [x_gmem.at[p:p + 1] for p in range(parts)], v_gmem,
      s_gmem.at[pl.ds(first // group_steps, scale_rows), pl.ds(n_idx * block_n, block_n)],
      o_gmem.at[k_idx, pl.ds(n_idx * block_n, block_n)], *scratch, rows=x_gmem.shape[1],
      block_n=block_n, steps=steps, stages=stages, group_steps=group_steps,
      x_block=lambda j: (0, 0, first + j), v_block=lambda j: (first + j, n_idx))


@functools.partial(jax.jit, static_argnames=("bits", "settings", "interpret"))
def flat_gemm(x, values, scales, *, bits: int, settings: Settings | None = None,
              interpret=False):
  """x [M, K] @ the int`bits` weight (values, scales) -> [M, N] in x's dtype, float32
  accumulation, for M <= 64."""
  op = f"flat_gemm_int{bits}"
  check(op, x, values, scales, bits)
  (m, k), (rows, n) = x.shape, values.shape
  why = unsupported(m, k, n, x.dtype, bits, settings)
  if why:
    raise ValueError(f"{op} (Mosaic GPU): {why}")
  s = tiling.fill(settings, Settings.default(rows, n))
  m_pad = pl.cdiv(m, mfg.ROWS) * mfg.ROWS
  xp = jnp.pad(x, ((0, m_pad - m), (0, 0)))  # copies of x only: M x K
  parts = shared.quantized_parts(xp, bits)
  steps = rows // (ROWS_PER_STEP * s.split_k)
  n_parts = parts.shape[0]

  def body(*refs):
    _kernel(*refs, parts=n_parts, block_n=s.block_n, steps=steps,
            stages=min(s.stages, steps), group_steps=rows // ROWS_PER_STEP if bits == 8 else 1)

  body.__name__ = f"fdjax_mgpu_flat_gemm_int{bits}"  # the compiled kernel's name
  partials = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((s.split_k, n, m_pad), jnp.float32),
      grid=(n // s.block_n, s.split_k), grid_names=("n", "k"),
      scratch_types=shared.quantized_scratch(n_parts, m_pad, s.block_n,
                                             1 if bits == 8 else steps, x.dtype),
      **shared.interpret_kwargs(interpret),
  )(parts, values, scales.reshape(-1, n))
  return jnp.sum(partials, axis=0)[:, :m].T.astype(x.dtype)
