"""FlashDecoding++'s flat GEMM on Mosaic GPU: x [M, K] @ w [K, N] for the small M of decoding,
with the weight streamed through shared memory by a multi-stage TMA pipeline (the "double
buffering" of the paper, `stages` copies in flight).

Hopper's warpgroup MMA multiplies 64 rows of its left operand, and a decode step has 1 to 64
rows of x. So the kernel computes the transpose, out^T [N, M] = w^T [N, K] @ x^T [K, M]: the
weight fills the MMA's 64 rows (a program owns `block_n` = 64 output columns) and x, padded
only to M_pad, a multiple of 8 (not 64), is the MMA's narrow right operand. Both operands are
read from shared memory as transposed views of the blocks TMA copied in their own layout
(16-bit dtypes: WGMMA transposes bf16 / f16 operands, not tf32). K is split across `split_k`
programs when N alone gives too few to fill the GPU; each writes float32 partials that the
wrapper sums (in a fixed order: deterministic) and transposes (an [M, N] array: nothing next
to the weight's K x N).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import tiling
from pallas_kernels.common.gemm import check
from pallas_kernels.mosaic_gpu import shared

DTYPES = (jnp.bfloat16, jnp.float16)  # what WGMMA takes transposed from shared memory
MAX_M = 64       # rows of x: the MMA's N (8 to 256); beyond 64 the vendor GEMM's tiles win
ROWS = 8         # x is padded to a multiple of this (the MMA's N granularity)


@dataclasses.dataclass(frozen=True)
class Settings:
  block_n: int | None = None   # output columns per program: the MMA's 64 rows of w^T
  block_k: int | None = None   # K per pipeline step (64 bf16: one 128-byte swizzled row)
  stages: int | None = None    # pipeline steps in flight (TMA copies ahead of the MMA)
  split_k: int | None = None   # programs sharing one column block's K (a divisor of K steps)

  @classmethod
  def default(cls, k: int, n: int, sms: int = shared.H100_SMS) -> "Settings":
    block_n, block_k = 64, 64
    steps = max(k // block_k, 1)
    want = max(1, pl.cdiv(2 * sms, max(n // block_n, 1)))
    split = max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)
    return cls(block_n=block_n, block_k=block_k, stages=min(4, max(steps // split, 1)),
               split_k=split)


def unsupported(m: int, k: int, n: int, dtype, settings: Settings | None = None) -> str | None:
  """Why the kernel cannot take these operands (None: it can)."""
  s = tiling.fill(settings, Settings.default(k, n))
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16 (WGMMA's transposed operands)"
  if m > MAX_M:
    return f"M={m} is more than {MAX_M}"
  if n % s.block_n:
    return f"N={n} is not a multiple of block_n={s.block_n}"
  if k % (s.block_k * s.split_k):
    return f"K={k} is not a multiple of block_k * split_k = {s.block_k * s.split_k}"
  return None


def _kernel(x_gmem, w_gmem, o_gmem, o_smem, *, block_n, block_k, k_steps, stages):
  n_idx, k_idx = jax.lax.axis_index("n"), jax.lax.axis_index("k")
  first = k_idx * k_steps  # this program's first K step
  shared.transposed_product(
      x_gmem, w_gmem, o_smem, o_gmem.at[k_idx, pl.ds(n_idx * block_n, block_n)],
      rows=x_gmem.shape[0], block_n=block_n, block_k=block_k, k_steps=k_steps, stages=stages,
      x_block=lambda j: (0, first + j), w_block=lambda j: (first + j, n_idx))


@functools.partial(jax.jit, static_argnames=("settings", "interpret"))
def flat_gemm(x, w, *, settings: Settings | None = None, interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, float32 accumulation, for M <= MAX_M.
  `interpret`: True (or a plgpu.InterpretGPUParams, e.g. with detect_races) runs Mosaic GPU's
  interpreter on the CPU."""
  check("flat_gemm", x, w)
  (m, k), n = x.shape, w.shape[1]
  why = unsupported(m, k, n, x.dtype, settings)
  if why:
    raise ValueError(f"flat_gemm (Mosaic GPU): {why}")
  s = tiling.fill(settings, Settings.default(k, n))
  m_pad = pl.cdiv(m, ROWS) * ROWS
  xp = jnp.pad(x, ((0, m_pad - m), (0, 0)))  # a copy of x only: M x K

  def fdjax_mgpu_flat_gemm(*refs):  # the compiled kernel's name
    _kernel(*refs, block_n=s.block_n, block_k=s.block_k,
            k_steps=k // (s.block_k * s.split_k), stages=s.stages)

  partials = plgpu.kernel(
      fdjax_mgpu_flat_gemm, out_type=jax.ShapeDtypeStruct((s.split_k, n, m_pad), jnp.float32),
      grid=(n // s.block_n, s.split_k), grid_names=("n", "k"),
      scratch_types=[plgpu.SMEM((s.block_n, m_pad), jnp.float32)],
      **shared.interpret_kwargs(interpret),
  )(xp, w)
  return jnp.sum(partials, axis=0)[:, :m].T.astype(x.dtype)
