"""What every backend's GEMV and flat GEMM take: x [M, K] @ w [K, N] in one float dtype, and
the largest M the GEMV is for."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_GEMV_M = 8  # beyond this the tensor-core (MXU) flat GEMM always wins


def check(op, x, w):
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"{op}: expected x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if x.dtype not in DTYPES or w.dtype != x.dtype:
    raise ValueError(f"{op}: x and w must share one of float32/bfloat16/float16, got "
                     f"{x.dtype} and {w.dtype}")
