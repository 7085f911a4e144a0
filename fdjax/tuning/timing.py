"""How fdjax times device work: one rule, used by `fdjax tune` and every benchmark.

JAX dispatches asynchronously, so blocking after every call would add the host's round trip
(tens of microseconds on a GPU) to kernels that take a few. Instead a timed round issues many
calls back to back, over input sets that rotate (so a small input does not sit in the L2
cache and flatter the kernel), and blocks once at the end: the time per call is the device's
whenever the device is slower than the host's dispatch, which `dispatch_floor` measures. The
median of several rounds is reported. Never time on zeros: callers pass random inputs.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from fdjax.ops import checks

L2_BYTES = 64 << 20  # more than any current GPU's L2 (H100: 50 MB, H200: 60 MB)


def sets_needed(set_bytes: int, limit: int = 8) -> int:
  """How many distinct input sets make one rotation at least 4x the L2 (at most `limit`)."""
  return int(max(1, min(limit, checks.cdiv(4 * L2_BYTES, max(set_bytes, 1)))))


def seconds_per_call(fn, arg_sets, *, calls: int = 30, rounds: int = 5, warmup: int = 2) -> float:
  """Median over `rounds` of (time of `calls` back-to-back calls of fn) / calls.

  fn: a jitted function; arg_sets: a list of argument tuples (fresh random inputs), used in
  turn. Every set is run `warmup` times first (compilation stays out of the numbers).
  """
  if not arg_sets:
    raise ValueError("seconds_per_call needs at least one argument set")
  for args in arg_sets:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(rounds):
    out = None
    t0 = time.perf_counter()
    for i in range(calls):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / calls)
  return statistics.median(per_call)


def dispatch_floor(calls: int = 200) -> float:
  """Seconds per call of a trivial jitted op timed the same way: below this, a measured time
  is the host's, not the device's."""
  x = jnp.ones((8,), jnp.float32) * 1.5
  f = jax.jit(lambda a: a * 1.0001)
  return seconds_per_call(f, [(x,)], calls=calls)


def copy_bandwidth_gbps(nbytes_: int = 1 << 30) -> float:
  """Device-memory bandwidth of a large copy-like kernel: (bytes read + bytes written) / s."""
  sets = [(jax.random.normal(jax.random.key(i), (nbytes_ // 4,), jnp.float32),)
          for i in range(2)]
  f = jax.jit(lambda a: a * 1.0001 + 1.0)
  t = seconds_per_call(f, sets, calls=10, rounds=5)
  return 2 * nbytes_ / t / 1e9
