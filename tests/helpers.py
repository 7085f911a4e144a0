"""Independent float64 numpy references and small utilities shared by the tests."""
from __future__ import annotations

import numpy as np


def rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values in result"
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def np_attention(q, k, v, mask, scale):
  """q [Tq, D], k/v [S, D], mask [Tq, S] -> [Tq, D]; rows with no key give zeros."""
  s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
  s = np.where(mask, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(mask, np.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1.0)
  return p @ v.astype(np.float64)


def np_decode_attention(q, k, v, lengths, scale):
  b, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  out = np.zeros((b, hq, d))
  for i in range(b):
    mask = (np.arange(s) < lengths[i])[None, :]
    for h in range(hq):
      out[i, h] = np_attention(q[i, h][None], k[i, :, h // g], v[i, :, h // g], mask, scale)[0]
  return out


def np_prefill_attention(q, k, v, lengths, causal, scale):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  out = np.zeros((b, t, hq, d))
  pos = np.arange(t)
  for i in range(b):
    mask = np.ones((t, t), bool)
    if causal:
      mask &= pos[:, None] >= pos[None, :]
    if lengths is not None:
      mask &= pos[None, :] < lengths[i]
    for h in range(hq):
      out[i, :, h] = np_attention(q[i, :, h], k[i, :, h // g], v[i, :, h // g], mask, scale)
  return out


def spy(monkeypatch, module, name):
  """Counts calls of module.name (at trace time) while still running it."""
  calls = []
  real = getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))
  return calls
