"""Independent float64 numpy references and small utilities shared by the tests."""
from __future__ import annotations

import numpy as np


def rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values in result"
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def np_attention(q, k, v, mask, scale, softcap=None):
  """q [Tq, D], k/v [S, D], mask [Tq, S] -> [Tq, D]; rows with no key give zeros."""
  s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  s = np.where(mask, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(mask, np.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1.0)
  return p @ v.astype(np.float64)


def np_decode_attention(q, k, v, lengths, scale, window=None, softcap=None):
  """One query per row at position lengths[b] - 1; with a window, keys j > that - window."""
  b, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  out = np.zeros((b, hq, d))
  for i in range(b):
    mask = (np.arange(s) < lengths[i])[None, :]
    if window is not None:
      mask = mask & (np.arange(s) > lengths[i] - 1 - window)[None, :]
    for h in range(hq):
      out[i, h] = np_attention(q[i, h][None], k[i, :, h // g], v[i, :, h // g], mask, scale,
                               softcap)[0]
  return out


def np_prefill_attention(q, k, v, lengths, causal, scale, window=None, softcap=None,
                         q_start=None):
  """Queries at positions q_start[b] + i (default i) against keys 0..S-1."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  out = np.zeros((b, t, hq, d))
  k_pos = np.arange(s)
  for i in range(b):
    q_pos = np.arange(t) + (0 if q_start is None else q_start[i])
    mask = np.ones((t, s), bool)
    if causal:
      mask &= q_pos[:, None] >= k_pos[None, :]
    if window is not None:
      mask &= q_pos[:, None] - k_pos[None, :] < window
    if lengths is not None:
      mask &= k_pos[None, :] < lengths[i]
    for h in range(hq):
      out[i, :, h] = np_attention(q[i, :, h], k[i, :, h // g], v[i, :, h // g], mask, scale,
                                  softcap)
  return out


def spy(monkeypatch, module, name, keywords=False):
  """Counts calls of module.name (at trace time) while still running it: a list of its name
  per call, or with `keywords` of each call's keyword arguments."""
  calls = []
  real = getattr(module, name)
  monkeypatch.setattr(module, name,
                      lambda *a, **k: calls.append(k if keywords else name) or real(*a, **k))
  return calls


def _record(monkeypatch, module, class_name) -> list:
  """A list to which the race detector class `module.class_name` appends each race it finds
  from now on (jax keeps one detector per interpreted kernel, replaced by the next kernel's:
  its own `races_found` only tells of the last kernel run). From jax 0.12 the detector raises
  on a race by default (`on_race="raise"`); here it records, as 0.11's does, so the test
  reports every race the same way on both."""
  seen = []

  class Recording(getattr(module, class_name)):
    def __setattr__(self, name, value):
      if name == "on_race":
        value = "warn"
      if name == "races_found" and value:
        seen.append(True)
      super().__setattr__(name, value)

  monkeypatch.setattr(module, class_name, Recording)
  return seen


def record_races(monkeypatch) -> list:
  """_record for TPU interpret mode's race detector."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  return _record(monkeypatch, ipc, "RaceDetectionState")


def cuda_text(jitted, *args) -> str:
  """The StableHLO of jitted(*args) traced and lowered for a CUDA GPU on this GPU-less host
  (the kernels lower for an H100: pallas_kernels.triton.shared.described_gpu, around the trace too,
  as jax reads the mesh in context when it traces)."""
  from pallas_kernels.triton import shared
  with shared.described_gpu():
    return jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def record_gpu_races(monkeypatch) -> list:
  """_record for Mosaic GPU interpret mode's race detector (its own class)."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  return _record(monkeypatch, gpu_callbacks, "GPURaceDetectionState")
