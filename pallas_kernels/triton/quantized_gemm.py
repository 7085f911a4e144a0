"""Weight-only int8 / int4 GEMV and flat GEMM: y[M, N] = x[M, K] @ dequantize(w) (Pallas,
Triton), reading the weight as its quantized bytes and dequantizing inside the K loop.

The storage format is pallas_kernels/common/quantized.py's (fdjax.ops.quant builds it).
Scales are in the activations' dtype. The integers are exact in bfloat16 and float16, so a
tile is multiplied as integers (on the tensor cores in the flat GEMM) and the scale applied
to the tile's float32 product: int8's per column, int4's per group. The kernels walk the
stored rows; an int4 tile of bytes is two integer tiles, the even and the odd K rows, each
against the matching columns of x (split into its even and odd columns before the kernel):
no interleaving of nibbles in registers. Splits, masking and launch are the plain kernels'
(flat_gemm.launch_split_k); settings are flat_gemm.Settings / gemv.Settings, block_k
counting K rows.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import tiling
from pallas_kernels.common.quantized import GROUP, check, unpack_int4
from pallas_kernels.triton import flat_gemm as fg
from pallas_kernels.triton import gemv as gv
from pallas_kernels.triton.flat_gemm import launch_split_k, split_range
from pallas_kernels.triton.shared import plgpu


def _weight_tile(values_ref, scales_ref, first, k_end, cols_ds, col_ok, *, bits, group,
                 block_k):
  """Stored rows [first, first + block_k) of the weight in the columns `cols_ds`: (the rows'
  mask, the int tiles of the x parts (one for int8; the even and the odd K rows for int4),
  the float32 scale row)."""
  k_ok = first + jnp.arange(block_k) < k_end
  q = plgpu.load(values_ref.at[pl.ds(first, block_k), cols_ds],
                 mask=k_ok[:, None] & col_ok[None, :], other=0)
  parts = (q.astype(jnp.int32),) if bits == 8 else unpack_int4(q)
  scale = plgpu.load(scales_ref.at[first // group, cols_ds], mask=col_ok, other=0.0)
  return k_ok, parts, scale.astype(jnp.float32)


def _flat_kernel(x_ref, values_ref, scales_ref, o_ref, *, bits, group, block_n, block_k,
                 k_per_split):
  n_idx, split = pl.program_id(0), pl.program_id(1)
  block_m = x_ref.shape[1]  # x padded to the block's rows
  cols_ds = pl.ds(n_idx * block_n, block_n)
  col_ok = n_idx * block_n + jnp.arange(block_n) < values_ref.shape[1]
  k_first, k_end, n_blocks = split_range(values_ref.shape[0], block_k, k_per_split)
  f32 = x_ref.dtype == jnp.float32

  def body(j, acc):
    first = k_first + j * block_k
    k_ok, parts, scale = _weight_tile(values_ref, scales_ref, first, k_end, cols_ds, col_ok,
                                      bits=bits, group=group, block_k=block_k)
    tile = jnp.zeros((block_m, block_n), jnp.float32)
    for p, q in enumerate(parts):
      part = jnp.asarray(p, jnp.int32)  # an array index: the interpreter takes no Python int
      x = plgpu.load(x_ref.at[part, pl.ds(0, block_m), pl.ds(first, block_k)],
                     mask=k_ok[None, :], other=0.0)
      tile += plgpu.dot(x, q.astype(x.dtype), allow_tf32=not f32)
    return acc + tile * scale[None, :]

  acc = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((block_m, block_n), jnp.float32))
  plgpu.store(o_ref.at[split, pl.ds(0, block_m), cols_ds], acc.astype(o_ref.dtype),
              mask=col_ok[None, :])


def _gemv_kernel(x_ref, values_ref, scales_ref, o_ref, *, m, bits, group, block_n, block_k,
                 k_per_split):
  n_idx, split = pl.program_id(0), pl.program_id(1)
  cols_ds = pl.ds(n_idx * block_n, block_n)
  col_ok = n_idx * block_n + jnp.arange(block_n) < values_ref.shape[1]
  k_first, k_end, n_blocks = split_range(values_ref.shape[0], block_k, k_per_split)

  def body(j, accs):
    first = k_first + j * block_k
    k_ok, parts, scale = _weight_tile(values_ref, scales_ref, first, k_end, cols_ds, col_ok,
                                      bits=bits, group=group, block_k=block_k)
    new = []
    for r, acc in enumerate(accs):
      tile = jnp.zeros((block_n,), jnp.float32)
      for p, q in enumerate(parts):  # array indices: the interpreter takes no Python int here
        x = plgpu.load(x_ref.at[jnp.asarray(p, jnp.int32), jnp.asarray(r, jnp.int32),
                                pl.ds(first, block_k)], mask=k_ok, other=0.0)
        tile += jnp.sum(x.astype(jnp.float32)[:, None] * q.astype(jnp.float32), axis=0)
      new.append(acc + tile * scale)
    return tuple(new)

  accs = jax.lax.fori_loop(0, n_blocks, body,
                           tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(m)))
  for r in range(m):
    plgpu.store(o_ref.at[split, jnp.asarray(r, jnp.int32), cols_ds],
                accs[r].astype(o_ref.dtype), mask=col_ok)


def _launch(kernel, op, x, values, scales, bits, settings, interpret, **params):
  """Both kernels walk the stored rows of `values` (K for int8, ceil(K / 2) for int4) and
  read x as its parts [P, M, rows]: x itself (int8), or its even and its odd columns (int4;
  two small strided copies of x outside the kernel, so each part is a contiguous load)."""
  check(op, x, values, scales, bits)
  (m, k), (rows, n) = x.shape, values.shape
  if bits == 8:
    parts, group, block_k_range = x[None], rows, (16, None)
  else:
    # block_k counts K rows, two per stored row; a tile lies within one group of scales and
    # its halves are at least 16 wide (the tensor-core dot's smallest K).
    settings = dataclasses.replace(settings, block_k=max(1, settings.block_k // 2))
    x = jnp.pad(x, ((0, 0), (0, 2 * rows - k)))
    parts, group, block_k_range = jnp.stack([x[:, 0::2], x[:, 1::2]]), GROUP // 2, (16, GROUP // 2)
  return launch_split_k(functools.partial(kernel, bits=bits, group=group, **params),
                        (parts, values, scales.reshape(-1, n)), m, rows, n, x.dtype, settings,
                        interpret=interpret, name=f"fdjax_{op}", block_k_range=block_k_range)


@functools.partial(jax.jit, static_argnames=("bits", "settings", "interpret"))
def flat_gemm(x, values, scales, *, bits: int, settings: fg.Settings | None = None,
              interpret=False):
  """x [M, K] @ the int`bits` weight (values, scales) -> [M, N] in x's dtype, float32
  accumulation; the flat GEMM's M padding (16 rows), splits and settings."""
  k, n = x.shape[-1], values.shape[-1]
  settings = tiling.fill(settings, fg.Settings.default(k, n))
  m = x.shape[0]
  check(f"flat_gemm_int{bits}", x, values, scales, bits)
  return _launch(_flat_kernel, f"flat_gemm_int{bits}", fg.pad_rows(x), values, scales, bits,
                 settings, interpret)[:m]


@functools.partial(jax.jit, static_argnames=("bits", "settings", "interpret"))
def gemv(x, values, scales, *, bits: int, settings: gv.Settings | None = None,
         interpret=False):
  """The same for M <= gv.MAX_M on the plain cores (no padding of M)."""
  if x.ndim == 2 and x.shape[0] > gv.MAX_M:
    raise ValueError(f"gemv_int{bits}: M must be at most {gv.MAX_M}, got {x.shape[0]}")
  k, n = x.shape[-1], values.shape[-1]
  settings = tiling.fill(settings, gv.Settings.default(k, n))
  return _launch(_gemv_kernel, f"gemv_int{bits}", x, values, scales, bits, settings, interpret,
                 m=x.shape[0])
