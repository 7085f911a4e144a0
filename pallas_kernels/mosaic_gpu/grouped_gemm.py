"""FlashDecoding++'s flat GEMM over ragged expert groups on Mosaic GPU: a mixture of experts'
tiles (fdjax.ops.moe: the (token, expert) pairs sorted by expert, cut into tiles of `rows`
rows of one expert each) each multiplied by its own expert's weight.

x [T, R, K] (tile t's rows), experts [T] int32 (tile t's expert; negative: an empty tile,
nothing read, its output left to the caller to drop), w [E, K, N] -> [T, R, N] float32.

As the flat GEMM (flat_gemm.py; shared.transposed_product), each program computes a transposed product out^T [block_n,
R] = w_e^T [block_n, K] @ x_t^T [K, R]: the expert's weight fills WGMMA's 64 rows and the
tile's R rows (8 to 64: a decode step's few tokens per expert are padded to 8, not 64) are
the narrow side, K streamed through shared memory by a `stages`-deep TMA pipeline. The grid is
(column blocks, tiles); a tile's expert is read from global memory and picks which weight
blocks the pipeline copies (w viewed as [E K, N]: expert e's block j is row block e K/block_k
+ j), so an expert no token chose is never read, and one chosen by several tiles is read once
per tile (from L2 after the first).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import shared

DTYPES = (jnp.bfloat16, jnp.float16)  # WGMMA's transposed operands from shared memory
MAX_ROWS = 64    # a tile's rows: WGMMA's N from 8 to 256; beyond 64 XLA's GEMM tiles win
ROWS = 8         # tiles' rows are a multiple of this


@dataclasses.dataclass(frozen=True)
class Settings:
  block_n: int = 64   # output columns per program: WGMMA's 64 rows of w^T
  block_k: int = 64   # K per pipeline step: one 128-byte swizzled row of bf16
  stages: int = 4     # pipeline steps in flight


def unsupported(rows: int, k: int, n: int, dtype, settings: Settings = Settings()) -> str | None:
  """Why the kernel cannot take tiles of `rows` rows times [K, N] experts (None: it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16 (WGMMA's transposed operands)"
  if rows % ROWS or rows > MAX_ROWS:
    return f"tiles of {rows} rows (a multiple of {ROWS} up to {MAX_ROWS})"
  if n % settings.block_n:
    return f"N={n} is not a multiple of block_n={settings.block_n}"
  if k % settings.block_k:
    return f"K={k} is not a multiple of block_k={settings.block_k}"
  return None


def _kernel(experts_gmem, x_gmem, w_gmem, o_gmem, o_smem, *, rows, block_n, block_k, k_steps,
            stages):
  n_idx, t = jax.lax.axis_index("n"), jax.lax.axis_index("t")
  e = experts_gmem[t]

  @pl.when(e >= 0)  # an empty tile reads nothing and writes nothing
  def _():
    shared.transposed_product(
        x_gmem, w_gmem, o_smem, o_gmem.at[t, pl.ds(n_idx * block_n, block_n)], rows=rows,
        block_n=block_n, block_k=block_k, k_steps=k_steps, stages=stages,
        x_block=lambda j: (t, j), w_block=lambda j: (e * k_steps + j, n_idx))


@functools.partial(jax.jit, static_argnames=("settings", "interpret"))
def grouped_gemm(x, experts, w, *, settings: Settings = Settings(), interpret=False):
  """x [T, R, K] tiles, experts [T] int32 (< 0: empty), w [E, K, N] -> [T, R, N] float32
  (an empty tile's rows undefined). `interpret`: True (or a plgpu.InterpretGPUParams) runs
  Mosaic GPU's interpreter on the CPU."""
  if x.ndim != 3 or w.ndim != 3 or experts.shape != x.shape[:1]:
    raise ValueError(f"grouped_gemm: expected x [T, R, K], experts [T], w [E, K, N]; got "
                     f"x{tuple(x.shape)}, experts{tuple(experts.shape)}, w{tuple(w.shape)}")
  (tiles, rows, k), (e, k_w, n) = x.shape, w.shape
  if k != k_w or x.dtype != w.dtype:
    raise ValueError(f"grouped_gemm: x [T, R, {k}] {x.dtype} and w [E, {k_w}, N] {w.dtype} "
                     f"must agree in K and dtype")
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f"grouped_gemm: experts must be integers, got {experts.dtype}")
  why = unsupported(rows, k, n, x.dtype, settings)
  if why:
    raise ValueError(f"grouped_gemm (Mosaic GPU): {why}")
  # an expert past the last reads the last (as XLA's gather clamps): never past w's end
  experts = jnp.where(experts < 0, -1, jnp.minimum(experts, e - 1)).astype(jnp.int32)
  s = settings
  k_steps = k // s.block_k

  def fdjax_mgpu_grouped_gemm(*refs):  # the compiled kernel's name
    _kernel(*refs, rows=rows, block_n=s.block_n, block_k=s.block_k, k_steps=k_steps,
            stages=min(s.stages, k_steps))

  out = plgpu.kernel(
      fdjax_mgpu_grouped_gemm, out_type=jax.ShapeDtypeStruct((tiles, n, rows), jnp.float32),
      grid=(n // s.block_n, tiles), grid_names=("n", "t"),
      scratch_types=[plgpu.SMEM((s.block_n, rows), jnp.float32)],
      **shared.interpret_kwargs(interpret),
  )(experts, x.reshape(tiles * rows, k), w.reshape(e * k, n))
  return out.transpose(0, 2, 1)
