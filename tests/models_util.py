"""Small random fdjax models for the tests."""
import jax.numpy as jnp
from flax import nnx

from models import ModelConfig, Transformer


def tiny_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=12, max_position_embeddings=256)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_model(seed=0, dtype=jnp.float32, **overrides) -> Transformer:
  model = Transformer(tiny_config(**overrides), rngs=nnx.Rngs(seed), dtype=dtype)
  # Larger weights than the default init, so logits are far from uniform.
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and var[...].ndim == 2:
      var[...] = var[...] * 8.0
  return model
