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

So a row is exact iff LO <= m - phi <= HI. Where the kernel rounds the weights exp(s - phi)
to float16 before they meet V (the Mosaic GPU decode kernel's WGMMA takes them in the input's
dtype), the window is float16's instead (`window`): a weight overflows past exp(11.09), and
below exp(-9.7) it is no longer normal (below exp(-16.6) it is 0), so the largest weight must
stay in [exp(-9), exp(11)]. bfloat16 has float32's exponent: float32's window.

Each split also records its largest score (a max-reduction it needs no synchronisation
for); after the splits are summed, rows outside the window, and rows whose sums are not
finite (an |v| beyond the bound above) or empty, are flagged and recomputed with the
ordinary online (synchronised) softmax. The guard is what makes a fixed phi safe: without it
a model whose scores leave the window gives inf and then NaN (ExecuTorch shipped exactly
that and reverted it).
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

LO = -40.0
HI = 60.0
LO_FLOAT16, HI_FLOAT16 = -9.0, 11.0  # weights rounded to float16 (see above)
DEFAULT_PHI = 0.0  # scores of the models we know fall well inside [phi + LO, phi + HI]


def window(weights_dtype=None) -> tuple[float, float]:
  """(LO, HI) for a kernel whose weights exp(s - phi) are in `weights_dtype` (None or a
  dtype with float32's exponent: float32's window)."""
  if weights_dtype is not None and jnp.dtype(weights_dtype) == jnp.float16:
    return LO_FLOAT16, HI_FLOAT16
  return LO, HI


def needs_recompute(row_max, denom, out, phi, bounds=(LO, HI)):
  """Rows whose async result cannot be trusted. row_max, denom [...]; out [..., D]; bounds:
  the window of m - phi (`window`). A row that saw no key (row_max -inf: no key yet, or none
  in its sliding window) has nothing to redo: its result, 0, is exact."""
  delta = row_max - phi
  in_window = (delta >= bounds[0]) & (delta <= bounds[1])
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


def check_call(op, q, mode, window, softcap, causal=True):
  """What every attention kernel checks first: q's head_dim and dtype, the mode ("async" or
  "online"), the window and soft cap."""
  check_inputs(op, q)
  check_mode(op, mode)
  check_options(op, window, softcap, causal)


def check_mode(op, mode):
  """"async" (the unified max value with the guard) or "online" (the synchronised softmax)."""
  if mode not in ("async", "online"):
    raise ValueError(f"{op}: unknown mode {mode!r}")


# Tests set this to run interpret mode's guard as a GPU runs it (see select_guard).
SELECT_IN_INTERPRET = False


def select_guard(interpret: bool) -> bool:
  """Whether the guard's recompute runs unconditionally over the flagged programs only and
  its rows are selected, rather than under lax.cond. A GPU kernel selects: XLA:GPU runs a
  conditional by copying its predicate to the host and blocking the host until the stream is
  done (xla/backends/gpu/runtime/conditional_thunk.cc), so each call would stall the GPU once,
  once per layer in a decode step. On an H200 the async path with the cond took 81 us against
  the online path's 47 at batch 1, 4k keys, 32 heads (bench/results/H200_NOTES.md). An
  inactive program reads no key, so a recompute with no flagged row is one near-empty
  launch. Interpret mode (the CPU) keeps the cond: free there, and it skips a slow
  interpreted pass; SELECT_IN_INTERPRET makes the tests take the GPU's form."""
  return not interpret or SELECT_IN_INTERPRET


# What the attention wrappers take as fixed (static) keyword arguments when jitted.
STATIC = ("heads_major", "sm_scale", "window", "softcap", "mode", "settings", "interpret",
          "return_stats", "select", "causal", "generation")


def jitted(fn):
  """An attention wrapper as one jitted program per shapes and STATIC arguments (as JAX's own
  Pallas ops are): called eagerly, each of its jnp operations and the guard's cond would
  compile and dispatch on its own; inside a model's jit it is inlined. A wrapper with a
  `select` argument gets select_guard(interpret) unless the caller gives one, decided at
  each call outside the jit, so a change of SELECT_IN_INTERPRET is a new program, never a
  stale trace."""
  params = inspect.signature(fn).parameters
  compiled = jax.jit(fn, static_argnames=tuple(n for n in params if n in STATIC))
  if "select" not in params:
    return compiled

  @functools.wraps(fn)
  def call(*args, **kwargs):
    kwargs.setdefault("select", select_guard(kwargs.get("interpret", False)))
    return compiled(*args, **kwargs)
  return call


