"""The Pallas kernel modules of the GPU and TPU backends, imported when first used.

Importing them costs more than a CPU run uses: Mosaic GPU's MLIR dialects alone take ~0.9 s
(jax 0.12, this 2-core Xeon), Mosaic TPU's 0.2 s, Triton's 0.1 s, a third of what
`python -m fdjax generate` spent importing. The ops layer names each one with `module()`,
an importlib LazyLoader module: nothing is read until an attribute is, then it is the
module itself (the same object `import` gives anywhere else). A CPU program that never
takes a GPU or TPU branch never imports them."""
from __future__ import annotations

import importlib.util
import sys


def module(name: str):
  """The module `name` (e.g. "pallas_kernels.mosaic_gpu.flat_gemm"), executed on first
  attribute access; already imported: that module."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)  # imports the parent packages (docstrings)
  if spec is None:
    raise ModuleNotFoundError(f"no module named {name!r}", name=name)
  spec.loader = importlib.util.LazyLoader(spec.loader)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  parent, _, child = name.rpartition(".")
  setattr(sys.modules[parent], child, mod)  # as `import` leaves it
  spec.loader.exec_module(mod)
  return mod
