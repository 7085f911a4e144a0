"""Checkpoints: Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 (text) / Phi-3 and
the mixtures of experts Mixtral / Qwen2-MoE / Qwen3-MoE directories
(config.json + safetensors, sharded or not) read as they are, and fdjax's own models written
in the same format.

Missing, unexpected or wrongly shaped tensors, NaN or infinite values and config features
fdjax does not implement are refused with an error that names them.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fdjax.io import mesh as mesh_lib
from fdjax.ops import checks, quant
from models import layout, rope
from models import quantize as quantization
from models.config import LAYER_TYPES, ModelConfig
from models.llama import Transformer
from models.quantize import Quantization

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                    "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
                    "olmo2": "Olmo2ForCausalLM"}
QWEN_MOE = ("qwen2_moe", "qwen3_moe")
# Hugging Face's -> fdjax's ("swish" is transformers' other name of SiLU)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# The families whose transformers attention reads attention_bias (and Llama's MLP mlp_bias);
# Mistral's, Mixtral's and Phi-3's have none whatever their config says: ignored, as there.
READS_ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "smollm3",
                        "granite", "olmo2")
# What transformers' config class takes for a field config.json leaves out, per family, where
# it differs from what fdjax would otherwise take (silu, rms_norm_eps 1e-6, RoPE base 1e4 (Gemma
# 3's global 1e6), no window, no soft-capping, head_dim = hidden / heads, as many KV heads as
# heads, a 2048 context): a hand-written config.json gives Hugging Face's model, not another.
# tests/test_checkpoint.py checks every entry against transformers' classes.
HF_DEFAULTS = {
    "llama": {},
    "mistral": dict(max_position_embeddings=131072, sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128),
    "gemma2": dict(max_position_embeddings=8192, num_key_value_heads=4, head_dim=256,
                   sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(max_position_embeddings=131072, num_key_value_heads=4, head_dim=256,
                        sliding_window=4096, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5),
    "mixtral": dict(max_position_embeddings=131072, num_key_value_heads=8, rms_norm_eps=1e-5,
                    rope_theta=1e6),
    "qwen2_moe": dict(max_position_embeddings=32768, num_key_value_heads=16,
                      shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(max_position_embeddings=32768, num_key_value_heads=4),
    "smollm3": dict(max_position_embeddings=32768, num_key_value_heads=4, rope_theta=2e6,
                    tie_word_embeddings=True),
    "granite": {},
    "olmo2": dict(rms_norm_eps=1e-5),
}
FDJAX_MODEL_TYPE = "fdjax"
SAFETENSORS_INDEX = "model.safetensors.index.json"
META_FILE = "fdjax.json"
QUANTIZATION_KEY = "quantization"  # config.json of a checkpoint saved quantized


class CheckpointError(ValueError):
  """A checkpoint fdjax cannot load as it is (names the file, key or tensor)."""


# ----------------------------------------------------------------------------- config

def _refuse(cond, what):
  if cond:
    raise CheckpointError(f"config.json: {what} is not implemented by fdjax")


def _integer(hf: dict, key: str, default=None):
  """hf[key] (or `default` where it is absent or null; KeyError where neither is given): a
  positive integer, else CheckpointError naming the field (a float window was truncated, a 0
  head_dim taken for hidden / heads)."""
  value = hf.get(key)
  value = default if value is None else value
  if value is None:
    raise KeyError(key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise CheckpointError(f"config.json: {key} must be a positive integer, got {value!r}")
  return value


def _number(where: str, value) -> float:
  """value: a finite number above 0, else CheckpointError naming `where`."""
  try:
    return checks.finite_number("config.json", where, value)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _flag(hf: dict, key: str, default: bool) -> bool:
  """hf[key] (default where absent): true or false (bool("false") is True)."""
  value = hf.get(key, default)
  if not isinstance(value, bool):
    raise CheckpointError(f"config.json: {key} must be true or false, got {value!r}")
  return value


def _mapping(where: str, value) -> dict:
  if not isinstance(value, dict):
    raise CheckpointError(f"config.json: {where} must be an object, got {value!r}")
  return value


def _rope(params: dict, theta: float, context: int, where: str = "rope_parameters",
          original=None) -> tuple[float, dict | None]:
  """(theta, scaling) from one set of RoPE parameters (rope_type or the older `type`,
  rope_theta, the scaling's own keys, checked: a missing or zero factor failed at the first
  forward, or made NaN logits); `context`: the model's max_position_embeddings, llama3's
  original context where its parameters leave it out (as transformers takes it); `original`:
  one given beside them (the top-level original_max_position_embeddings), which transformers
  puts first."""
  params = dict(_mapping(where, params))
  theta = _number(f"{where}.rope_theta", params.pop("rope_theta", theta))
  _refuse(params.pop("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in rope.SUPPORTED_ROPE_TYPES:
    raise CheckpointError(f"config.json: unsupported rope_type {kind!r} "
                          f"(fdjax implements {rope.SUPPORTED_ROPE_TYPES})")
  if kind == "default":
    return theta, None
  scaling = {k: v for k, v in params.items() if k != "type"}
  scaling["rope_type"] = kind
  if "factor" not in scaling:
    raise CheckpointError(f"config.json: {where} of rope_type {kind!r} needs a factor")
  scaling["factor"] = _number(f"{where}.factor", scaling["factor"])
  if kind == "llama3":
    if original is not None:
      scaling["original_max_position_embeddings"] = original
    scaling.setdefault("original_max_position_embeddings", context)
    _integer(scaling, "original_max_position_embeddings")
    for key in ("low_freq_factor", "high_freq_factor"):
      if key not in scaling:
        raise CheckpointError(f"config.json: {where} of rope_type 'llama3' needs {key}")
      scaling[key] = _number(f"{where}.{key}", scaling[key])
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
      raise CheckpointError(f"config.json: {where}.high_freq_factor must be above its "
                            f"low_freq_factor, got {scaling['high_freq_factor']} <= "
                            f"{scaling['low_freq_factor']}")
  return theta, scaling


def _rope_settings(hf: dict, context: int, theta: float = 10000.0
                   ) -> tuple[float, dict | None]:
  """(theta, scaling) as transformers reads them: the older `rope_scaling` where a config
  has one (it wins over `rope_parameters`), else `rope_parameters`; the rope_theta inside
  them, else the top-level one; a llama3 scaling's original context from a top-level
  original_max_position_embeddings where there is one (Phi-3 writes it there), else its
  own, else max_position_embeddings."""
  where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  params = dict(_mapping(where, hf.get(where) or {}))
  params.setdefault("rope_theta", hf.get("rope_theta", theta))
  return _rope(params, theta, context, where, hf.get("original_max_position_embeddings"))


GEMMA_LAYER_TYPES = ("full_attention", "sliding_attention")


def _gemma_rope(hf: dict, context: int) -> tuple[float, dict | None, float]:
  """Gemma 3's (global theta, global scaling, local theta), as transformers reads them:
  `rope_parameters` per layer type (each absent one the default), the older `rope_scaling`
  merged into the global layers' (real checkpoints carry it alone), the thetas from them,
  else rope_theta / rope_local_base_freq. A flat rope_parameters, which transformers
  ignores here, is refused unless it says nothing but the default."""
  params = _mapping("rope_parameters", hf.get("rope_parameters") or {})
  if params and not set(params) & set(GEMMA_LAYER_TYPES):
    if params.get("rope_type", params.get("type", "default")) != "default" or \
        set(params) - {"rope_type", "type", "rope_theta"}:
      raise CheckpointError(
          f"config.json: Gemma 3 takes rope_parameters per layer type ({{\"full_attention\": "
          f"{{...}}, \"sliding_attention\": {{...}}}}), got a flat {params!r} (transformers "
          "ignores a flat one; put a scaling of the global layers under full_attention)")
    params = {}
  full = dict(_mapping("rope_parameters.full_attention",
                       params.get("full_attention") or {"rope_type": "default"}))
  if hf.get("rope_scaling") is not None:
    full.update(_mapping("rope_scaling", hf["rope_scaling"]))
  full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
  local = dict(_mapping("rope_parameters.sliding_attention",
                        params.get("sliding_attention") or {"rope_type": "default"}))
  local.setdefault("rope_theta", hf.get("rope_local_base_freq", 1e4))
  theta, scaling = _rope(full, 1e6, context, "rope_parameters.full_attention")
  local_theta, local_scaling = _rope(local, 1e4, context, "rope_parameters.sliding_attention")
  _refuse(local_scaling is not None, "RoPE scaling of the sliding-window layers")
  return theta, scaling, local_theta


def _windows(hf: dict, mtype: str, num_layers: int) -> tuple[int | None, tuple | None]:
  """(sliding_window, layer_types) as each family's attention reads them: Mistral and Phi-3
  window every layer; Qwen2/3 (with use_sliding_window) the layers from max_window_layers on,
  Gemma 2 all but every 2nd, Gemma 3 all but every 6th (sliding_window_pattern), unless
  layer_types lists
  them; Llama none."""
  types = hf.get("layer_types")
  if types is not None and (not isinstance(types, list) or len(types) != num_layers):
    raise CheckpointError(f"config.json: layer_types must list one type per layer "
                          f"({num_layers}), got {types!r}")
  unknown = sorted(set(types or ()) - set(LAYER_TYPES))
  _refuse(unknown, f"layer_types {unknown}")
  window = hf.get("sliding_window")
  if mtype in ("qwen2", "qwen3"):
    if not _flag(hf, "use_sliding_window", False):
      window = None
    first = hf.get("max_window_layers", 28)
    types = types or ["sliding_attention" if i >= first else "full_attention"
                      for i in range(num_layers)]
  elif mtype in ("gemma2", "gemma3_text"):  # Gemma 2 alternates, whatever a pattern says
    pattern = 2 if mtype == "gemma2" else hf.get("sliding_window_pattern",
                                                 hf.get("_sliding_window_pattern", 6))
    types = types or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                      for i in range(num_layers)]
  elif mtype in ("mistral", "phi3", "mixtral"):
    types = None
  elif mtype == "smollm3":  # windowed: its NoPE layers (with use_sliding_window)
    if not _flag(hf, "use_sliding_window", False):
      window = None
    nope = _nope_layers(hf, num_layers)
    types = types or ["sliding_attention" if i in nope else "full_attention"
                      for i in range(num_layers)]
  else:
    window = None
  if window is None or (types is not None and "sliding_attention" not in types):
    return None, None
  window = _integer(hf, "sliding_window")
  if types is None or all(t == "sliding_attention" for t in types):
    return window, None
  return window, tuple(types)


def _granite(hf: dict) -> dict:
  """Granite's four multipliers: the embeddings', the residual branches', the score scale
  (attention_multiplier, in place of 1 / sqrt(head_dim)) and the logits' divisor (each 1 by
  default, as transformers takes them)."""
  number = lambda key: _number(key, hf.get(key, 1.0))
  return dict(embed_scale=number("embedding_multiplier"),
              residual_scale=number("residual_multiplier"),
              attn_scale=number("attention_multiplier"), logit_divisor=number("logits_scaling"))


def _nope_layers(hf: dict, num_layers: int) -> tuple:
  """SmolLM3's layers without RoPE: where no_rope_layers holds 0 (1: RoPE), else every
  no_rope_layer_interval-th (4)."""
  flags = hf.get("no_rope_layers")
  if flags is None:
    every = hf.get("no_rope_layer_interval", 4)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise CheckpointError(f"config.json: no_rope_layer_interval must be an integer >= 1, "
                            f"got {every!r}")
    flags = [int((i + 1) % every != 0) for i in range(num_layers)]
  if (not isinstance(flags, list) or len(flags) < num_layers
      or any(f not in (0, 1) or isinstance(f, bool) for f in flags)):
    raise CheckpointError(f"config.json: no_rope_layers must list 0 or 1 for each of the "
                          f"{num_layers} layers, got {flags!r:.80}")
  return tuple(i for i in range(num_layers) if not flags[i])


def _experts(hf: dict, mtype: str, num_layers: int) -> dict:
  """The mixture-of-experts fields: Mixtral's experts in every layer (num_local_experts of
  intermediate_size, top-k renormalised); Qwen's in the layers decoder_sparse_step and
  mlp_only_layers leave sparse (moe_intermediate_size; Qwen2-MoE's shared expert)."""
  # transformers 5 writes Qwen's num_experts as num_local_experts (an attribute map)
  n = hf.get("num_experts") or hf.get("num_local_experts") or 0
  if mtype == "mixtral":
    return dict(num_experts=n or 8,
                experts_per_token=hf.get("num_experts_per_tok", 2),
                moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
                moe_naming="mixtral")
  if mtype not in QWEN_MOE or not n:
    return {}
  _refuse(_flag(hf, "use_sliding_window", False),
          "use_sliding_window=true in a mixture-of-experts model")
  missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in hf]
  if missing:
    raise CheckpointError(f"config.json: a {mtype} config with num_experts needs {missing}")
  step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
  if not isinstance(step, int) or step < 1:
    raise CheckpointError(f"config.json: decoder_sparse_step must be an integer >= 1, got "
                          f"{step!r}")
  dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
  return dict(num_experts=n, experts_per_token=hf["num_experts_per_tok"],
              moe_intermediate_size=hf["moe_intermediate_size"],
              norm_topk_prob=_flag(hf, "norm_topk_prob", False), dense_layers=dense or None,
              shared_expert_size=(hf.get("shared_expert_intermediate_size") or 0
                                  if mtype == "qwen2_moe" else 0))


