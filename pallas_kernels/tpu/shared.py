"""What the TPU kernels share: facts about the TPU generations they are sized for, how a
block respects the (8, 128) tiling, the launch (`pallas_call` with scalar prefetch and
dimension semantics), and TPU interpret mode with the race detector.

A TPU core walks a kernel's grid in order; each blocked operand is copied HBM -> VMEM by
Pallas' pipeline one grid step ahead (two buffers: the double buffer FlashDecoding++ asks
for, given by the hardware's DMA engine instead of software pipelining). Grid axes marked
"parallel" may be split across the TensorCores of a chip (two on v5p's megacore, one on
v5e and v6e); "arbitrary" axes carry accumulators from step to step (outputs whose block
does not change along them stay in VMEM until it does).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.tiling import fill  # noqa: F401  (settings' defaults: one rule)

LANES = 128  # the minor dimension of a vector register / VMEM tile


@dataclasses.dataclass(frozen=True)
class Generation:
  """What sizes the kernels for one TPU generation (public figures; `vmem` per TensorCore)."""
  name: str            # fdjax's name: "v5e", "v6e", "v5p"
  device_kind: str     # jax's Device.device_kind on it
  topology: str        # a 2x2(x1) slice for jax.experimental.topologies
  cores: int           # TensorCores a "parallel" grid axis is split across
  vmem: int            # bytes of VMEM per core
  mxu: int             # the MXU's side: 128 (v5e, v5p) or 256 (v6e)
  hbm_gbps: float      # HBM bandwidth per chip, GB/s
  bf16_tflops: float


GENERATIONS = {g.name: g for g in (
    Generation("v5e", "TPU v5 lite", "v5e:2x2", 1, 128 << 20, 128, 819.0, 197.0),
    Generation("v6e", "TPU v6 lite", "v6e:2x2", 1, 128 << 20, 256, 1640.0, 918.0),
    Generation("v5p", "TPU v5", "v5p:2x2x1", 2, 64 << 20, 128, 2765.0, 459.0),
)}
DEFAULT = "v5e"
# What a kernel's blocks (double-buffered) and scratch may take of VMEM by default: the
# scoped VMEM XLA gives a kernel is 16 MiB on v5e and v5p and 32 MiB on v6e (libtpu 0.0.42:
# a 2048 x 2048 bfloat16 tile of w, double-buffered, is refused on v5e and v5p and compiles
# on v6e); a kernel that needs more would have to raise vmem_limit_bytes, and one past the
# core's VMEM is refused whatever the limit.
BLOCK_BUDGET = 8 << 20


def generation(kind: str | None) -> Generation:
  """The generation of a device kind ("TPU v5 lite") or name ("v6e"); v5e's facts for
  anything else (a CPU in interpret mode)."""
  for g in GENERATIONS.values():
    if kind in (g.name, g.device_kind):
      return g
  return GENERATIONS[DEFAULT]


def sublanes(dtype) -> int:
  """Rows of one VMEM tile of `dtype`: 8 for 32-bit, 16 for bfloat16 (packed in pairs)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def round_up(x: int, m: int) -> int:
  return pl.cdiv(x, m) * m


def interpret_params(interpret):
  """False (compile with Mosaic), an InterpretParams as given, or True: TPU interpret mode
  with the race detector on and fresh buffers filled with NaN (a read of memory no one wrote
  poisons the result)."""
  if interpret is True:
    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  return interpret


def call(kernel, operands, *, grid, in_specs, out_specs, out_shape, scalars=(), semantics,
         interpret, name, scratch=()):
  """pallas_call on the TPU: `scalars` (int32 arrays: lengths, page tables, flags) are
  prefetched to SMEM before the grid runs and handed to every index map and to the kernel
  first; `semantics` per grid axis: "parallel" or "arbitrary"."""
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=list(scratch))
  return pl.pallas_call(
      kernel, grid_spec=spec, out_shape=out_shape, name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=tuple(semantics)),
      interpret=interpret_params(interpret))(*scalars, *operands)


def smem():
  """A small operand (phi) kept whole in scalar memory."""
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def dot(a, b, *, trans_b=False):
  """a @ b (a @ b.T with trans_b) on the MXU into float32; float32 operands at HIGHEST
  precision (the MXU's default would round them to bfloat16 passes)."""
  exact = a.dtype == jnp.float32 or b.dtype == jnp.float32
  return jax.lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST if exact else None,
                             preferred_element_type=jnp.float32)
