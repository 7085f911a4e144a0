"""The one table of how a model's parameters map to Hugging Face tensors.

Each entry names one fdjax parameter (its path in the module tree) and the checkpoint tensors
it is made of: Hugging Face stores matrices [out, in] (`transpose`: fdjax keeps [in, out], the
`linear` op's [K, N]) and q/k/v and gate/up apart (fdjax fuses them along the output axis, in
the order listed), except Phi-3, whose checkpoints hold them fused as fdjax does
(`fused_checkpoint`: one tensor each). Norm names follow the family: Llama's
post_attention_layernorm is the norm before the MLP, Gemma's (`sandwich_norms`) the norm of
the attention's output, with pre_/post_feedforward_layernorm around the MLP. Loading, saving
and the shape checks are all derived from it (fdjax.io.checkpoint); `split_last` is the one
fused-tensor split, used by the model too. A
weight quantized to int8 / int4 (fdjax.ops.quant) is stored under the same names as its values
plus a NAME_scale tensor of scales, both [out, ...] and fused / split the same way.

With tensor parallelism (models/parallel.py) each entry also says how it is split across
devices (`split`), and `shard_pieces` which slices of which checkpoint tensors one device's
part is made of: q/k/v and gate/up by column, each device its own heads / rows of each part
(KV heads repeated when there are fewer than devices), the attention output and down
projections by row, the embedding and LM head by vocabulary (zero-padded), the rest whole;
a mixture of experts' stacked experts each split as the dense MLP, the router whole.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fdjax.ops import quant
from models import parallel, positions

SCALE_SUFFIX = "_scale"  # a quantized tensor's scales: "...q_proj.weight_scale"


@dataclasses.dataclass(frozen=True)
class Entry:
  param: tuple        # path in the model, e.g. ("layers", 0, "attn", "wqkv")
  names: tuple        # checkpoint tensor names, fused along fdjax's last axis in this order
  shapes: tuple       # their checkpoint shapes
  transpose: bool     # checkpoint [out, in] -> fdjax [in, out]
  # only ever a weight a linear layer (dispatch.linear's w) or the experts (dispatch.moe's
  # w_gate_up / w_down) multiply by: quantizable
  linear: bool = False
  # Across tensor-parallel devices: None (whole on each), "qkv" / "gate_up" (by column, each
  # part its own heads / rows), "rows" (by fdjax's input axis), "vocab" (by vocabulary).
  split: str | None = None
  # > 0: a mixture of experts' stacked weight [experts, ...]: `names` and `shapes` list each
  # expert's tensors in turn (its parts fused as above), expert 0 first.
  experts: int = 0

  def groups(self) -> list[tuple[tuple, tuple]]:
    """(names, shapes) of each slice along the stacked expert axis; one group if unstacked."""
    if not self.experts:
      return [(self.names, self.shapes)]
    n = len(self.names) // self.experts
    return [(self.names[i:i + n], self.shapes[i:i + n]) for i in range(0, len(self.names), n)]

  def tensors(self, method: str | None = None) -> list[tuple[str, tuple]]:
    """(name, shape) of each checkpoint tensor: the listed ones, or, for a weight quantized
    to `method` ("int8" / "int4"), each one's values and scales, [out, ...] as the weight."""
    if method is None:
      return list(zip(self.names, self.shapes))
    out = []
    for name, (rows, k) in zip(self.names, self.shapes):
      values, scales = quant.stored_shapes(method, k, rows)
      out += [(name, values[::-1]), (name + SCALE_SUFFIX, scales[::-1])]
    return out

  @property
  def sizes(self) -> list[int]:
    """Each tensor's share of the fused parameter's last axis (of one expert's slice)."""
    return [s[0] if self.transpose else s[-1] for s in self.groups()[0][1]]

  @property
  def shape(self) -> tuple:
    """The fdjax parameter's shape."""
    first = self.shapes[0]
    one = tuple(first[1:] if self.transpose else first[:-1]) + (sum(self.sizes),)
    return (self.experts,) + one if self.experts else one

  @property
  def split_axis(self) -> int | None:
    """The fdjax axis split across tensor-parallel devices, or None."""
    if self.split is None:
      return None
    first_axis = self.split == "rows" or (self.split == "vocab" and not self.transpose)
    return (1 if self.experts else 0) if first_axis else len(self.shape) - 1


def split_last(x, sizes):
  """The parts of a tensor fused along its last axis (q / k / v, gate / up)."""
  parts, start = [], 0
  for size in sizes:
    parts.append(x[..., start:start + size])
    start += size
  return parts


def assemble(entry: Entry, parts) -> np.ndarray:
  """An fdjax parameter from its checkpoint arrays in the entry's order (whole tensors, or one
  device's slices of them, `shard_pieces`): each [out, in] transposed, fused along the last
  axis, a mixture of experts' experts (each its parts fused) stacked."""
  parts = [p.T if entry.transpose else p for p in parts]
  fuse = lambda ps: ps[0] if len(ps) == 1 else np.concatenate(ps, axis=-1)  # noqa: E731
  if not entry.experts:
    return fuse(parts)
  n = len(parts) // entry.experts
  return np.stack([fuse(parts[i:i + n]) for i in range(0, len(parts), n)])


