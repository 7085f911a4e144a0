"""Checkpoints: Hugging Face Llama / Mistral / Qwen2 directories (config.json + safetensors,
sharded or not) read as they are, and fdjax's own models written in the same format.

Missing, unexpected or wrongly shaped tensors and config features fdjax does not implement
are refused with an error that names them.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models import rope
from models.config import ModelConfig
from models.llama import Transformer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
FDJAX_MODEL_TYPE = "fdjax"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint fdjax cannot load as it is (names the file, key or tensor)."""


# ----------------------------------------------------------------------------- config

def _rope_settings(hf: dict) -> tuple[float, dict | None]:
  """(theta, scaling) from either the newer `rope_parameters` or the older
  `rope_theta` + `rope_scaling` keys."""
  params = hf.get("rope_parameters")
  if params:
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in rope.SUPPORTED_ROPE_TYPES:
    raise CheckpointError(f"config.json: unsupported rope_type {kind!r} "
                          f"(fdjax implements {rope.SUPPORTED_ROPE_TYPES})")
  if kind == "default":
    return float(theta), None
  scaling = {k: v for k, v in scaling.items() if k != "type"}
  scaling["rope_type"] = kind
  return float(theta), scaling


def config_from_hf(hf: dict) -> ModelConfig:
  """Translates a Hugging Face config.json dict, refusing features fdjax does not implement."""
  mtype = hf.get("model_type")
  if mtype == FDJAX_MODEL_TYPE:
    return ModelConfig.from_dict({k: v for k, v in hf.items() if k != "model_type"})
  if mtype not in HF_ARCHITECTURES:
    raise CheckpointError(f"config.json: unsupported model_type {mtype!r}; fdjax loads "
                          f"{sorted(HF_ARCHITECTURES)} and its own {FDJAX_MODEL_TYPE!r}")
  def refuse(cond, what):
    if cond:
      raise CheckpointError(f"config.json: {what} is not implemented by fdjax")
  refuse(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}")
  refuse(hf.get("mlp_bias", False), "mlp_bias=true")
  refuse(mtype != "qwen2" and hf.get("attention_bias", False), "attention_bias=true")
  refuse(hf.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1")
  layer_types = hf.get("layer_types") or []
  refuse(any(t != "full_attention" for t in layer_types),
         f"layer_types other than full_attention ({sorted(set(layer_types))})")
  sliding = hf.get("sliding_window")
  if mtype == "qwen2" and not hf.get("use_sliding_window", False):
    sliding = None
  theta, scaling = _rope_settings(hf)
  heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=(mtype == "qwen2"),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      # A sliding window is exact as full attention while every sequence fits in it; the
      # model refuses longer spans (see Transformer.__call__).
      sliding_window=sliding)


# ---------------------------------------------------------------------- tensor layout

def _layout(cfg: ModelConfig):
  """[(hf_name, hf_shape)] in the order fdjax assembles them."""
  h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  names = [("model.embed_tokens.weight", (cfg.vocab_size, h)), ("model.norm.weight", (h,))]
  if not cfg.tie_word_embeddings:
    names.append(("lm_head.weight", (cfg.vocab_size, h)))
  if cfg.position_encoding == "absolute":
    names.append(("model.embed_positions.weight", (cfg.max_position_embeddings, h)))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
              (p + "self_attn.q_proj.weight", (cfg.num_heads * d, h)),
              (p + "self_attn.k_proj.weight", (cfg.num_kv_heads * d, h)),
              (p + "self_attn.v_proj.weight", (cfg.num_kv_heads * d, h)),
              (p + "self_attn.o_proj.weight", (h, cfg.num_heads * d)),
              (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
              (p + "mlp.down_proj.weight", (h, f))]
    if cfg.qkv_bias:
      names += [(p + "self_attn.q_proj.bias", (cfg.num_heads * d,)),
                (p + "self_attn.k_proj.bias", (cfg.num_kv_heads * d,)),
                (p + "self_attn.v_proj.bias", (cfg.num_kv_heads * d,))]
    if cfg.position_encoding == "cope":
      names.append((p + "self_attn.pos_emb", (cfg.npos_max, d)))
  return names


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh)["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors file found")
  missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise CheckpointError(f"{path}: shard(s) named in {SAFETENSORS_INDEX} are missing: {missing}")
  return [os.path.join(path, f) for f in files]


