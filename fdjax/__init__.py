"""fdjax: FlashDecoding++ and CoPE in JAX/Pallas.

The names below load on first use (PEP 562), so importing an op module such as
fdjax.dispatch never pulls in the engine (checkpoints, generate) and any import order works.
"""
import importlib

from fdjax import runtime as _runtime

_runtime.keep_cpu_loops_threaded()  # before any computation: XLA reads its flags once

_EXPORTS = {"dispatch": "fdjax.dispatch", "load_pretrained": "fdjax.checkpoint",
            "save_pretrained": "fdjax.checkpoint", "CheckpointError": "fdjax.checkpoint",
            "generate": "fdjax.decode_loop", "GenerationResult": "fdjax.decode_loop",
            "KVCache": "fdjax.kv_cache", "init_cache": "fdjax.kv_cache",
            "load_tokenizer": "fdjax.tokenizer", "KVStore": "fdjax.paging",
            "PagePool": "fdjax.paging", "PoolExhausted": "fdjax.paging",
            "quantize": "models.quantize", "make_mesh": "fdjax.mesh"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'fdjax' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  return module if module.__name__ == f"fdjax.{name}" else getattr(module, name)
