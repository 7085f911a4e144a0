"""fdjax: FlashDecoding++ and CoPE in JAX/Pallas.

The names below load on first use (PEP 562), so importing an op module such as
fdjax.ops.dispatch never pulls in the engine (checkpoints, generate) and any import order works.
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys

from fdjax import runtime as _runtime

_runtime.keep_cpu_loops_threaded()  # before any computation: XLA reads its flags once


class _Siblings(importlib.abc.MetaPathFinder):
  """Finds the packages that sit beside fdjax/ (models/, pallas_kernels/: the project's top
  level) where they are. An editable install's finder runs after sys.path's folders, so a
  folder of the same name in the working directory (say models/llama/ holding a checkpoint)
  would otherwise be imported in their place, as a namespace package; this finder is put
  first only when that would happen."""
  ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def __init__(self, names):
    self.names = names

  def find_spec(self, name, path=None, target=None):
    if path is not None or name not in self.names:
      return None
    folder = os.path.join(self.ROOT, name)
    return importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def _shadowed() -> list[str]:
  """The sibling packages that `import` would not take from beside fdjax/."""
  out = []
  for name in ("models", "pallas_kernels"):
    init = os.path.join(_Siblings.ROOT, name, "__init__.py")
    if name not in sys.modules and os.path.exists(init):
      spec = importlib.util.find_spec(name)
      if spec is None or spec.origin != init:
        out.append(name)
  return out


if _shadowed():
  sys.meta_path.insert(0, _Siblings(tuple(_shadowed())))

_EXPORTS = {"dispatch": "fdjax.ops.dispatch", "load_pretrained": "fdjax.io.checkpoint",
            "save_pretrained": "fdjax.io.checkpoint", "CheckpointError": "fdjax.io.checkpoint",
            "generate": "fdjax.engine.decode_loop", "GenerationResult": "fdjax.engine.decode_loop",
            "embed": "fdjax.engine.embed",
            "KVCache": "fdjax.ops.kv_cache", "init_cache": "fdjax.ops.kv_cache",
            "load_tokenizer": "fdjax.io.tokenizer", "KVStore": "fdjax.engine.paging",
            "PagePool": "fdjax.engine.paging", "PoolExhausted": "fdjax.engine.paging",
            "quantize": "models.quantize", "make_mesh": "fdjax.io.mesh",
            "cpu_devices": "fdjax.io.mesh"}
_MODULES = {"dispatch"}  # names that are modules; the others are taken from theirs
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'fdjax' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  return module if name in _MODULES else getattr(module, name)
