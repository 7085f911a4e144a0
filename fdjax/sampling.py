"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), on device."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampler(NamedTuple):
  """Static sampling settings (hashable, so a jitted loop specialises on them)."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def validate(self, vocab_size: int) -> "Sampler":
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k):
      raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
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
