"""FlashDecoding++'s flat GEMM on the TPU: y[M, N] = x[M, K] @ w[K, N] for small M (Pallas,
Mosaic TPU).

M is not tiled and not padded: x's block is all M rows (a block dimension equal to the
array's is always a legal tile; Mosaic pads it to the 8 / 16 sublanes of a vreg inside the
core, not in HBM). Grid (N blocks, K blocks): the N axis is "parallel" (v5p's two cores
split it), the K axis "arbitrary", accumulating in a float32 VMEM scratch. Each step's
tile of w, block_k x block_n, is copied in by the pipeline while the previous one is on the
MXU: the paper's double buffer. Tiles are large (up to 4 MiB of w) because the kernel is
bound by reading w and each grid step costs a fixed ~0.35 us. K need not divide block_k
(the edge tile's rows past K are zeroed, in x and in w: the padding holds anything); N need
not divide block_n (the edge block's extra columns are never written back).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.gemm import check
from pallas_kernels.tpu import shared


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_n: int | None = None  # columns of w per program (a multiple of 128)
  block_k: int | None = None  # rows of w per grid step (a multiple of 128)

  @classmethod
  def default(cls, k: int, n: int, dtype=jnp.bfloat16, generation: str | None = None
              ) -> "Settings":
    """Up to 1024 columns (two or more N blocks on a chip with two cores), and the deepest
    power-of-two K tile up to 2048 with the tile of w within BLOCK_BUDGET / 2 (two buffers)."""
    cores = shared.generation(generation).cores
    block_n = min(1024, shared.round_up(pl.cdiv(n, cores), shared.LANES))
    block_k = min(2048, max(shared.LANES, pl.next_power_of_2(k)))
    while block_k > shared.LANES and 2 * block_k * block_n * jnp.dtype(dtype).itemsize > \
        shared.BLOCK_BUDGET:
      block_k //= 2
    return cls(block_n=block_n, block_k=block_k)


def zero_k_edge(a, axis, k_first, k_total):
  """A tile `a` whose `axis` runs over K from k_first, with the positions at or past k_total
  zeroed (the edge tile's padding holds anything, and 0 * NaN is NaN)."""
  shape = [1, 1]
  shape[axis] = a.shape[axis]
  ks = k_first + jax.lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
  return jnp.where(ks < k_total, a, 0)


def k_loop(x_ref, w_ref, o_ref, acc_ref, *, k_total, block_k, x_k_axis, update):
  """The body both linear kernels share: zero the float32 accumulator at the first K step,
  `update(x, w, acc_ref)` with this step's tiles (K edge zeroed; x's K runs along
  `x_k_axis`), write the result at the last step."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  x, w = x_ref[...], w_ref[...]
  if k_total % block_k:
    x = zero_k_edge(x, x_k_axis, j * block_k, k_total)
    w = zero_k_edge(w, 0, j * block_k, k_total)
  update(x, w, acc_ref)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _on_the_mxu(x, w, acc_ref):
  acc_ref[...] += shared.dot(x, w)


def launch(kernel, operands, in_specs, m, k, n, dtype, settings, *, interpret, name):
  """Runs `kernel(*operand_refs, o_ref, acc_ref)` over (N blocks, K blocks) for an [M, N]
  result in `dtype`, with a float32 [M, block_n] accumulator; `in_specs` are given
  (block_n, block_k)."""
  block_n, block_k = settings.block_n, settings.block_k
  if block_n % shared.LANES or block_k % shared.LANES:
    raise ValueError(f"{name}: block_n {block_n} and block_k {block_k} must be multiples of "
                     f"{shared.LANES}")
  return shared.call(
      kernel, operands, grid=(pl.cdiv(n, block_n), pl.cdiv(k, block_k)),
      in_specs=in_specs(block_n, block_k),
      out_specs=pl.BlockSpec((m, block_n), lambda i, j: (0, i)),
      out_shape=jax.ShapeDtypeStruct((m, n), dtype),
      scratch=[pltpu.VMEM((m, block_n), jnp.float32)],
      semantics=("parallel", "arbitrary"), interpret=interpret, name=name)


@functools.partial(jax.jit, static_argnames=("settings", "generation", "interpret"))
def flat_gemm(x, w, *, settings: Settings | None = None, generation: str | None = None,
              interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, float32 accumulation."""
  check("flat_gemm", x, w)
  m, k = x.shape
  n = w.shape[1]
  settings = shared.fill(settings, Settings.default(k, n, x.dtype, generation))

  def specs(block_n, block_k):
    return [pl.BlockSpec((m, block_k), lambda i, j: (0, j)),
            pl.BlockSpec((block_k, block_n), lambda i, j: (j, i))]

  kernel = functools.partial(k_loop, k_total=k, block_k=settings.block_k, x_k_axis=1,
                             update=_on_the_mxu)
  return launch(kernel, (x, w), specs,
                m, k, n, x.dtype, settings, interpret=interpret, name="fdjax_tpu_flat_gemm")
