"""The linear layer as XLA:CPU runs it fastest, in the form fdjax.ops.selection.cpu_linear
picks (measured on a 2-core AMD EPYC with AVX-512 bf16 and VNNI, jax 0.12; the numbers are in
the rule's docstring):

* `rows`: x padded with zero rows to this many before the dot, the result sliced back. XLA:CPU
  runs a one-row bfloat16 dot through a path 2.6x slower than a two-row one; the padded row
  costs nothing measurable, and the real row's result is the same.
* `int8_dot`: int8 weights (fdjax.ops.quant, one scale per output column) multiplied as int8 x
  int8 with int32 accumulation, which XLA:CPU runs on the processor's VNNI dot-product
  instructions: each row of x is quantized on the fly to int8 with its own scale (absmax /
  127, round to nearest), and y = (xq @ wq) * x_scale * w_scale. This is W8A8 dynamic
  quantization, as llama.cpp's q8 dot products and PyTorch's quantize_dynamic compute it; its
  error over the weight-only reference is bounded per output by
  x_scale / 2 * sum_k |w[k, n]| (each activation moves by at most half a step). XLA's
  weight-only form dequantizes the whole weight to x's dtype first, which XLA:CPU
  materializes: 3-4x slower than the float weights it replaces.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from fdjax.ops import quant, reference


@dataclasses.dataclass(frozen=True)
class Form:
  rows: int = 1           # pad x to at least this many rows
  int8_dot: bool = False  # int8 weights: the W8A8 dynamic product


def quantize_rows(x):
  """x [M, K] -> (int8 [M, K], float32 scales [M, 1]): each row scaled by its absmax / 127 and
  rounded; a row of zeros has scale 0 and quantizes to zeros."""
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.round(xf / safe).astype(jnp.int8), scale


def int8_dot(x, w: quant.QuantizedWeight):
  """x [M, K] @ int8 w [K, N] as int8 x int8 -> int32, rescaled; in x's dtype."""
  xq, x_scale = quantize_rows(x)
  acc = lax.dot(xq, w.values, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * x_scale * w.scales.astype(jnp.float32)
  return y.astype(x.dtype)


def linear(x, w, form: Form):
  """x [M, K] @ w [K, N] (float, or a QuantizedWeight) in `form`; in x's dtype."""
  m = x.shape[0]
  if m < form.rows:
    x = jnp.pad(x, ((0, form.rows - m), (0, 0)))
  if form.int8_dot:
    if not (isinstance(w, quant.QuantizedWeight) and w.bits == 8):
      raise ValueError("cpu_linear: the int8 dot takes int8 weights only")
    y = int8_dot(x, w)
  else:
    y = reference.linear(x, w)
  return y[:m]
