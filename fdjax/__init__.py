"""fdjax: FlashDecoding++ and CoPE in JAX/Pallas.

The names below load on first use (PEP 562), so importing an op module such as
fdjax.ops.dispatch never pulls in the engine (checkpoints, generate) and any import order works.
"""
import importlib

from fdjax import runtime as _runtime

_runtime.keep_cpu_loops_threaded()  # before any computation: XLA reads its flags once

_EXPORTS = {"dispatch": "fdjax.ops.dispatch", "load_pretrained": "fdjax.io.checkpoint",
            "save_pretrained": "fdjax.io.checkpoint", "CheckpointError": "fdjax.io.checkpoint",
            "generate": "fdjax.engine.decode_loop", "GenerationResult": "fdjax.engine.decode_loop",
            "KVCache": "fdjax.ops.kv_cache", "init_cache": "fdjax.ops.kv_cache",
            "load_tokenizer": "fdjax.io.tokenizer", "KVStore": "fdjax.engine.paging",
            "PagePool": "fdjax.engine.paging", "PoolExhausted": "fdjax.engine.paging",
            "quantize": "models.quantize", "make_mesh": "fdjax.io.mesh"}
_MODULES = {"dispatch"}  # names that are modules; the others are taken from theirs
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'fdjax' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  return module if name in _MODULES else getattr(module, name)