def config_from_hf(hf: dict) -> ModelConfig:
  """Translates a Hugging Face config.json dict, refusing features fdjax does not implement."""
  mtype = hf.get("model_type")
  if mtype == FDJAX_MODEL_TYPE:
    return ModelConfig.from_dict({k: v for k, v in hf.items()
                                  if k not in ("model_type", QUANTIZATION_KEY)})
  if mtype not in HF_ARCHITECTURES:
    hint = (" (the multimodal Gemma 3; fdjax reads the text-only gemma3_text, "
            "Gemma3ForCausalLM)" if mtype == "gemma3" else "")
    raise CheckpointError(f"config.json: unsupported model_type {mtype!r}{hint}; fdjax loads "
                          f"{sorted(HF_ARCHITECTURES)} and its own {FDJAX_MODEL_TYPE!r}")
  _refuse(hf.get("quantization_config"), "a pre-quantized checkpoint (quantization_config; "
          "load the float one with quantize=\"int8\" or \"int4\")")
  hf = {**HF_DEFAULTS[mtype], **hf}
  gemma = mtype in ("gemma2", "gemma3_text")
  act_key = "hidden_activation" if gemma and "hidden_activation" in hf else "hidden_act"
  act = hf.get(act_key, "silu")
  _refuse(act not in ACTIVATIONS, f"{act_key}={act!r}")
  _refuse(mtype in ("llama", "smollm3", "granite") and _flag(hf, "mlp_bias", False),
          "mlp_bias=true")
  qkv_bias = mtype == "qwen2" or (mtype == "qwen2_moe" and _flag(hf, "qkv_bias", True))
  _refuse(mtype in READS_ATTENTION_BIAS and _flag(hf, "attention_bias", False),
          "attention_bias=true")
  _refuse(hf.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1")
  _refuse(hf.get("use_bidirectional_attention", False), "use_bidirectional_attention=true")
  heads, layers, hidden = (_integer(hf, k) for k in ("num_attention_heads",
                                                      "num_hidden_layers", "hidden_size"))
  if hf.get("head_dim") is None and hidden % heads:
    raise CheckpointError(f"config.json: hidden_size ({hidden}) is not a multiple of "
                          f"num_attention_heads ({heads}), and no head_dim is given")
  context = _integer(hf, "max_position_embeddings", 2048)
  window, layer_types = _windows(hf, mtype, layers)
  if gemma:
    gemma3 = mtype == "gemma3_text"
    theta, scaling, local_theta = (_gemma_rope(hf, context) if gemma3
                                   else (*_rope_settings(hf, context), None))
    family = dict(qk_norm=gemma3, norm_offset=1.0, sandwich_norms=True,
                  embed_scale=hidden ** 0.5,
                  attn_scale=_number("query_pre_attn_scalar",
                                     hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                  # Gemma 3's attention has no soft-capping (q/k norms instead): transformers
                  # ignores its attn_logit_softcapping, and so does fdjax; Gemma 2's applies it.
                  attn_softcap=None if gemma3 else hf.get("attn_logit_softcapping"),
                  final_softcap=hf.get("final_logit_softcapping"),
                  local_rope_theta=None if window is None or not gemma3 else local_theta)
  else:
    (theta, scaling), family = _rope_settings(hf, context), dict(
        qk_norm=mtype in ("qwen3", "qwen3_moe", "olmo2"), fused_checkpoint=(mtype == "phi3"),
        **_experts(hf, mtype, layers), **(_granite(hf) if mtype == "granite" else {}),
        # OLMo 2: norms after attention and the MLP only; q / k normed over all heads
        **(dict(pre_norms=False, sandwich_norms=True, qk_norm_whole=True)
           if mtype == "olmo2" else {}))
  return ModelConfig(
      vocab_size=hf["vocab_size"], hidden_size=hidden,
      intermediate_size=hf["intermediate_size"], num_layers=layers,
      num_heads=heads, num_kv_heads=_integer(hf, "num_key_value_heads", heads),
      head_dim=_integer(hf, "head_dim", hidden // heads),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
      tie_word_embeddings=_flag(hf, "tie_word_embeddings", gemma),
      qkv_bias=bool(qkv_bias), mlp_activation=ACTIVATIONS[act],
      max_position_embeddings=context,
      nope_layers=(_nope_layers(hf, layers) or None) if mtype == "smollm3" else None,
      sliding_window=window, layer_types=layer_types, **family)


# ---------------------------------------------------------------------- tensors

def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no \"weight_map\" object")
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors file found")
  missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise CheckpointError(f"{path}: shard(s) named in {SAFETENSORS_INDEX} are missing: {missing}")
  return [os.path.join(path, f) for f in files]


def _open_safetensors(file: str):
  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _once(name: str, seen: dict, file: str):
  if name in seen:
    raise CheckpointError(f"{file}: tensor {name} is stored a second time (another "
                          f".safetensors file here holds it too)")


def _backbone_named(tensors: dict) -> dict:
  """`tensors` under the names of a causal LM's checkpoint: a backbone's own (embed_tokens.*,
  layers.*, norm.*: what sentence-transformers saves, as the Qwen3-Embedding checkpoints
  ship) prefixed "model.", as transformers maps them; others as they are."""
  if "embed_tokens.weight" not in tensors or any(n.startswith("model.") for n in tensors):
    return tensors
  return {n if n == "lm_head.weight" else "model." + n: t for n, t in tensors.items()}


def read_tensors(path: str, cfg: ModelConfig, stored: Quantization | None = None
                 ) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as numpy arrays, checked against cfg's expected layout
  (with `stored`: the quantized tensors a checkpoint saved quantized holds)."""
  expected, quantized = _expected(cfg, stored)
  tensors = {}
  for file in _safetensors_files(path):
    with _open_safetensors(file) as fh:
      for name in fh.keys():
        _once(name, tensors, file)
        tensors[name] = fh.get_tensor(name)
  tensors = _backbone_named(tensors)
  _check_tensors(path, expected, quantized, stored, tensors, lambda n: tensors[n])
  return tensors


def open_tensors(path: str, cfg: ModelConfig, stored: Quantization | None = None) -> dict:
  """Every tensor of the checkpoint as a memory-mapped safetensors slice (indexing one reads
  only that part of the file), checked against cfg's expected layout (with `stored`: the
  quantized tensors a checkpoint saved quantized holds)."""
  expected, quantized = _expected(cfg, stored)
  slices = {}
  for file in _safetensors_files(path):
    fh = _open_safetensors(file)  # kept open by its slices
    for name in fh.keys():
      _once(name, slices, file)
      slices[name] = fh.get_slice(name)
  slices = _backbone_named(slices)
  shapes = {name: _Shaped(tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
  _check_tensors(path, expected, quantized, stored, shapes, lambda n: slices[n][...])
  return slices


class _Shaped:
  """A tensor's shape and dtype, read from the file's header."""
  _NUMPY = {"I8": np.dtype(np.int8), "U8": np.dtype(np.uint8)}  # the quantized values'

  def __init__(self, shape, dtype: str):
    self.shape = shape
    self.dtype = self._NUMPY.get(dtype, dtype)


def _expected(cfg: ModelConfig, stored: Quantization | None) -> tuple[dict, dict]:
  """(name -> shape of every tensor cfg's checkpoint holds, name -> dtype of the quantized
  values among them)."""
  expected, quantized = {}, {}
  for e in layout.layout(cfg):
    method = stored.method if stored and stored.covers(e) else None
    for name, shape in e.tensors(method):
      expected[name] = shape
      if method and not name.endswith(layout.SCALE_SUFFIX):
        quantized[name] = np.int8 if method == "int8" else np.uint8
  return expected, quantized


def _check_tensors(path, expected, quantized, stored, tensors, value):
  """Refuses missing, unexpected and misshapen tensors (`tensors`: name -> something with a
  shape and a dtype; `value(name)`: the whole tensor, read only to compare a tied matrix
  stored twice)."""
  extra = set(tensors) - set(expected)
  if ("lm_head.weight" in extra and "lm_head.weight" not in expected
      and "model.embed_tokens.weight" in tensors
      and np.array_equal(value("lm_head.weight"), value("model.embed_tokens.weight"))):
    extra.discard("lm_head.weight")  # some writers store the tied matrix twice
  unexpected = sorted(extra)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    headless = (" (a backbone without its LM head, as an embedding model may ship: fdjax "
                "loads a causal LM, whose head is its own or the tied embedding)"
                if missing == ["lm_head.weight"] else "")
    raise CheckpointError(f"{path}: missing tensor(s) {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                          + headless)
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:8]}"
                          + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
  for name, shape in expected.items():
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"expected {shape}")
    if name in quantized and tensors[name].dtype != quantized[name]:
      raise CheckpointError(f"{path}: tensor {name} has dtype {tensors[name].dtype}, expected "
                            f"{np.dtype(quantized[name])} ({stored.method} values)")
    if name not in quantized and not _floating(tensors[name].dtype):
      raise CheckpointError(f"{path}: tensor {name} has dtype {tensors[name].dtype}, not a "
                            f"floating-point type")


# A float's magnitude bits (its bits less the sign, read as an integer: they order as the
# magnitudes do) from which it is infinite or NaN, and from which it rounds to infinity in
# float16 (past 65504: 65520 and up). numpy's isfinite on bfloat16 goes element by element,
# 100x slower than this.
_MAGNITUDE = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00, None),
              np.dtype(jnp.bfloat16): (np.uint16, 0x7FFF, 0x7F80, 0x4780),
              np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000, 0x477FF000),
              np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000,
                                     0x40EFFE0000000000)}


def check_values(path: str, name: str, value: np.ndarray, dtype=None):
  """CheckpointError where a floating-point tensor (or a slice of one) holds a NaN or an
  infinity (every logit it reaches would be NaN, and generation would go on with nonsense),
  or, loading as float16 (`dtype`), a value past float16's range (it would become one)."""
  value = np.asarray(value)
  if value.dtype.kind not in "fV" or value.size == 0:
    return  # quantized values (int8 / uint8)
  if value.dtype not in _MAGNITUDE:  # the float8s
    value = value.astype(np.float32)
  bits, sign, infinite, past_float16 = _MAGNITUDE[value.dtype]
  magnitude = value.view(bits) & bits(sign)
  largest = magnitude.max()  # (a max makes no array of booleans: 3 GB/s of bfloat16)
  if largest >= bits(infinite):
    limit, what = infinite, "NaN or infinite value(s), the first"
  elif (dtype is not None and jnp.dtype(dtype) == jnp.float16 and past_float16 is not None
        and largest >= bits(past_float16)):
    limit, what = past_float16, ("value(s) past float16's range (65504): load it in bfloat16 "
                                 "or float32, the first")
  else:
    return
  bad = magnitude >= bits(limit)
  where = [int(i) for i in np.unravel_index(int(np.argmax(bad)), value.shape)]
  raise CheckpointError(f"{path}: tensor {name} holds {int(bad.sum())} {what} at index {where}")


def _floating(dtype) -> bool:
  """Whether a tensor's dtype (numpy's, or a safetensors header's name) is a float (bfloat16
  and the float8s are numpy's kind "V")."""
  if isinstance(dtype, str):
    return dtype.startswith(("F", "BF"))
  return np.dtype(dtype).kind in "fV"


def _assign(model: Transformer, tensors: dict, dtype, stored: Quantization | None,
            quantize: Quantization | None):
  """Sets every parameter from the checkpoint's tensors: as stored (quantized ones as they
  are, scales in `dtype`), or quantized now where `quantize` covers it."""
  for e in layout.layout(model.config):
    def fused(names):
      return layout.assemble(e, [tensors[n] for n in names])
    if stored and stored.covers(e):
      value = quant.from_stored(fused(e.names), fused([n + layout.SCALE_SUFFIX for n in e.names]),
                                stored.method, e.shape[-2], dtype)
    elif quantize and quantize.covers(e):
      value = quant.quantize(fused(e.names), quantize.method, dtype)
    else:
      value = jnp.asarray(fused(e.names), dtype=dtype)
    layout.param_at(model, e.param).set_value(value)


def read_meta(path: str) -> dict:
  """fdjax's own settings beside a checkpoint (fdjax.json): the tokenizer, training record,
  the async softmax's phi per layer."""
  file = os.path.join(path, META_FILE)
  if not os.path.exists(file):
    return {}
  with open(file) as fh:
    return json.load(fh)


def write_meta(path: str, **fields) -> str:
  """Merges fields into the checkpoint's fdjax.json."""
  meta = {**read_meta(path), **fields}
  file = os.path.join(path, META_FILE)
  with open(file, "w") as fh:
    json.dump(meta, fh, indent=2)
  return file


def _read_json(file: str) -> dict:
  """A JSON object from a checkpoint's file, or CheckpointError naming the file."""
  try:
    with open(file) as fh:
      value = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{file}: must hold a JSON object, got {type(value).__name__}")
  return value


def load_config(path: str) -> ModelConfig:
  """The checkpoint's config, with the phi per layer `fdjax calibrate` stored in fdjax.json."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise CheckpointError(f"{path}: no config.json")
  hf = _read_json(file)
  try:
    cfg = config_from_hf(hf)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  except KeyError as e:
    raise CheckpointError(f"{file}: the required field {e.args[0]!r} is missing") from None
  except (TypeError, ValueError) as e:  # a field of the wrong type or value
    raise CheckpointError(f"{file}: {e}") from None
  phi = read_meta(path).get("softmax_phi")
  return cfg if phi is None else dataclasses.replace(cfg, softmax_phi=tuple(phi))


def load_quantization(path: str) -> Quantization | None:
  """How a checkpoint saved quantized is quantized (its config.json records it), or None."""
  record = _read_json(os.path.join(path, "config.json")).get(QUANTIZATION_KEY)
  try:
    return None if record is None else Quantization.from_dict(record)
  except ValueError as e:
    raise CheckpointError(f"{path}: config.json: {e}") from None


def load_pretrained(path: str | os.PathLike, dtype=None, quantize: str | None = None,
                    quantize_lm_head: bool = False, mesh=None) -> Transformer:
  """Loads a Hugging Face (Llama / Mistral / Qwen2) or fdjax checkpoint directory.

  dtype: the parameters' dtype (a quantized weight's scales'); None keeps the checkpoint's.
  quantize: None, "int8" or "int4": the linear layers' weights quantized as they load, from
  the checkpoint's own values (the untied LM head too with quantize_lm_head; the embedding
  and the norms never). A checkpoint saved quantized loads as saved, not quantized again.
  mesh: a jax.sharding.Mesh (fdjax.make_mesh): the model is loaded onto it, tensor parallel
  over its "model" axis, each device reading only its slices of the memory-mapped files
  (a models.sharded.ShardedTransformer, called like a Transformer).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  cfg = load_config(path)
  stored = load_quantization(path)
  if quantize is None and quantize_lm_head:
    raise ValueError("load_pretrained: quantize_lm_head=True needs quantize=\"int8\" or "
                     "\"int4\" (the LM head is quantized with the linear layers)")
  want = None if quantize is None else Quantization(quantize, quantize_lm_head)
  if want is not None:
    quantization.entries(cfg, want)  # refuses what cannot be quantized
    if stored is not None and stored != want:
      raise CheckpointError(f"{path}: saved quantized as {stored.to_dict()}; it loads as saved "
                            f"(quantize=None), not as {want.to_dict()}")
  if mesh is not None:
    return _load_on_mesh(path, cfg, dtype, mesh, stored, want)
  tensors = read_tensors(path, cfg, stored)
  if dtype is None:
    dtype = tensors["model.embed_tokens.weight"].dtype
  dtype = _param_dtype(path, dtype)
  for name, value in tensors.items():
    check_values(path, name, value, dtype)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  model.dtype = dtype
  _assign(model, tensors, dtype, stored, None if stored else want)
  return model


