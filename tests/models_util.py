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


def compiled(fn, *args, **kwargs):
  """fn(*args, **kwargs) compiled as one program: arrays (and pytrees of them, nnx modules
  included) are its inputs, Python scalars, strings, None and functions are fixed. Run
  eagerly, each operation compiles on its own at about 40 ms on this project's 2-core CPU,
  seconds a call, most of a test's time. A new program per call (nothing is reused from an
  earlier call, whatever was patched or overridden in between), traced here, so what the
  trace reads (dispatch.using, monkeypatches) is this moment's."""
  def fixed(v):
    return v is None or isinstance(v, (bool, int, float, str)) or (
        callable(v) and not isinstance(v, nnx.Module))

  # a fresh function each call: jax keeps traces per function, so nothing is reused
  return nnx.jit(lambda *a, **k: fn(*a, **k),
                 static_argnums=tuple(i for i, v in enumerate(args) if fixed(v)),
                 static_argnames=tuple(k for k, v in kwargs.items() if fixed(v)))(*args, **kwargs)


def forward(model, *args, **kwargs):
  """model(*args, **kwargs) as one compiled program (`compiled`)."""
  return compiled(lambda m, *a, **k: m(*a, **k), model, *args, **kwargs)
