"""The weight-only int8 / int4 storage format every backend's quantized kernels read (its one
definition; fdjax.ops.quant builds it):
  int8  values int8 [K, N], one scale per output column: scales [N];
        w[k, n] = values[k, n] * scales[n].
  int4  values uint8 [ceil(K / 2), N], byte r holding rows 2r (low nibble) and 2r + 1 (high
        nibble) of column n, each stored as value + 8; one scale per group of GROUP input
        rows: scales [ceil(K / GROUP), N]; w[k, n] = (nibble - 8) * scales[k // GROUP, n].
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common.gemm import DTYPES

BITS = (8, 4)
GROUP = 128      # int4: input rows per scale
INT4_ZERO = 8    # a stored nibble minus this is the value


def stored_shapes(bits: int, k: int, n: int) -> tuple[tuple, tuple]:
  """(values shape, scales shape) of a [K, N] weight quantized to `bits`."""
  if bits == 8:
    return (k, n), (n,)
  return (pl.cdiv(k, 2), n), (pl.cdiv(k, GROUP), n)


def pack_int4(q):
  """int [K, N] in [-8, 7] -> uint8 [ceil(K / 2), N], two rows per byte (jnp)."""
  q = jnp.asarray(q, jnp.int32) + INT4_ZERO
  if q.shape[0] % 2:
    q = jnp.concatenate([q, jnp.full((1, q.shape[1]), INT4_ZERO, jnp.int32)])
  return (q[0::2] | (q[1::2] << 4)).astype(jnp.uint8)


def unpack_int4(b):
  """uint8 bytes -> (the even rows, the odd rows) as int32 in [-8, 7] (jnp; in kernels too)."""
  b = b.astype(jnp.int32)
  return (b & 15) - INT4_ZERO, (b >> 4) - INT4_ZERO


def check(op, x, values, scales, bits):
  if bits not in BITS:
    raise ValueError(f"{op}: bits must be one of {BITS}, got {bits!r}")
  if x.ndim != 2 or values.ndim != 2:
    raise ValueError(f"{op}: expected x [M, K] and values [K', N], got {x.shape} and "
                     f"{values.shape}")
  want_v, want_s = stored_shapes(bits, x.shape[1], values.shape[1])
  if values.shape != want_v or scales.shape != want_s:
    raise ValueError(f"{op}: int{bits} weights for K={x.shape[1]} must be values {want_v} and "
                     f"scales {want_s}, got {values.shape} and {scales.shape}")
  want_dtype = jnp.int8 if bits == 8 else jnp.uint8
  if values.dtype != want_dtype:
    raise ValueError(f"{op}: int{bits} values must be {jnp.dtype(want_dtype).name}, got "
                     f"{values.dtype}")
  if x.dtype not in DTYPES or scales.dtype != x.dtype:
    raise ValueError(f"{op}: x and scales must share one of float32/bfloat16/float16, got "
                     f"{x.dtype} and {scales.dtype}")
