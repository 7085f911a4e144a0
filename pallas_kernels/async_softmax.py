"""FlashDecoding++'s asynchronous softmax: the unified max value `phi` and its guard.

softmax(s) = exp(s - phi) / sum(exp(s - phi)) for any phi, so with one fixed phi every KV
split (or key block) accumulates its numerator sum(exp(s - phi) v) and denominator
sum(exp(s - phi)) on its own, and the partials are simply added: no running max, no
rescaling, no exchange of maxima. It is exact as long as the float32 accumulators neither
overflow nor lose the row to underflow, which depends only on the row's largest score m:

* Overflow. A row sums at most S terms, each at most exp(m - phi), times |v|. float32 holds
  up to exp(88.7). With S <= 2^24 (ln = 16.6) and |v| <= exp(12) (~1.6e5) the sums stay
  finite while m - phi <= 88.7 - 16.6 - 12 = 60: HI = 60.
* Underflow. float32 normals reach down to exp(-87.3). If m - phi >= -40, the largest term
  is >= exp(-40) (4e-18) and its products with |v| >= 1e-20 stay normal, so the row keeps
  full precision; terms that do flush to zero weigh exp(-87.3 + 40) < 1e-20 relative to the
  largest, far below float32's epsilon: LO = -40.

So a row is exact iff LO <= m - phi <= HI. Each split also records its largest score (a
max-reduction it needs no synchronisation for); after the splits are summed, rows outside
the window, and rows whose sums are not finite (an |v| beyond the bound above) or empty,
are flagged and recomputed with the ordinary online (synchronised) softmax. The guard is
what makes a fixed phi safe: without it a model whose scores leave the window gives inf and
then NaN (ExecuTorch shipped exactly that and reverted it).
"""
from __future__ import annotations

import jax.numpy as jnp

LO = -40.0
HI = 60.0
DEFAULT_PHI = 0.0  # scores of the models we know fall well inside [phi + LO, phi + HI]


def needs_recompute(row_max, denom, out, phi):
  """Rows whose async result cannot be trusted. row_max, denom [...]; out [..., D]. A row
  that saw no key (row_max -inf: no key yet, or none in its sliding window) has nothing to
  redo: its result, 0, is exact."""
  delta = row_max - phi
  in_window = (delta >= LO) & (delta <= HI)
  finite = jnp.isfinite(denom) & (denom > 0) & jnp.all(jnp.isfinite(out), axis=-1)
  return (row_max > -jnp.inf) & ~(in_window & finite)


def unsupported(head_dim: int, dtype) -> str | None:
  """Why the attention kernels cannot take this head_dim / dtype, or None if they can:
  Triton's dot and tiles need a power-of-two head_dim >= 16, in float32 or bfloat16."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    return f"head_dim {head_dim} is not a power of two >= 16"
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    return f"dtype {jnp.dtype(dtype).name} is not float32 or bfloat16"
  return None


def check_inputs(op, q):
  why = unsupported(q.shape[-1], q.dtype)
  if why:
    raise ValueError(f"{op}: the Pallas kernel cannot take this input: {why}")


def cap(s, softcap):
  """Soft-capped scores, softcap * tanh(s / softcap) (Gemma), or s when softcap is None."""
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


def check_options(op, window, softcap, causal=True):
  """A sliding window is a positive number of keys, for causal attention only; a soft cap a
  positive number (both None when unused)."""
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ValueError(f"{op}: window must be a positive integer (keys), got {window!r}")
    if not causal:
      raise ValueError(f"{op}: a sliding window needs causal attention")
  if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                              or not softcap > 0):
    raise ValueError(f"{op}: softcap must be a positive number, got {softcap!r}")
