"""GEMV for the smallest M on the TPU's vector unit: y[M, N] = x[M, K] @ w[K, N] (Pallas,
Mosaic TPU).

For M of 1 or 2 the MXU holds each 128 x 128 (v6e: 256 x 256) tile of w for one or two rows
of x. Here the VPU does it instead: x comes in transposed ([K, M], a few KB), each row's
column x[:, r] is broadcast across the lanes of the w tile, multiplied in float32 and
reduced over K (the sublanes). The grid, tiles, K-edge masking and double-buffered stream
of w are the flat GEMM's (flat_gemm.launch). Whether it beats the MXU, and up to which M,
is per generation: `fdjax tune` measures it (selection's table, M1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common.gemm import MAX_GEMV_M as MAX_M
from pallas_kernels.common.gemm import check
from pallas_kernels.tpu import flat_gemm, shared
from pallas_kernels.tpu.flat_gemm import Settings  # the flat GEMM's knobs and defaults


def _on_the_vpu(xt, w, acc_ref):
  """xt [block_k, M], w [block_k, block_n]: each row's column of x across w's lanes."""
  w = w.astype(jnp.float32)
  xt = xt.astype(jnp.float32)
  for r in range(xt.shape[1]):
    acc_ref[r:r + 1, :] += jnp.sum(xt[:, r:r + 1] * w, axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("settings", "generation", "interpret"))
def gemv(x, w, *, settings: Settings | None = None, generation: str | None = None,
         interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] for M <= MAX_M, in x's dtype, float32 accumulation."""
  check("gemv", x, w)
  m, k = x.shape
  if m > MAX_M:
    raise ValueError(f"gemv: M must be at most {MAX_M}, got {m}")
  n = w.shape[1]
  settings = shared.fill(settings, Settings.default(k, n, x.dtype, generation))

  def specs(block_n, block_k):
    return [pl.BlockSpec((block_k, m), lambda i, j: (j, 0)),
            pl.BlockSpec((block_k, block_n), lambda i, j: (j, i))]

  kernel = functools.partial(flat_gemm.k_loop, k_total=k, block_k=settings.block_k,
                             x_k_axis=0, update=_on_the_vpu)
  return flat_gemm.launch(kernel, (x.T, w), specs, m, k, n, x.dtype, settings,
                          interpret=interpret, name="fdjax_tpu_gemv")
