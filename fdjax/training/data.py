"""Byte-level text data for training: the Python standard library's own sources (found with
sysconfig), or any files. Held-out files are chosen by a hash of their path, so the split
is the same on every machine with the same Python."""
from __future__ import annotations

import hashlib
import os
import sysconfig

import numpy as np


def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "test", "tests",
                                                   "__pycache__", "idlelib", "lib2to3"))
    files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
  if not files:
    raise ValueError(f"no .py files under the standard library at {root}")
  return files


def split_files(files, held_out_fraction=0.05):
  def held(f):
    name = os.path.basename(os.path.dirname(f)) + "/" + os.path.basename(f)
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 1000 < held_out_fraction * 1000
  train = [f for f in files if not held(f)]
  test = [f for f in files if held(f)]
  return train, test


def read_bytes(files) -> np.ndarray:
  chunks = []
  for f in files:
    with open(f, "rb") as fh:
      chunks.append(np.frombuffer(fh.read(), np.uint8))
  return np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)


def byte_batches(data: np.ndarray, batch: int, seq_len: int, what: str = "data"):
  """batch(rng) -> (ids [batch, seq_len + 1] int32, mask of ones [batch, seq_len])."""
  if data.size < seq_len + 2:
    raise ValueError(f"the {what} has {data.size} bytes, fewer than seq_len + 2 = "
                     f"{seq_len + 2}")
  def batch_fn(rng):
    starts = rng.integers(0, data.size - seq_len - 1, batch)
    ids = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return ids, np.ones((batch, seq_len), np.float32)
  return batch_fn
