"""The CoPE paper's three synthetic tasks as data generators, scaled down to run on a CPU.

Each task gives `sample(rng, n, split) -> (ids [n, L] int32, answer_mask [n, L - 1] float32)`:
the model reads ids[:, :-1] and is scored where answer_mask is 1 (its prediction of ids[:,
1:] there). `error(pred, ids, mask)` is the task's error rate. Splits are "id" and names
starting with "ood". Sequences of one split and task have one length, so they batch.

* Flip-Flop (Liu et al. 2023, as in CoPE sec. 4.1), 24 instruction pairs by default (the
  paper: 256): instructions w (write a bit), i (ignore a bit), r (read: repeat the last
  written bit), each followed by a bit. id: ignore with probability 0.8; ood_sparse: 0.98
  (more ignores between the write and the read); ood_dense: 0.1 (reads close to their
  writes), Liu et al.'s three splits. Error: wrong bits over all reads.
* Selective copy (Gu & Dao 2023, CoPE sec. 4.2): data tokens scattered among blanks, then a
  separator, then the data tokens in order. The paper copies 16 tokens among 256 blanks
  in-distribution, 128 (ood_dense) and 512 (ood_sparse); here 4 tokens among 16, 8 and 32
  blanks (the same halving and doubling). Error: sequences not copied exactly.
* Counting (CoPE sec. 4.3): statements `x = 0 ;`, `x ++ ;`, `pass ;` drawn 1 : 7 : 50 over
  1, 3 or 5 variables, then `print x ?` and the count of `x ++ ;` since x's last reset.
  The paper draws 3 to 512 statements; here 3 to 20 (id), and 21 to 40 for ood_long (longer
  than any training sequence); shorter sequences are padded on the left with `pass ;`.
  Error: wrong counts.
"""
from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------- Flip-Flop

FF_W, FF_R, FF_I, FF_0, FF_1 = range(5)


class FlipFlop:
  name = "flipflop"
  vocab_size = 5
  splits = {"id": 0.8, "ood_sparse": 0.98, "ood_dense": 0.1}  # p(ignore), Liu et al.'s splits

  def __init__(self, pairs: int = 24):
    self.pairs = pairs

  def sample(self, rng, n, split="id"):
    p_ignore = self.splits[split]
    ids = np.zeros((n, 2 * self.pairs), np.int32)
    mask = np.zeros((n, 2 * self.pairs - 1), np.float32)
    for r in range(n):
      bit = int(rng.integers(2))
      ids[r, :2] = FF_W, FF_0 + bit
      for i in range(1, self.pairs):
        if i == self.pairs - 1:
          op = FF_R  # every sequence ends with a read
        else:
          u = rng.random()
          op = FF_I if u < p_ignore else (FF_W if u < p_ignore + (1 - p_ignore) / 2 else FF_R)
        if op == FF_W:
          bit = int(rng.integers(2))
          val = bit
        elif op == FF_R:
          val = bit
          mask[r, 2 * i] = 1.0  # predicting position 2i + 1 from position 2i
        else:
          val = int(rng.integers(2))
        ids[r, 2 * i:2 * i + 2] = op, FF_0 + val
    return ids, mask

  @staticmethod
  def error(pred, ids, mask):
    wrong = (pred != ids[:, 1:]) & (mask > 0)
    return float(wrong.sum() / max(mask.sum(), 1))


# -------------------------------------------------------------------- Selective copy

class SelectiveCopy:
  name = "selective_copy"
  n_data_tokens = 8   # distinct data values
  BLANK, SEP = 8, 9
  vocab_size = 10
  splits = {"id": 16, "ood_dense": 8, "ood_sparse": 32}  # blanks (paper: 256/128/512)

  def __init__(self, to_copy: int = 4):
    self.to_copy = to_copy

  def sample(self, rng, n, split="id"):
    blanks = self.splits[split]
    width = self.to_copy + blanks
    length = width + 1 + self.to_copy
    ids = np.full((n, length), self.BLANK, np.int32)
    mask = np.zeros((n, length - 1), np.float32)
    for r in range(n):
      data = rng.integers(0, self.n_data_tokens, self.to_copy)
      where = np.sort(rng.choice(width, self.to_copy, replace=False))
      ids[r, where] = data
      ids[r, width] = self.SEP
      ids[r, width + 1:] = data
    mask[:, width:] = 1.0
    return ids, mask

  @staticmethod
  def error(pred, ids, mask):
    wrong = ((pred != ids[:, 1:]) & (mask > 0)).any(axis=1)
    return float(wrong.mean())


# -------------------------------------------------------------------------- Counting

class Counting:
  name = "counting"
  EQ, ZERO, INC, PASS, SEMI, PRINT, QMARK = range(5, 12)
  NUM0 = 12
  # statements per sequence, drawn uniformly from [lo, hi] (the paper: 3 to 512)
  splits = {"id": (3, 20), "ood_long": (21, 40)}

  def __init__(self, variables: int = 1):
    self.variables = variables
    self.vocab_size = self.NUM0 + max(hi for _, hi in self.splits.values()) + 1

  def _statements(self, rng, n_statements):
    toks, counts = [], [0] * self.variables
    for v in range(self.variables):  # every variable starts at zero
      toks += [v, self.EQ, self.ZERO, self.SEMI]
    for _ in range(n_statements):
      kind = rng.choice(3, p=np.array([1, 7, 50]) / 58)
      v = int(rng.integers(self.variables))
      if kind == 0:
        toks += [v, self.EQ, self.ZERO, self.SEMI]
        counts[v] = 0
      elif kind == 1:
        toks += [v, self.INC, self.SEMI]
        counts[v] += 1
      else:
        toks += [self.PASS, self.SEMI]
    return toks, counts

  def sample(self, rng, n, split="id"):
    lo, hi = self.splits[split]
    # One length per split (so batches share a shape): 3 tokens a statement, against an
    # expected 2.14; the rare longer sequence is drawn again.
    length = 4 * self.variables + 3 * hi + 4
    ids = np.zeros((n, length), np.int32)
    for r in range(n):
      n_statements = int(rng.integers(lo, hi + 1))
      while True:
        toks, counts = self._statements(rng, n_statements)
        v = int(rng.integers(self.variables))
        seq = toks + [self.PRINT, v, self.QMARK, self.NUM0 + counts[v]]
        if len(seq) <= length:
          break
      pad = length - len(seq)  # left padding with `pass ;` (and one `;` if odd)
      ids[r] = [self.SEMI] * (pad % 2) + [self.PASS, self.SEMI] * (pad // 2) + seq
    mask = np.zeros((n, length - 1), np.float32)
    mask[:, -1] = 1.0
    return ids, mask

  @staticmethod
  def error(pred, ids, mask):
    return float(((pred[:, -1] != ids[:, -1])).mean())


TASKS = ("flipflop", "selective_copy", "counting")


def get(name: str, variables: int = 1):
  if name == "flipflop":
    return FlipFlop()
  if name == "selective_copy":
    return SelectiveCopy()
  if name == "counting":
    return Counting(variables)
  raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
