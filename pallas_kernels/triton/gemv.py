"""GEMV for the smallest M: y[M, N] = x[M, K] @ w[K, N] on the plain cores (Pallas, Triton).

For M of 1 or 2 the tensor-core dot would pad M to 16 rows and waste most of its work; here
each program owns `block_n` columns, walks K in `block_k` steps and, for each of the M rows
(unrolled; M is small and static), multiplies the x chunk into the w tile and reduces over
K. No padding of M at all. Split-K across programs, as in the flat GEMM, fills the GPU when
N is small; the float32 partials are summed afterwards (deterministic).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import tiling
from pallas_kernels.common.gemm import MAX_GEMV_M as MAX_M
from pallas_kernels.common.gemm import check
from pallas_kernels.triton import flat_gemm
from pallas_kernels.triton.flat_gemm import launch_split_k, split_k_for, split_range
from pallas_kernels.triton.shared import plgpu


class Settings(flat_gemm.Settings):
  """The flat GEMM's knobs, with the GEMV's defaults."""

  @classmethod
  def default(cls, k: int, n: int) -> "Settings":
    return cls(block_n=128, block_k=64, split_k=split_k_for(k, n, 128, 64), num_stages=2,
               num_warps=4)


def _kernel(x_ref, w_ref, o_ref, *, m, block_n, block_k, k_per_split):
  n_idx, split = pl.program_id(0), pl.program_id(1)
  k_total, n_total = w_ref.shape
  cols = n_idx * block_n + jnp.arange(block_n)
  col_ok = cols < n_total
  k_first, k_end, n_blocks = split_range(k_total, block_k, k_per_split)

  def body(j, accs):
    first = k_first + j * block_k
    k_ok = first + jnp.arange(block_k) < k_end
    w = plgpu.load(w_ref.at[pl.ds(first, block_k), pl.ds(n_idx * block_n, block_n)],
                   mask=k_ok[:, None] & col_ok[None, :], other=0.0).astype(jnp.float32)
    new = []
    for r in range(m):
      row = jnp.asarray(r, jnp.int32)  # an array index: the interpreter takes no Python int here
      x = plgpu.load(x_ref.at[row, pl.ds(first, block_k)], mask=k_ok, other=0.0)
      new.append(accs[r] + jnp.sum(x.astype(jnp.float32)[:, None] * w, axis=0))
    return tuple(new)

  accs = jax.lax.fori_loop(0, n_blocks, body,
                           tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(m)))
  for r in range(m):
    plgpu.store(o_ref.at[split, jnp.asarray(r, jnp.int32), pl.ds(n_idx * block_n, block_n)],
                accs[r].astype(o_ref.dtype), mask=col_ok)


@functools.partial(jax.jit, static_argnames=("settings", "interpret"))
def gemv(x, w, *, settings: Settings | None = None, interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] for M <= MAX_M, in x's dtype, float32 accumulation."""
  check("gemv", x, w)
  m, k = x.shape
  if m > MAX_M:
    raise ValueError(f"gemv: M must be at most {MAX_M}, got {m}")
  settings = tiling.fill(settings, Settings.default(k, w.shape[1]))
  return launch_split_k(functools.partial(_kernel, m=m), (x, w), m, k, w.shape[1], x.dtype,
                        settings, interpret=interpret, name="fdjax_gemv")
