"""fdjax: FlashDecoding++ and CoPE in JAX/Pallas."""
from fdjax import dispatch
from fdjax.checkpoint import CheckpointError, load_pretrained, save_pretrained
from fdjax.decode_loop import GenerationResult, generate
from fdjax.kv_cache import KVCache, init_cache
from fdjax.tokenizer import load_tokenizer

__all__ = ["dispatch", "load_pretrained", "save_pretrained", "CheckpointError", "generate",
           "GenerationResult", "KVCache", "init_cache", "load_tokenizer"]