def read_tensors(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as numpy arrays, checked against cfg's expected layout."""
  expected = dict(_layout(cfg))
  tensors = {}
  for file in _safetensors_files(path):
    with safe_open(file, framework="numpy") as fh:
      for name in fh.keys():
        tensors[name] = fh.get_tensor(name)
  extra = set(tensors) - set(expected)
  if (cfg.tie_word_embeddings and "lm_head.weight" in extra
      and np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight"))):
    extra.discard("lm_head.weight")  # some writers store the tied matrix twice
  unexpected = sorted(extra)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise CheckpointError(f"{path}: missing tensor(s) {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:8]}"
                          + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
  for name, shape in expected.items():
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"expected {shape}")
  return tensors


def _assign(model: Transformer, tensors: dict, dtype):
  cfg = model.config
  cast = lambda a: jnp.asarray(a, dtype=dtype)
  emb = tensors["model.embed_tokens.weight"]
  if cfg.tie_word_embeddings:
    model.lm_head.set_value(cast(emb.T))
  else:
    model.embed.set_value(cast(emb))
    model.lm_head.set_value(cast(tensors["lm_head.weight"].T))
  model.norm.weight.set_value(cast(tensors["model.norm.weight"]))
  if cfg.position_encoding == "absolute":
    model.pos_table.set_value(cast(tensors["model.embed_positions.weight"]))
  for i, layer in enumerate(model.layers):
    t = lambda n: tensors[f"model.layers.{i}.{n}"]
    layer.attn_norm.weight.set_value(cast(t("input_layernorm.weight")))
    layer.mlp_norm.weight.set_value(cast(t("post_attention_layernorm.weight")))
    layer.attn.wqkv.set_value(cast(np.concatenate(
        [t("self_attn.q_proj.weight").T, t("self_attn.k_proj.weight").T,
         t("self_attn.v_proj.weight").T], axis=1)))
    if cfg.qkv_bias:
      layer.attn.bqkv.set_value(cast(np.concatenate(
          [t("self_attn.q_proj.bias"), t("self_attn.k_proj.bias"), t("self_attn.v_proj.bias")])))
    if cfg.position_encoding == "cope":
      layer.attn.pos_emb.set_value(cast(t("self_attn.pos_emb")))
    layer.attn.wo.set_value(cast(t("self_attn.o_proj.weight").T))
    layer.mlp.w_gate_up.set_value(cast(np.concatenate(
        [t("mlp.gate_proj.weight").T, t("mlp.up_proj.weight").T], axis=1)))
    layer.mlp.w_down.set_value(cast(t("mlp.down_proj.weight").T))


def load_config(path: str) -> ModelConfig:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise CheckpointError(f"{path}: no config.json")
  with open(file) as fh:
    return config_from_hf(json.load(fh))


def load_pretrained(path: str | os.PathLike, dtype=None) -> Transformer:
  """Loads a Hugging Face (Llama / Mistral / Qwen2) or fdjax checkpoint directory.

  dtype: the parameters' dtype; None keeps the checkpoint's own.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  from fdjax import calibrate  # per-layer phi, if `fdjax calibrate` left one beside it
  cfg = calibrate.apply_saved(path, load_config(path))
  tensors = read_tensors(path, cfg)
  if dtype is None:
    dtype = tensors["model.embed_tokens.weight"].dtype
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise CheckpointError(f"{path}: unsupported parameter dtype {dtype}")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  model.dtype = dtype
  _assign(model, tensors, dtype)
  return model


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face names and layouts ([out, in] weights)."""
  cfg = model.config
  a = lambda p: np.asarray(jax.device_get(p[...]))
  d, hq, hkv, f = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
  out = {"model.norm.weight": a(model.norm.weight)}
  if cfg.position_encoding == "absolute":
    out["model.embed_positions.weight"] = a(model.pos_table)
  if cfg.tie_word_embeddings:
    out["model.embed_tokens.weight"] = a(model.lm_head).T
  else:
    out["model.embed_tokens.weight"] = a(model.embed)
    out["lm_head.weight"] = a(model.lm_head).T
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    qkv = a(layer.attn.wqkv)
    out[p + "input_layernorm.weight"] = a(layer.attn_norm.weight)
    out[p + "post_attention_layernorm.weight"] = a(layer.mlp_norm.weight)
    out[p + "self_attn.q_proj.weight"] = qkv[:, :hq * d].T
    out[p + "self_attn.k_proj.weight"] = qkv[:, hq * d:(hq + hkv) * d].T
    out[p + "self_attn.v_proj.weight"] = qkv[:, (hq + hkv) * d:].T
    if cfg.qkv_bias:
      b = a(layer.attn.bqkv)
      out[p + "self_attn.q_proj.bias"] = b[:hq * d]
      out[p + "self_attn.k_proj.bias"] = b[hq * d:(hq + hkv) * d]
      out[p + "self_attn.v_proj.bias"] = b[(hq + hkv) * d:]
    if cfg.position_encoding == "cope":
      out[p + "self_attn.pos_emb"] = a(layer.attn.pos_emb)
    out[p + "self_attn.o_proj.weight"] = a(layer.attn.wo).T
    gu = a(layer.mlp.w_gate_up)
    out[p + "mlp.gate_proj.weight"] = gu[:, :f].T
    out[p + "mlp.up_proj.weight"] = gu[:, f:].T
    out[p + "mlp.down_proj.weight"] = a(layer.mlp.w_down).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(model: Transformer, path: str | os.PathLike, extra_config: dict | None = None):
  """Writes config.json (model_type "fdjax") and model.safetensors; load_pretrained reads it."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config = {"model_type": FDJAX_MODEL_TYPE, **model.config.to_dict()}
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh, indent=2)
  if extra_config:
    with open(os.path.join(path, "fdjax.json"), "w") as fh:
      json.dump(extra_config, fh, indent=2)
  save_file(to_hf_tensors(model), os.path.join(path, "model.safetensors"))
