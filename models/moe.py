"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE) in Flax NNX.

The router is a [H, E] matrix applied in float32; each token goes to its `experts_per_token`
most probable experts (softmax, top-k, renormalised with `norm_topk_prob`), each a gated MLP
like the dense one, and their outputs are summed with the routing weights. The experts' work
is `fdjax.ops.dispatch.moe` (which picks how by tokens per expert); this file never picks a
kernel. Experts are stacked: w_gate_up [E, H, 2F] (gate, up fused as in the dense MLP),
w_down [E, F, H]. Qwen2-MoE adds a shared expert every token goes through, scaled by
sigmoid(x @ shared_gate). With tensor parallelism each device holds 1/tp of every expert's
width (models/parallel.py says why) and the router whole.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fdjax.ops import dispatch
from models import parallel
from models.config import MLP_ACTIVATIONS, ModelConfig


def _normal(rngs, shape, dtype, std=0.02):
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class SparseMLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs, dtype, tp=None,
               shared: nnx.Module | None = None):
    self.tp = tp  # parallel.Parallel: cfg is one device's share, 1/tp of every expert
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.router = _normal(rngs, (h, e), dtype)
    self.w_gate_up = _normal(rngs, (e, h, 2 * f), dtype)
    self.w_down = _normal(rngs, (e, f, h), dtype)
    self.shared = shared  # the dense MLP of the shared expert, or None
    self.shared_gate = None if shared is None else _normal(rngs, (h, 1), dtype)
    self.top_k = cfg.experts_per_token
    self.normalize = cfg.norm_topk_prob
    self.activation = cfg.mlp_activation

  def __call__(self, x):
    logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    y = parallel.reduce(dispatch.moe(x, logits, self.w_gate_up[...], self.w_down[...],
                                     top_k=self.top_k, normalize=self.normalize,
                                     activation=MLP_ACTIVATIONS[self.activation]), self.tp)
    if self.shared is not None:
      y = y + jax.nn.sigmoid(dispatch.linear(x, self.shared_gate[...])) * self.shared(x)
    return y
