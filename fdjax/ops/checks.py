"""Input checks at the public API boundary.

chex does the shape/dtype assertions; its AssertionError becomes a ValueError that
names the op, so every bad input across fdjax surfaces as one exception type.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _wrap(op: str, fn, *args, **kwargs):
  try:
    fn(*args, **kwargs)
  except AssertionError as e:
    raise ValueError(f"{op}: {e}") from None


def rank(op: str, name: str, x, r: int) -> None:
  if getattr(x, "ndim", None) != r:
    raise ValueError(f"{op}: {name} must have rank {r}, got shape {getattr(x, 'shape', None)}")


def float_dtype(op: str, name: str, x) -> None:
  if x.dtype not in FLOAT_DTYPES:
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def same_dtype(op: str, **arrays) -> None:
  _wrap(op, chex.assert_trees_all_equal_dtypes, *arrays.values())


def int_vector(op: str, name: str, x, n: int) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{op}: {name} must be an integer array, got {x.dtype}")
  if x.shape != (n,):
    raise ValueError(f"{op}: {name} must have shape ({n},), got {x.shape}")


def in_range(op: str, name: str, x, lo: int, hi: int) -> None:
  """Values of x in [lo, hi], checked where they are known now (outside jit)."""
  known = concrete(x)
  if known is not None:
    bad = sorted({int(v) for v in np.ravel(known) if not lo <= int(v) <= hi})
    if bad:
      raise ValueError(f"{op}: {name} {bad[:8]} out of range [{lo}, {hi}]")


def gqa(op: str, q_heads: int, kv_heads: int) -> None:
  if kv_heads < 1 or q_heads % kv_heads:
    raise ValueError(f"{op}: query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")


def positive_int(op: str, name: str, value) -> None:
  """value is an int (not a bool) of at least 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{op}: {name} must be a positive integer, got {value!r}")


def finite_number(op: str, name: str, value, zero: bool = False) -> float:
  """value is a finite int or float (not a bool) above 0 (at least 0 with `zero`); as a
  float."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
    raise ValueError(f"{op}: {name} must be a finite number {'at least' if zero else 'above'}"
                     f" 0, got {value!r}")
  return float(value)


def cdiv(a: int, b: int) -> int:
  """a / b rounded up (positive b)."""
  return -(-a // b)


def choice(op: str, name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{op}: unknown {name} {value!r}; expected one of {tuple(allowed)}")


def concrete(x):
  """x as a numpy array when its value is known now (outside jit), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
