"""Weight-only quantization of a model: which parameters (the layout table's linear weights,
a mixture of experts' stacked experts among them, each expert quantized alone;
the LM head only if asked; never the embedding, the norms, biases or position tables) and
doing it to a model in memory. The model code is unchanged: a quantized parameter holds a
fdjax.ops.quant.QuantizedWeight, which `dispatch.linear` and `dispatch.moe` take in place of
the array.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from fdjax.ops import quant
from models import layout, parallel


@dataclasses.dataclass(frozen=True)
class Quantization:
  """What is quantized: the method ("int8" / "int4") and whether the (untied) LM head is."""
  method: str
  lm_head: bool = False

  def __post_init__(self):
    quant.bits_of(self.method)  # a ValueError naming the methods for an unknown one

  def covers(self, entry: layout.Entry) -> bool:
    return entry.linear and (entry.param != ("lm_head",) or self.lm_head)

  def to_dict(self) -> dict:
    """As recorded in a saved checkpoint's config.json under "quantization"."""
    group = {"group_size": quant.GROUP} if self.method == "int4" else {}
    return {"method": self.method, **group, "lm_head": self.lm_head}

  @classmethod
  def from_dict(cls, d: dict, where: str = "quantization") -> "Quantization":
    if not isinstance(d, dict) or "method" not in d:
      raise ValueError(f"{where}: expected {{\"method\": ..., \"lm_head\": ...}}, got {d!r}")
    if d["method"] == "int4" and d.get("group_size", quant.GROUP) != quant.GROUP:
      raise ValueError(f"{where}: int4 group_size {d['group_size']}; fdjax's int4 has groups "
                       f"of {quant.GROUP}")
    return cls(d["method"], bool(d.get("lm_head", False)))


def entries(cfg, q: Quantization) -> list[layout.Entry]:
  """The layout entries `q` quantizes in a model of this config."""
  if q.lm_head and cfg.tie_word_embeddings:
    raise ValueError("quantize: the LM head of a model with tied embeddings is its embedding, "
                     "which stays unquantized (lm_head=False)")
  return [e for e in layout.layout(cfg) if q.covers(e)]


def check_split(cfg, tp: int, q: Quantization):
  """Refuses (ValueError naming the weight and the numbers) int4 weights split by input rows
  across tp devices (attention output, down) where a device's rows would not be whole groups
  of GROUP: each device's part of a weight must be the one-device int4 format on its own."""
  if q.method != "int4" or tp == 1:
    return
  for e, mine in zip(layout.layout(cfg), layout.layout(parallel.local_config(cfg, tp))):
    if q.covers(e) and e.split == "rows" and mine.shape[-2] % quant.GROUP:
      raise ValueError(
          f"int4 on a mesh: tp={tp} leaves each device {mine.shape[-2]} of {e.names[0]}'s "
          f"{e.shape[-2]} input rows, not whole groups of {quant.GROUP} (int4's scales); "
          f"use int8, or a tp that leaves each device a multiple of {quant.GROUP}")


def of(model) -> Quantization | None:
  """How a model's weights are quantized (a sharded model's: its local model's), or None."""
  model = getattr(model, "local", model)
  found = {e.param: w for e in layout.layout(model.config)
           if isinstance(w := layout.param_at(model, e.param)[...], quant.QuantizedWeight)}
  if not found:
    return None
  methods = sorted({w.method for w in found.values()})
  if len(methods) > 1:
    raise ValueError(f"model mixes quantization methods {methods}")
  return Quantization(methods[0], ("lm_head",) in found)


def quantize(model, method: str, *, lm_head: bool = False):
  """Quantizes the model's linear-layer weights to `method` ("int8" / "int4") in place (the
  LM head too if `lm_head`), scales in the model's dtype; returns the model."""
  q = Quantization(method, lm_head)
  if of(model) is not None:
    raise ValueError(f"quantize: the model is already quantized ({of(model).method})")
  for e in entries(model.config, q):
    param = layout.param_at(model, e.param)
    param.set_value(quant.quantize(param[...], method))
  return model


def weight_bytes(model) -> dict[str, int]:
  """Bytes the model's arrays hold: {"linear": its layers' linear weights (what quantize
  converts by default), "total": every array}."""
  layers = Quantization(quant.METHODS[0])
  linear = [layout.param_at(model, e.param).get_value() for e in layout.layout(model.config)
            if layers.covers(e)]
  return {"linear": quant.nbytes(linear), "total": quant.nbytes(nnx.state(model))}
