"""Tensor parallelism (Megatron style) over a mesh axis: what each device holds of a model and
the collectives its forward pass needs.

With tp devices on the "model" axis each device runs the ordinary decoder (models/llama.py)
on a LOCAL config: num_heads / tp query heads, their KV heads (num_kv_heads / tp of them, or,
with fewer KV heads than devices, the one KV head its query heads share: KV heads are then
replicated), intermediate_size / tp (a mixture of experts: every expert's width / tp, the
router whole: see `local_config`), and a 1/tp slice of the vocabulary (padded to a
multiple of tp with zero rows whose logits are dropped). q/k/v and gate/up are split by
column (each device its own heads), the attention output and down projections by row, so
each block needs one all-reduce (psum) after each of the two; the LM head is split by
vocabulary and its logits all-gathered; the embedding lookup takes each device's vocabulary
slice (rows outside it masked) and sums over devices. The "data" axis holds independent
replicas that split the batch. Which slice of which checkpoint tensor a device holds is
models/layout.py's (`shard_pieces`); the mesh and its checks are fdjax/io/mesh.py's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fdjax.ops import checks

DATA, MODEL = "data", "model"  # the mesh's axes: replicas splitting the batch; tensor parallel


@dataclasses.dataclass(frozen=True)
class Parallel:
  """How a local model takes part in tensor parallelism: the mesh axis, its size, and the
  whole model's vocabulary (its LM head holds a padded 1/tp slice of it)."""
  axis: str
  tp: int
  vocab_size: int


def kv_heads(cfg, tp: int) -> int:
  """KV heads per device: num_kv_heads / tp, or 1 (replicated) with fewer than tp."""
  return max(1, cfg.num_kv_heads // tp)


def kv_head_start(cfg, tp: int, device: int) -> int:
  """The first KV head device `device` of tp holds (the one its query heads read)."""
  q_per_device = cfg.num_heads // tp
  return device * q_per_device // (cfg.num_heads // cfg.num_kv_heads) if (
      cfg.num_kv_heads < tp) else device * kv_heads(cfg, tp)


def padded_vocab(cfg, tp: int) -> int:
  return checks.cdiv(cfg.vocab_size, tp) * tp


def check(cfg, tp: int):
  """Refuses (ValueError, naming the numbers) a model that cannot be split tp ways."""
  checks.positive_int("tensor parallelism", "tp", tp)
  for name in ("num_heads", "intermediate_size", "moe_intermediate_size", "shared_expert_size"):
    if getattr(cfg, name) % tp:
      raise ValueError(f"tensor parallelism: tp={tp} does not divide the model's {name} "
                       f"({getattr(cfg, name)})")
  if cfg.qk_norm_whole and tp > 1:  # (its norm would sum over every device's heads)
    raise ValueError(f"tensor parallelism: tp={tp} for a model whose q/k norm spans all its "
                     "heads at once (OLMo 2) is not implemented; use tp=1 (dp splits the batch)")
  hkv = cfg.num_kv_heads
  if hkv % tp and tp % hkv:
    raise ValueError(f"tensor parallelism: the model's num_kv_heads ({hkv}) is neither a "
                     f"multiple nor a divisor of tp={tp}")


def local_config(cfg, tp: int):
  """The config each of tp devices runs (its share of the heads, the MLP and the vocab).

  A mixture of experts' experts are split as the dense MLP is, each expert's gate/up by
  column and down by row (every device 1/tp of every expert), not spread whole across devices
  (expert parallelism): at decode's few tokens a step reads only the k chosen experts, and
  whole experts would leave the devices that hold none of them idle while one reads two or
  three, where split experts give every device 1/tp of each. The router runs whole on every
  device (the same choice everywhere); the experts' partial sums and the shared expert's meet
  in one all-reduce each, as the dense MLP's."""
  check(cfg, tp)
  return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp,
                             num_kv_heads=kv_heads(cfg, tp),
                             intermediate_size=cfg.intermediate_size // tp,
                             moe_intermediate_size=cfg.moe_intermediate_size // tp,
                             shared_expert_size=cfg.shared_expert_size // tp,
                             vocab_size=padded_vocab(cfg, tp) // tp)


def reduce(x, parallel: Parallel | None):
  """The all-reduce after a row-parallel projection (attention output, down)."""
  return x if parallel is None else jax.lax.psum(x, parallel.axis)


def take_rows(table, ids, parallel: Parallel | None, axis: int):
  """Rows `ids` of an embedding table along `axis` (the vocabulary axis); with tensor
  parallelism the table is this device's vocabulary slice: ids outside it read zeros and the
  devices' lookups are summed."""
  if parallel is None:
    return jnp.take(table, ids, axis=axis)
  local = table.shape[axis]
  ids = ids - jax.lax.axis_index(parallel.axis) * local
  mine = (ids >= 0) & (ids < local)
  x = jnp.take(table, jnp.where(mine, ids, 0), axis=axis)
  mine = jnp.expand_dims(mine, 0 if axis else -1)  # the lookup's hidden axis: first or last
  return jax.lax.psum(jnp.where(mine, x, jnp.zeros((), x.dtype)), parallel.axis)


def gather_logits(logits, parallel: Parallel | None):
  """The whole vocabulary's logits from each device's slice (the padding dropped)."""
  if parallel is None:
    return logits
  logits = jax.lax.all_gather(logits, parallel.axis, axis=logits.ndim - 1, tiled=True)
  return logits[..., :parallel.vocab_size]
