"""Weight-only quantized weights: the type `dispatch.linear` takes in place of a [K, N] array,
and quantize / dequantize.

int8: one scale per output column; int4: one scale per group of 128 input rows, two values
per byte (the format is pallas_kernels.common.quantized's). Symmetric, round to nearest:
scale = max |w| / 127 (int8) or / 7 (int4) over the column or group, stored in the model's
dtype, and q = round(w / scale) with that stored scale. A QuantizedWeight is a pytree (its
arrays are the leaves; bits and K are static), so it sits in an nnx.Param, goes through jit,
and `w[...]` reads it as a parameter's array is read. A mixture of experts' stacked weights
[E, K, N] are quantized per expert: values and scales gain the leading E axis, each expert's
slice the [K, N] format (`take` picks experts, as indexing an array does).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from fdjax.ops import checks
from pallas_kernels.common import quantized as quantized_format

METHODS = ("int8", "int4")
GROUP = quantized_format.GROUP
_QMAX = {8: 127, 4: 7}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  values: jax.Array   # int8 [(E,) K, N] or uint8 [(E,) ceil(K / 2), N] (two int4 per byte)
  scales: jax.Array   # [(E,) N] (int8) or [(E,) ceil(K / 128), N] (int4), in the model's dtype
  bits: int = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))

  @property
  def method(self) -> str:
    return f"int{self.bits}"

  @property
  def shape(self) -> tuple[int, ...]:
    """The [K, N] (stacked experts: [E, K, N]) of the weight it stands for."""
    return tuple(self.values.shape[:-2]) + (self.k, self.values.shape[-1])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    """The dtype it dequantizes to: the scales'."""
    return self.scales.dtype

  @property
  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in (self.values, self.scales))

  def __getitem__(self, index):
    if index is not Ellipsis:
      raise TypeError("a QuantizedWeight is read whole (w[...]); dequantize(w) gives the array")
    return self


def bits_of(method: str) -> int:
  checks.choice("quantize", "method", method, METHODS)
  return int(method[3:])


def stored_shapes(method: str, k: int, n: int) -> tuple[tuple, tuple]:
  """(values shape, scales shape) of a [K, N] weight quantized to `method`."""
  return quantized_format.stored_shapes(bits_of(method), k, n)


def weight_nbytes(k: int, n: int, dtype, method: str | None = None) -> int:
  """Bytes of a [K, N] weight in `dtype`, or quantized to `method` (scales in `dtype`)."""
  itemsize = jnp.dtype(dtype).itemsize
  if method is None:
    return k * n * itemsize
  values, scales = stored_shapes(method, k, n)
  return math.prod(values) + math.prod(scales) * itemsize


def nbytes(tree) -> int:
  """Bytes of the arrays in a pytree (a model's state: quantized weights count their values
  and scales)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))


def quantize(w, method: str, dtype=None) -> QuantizedWeight:
  """A float [K, N] weight (or stacked experts' [E, K, N], each quantized alone) quantized to
  `method`, scales in `dtype` (default: w's)."""
  bits = bits_of(method)
  if getattr(w, "ndim", None) not in (2, 3):
    raise ValueError(f"quantize: the weight must be [K, N] or stacked experts' [E, K, N], got "
                     f"shape {getattr(w, 'shape', None)}")
  dtype = jnp.dtype(dtype or w.dtype)
  if dtype not in checks.FLOAT_DTYPES:
    raise ValueError(f"quantize: scales must be float32, bfloat16 or float16, got {dtype}")
  if w.ndim == 3:  # one expert at a time: float32 temporaries of one expert, not of all
    one = [_quantize_jit(w[i], bits, dtype) for i in range(w.shape[0])]
    return QuantizedWeight(jnp.stack([q.values for q in one]),
                           jnp.stack([q.scales for q in one]), bits, w.shape[1])
  return _quantize_jit(w, bits, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_jit(w, bits: int, dtype) -> QuantizedWeight:
  """quantize's work on one [K, N] weight."""
  w = jnp.asarray(w, jnp.float32)
  k, n = w.shape
  qmax = _QMAX[bits]
  if bits == 8:
    scales = (jnp.max(jnp.abs(w), axis=0) / qmax).astype(dtype)
  else:
    groups = checks.cdiv(k, GROUP)
    padded = jnp.pad(w, ((0, groups * GROUP - k), (0, 0)))
    scales = (jnp.max(jnp.abs(padded.reshape(groups, GROUP, n)), axis=1) / qmax).astype(dtype)
  per_row = _per_row(scales, bits, k)
  q = jnp.clip(jnp.round(w / jnp.where(per_row > 0, per_row, 1.0)), -qmax, qmax)
  values = q.astype(jnp.int8) if bits == 8 else quantized_format.pack_int4(q)
  return QuantizedWeight(values, scales, bits, k)


def _per_row(scales, bits: int, k: int):
  """Each of the K rows' scales [..., K or 1, N] in float32."""
  scales = scales.astype(jnp.float32)
  if bits == 8:
    return scales[..., None, :]
  return jnp.repeat(scales, GROUP, axis=-2)[..., :k, :]


def dequantize(w: QuantizedWeight, dtype=None):
  """The [(E,) K, N] float weight w stands for, in `dtype` (default: the scales')."""
  dtype = dtype or w.dtype
  if w.bits == 8:
    q = w.values.astype(jnp.float32)
  else:
    even, odd = quantized_format.unpack_int4(w.values)
    q = jnp.stack([even, odd], axis=-2).reshape(*w.values.shape[:-2], -1, w.values.shape[-1])
    q = q[..., :w.k, :].astype(jnp.float32)
  return (q * _per_row(w.scales, w.bits, w.k)).astype(dtype)


def take(w: QuantizedWeight, index) -> QuantizedWeight:
  """Stacked experts' quantized weight at expert ids `index` (any shape; XLA's gather
  clamps ids past the end), as w[index] picks a float array's."""
  if w.values.ndim != 3:
    raise ValueError(f"take: expected stacked experts [E, K, N], got {w.shape}")
  return QuantizedWeight(w.values[index], w.scales[index], w.bits, w.k)


def from_stored(values, scales, method: str, k: int, dtype=None) -> QuantizedWeight:
  """A QuantizedWeight from stored arrays (a checkpoint's; stacked experts with a leading
  axis on both), checked against K."""
  bits = bits_of(method)
  values, scales = jnp.asarray(values), jnp.asarray(scales, dtype or scales.dtype)
  if values.ndim == 3 and values.shape[:1] != scales.shape[:1]:
    raise ValueError(f"{method} weight: values {values.shape} and scales {scales.shape} hold "
                     f"different numbers of experts")
  one = lambda a: jax.ShapeDtypeStruct(a.shape[1:] if values.ndim == 3 else a.shape, a.dtype)  # noqa: E731
  x = jax.ShapeDtypeStruct((1, k), scales.dtype)
  quantized_format.check(f"{method} weight", x, one(values), one(scales), bits)
  return QuantizedWeight(values, scales, bits, k)
