"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), on device."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.ops import checks


class Sampler(NamedTuple):
  """Static sampling settings (hashable, so a jitted loop specialises on them)."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def validate(self, vocab_size: int) -> "Sampler":
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None:
      checks.positive_int("sampling", "top_k", self.top_k)
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    top_k = None if self.top_k is None else min(self.top_k, vocab_size)
    return Sampler(float(self.temperature), top_k, self.top_p)


def filter_logits(logits, top_k: int | None, top_p: float | None):
  """Sets to -inf every logit outside the top-k and outside the top-p nucleus."""
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p  # the most likely token always stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits, key, sampler: Sampler):
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampler.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampler.temperature, sampler.top_k, sampler.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class RowSampling(NamedTuple):
  """Per-row sampling settings, as arrays (a continuous batch mixes requests): temperature
  [B] (0: greedy), top_k [B] int (0: off), top_p [B] (1: off), seed [B] uint32. A row's
  token at position p is drawn with the key fold_in(key(seed), p), so what a request
  samples does not depend on the batch it ran in."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array

  @classmethod
  def of(cls, settings) -> "RowSampling":
    """From (temperature, top_k | None, top_p | None, seed) per row, as numpy arrays (the
    caller puts them on the device)."""
    t, k, p, s = zip(*settings) if settings else ((), (), (), ())
    return cls(np.asarray(t, np.float32), np.asarray([x or 0 for x in k], np.int32),
               np.asarray([1.0 if x is None else x for x in p], np.float32),
               np.asarray(s, np.uint32))


def filter_rows(logits, rows: RowSampling):
  """filter_logits with each row's own temperature, top-k and top-p (one sort per row)."""
  v = logits.shape[-1]
  x = logits / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
  ordered = -jnp.sort(-x, axis=-1)
  k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, v), v)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  x = jnp.where(x < kth, -jnp.inf, x)
  ordered = jnp.where(jnp.arange(v)[None, :] < k[:, None], ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1)
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(x < threshold, -jnp.inf, x)


def sample_rows(logits, rows: RowSampling, positions):
  """logits [B, V] float32 -> token ids [B] int32, row b drawn as rows[b] says for the token
  at positions[b]; an all-greedy batch skips the sort."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(rows.seed, positions)
    drawn = jax.vmap(lambda key, x: jax.random.categorical(key, x))(keys,
                                                                      filter_rows(logits, rows))
    return jnp.where(rows.temperature > 0, drawn.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda _: greedy, None)
