"""What every kernel shares: facts about the GPU they size themselves for (read from the
device where there is one, the H100 SXM's where there is none: a CPU, or compiling for a
described GPU), how a kernel's settings take their defaults, and the launch."""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

DOT_MIN_ROWS = 16  # the smallest M (and N, K) Triton's tensor-core dot takes
H100_SMS = 132
H100_SHARED_MEMORY = 227 * 1024  # bytes a block may opt in to (sm_90); JAX does not report it


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming multiprocessors of the first GPU, else the H100's 132."""
  for d in jax.devices():
    if d.platform == "gpu" and getattr(d, "core_count", None):
      return int(d.core_count)
  return H100_SMS


def fill(settings, default):
  """A kernel's settings with every field left None taken from `default` (both are the
  kernel's frozen Settings dataclass)."""
  given = {f: v for f, v in vars(settings).items() if v is not None} if settings else {}
  return dataclasses.replace(default, **given)


def call(kernel, args, *, grid, out_shape, settings, interpret, name):
  """pallas_call with every operand left in device memory (the kernel loads its own tiles,
  masked at the edges) and the settings' warps and software-pipeline stages."""
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  several = isinstance(out_shape, (list, tuple))
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[anywhere] * len(args),
      out_specs=[anywhere] * len(out_shape) if several else anywhere, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=settings.num_warps,
                                           num_stages=settings.num_stages),
      interpret=interpret, name=name)(*args)