def _param_dtype(path, dtype):
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise CheckpointError(f"{path}: unsupported parameter dtype {dtype}")
  return dtype


def _load_on_mesh(path, cfg, dtype, mesh, stored: Quantization | None,
                  want: Quantization | None):
  """The checkpoint onto `mesh`, each device reading its slices: quantized weights as saved
  (`stored`), or quantized as they load (`want`)."""
  mesh_lib.check_mesh(mesh)
  slices = open_tensors(path, cfg, stored)
  if dtype is None:
    dtype = slices["model.embed_tokens.weight"][0:1].dtype
  shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
  dtype = _param_dtype(path, dtype)

  def read(name, axis, start, stop):
    piece = mesh_lib.padded_slice(slices[name], shapes[name], axis, start, stop)
    check_values(path, name, piece, dtype)
    return piece

  return mesh_lib.build(cfg, dtype, mesh, read,
                        quantization=stored or want, stored=stored is not None)


def prepare_save(path: str | os.PathLike) -> str:
  """The directory a checkpoint is saved to, made if need be; CheckpointError where it holds
  another checkpoint's shards or index, which loading would read beside (or instead of) the
  model.safetensors written there."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  stale = sorted(f for f in os.listdir(path) if f == SAFETENSORS_INDEX or (
      f.endswith(".safetensors") and f != "model.safetensors"))
  if stale:
    raise CheckpointError(f"{path}: holds another checkpoint's {stale[:4]}; saving there would "
                          f"mix the two (remove them, or save to another directory)")
  return path


def save_pretrained(model: Transformer, path: str | os.PathLike, extra_config: dict | None = None):
  """Writes config.json (model_type "fdjax"; a quantized model's quantization recorded) and
  model.safetensors (quantized weights as they are); load_pretrained reads it."""
  path = prepare_save(path)
  config = {"model_type": FDJAX_MODEL_TYPE, **model.config.to_dict()}
  q = quantization.of(model)
  if q is not None:
    config[QUANTIZATION_KEY] = q.to_dict()
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh, indent=2)
  if extra_config:
    write_meta(path, **extra_config)
  save_file(layout.to_hf_tensors(model), os.path.join(path, "model.safetensors"))