def guarded(mode, run_async, run_online, no_flags, select=False):
  """The scheme every async kernel follows, as (out, flags). mode "online": run_online(None)
  (every row synchronised; flags `no_flags`). mode "async": (out, flags) = run_async(); the
  flagged rows are replaced by run_online(flags) (the kernel in online mode for the flagged
  rows' programs only), inside the same jitted function: under lax.cond when any row is
  flagged, or with `select` (see select_guard) always, with no branch."""
  if mode == "online":
    return run_online(None), no_flags
  out, flags = run_async()

  def recompute(out):
    return jnp.where(flags[..., None], run_online(flags), out)

  if select:
    return recompute(out), flags
  return jax.lax.cond(jnp.any(flags), recompute, lambda out: out, out), flags


def stats(flags) -> dict:
  """What return_stats gives: how many rows, and what fraction, the guard recomputed."""
  return {"recomputed_rows": jnp.sum(flags), "recomputed_fraction": jnp.mean(flags)}


def phi_operand(phi):
  """The unified max value as the kernels take it: float32 [1] (None: DEFAULT_PHI)."""
  return jnp.asarray(DEFAULT_PHI if phi is None else phi, jnp.float32).reshape(1)


def row_lengths(lengths, batch: int, s: int):
  """Valid keys per row as int32 [B] clipped to [0, s] (None: every row all s keys)."""
  if lengths is None:
    return jnp.full((batch,), s, jnp.int32)
  return jnp.clip(lengths.astype(jnp.int32), 0, s)


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


def combine_online(o, l, m, axis):
  """FlashDecoding's combine of split partials along `axis` (o [..., D]; l, m without D):
  rescale each split to the global max of its row, then sum and divide."""
  m_all = jnp.max(m, axis=axis, keepdims=True)
  w = jnp.where(jnp.isfinite(m), jnp.exp(m - jnp.where(jnp.isfinite(m_all), m_all, 0.0)), 0.0)
  den = jnp.sum(w * l, axis=axis)
  num = jnp.sum(jnp.expand_dims(w, -1) * o, axis=axis)
  return num / jnp.expand_dims(jnp.where(den > 0, den, 1.0), -1)


def combine_async(o, l, m, phi, axis, bounds=(LO, HI)):
  """The async combine of split partials along `axis`: numerators and denominators (all
  against the one phi) simply summed. Returns (out, rows the guard flags)."""
  den = jnp.sum(l, axis=axis)
  out = jnp.sum(o, axis=axis) / jnp.expand_dims(jnp.where(den > 0, den, 1.0), -1)
  return out, needs_recompute(jnp.max(m, axis=axis), den, out, phi, bounds)


def guarded_groups(run, phi, mode, batch: int, kv_heads: int, group: int, group_pad: int,
                   out_dtype, return_stats: bool, select: bool = False, weights_dtype=None):
  """The GPU split-KV decode kernels' driver (Triton and Mosaic GPU): run(active, online) runs
  the kernel over the (row, KV head) programs `active` (int32 [B, Hkv]) and gives partials o
  [B, Hkv, splits, group_pad, D], l and m [B, Hkv, splits, group_pad]; the splits are combined,
  the guard's flagged groups rerun online (`guarded`, with `select`), the padding rows of each
  group dropped. weights_dtype: what the kernel rounds exp(s - phi) to (the guard's `window`).
  Returns [B, Hkv * group, D] in out_dtype (and stats)."""
  def run_async():
    out, flags = combine_async(*run(jnp.ones((batch, kv_heads), jnp.int32), online=False),
                               phi[0], axis=2, bounds=window(weights_dtype))
    return out, flags & (jnp.arange(group_pad) < group)  # padding rows never count

  def run_online(flags):  # only the flagged (row, KV head) groups run
    active = jnp.ones((batch, kv_heads), bool) if flags is None else jnp.any(flags, axis=-1)
    return combine_online(*run(active.astype(jnp.int32), online=True), axis=2)

  out, flags = guarded(mode, run_async, run_online,
                       jnp.zeros((batch, kv_heads, group_pad), bool), select)
  out = out[:, :, :group].reshape(batch, kv_heads * group, -1).astype(out_dtype)
  return (out, stats(flags[:, :, :group])) if return_stats else out