def qkv_sizes(cfg) -> list[int]:
  """The fused projection's parts: q, k, v, and CoPE's gate keys where it has its own."""
  d, kv = cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return [cfg.num_heads * d] + [kv] * (3 if cfg.gate_keys else 2)


def shard_pieces(entry: Entry, cfg, tp: int, device: int) -> list[tuple[str, int, int, int]]:
  """What device `device` of tp holds of an entry's parameter: (checkpoint tensor name, its
  axis, start, stop) slices, fused along the parameter's last axis in this order after the
  entry's transpose; rows from the tensor's end on are zeros (the padded vocabulary)."""
  if entry.split is None:
    return [(name, 0, 0, shape[0]) for name, shape in zip(entry.names, entry.shapes)]
  if entry.experts:  # each expert's pieces in turn (the caller stacks them)
    return [piece for names, shapes in entry.groups() for piece in shard_pieces(
        dataclasses.replace(entry, names=names, shapes=shapes, experts=0), cfg, tp, device)]
  if entry.split in ("rows", "vocab"):
    (name,), (shape,) = entry.names, entry.shapes
    axis = 1 if entry.split == "rows" else 0
    size = (shape[axis] if entry.split == "rows" else parallel.padded_vocab(cfg, tp)) // tp
    return [(name, axis, device * size, (device + 1) * size)]
  if entry.split == "qkv":
    d, hq, hkv = cfg.head_dim, cfg.num_heads // tp, parallel.kv_heads(cfg, tp)
    kv0 = parallel.kv_head_start(cfg, tp, device)
    wanted = [(device * hq * d, hq * d)] + [(kv0 * d, hkv * d)] * (len(qkv_sizes(cfg)) - 1)
  else:  # gate_up: of the dense MLP, an expert or the shared expert (its own width)
    f = sum(entry.sizes) // 2 // tp
    wanted = [(device * f, f)] * 2
  # The parts (q, k, v or gate, up) are separate tensors, or one fused tensor (Phi-3).
  sizes = qkv_sizes(cfg) if entry.split == "qkv" else [sum(entry.sizes) // 2] * 2
  names = entry.names if len(entry.names) > 1 else entry.names * len(sizes)
  offsets = [0] * len(sizes) if len(entry.names) > 1 else [sum(sizes[:i]) for i in
                                                            range(len(sizes))]
  return [(name, 0, off + start, off + start + n)
          for name, off, (start, n) in zip(names, offsets, wanted)]


def quantized_pieces(entry: Entry, pieces, method: str) -> tuple[list, list]:
  """The slices of a quantized weight's stored values and of its NAME_scale scales that make
  the same part of it as the float weight's slices `pieces` (shard_pieces', of [out, in]
  tensors). Output rows take their values and their scales alike; input rows (a split "by
  rows") take their values and, int8, every output's one scale whole, int4 their own groups
  of GROUP rows (two rows per byte), which the split must not cut (models/quantize.py's
  check_split)."""
  out_rows = {name: shape[0] for name, shape in zip(entry.names, entry.shapes)}
  values, scales = [], []
  for name, axis, start, stop in pieces:
    scale = name + SCALE_SUFFIX
    if axis == 0:
      values.append((name, 0, start, stop))
      scales.append((scale, 0, start, stop))
    elif method == "int8":
      values.append((name, 1, start, stop))
      scales.append((scale, 0, 0, out_rows[name]))
    else:
      if start % quant.GROUP or stop % quant.GROUP:
        raise ValueError(f"{name}: input rows {start}:{stop} cut int4's groups of "
                         f"{quant.GROUP} rows")
      values.append((name, 1, start // 2, stop // 2))
      scales.append((scale, 1, start // quant.GROUP, stop // quant.GROUP))
  return values, scales


def layout(cfg) -> list[Entry]:
  """Every parameter of a model with this config, in checkpoint order."""
  h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  e = lambda param, names, shapes, transpose, linear=False, split=None: Entry(
      tuple(param), tuple(names), tuple(shapes), transpose, linear, split)
  pe = positions.get(cfg.position_encoding)
  if cfg.tie_word_embeddings:  # one [H, V] matrix: the output projection, gathered to embed
    out = [e(["lm_head"], ["model.embed_tokens.weight"], [(v, h)], True, split="vocab")]
  else:
    out = [e(["embed"], ["model.embed_tokens.weight"], [(v, h)], False, split="vocab"),
           e(["lm_head"], ["lm_head.weight"], [(v, h)], True, linear=True, split="vocab")]
  out.append(e(["norm", "weight"], ["model.norm.weight"], [(h,)], False))
  if pe.model_param(cfg):
    name, shape, _ = pe.model_param(cfg)
    out.append(e(["pos_table"], [name], [shape], False))
  qkv = qkv_sizes(cfg)
  norms = ({"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm"} if cfg.sandwich_norms else
           {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"})
  if not cfg.pre_norms:  # OLMo 2: the norms after attention and the MLP only
    norms = {k: v for k, v in norms.items() if k.endswith("_post_norm")}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = [p + f"self_attn.{x}_proj" for x in ("q", "k", "v", "cope_key")[:len(qkv)]]
    wqkv = (([p + "self_attn.qkv_proj.weight"], [(sum(qkv), h)]) if cfg.fused_checkpoint else
            ([n + ".weight" for n in attn], [(size, h) for size in qkv]))
    out += [e(["layers", i, ours, "weight"], [p + theirs + ".weight"], [(h,)], False)
            for ours, theirs in norms.items()]
    out += [
        e(["layers", i, "attn", "wqkv"], *wqkv, True, linear=True, split="qkv"),
        e(["layers", i, "attn", "wo"], [p + "self_attn.o_proj.weight"], [(h, qkv[0])], True,
          linear=True, split="rows")]
    out += (_sparse_mlp(cfg, i, p) if cfg.sparse(i) else
            _dense_mlp(cfg, i, p + "mlp.", ("mlp",), f))
    if cfg.qk_norm:
      whole = (cfg.num_heads, cfg.num_kv_heads) if cfg.qk_norm_whole else (1, 1)
      out += [e(["layers", i, "attn", f"{x}_norm", "weight"], [p + f"self_attn.{x}_norm.weight"],
                [(cfg.head_dim * heads,)], False) for x, heads in zip("qk", whole)]
    if cfg.qkv_bias:
      out.append(e(["layers", i, "attn", "bqkv"], [n + ".bias" for n in attn],
                   [(size,) for size in qkv], False, split="qkv"))
    if pe.layer_param(cfg):
      name, shape, _ = pe.layer_param(cfg)
      out.append(e(["layers", i, "attn", "pos_emb"], [p + name], [shape], False))
  return out


def _dense_mlp(cfg, i, prefix, param, f) -> list[Entry]:
  """A gated MLP of width f: gate/up fused, then down."""
  h = cfg.hidden_size
  gate_up = (([prefix + "gate_up_proj.weight"], [(2 * f, h)]) if cfg.fused_checkpoint else
             ([prefix + "gate_proj.weight", prefix + "up_proj.weight"], [(f, h), (f, h)]))
  return [Entry(("layers", i, *param, "w_gate_up"), *map(tuple, gate_up), True, True,
                "gate_up"),
          Entry(("layers", i, *param, "w_down"), (prefix + "down_proj.weight",), ((h, f),),
                True, True, "rows")]


def _sparse_mlp(cfg, i, p) -> list[Entry]:
  """A mixture of experts' router, stacked experts and shared expert (Qwen2-MoE), under
  Mixtral's names (block_sparse_moe, w1 / w3 / w2) or Qwen's (mlp, gate_ / up_ / down_proj)."""
  h, f, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
  mixtral = cfg.moe_naming == "mixtral"
  m = p + ("block_sparse_moe." if mixtral else "mlp.")
  gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
  ex = [f"{m}experts.{j}." for j in range(n)]
  out = [Entry(("layers", i, "mlp", "router"), (m + "gate.weight",), ((n, h),), True),
         Entry(("layers", i, "mlp", "w_gate_up"),
               tuple(x + w + ".weight" for x in ex for w in (gate, up)), ((f, h),) * (2 * n),
               True, linear=True, split="gate_up", experts=n),
         Entry(("layers", i, "mlp", "w_down"), tuple(x + down + ".weight" for x in ex),
               ((h, f),) * n, True, linear=True, split="rows", experts=n)]
  if cfg.shared_expert_size:
    out += _dense_mlp(cfg, i, m + "shared_expert.", ("mlp", "shared"), cfg.shared_expert_size)
    out.append(Entry(("layers", i, "mlp", "shared_gate"), (m + "shared_expert_gate.weight",),
                     ((1, h),), True))
  return out


def param_at(model, path):
  """The nnx.Param at `path` (names and list indices)."""
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def to_hf_tensors(model) -> dict[str, np.ndarray]:
  """The inverse of the layout: a models.Transformer's parameters under Hugging Face names
  and layouts ([out, in] weights; a quantized weight as its values and its scales)."""
  out = {}
  for e in layout(model.config):
    value = param_at(model, e.param)[...]
    arrays = [(e.names, value)]
    if isinstance(value, quant.QuantizedWeight):  # its values and its scales, split alike
      arrays = [(e.names, value.values),
                ([n + SCALE_SUFFIX for n in e.names], value.scales)]
    for names, array in arrays:
      array = np.asarray(jax.device_get(array))
      per = len(names) // max(e.experts, 1)  # one expert's slice at a time
      stacked = [(names, array)] if not e.experts else zip(
          [names[i:i + per] for i in range(0, len(names), per)], array)
      for group, value in stacked:
        for name, part in zip(group, split_last(value, e.sizes)):
          out[name] = np.ascontiguousarray(part.T if e.transpose else part)
  return out
