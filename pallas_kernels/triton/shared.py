"""What every kernel shares: facts about the GPU they size themselves for (read from the
device where there is one, the H100 SXM's where there is none: a CPU, or compiling for a
described GPU), how a kernel's settings take their defaults, and the launch."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the kernels of this folder take Pallas's Triton backend from here
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # a JAX without it (deprecated since 0.11): fdjax.ops.selection says so
  plgpu = None
AVAILABLE = plgpu is not None  # whether this JAX has Pallas's Triton backend

DOT_MIN_ROWS = 16  # the smallest M (and N, K) Triton's tensor-core dot takes
H100_SMS = 132
H100_KIND = "NVIDIA H100 80GB HBM3"  # the device kind jax reports for an H100 SXM
H100_SHARED_MEMORY = 227 * 1024  # bytes a block may opt in to (sm_90); JAX does not report it
# How an sm_90 SM gives out its resources (CUDA occupancy rules; fdjax.tuning.aot counts with them):
SM90_REGISTER_UNIT = 256       # registers are allocated per warp in units of this many
SM90_SHARED_UNIT = 128         # shared memory is allocated per block in units of this many bytes
SM90_SHARED_RESERVED = 1024    # bytes of shared memory the system reserves per block
SM90_MAX_PROGRAMS_PER_SM = 32  # resident blocks per SM


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming multiprocessors of the first GPU, else the H100's 132."""
  for d in jax.devices():
    if d.platform == "gpu" and getattr(d, "core_count", None):
      return int(d.core_count)
  return H100_SMS


@contextlib.contextmanager
def described_gpu():
  """Context in which the kernels lower for a CUDA GPU on a host that has none
  (`.lower(lowering_platforms=("cuda",))`, or dispatch.lowering_for("cuda")): jax (0.11 on)
  asks the mesh in context which GPU Pallas' Triton lowering is for; here that is an H100,
  set as a one-device abstract mesh. A mesh in context that already names a device (a
  described GPU's, fdjax.tuning.aot.on) or a GPU present is left as it is."""
  from jax.sharding import (AbstractDevice, AbstractMesh, AxisType, get_abstract_mesh,
                            use_abstract_mesh)
  if (getattr(get_abstract_mesh(), "abstract_device", None) is not None
      or any(d.platform == "gpu" for d in jax.devices())):
    yield
    return
  h100 = AbstractDevice(device_kind=H100_KIND, num_cores=H100_SMS, platform="gpu")
  # Auto: the mesh names the device only; it shards nothing (Explicit would type every array)
  with use_abstract_mesh(AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,),
                                      abstract_device=h100)):
    yield


def fit_blocks(block_q: int, block_k: int, head_dim: int, dtype, limits: dict) -> tuple:
  """Halves the larger block (block_q on a tie; neither below DOT_MIN_ROWS) until
  block_q * block_k * head_dim <= limits[itemsize of dtype]. The product bounds the score
  and output tiles a program holds, and so its registers; each kernel's limits are where it
  stops spilling when compiled for the H100 (bench/results/kernels_h100.md). float32 has
  the smaller limit: its exact dots run on the plain cores, not the tensor cores."""
  limit = limits[jnp.dtype(dtype).itemsize]
  while block_q * block_k * head_dim > limit and max(block_q, block_k) > DOT_MIN_ROWS:
    if block_q >= block_k and block_q > DOT_MIN_ROWS:
      block_q //= 2
    else:
      block_k //= 2
  return block_q, block_k


def call(kernel, args, *, grid, out_shape, settings, interpret, name):
  """pallas_call with every operand left in device memory (the kernel loads its own tiles,
  masked at the edges) and the settings' warps and software-pipeline stages."""
  if not AVAILABLE:
    raise ValueError(f"{name}: this JAX has no Pallas Triton backend (deprecated since 0.11); "
                     f"use impl='auto', 'pallas_mosaic' or 'xla'")
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  several = isinstance(out_shape, (list, tuple))
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[anywhere] * len(args),
      out_specs=[anywhere] * len(out_shape) if several else anywhere, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=settings.num_warps,
                                           num_stages=settings.num_stages),
      interpret=interpret, name=name)(*args)
