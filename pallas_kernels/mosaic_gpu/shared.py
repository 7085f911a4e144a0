"""What the Mosaic GPU kernels share: the shared-memory layout WGMMA reads, and how a kernel
is asked to run in Mosaic GPU's interpret mode."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

H100_SMS = 132  # programs to aim for: two per SM (the Triton kernels' rule)


def transforms(minor: int, dtype):
  """The layout a TMA copy writes a block in so WGMMA can read it: 8-row tiles of the widest
  swizzle the minor dimension fills (128 bytes from 64 bfloat16 on, 32 bytes at 16)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def interpret_kwargs(interpret) -> dict:
  """plgpu.kernel's keyword for `interpret`: False runs the compiled kernel; True (or a
  plgpu.InterpretGPUParams, e.g. with detect_races) Mosaic GPU's interpreter on the CPU."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return dict(interpret=interpret)
  return dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
