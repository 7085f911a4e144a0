"""The linear layer as XLA:CPU runs it fastest, in the form fdjax.ops.selection.cpu_linear
picks (measured on a 2-core AMD EPYC with AVX-512 bf16 and VNNI, jax 0.12; the numbers are in
the rule's docstring):

* `rows`: x padded with zero rows to this many before the dot, the result sliced back. XLA:CPU
  runs a one-row bfloat16 dot through a path 2.6x slower than a two-row one; the padded row
  costs nothing measurable, and the real row's result is the same.
* `group`: int8 weights (fdjax.ops.quant, one scale per output column) multiplied as int8 x
  int8 with int32 accumulation, which XLA:CPU runs on the processor's VNNI dot-product
  instructions. x is quantized on the fly in groups of 128 entries of a row (64 or 32 where K
  is not a multiple of 128: `group_for`), each with its own scale (absmax / 127, round to
  nearest), as llama.cpp quantizes activations for its q8 dot products (in blocks of 32): one
  large activation then coarsens only its own group, where one scale per row would coarsen
  the whole row (LLM activations have such outlier channels). y = sum over groups of
  (xq_g @ wq_g) * x_scale_g, times w_scale. Its error over the weight-only reference is
  bounded per output by sum over groups of x_scale_g / 2 * sum_{k in g} |w[k, n]| (each
  activation moves by at most half its group's step). XLA's weight-only form dequantizes the
  whole weight to x's dtype first, which XLA:CPU materializes: up to 2.5x slower than the
  float weights it replaces (M = 1).
* `group` with int4 weights (two per byte, one scale per 128 rows of K per column): the same
  int8 x int8 dot (W4A8 dynamic). The bytes are unpacked to int8 on the fly, the even and odd
  rows of K apart (a byte holds rows 2r and 2r + 1, so nothing is interleaved: x's even and
  odd columns meet them), and x is quantized in the weights' own groups of 128, so each
  group's int32 product is rescaled once by x's scale times the weight's. The bound above
  holds with the dequantized weight.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from fdjax.ops import quant, reference
from pallas_kernels.common import quantized as quantized_format


@dataclasses.dataclass(frozen=True)
class Form:
  rows: int = 1   # pad x to at least this many rows
  group: int = 0  # int8 / int4 weights: the int8 dot, x in groups of this many (0: not)


GROUPS = (128, 64, 32)  # activations per scale, the largest that divides K


def group_for(k: int) -> int:
  """The group the int8 dot quantizes x in for K = k (0: none of GROUPS divides k)."""
  return next((g for g in GROUPS if k % g == 0), 0)


def quantize_groups(x, group: int):
  """x [M, K] (K a multiple of `group`) -> (int8 [M, K / group, group], float32 scales
  [M, K / group, 1]): each group scaled by its absmax / 127 and rounded; a group of zeros
  has scale 0 and quantizes to zeros."""
  m, k = x.shape
  xg = x.astype(jnp.float32).reshape(m, k // group, group)
  scale = jnp.max(jnp.abs(xg), axis=-1, keepdims=True) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.round(xg / safe).astype(jnp.int8), scale


def int8_dot(x, w: quant.QuantizedWeight, group: int):
  """x [M, K] @ int8 w [K, N] as int8 x int8 -> int32 per group of `group` entries of K,
  rescaled and summed; in x's dtype."""
  if not (isinstance(w, quant.QuantizedWeight) and w.bits == 8):
    raise ValueError("cpu_linear: the int8 dot takes int8 weights only")
  k, n = w.values.shape
  if group <= 0 or k % group:
    raise ValueError(f"cpu_linear: the int8 dot's group ({group}) must divide K ({k})")
  xq, x_scale = quantize_groups(x, group)
  groups = w.values.reshape(k // group, group, n)
  acc = lax.dot_general(xq, groups, (((2,), (1,)), ((1,), (0,))),
                        preferred_element_type=jnp.int32)  # [K / group, M, N]
  y = jnp.sum(acc.astype(jnp.float32) * x_scale.transpose(1, 0, 2), axis=0)
  return (y * w.scales.astype(jnp.float32)).astype(x.dtype)


def int4_dot(x, w: quant.QuantizedWeight, group: int):
  """x [M, K] @ int4 w [K, N] as int8 x int8 -> int32 per group of the weight's 128 rows of
  K (`group` must be that), the even and odd rows apart, rescaled by x's and the weight's
  scales and summed; in x's dtype."""
  if not (isinstance(w, quant.QuantizedWeight) and w.bits == 4 and w.values.ndim == 2):
    raise ValueError("cpu_linear: the int4 dot takes [K, N] int4 weights only")
  k, n = w.k, w.values.shape[1]
  if group != quantized_format.GROUP or k % group:
    raise ValueError(f"cpu_linear: the int4 dot's group ({group}) must be the weights' "
                     f"{quantized_format.GROUP} and divide K ({k})")
  xq, x_scale = quantize_groups(x, group)  # [M, G, group]
  g, half = k // group, group // 2
  acc = 0
  for part, rows in enumerate(quantized_format.unpack_int4(w.values)):  # K rows 2r, 2r + 1
    acc = acc + lax.dot_general(xq[..., part::2], rows.astype(jnp.int8).reshape(g, half, n),
                                (((2,), (1,)), ((1,), (0,))),
                                preferred_element_type=jnp.int32)  # [G, M, N]
  scale = x_scale.transpose(1, 0, 2) * w.scales.astype(jnp.float32)[:, None, :]  # [G, M, N]
  return jnp.sum(acc.astype(jnp.float32) * scale, axis=0).astype(x.dtype)


def linear(x, w, form: Form):
  """x [M, K] @ w [K, N] (float, or a QuantizedWeight) in `form`; in x's dtype."""
  m = x.shape[0]
  if m < form.rows:
    x = jnp.pad(x, ((0, form.rows - m), (0, 0)))
  if not form.group:
    y = reference.linear(x, w)
  elif isinstance(w, quant.QuantizedWeight) and w.bits == 4:
    y = int4_dot(x, w, form.group)
  else:
    y = int8_dot(x, w, form.group)
  return y[:m]
