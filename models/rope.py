"""Rotary position embedding (Hugging Face's rotate-half layout), with Llama-3 and linear scaling."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
  """The [head_dim // 2] inverse frequencies, float32."""
  freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "default":
    pass
  elif kind == "linear":
    freq = freq / scaling["factor"]
  elif kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_ctx / low, freq / factor, freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    freq = np.where(medium, smoothed, scaled)
  else:
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {SUPPORTED_ROPE_TYPES}")
  return freq.astype(np.float32)


def apply(x, positions, freq):
  """x [B, T, H, D]; positions [B, T] int -> x rotated, in x's dtype."""
  angles = positions.astype(jnp.float32)[..., None, None, None] * jnp.asarray(freq)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)  # [B,T,1,1,D/2]
  # x as its halves [.., 2, D/2]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), the halves
  # swapped by a reverse and the sign a constant: elementwise only (rotate-half's
  # concatenates stay unfused ops of their own in XLA:CPU's decode step from jax 0.11 on)
  halves = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
  sign = jnp.asarray([[-1.0], [1.0]], x.dtype)
  return (halves * cos + jnp.flip(halves, axis=-2) * (sign * sin)).reshape(x.shape)
