"""The Pallas kernel modules of the GPU and TPU backends, run when first used.

Importing them costs more than a CPU run uses: Mosaic GPU's MLIR dialects alone take ~0.9 s
(jax 0.12, a 2-core Xeon), Mosaic TPU's 0.2 s, Triton's 0.1 s: a fifth of what `python -m
fdjax generate` took to start. Each is named once, below, with `module()` (dispatch and
selection import the names): the module object is made and registered at once (what `import`
anywhere else gives), and its code runs when an attribute it does not have yet is first
read, under a lock, so threads that reach it together wait for one run. (importlib's
LazyLoader does not: CPython's _LazyModule switched its class before running the code,
gh-114763, and Python 3.12.1 still does.) A CPU program that never takes a GPU or TPU branch
never runs them."""
from __future__ import annotations

import importlib.util
import sys
import threading
import types

_LOCK = threading.RLock()
_RUNNING: set[str] = set()


class _OnFirstUse(types.ModuleType):
  """A module whose code has not run yet: the first read of a name it lacks runs it."""

  def __getattr__(self, attr):
    name = self.__spec__.name
    with _LOCK:
      if type(self) is _OnFirstUse and name not in _RUNNING:
        _RUNNING.add(name)  # the module's own code reading a name it lacks: AttributeError
        try:
          self.__spec__.loader.exec_module(self)
          self.__class__ = types.ModuleType
        finally:
          _RUNNING.discard(name)
    return types.ModuleType.__getattribute__(self, attr)


def module(name: str) -> types.ModuleType:
  """The module `name` (e.g. "pallas_kernels.mosaic_gpu.flat_gemm"), its code run on first
  use (a failure there raises then, and again at the next use); already imported: that
  module."""
  with _LOCK:
    if name in sys.modules:
      return sys.modules[name]
    spec = importlib.util.find_spec(name)  # imports the parent packages (docstrings)
    if spec is None:
      raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    mod = importlib.util.module_from_spec(spec)
    mod.__class__ = _OnFirstUse
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
      setattr(sys.modules[parent], child, mod)  # as `import` leaves it
    return mod


mosaic_decode = module("pallas_kernels.mosaic_gpu.decode_attention")
mosaic_flat_gemm = module("pallas_kernels.mosaic_gpu.flat_gemm")
mosaic_grouped = module("pallas_kernels.mosaic_gpu.grouped_gemm")
mosaic_grouped_quantized = module("pallas_kernels.mosaic_gpu.grouped_quantized_gemm")
mosaic_quantized = module("pallas_kernels.mosaic_gpu.quantized_gemm")
tpu_decode = module("pallas_kernels.tpu.decode_attention")
tpu_flat_gemm = module("pallas_kernels.tpu.flat_gemm")
tpu_gemv = module("pallas_kernels.tpu.gemv")
tpu_prefill = module("pallas_kernels.tpu.prefill_attention")
tpu_shared = module("pallas_kernels.tpu.shared")
triton_cope = module("pallas_kernels.triton.cope_attention")
triton_decode = module("pallas_kernels.triton.decode_attention")
triton_flat_gemm = module("pallas_kernels.triton.flat_gemm")
triton_gemv = module("pallas_kernels.triton.gemv")
triton_prefill = module("pallas_kernels.triton.prefill_attention")
triton_quantized = module("pallas_kernels.triton.quantized_gemm")
triton_shared = module("pallas_kernels.triton.shared")
