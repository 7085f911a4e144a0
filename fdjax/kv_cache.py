"""The KV cache: an explicit pytree passed into the model and returned by it.

One [B, S, Hkv, D] array per layer for keys and for values (the layout the decode
kernels read, so a decode step writes one row per sequence and never transposes or
copies the cache), and `lengths` [B]: how many entries of each row are valid.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  k: tuple
  v: tuple
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]


def init_cache(config, batch: int, max_len: int, dtype) -> KVCache:
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  zeros = lambda: jnp.zeros(shape, dtype)
  return KVCache(k=tuple(zeros() for _ in range(config.num_layers)),
                 v=tuple(zeros() for _ in range(config.num_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def write_prefill(cache_layer, new):
  """Writes a prompt's [B, T, Hkv, D] entries at positions [0, T)."""
  return jax.lax.dynamic_update_slice(cache_layer, new.astype(cache_layer.dtype), (0, 0, 0, 0))


def write_step(cache_layer, new, positions):
  """Writes one [B, 1, Hkv, D] entry per row at its own position (ragged batch)."""
  b = new.shape[0]
  return cache_layer.at[jnp.arange(b), positions].set(new[:, 0].astype(cache_layer.dtype))
