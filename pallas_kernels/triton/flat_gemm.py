"""FlashDecoding++'s flat GEMM: y[M, N] = x[M, K] @ w[K, N] for small M (Pallas, Triton).

Decode-time matmuls have M = batch (1 to 64), so they are bound by reading w. Vendor GEMMs
tile M at 64 or more and pad; here M is padded only to the smallest tile the tensor-core
dot allows (16 rows in Triton: x is padded with zero rows to that, a copy of x alone, so no
block reads past an array) and is not tiled. N is split across programs; each program
walks K in `block_k` steps, and the K loop is software-pipelined `num_stages` deep (2 = the
paper's double buffer: the next tile of w loads while the current one multiplies). When N
alone gives too few programs to fill the GPU, K is also split across programs (`split_k`)
and the float32 partials are summed afterwards: deterministic, no atomics. Edges of M, N
and K need not divide the blocks (masked loads and stores).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import tiling
from pallas_kernels.common.gemm import check
from pallas_kernels.triton import shared
from pallas_kernels.triton.shared import plgpu


def split_k_for(k: int, n: int, block_n: int, block_k: int) -> int:
  """K splits so that the N blocks times the splits fill the GPU about twice, each split
  keeping at least 4 K blocks."""
  programs_n = pl.cdiv(n, block_n)
  return int(max(1, min(pl.cdiv(2 * shared.num_sms(), programs_n), k // (4 * block_k))))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_n: int | None = None
  block_k: int | None = None
  split_k: int | None = None
  num_stages: int | None = None  # 2: the paper's double buffer
  num_warps: int | None = None

  @classmethod
  def default(cls, k: int, n: int, m: int = 16, dtype=jnp.bfloat16) -> "Settings":
    """Tiles of w 64 x 128, 4 warps, double buffered. float32 with more than 32 rows of x:
    32 x 64 (its exact dot runs on the plain cores; 64 rows spill at 64 x 128 and 64 x 64
    when compiled for the H100)."""
    block_n, block_k = (32, 64) if jnp.dtype(dtype).itemsize == 4 and m > 32 else (64, 128)
    return cls(block_n=block_n, block_k=block_k, split_k=split_k_for(k, n, block_n, block_k),
               num_stages=2, num_warps=4)


def k_ranges(k: int, block_k: int, split_k: int) -> int:
  """Length of each split's contiguous K range (a multiple of block_k)."""
  return pl.cdiv(pl.cdiv(k, split_k), block_k) * block_k


def split_range(k_total, block_k, k_per_split):
  """(first K index, end, number of K blocks) of this program's split (grid axis 1)."""
  k_first = pl.program_id(1) * k_per_split
  k_end = jnp.minimum(k_first + k_per_split, k_total)
  return k_first, k_end, pl.cdiv(jnp.maximum(k_end - k_first, 0), block_k)


def _kernel(x_ref, w_ref, o_ref, *, block_n, block_k, k_per_split, f32):
  n_idx, split = pl.program_id(0), pl.program_id(1)
  block_m, k_total = x_ref.shape  # x padded to the block's rows
  n_total = w_ref.shape[1]
  cols = n_idx * block_n + jnp.arange(block_n)
  k_first, k_end, n_blocks = split_range(k_total, block_k, k_per_split)

  def body(j, acc):
    ks = k_first + j * block_k + jnp.arange(block_k)
    k_ok = ks < k_end
    x = plgpu.load(x_ref.at[pl.ds(0, block_m), pl.ds(k_first + j * block_k, block_k)],
                   mask=k_ok[None, :], other=0.0)
    w = plgpu.load(w_ref.at[pl.ds(k_first + j * block_k, block_k),
                            pl.ds(n_idx * block_n, block_n)],
                   mask=k_ok[:, None] & (cols[None, :] < n_total), other=0.0)
    return acc + plgpu.dot(x, w, allow_tf32=not f32)

  acc = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((block_m, block_n), jnp.float32))
  plgpu.store(o_ref.at[split, pl.ds(0, block_m), pl.ds(n_idx * block_n, block_n)],
              acc.astype(o_ref.dtype), mask=cols[None, :] < n_total)


@functools.partial(jax.jit, static_argnames=("settings", "interpret"))
def flat_gemm(x, w, *, settings: Settings | None = None, interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, float32 accumulation."""
  check("flat_gemm", x, w)
  m, k = x.shape
  settings = tiling.fill(settings, Settings.default(k, w.shape[1], m, x.dtype))
  x = pad_rows(x)
  return launch_split_k(functools.partial(_kernel, f32=x.dtype == jnp.float32),
                        (x, w), x.shape[0], k, w.shape[1], x.dtype, settings,
                        interpret=interpret, name="fdjax_flat_gemm")[:m]


def pad_rows(x):
  """x [M, K] with zero rows added up to the flat GEMM's block of rows: the smallest tile the
  tensor-core dot takes (16), else M's next power of two."""
  m = x.shape[0]
  return jnp.pad(x, ((0, max(shared.DOT_MIN_ROWS, pl.next_power_of_2(m)) - m), (0, 0)))


def launch_split_k(kernel, operands, m, k, n, dtype, settings, *, interpret, name,
                   block_k_range=(16, None)):
  """Runs `kernel(*operand_refs, o_ref, block_n=, block_k=, k_per_split=)` over the grid
  (N blocks, splits of the K rows the kernel walks) for an [M, N] result in `dtype`, and sums
  the float32 partials of the splits (no atomics). Blocks are clamped to the (power-of-two
  rounded) matrix sizes and block_k to `block_k_range`."""
  low, high = block_k_range
  block_k = min(settings.block_k, max(16, pl.next_power_of_2(k)), high or settings.block_k)
  block_k = max(low, block_k)
  block_n = min(settings.block_n, max(16, pl.next_power_of_2(n)))
  k_per_split = k_ranges(k, block_k, settings.split_k)
  split_k = pl.cdiv(k, k_per_split)
  out_dtype = dtype if split_k == 1 else jnp.float32
  out = shared.call(
      functools.partial(kernel, block_n=block_n, block_k=block_k, k_per_split=k_per_split),
      operands, grid=(pl.cdiv(n, block_n), split_k),
      out_shape=jax.ShapeDtypeStruct((split_k, m, n), out_dtype), settings=settings,
      interpret=interpret, name=name)
  return out[0] if split_k == 1 else jnp.sum(out, axis=0).astype(dtype)
