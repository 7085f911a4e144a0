"""How fdjax times device work: one rule, used by `fdjax tune` and every benchmark.

JAX dispatches asynchronously, but each call still costs the host a dispatch: about 40
microseconds per call with jax 0.11.2 on an H200 (bench/results/gpu_env), longer than a decode
kernel takes there (a 100 MB weight read at 4 TB/s is 25 us). Calls timed back to back from
Python therefore measure the host, not the device: the first H200 run showed every JAX kernel
between 35 and 65 us while cuBLAS read the same weights in 27. So a timed round runs all its
calls inside one compiled program, a loop over input sets that rotate (so a small input does
not sit in the L2 cache and flatter the kernel): the dispatch is paid once per round.
Each call's inputs pass through an optimization barrier with the loop's carry, so XLA can
neither hoist a call (or any part of it, such as a baseline's dequantization) out of the
loop nor merge calls; each output passes through one too and one element of it feeds the
carry, so nothing is dropped or computed in part. The loop's trip count is a constant, so
XLA:GPU runs it without reading a predicate back to the host (which a conditional, or a loop
of unknown length, does once per step). The median of several rounds is reported.
Never time on zeros: callers pass random inputs. `dispatch_floor` times back-to-back host
calls: what a call costs when it is not inside a compiled loop.
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from fdjax.ops import checks

L2_BYTES = 64 << 20  # more than any current GPU's L2 (H100: 50 MB, H200: 60 MB)

# A benchmark's smoke form (`--smoke`, `--quick`: the check, on a CPU, that the script runs
# end to end) times nothing anyone reads; there `smoke()` makes each timing one warm-up and
# one round over one input set: an interpret-mode kernel runs 3 times, not 7 rounds of up to
# 8 sets (bench/attention.py's smoke form 82 -> 39 s on 2 cores).
SMOKE = False


def smoke() -> None:
  """Every later `seconds_per_call` in this process in its smoke form (see SMOKE)."""
  global SMOKE
  SMOKE = True


def sets_needed(set_bytes: int, limit: int = 8) -> int:
  """How many distinct input sets make one rotation at least 4x the L2 (at most `limit`)."""
  return int(max(1, min(limit, checks.cdiv(4 * L2_BYTES, max(set_bytes, 1)))))


def seconds_per_call(fn, arg_sets, *, calls: int = 30, rounds: int = 5, warmup: int = 2) -> float:
  """Median over `rounds` of (time of one program running fn `calls` times) / calls.

  fn: a traceable function (jitted or not) of arrays; arg_sets: a list of argument tuples
  (fresh random inputs), used in turn (the calls are rounded up to whole rotations). The
  program is compiled and run `warmup` times first, so compilation stays out of the numbers.
  """
  if not arg_sets:
    raise ValueError("seconds_per_call needs at least one argument set")
  if SMOKE:
    arg_sets, rounds, warmup = arg_sets[:1], 1, 1
  reps = max(1, -(-calls // len(arg_sets)))
  program = jax.jit(functools.partial(_looped, fn, reps))
  for _ in range(warmup):
    jax.block_until_ready(program(arg_sets))
  per_call = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(program(arg_sets))
    per_call.append((time.perf_counter() - t0) / (reps * len(arg_sets)))
  return statistics.median(per_call)


def _looped(fn, reps, arg_sets):
  """fn over every set, `reps` times, in one while loop (see the module's docstring)."""
  def one(acc, args):
    args, acc = jax.lax.optimization_barrier((args, acc))  # args now depend on the step
    out = jax.lax.optimization_barrier(fn(*args))  # the whole output is computed
    first = jax.tree_util.tree_leaves(out)[0]
    return acc + first.reshape(-1)[0].astype(jnp.float32)
  def step(_, acc):
    for args in arg_sets:
      acc = one(acc, args)
    return acc
  return jax.lax.fori_loop(0, reps, step, jnp.zeros((), jnp.float32))


def dispatch_floor(calls: int = 200) -> float:
  """Seconds per call of a trivial jitted op called back to back from Python: what each call
  from the host costs, which a timed loop of kernels inside one program does not pay."""
  x = jnp.ones((8,), jnp.float32) * 1.5
  f = jax.jit(lambda a: a * 1.0001)
  for _ in range(2):
    jax.block_until_ready(f(x))
  per_call = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(x)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / calls)
  return statistics.median(per_call)


def copy_bandwidth_gbps(nbytes_: int = 1 << 30) -> float:
  """Device-memory bandwidth of a large copy-like kernel: (bytes read + bytes written) / s."""
  sets = [(jax.random.normal(jax.random.key(i), (nbytes_ // 4,), jnp.float32),)
          for i in range(2)]
  f = jax.jit(lambda a: a * 1.0001 + 1.0)
  t = seconds_per_call(f, sets, calls=10, rounds=5)
  return 2 * nbytes_ / t / 1e9
