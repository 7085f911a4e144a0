"""Flax model definitions; they call fdjax.ops.dispatch, never a kernel."""
from models.config import ModelConfig
from models.llama import Transformer

__all__ = ["ModelConfig", "Transformer"]
