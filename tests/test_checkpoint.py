"""Checkpoint loading: round trips and every refusal names what is wrong."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fdjax
from fdjax.checkpoint import CheckpointError, config_from_hf
from models import ModelConfig
from tests.models_util import tiny_model

HF_BASE = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, max_position_embeddings=64)


@pytest.mark.parametrize("overrides", [dict(), dict(position_encoding="none"),
                                       dict(tie_word_embeddings=True, qkv_bias=True)])
def test_save_load_round_trip(tmp_path, overrides):
  model = tiny_model(**overrides)
  fdjax.save_pretrained(model, tmp_path)
  loaded = fdjax.load_pretrained(tmp_path)
  assert loaded.config == model.config
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))


def test_load_with_dtype(tmp_path):
  fdjax.save_pretrained(tiny_model(), tmp_path)
  assert fdjax.load_pretrained(tmp_path, dtype="bfloat16").lm_head[...].dtype == jnp.bfloat16


@pytest.fixture
def saved(tmp_path):
  fdjax.save_pretrained(tiny_model(), tmp_path)
  return str(tmp_path), load_file(os.path.join(tmp_path, "model.safetensors"))


def _drop(t):
  del t["model.layers.1.mlp.up_proj.weight"]


def _add(t):
  t["model.layers.0.self_attn.rotary.weight"] = np.ones(3, np.float32)


def _reshape(t):
  t["model.norm.weight"] = np.ones(47, np.float32)


@pytest.mark.parametrize("edit,msg", [
    (_drop, r"missing tensor.*layers\.1\.mlp\.up_proj"),
    (_add, r"unexpected tensor.*rotary"),
    (_reshape, r"model\.norm\.weight has shape \(47,\)"),
])
def test_bad_tensors_are_named(saved, edit, msg):
  path, tensors = saved
  edit(tensors)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path)


def test_missing_shard_and_missing_config(tmp_path_factory, saved):
  path, _ = saved
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"weight_map": {"x": "model-00002-of-00002.safetensors"}}, fh)
  with pytest.raises(CheckpointError, match="shard.*missing"):
    fdjax.load_pretrained(path)
  with pytest.raises(CheckpointError, match="no config.json"):
    fdjax.load_pretrained(tmp_path_factory.mktemp("empty"))


@pytest.mark.parametrize("extra,msg", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "unsupported rope_type 'dynamic'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(layer_types=["sliding_attention"]), "layer_types"),
])
def test_unsupported_config_features_are_refused(extra, msg):
  with pytest.raises(CheckpointError, match=msg):
    config_from_hf({**HF_BASE, **extra})


def test_both_rope_spellings_read_the_same():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  old = config_from_hf({**HF_BASE, "rope_theta": 5e5, "rope_scaling": scaling})
  new = config_from_hf({**HF_BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}})
  assert old == new and old.rope_theta == 5e5 and old.rope_scaling_dict == scaling


def test_sliding_window_is_enforced_not_ignored():
  cfg = config_from_hf({**HF_BASE, "model_type": "mistral", "sliding_window": 16})
  assert cfg.sliding_window == 16
  model = tiny_model(sliding_window=16)
  with pytest.raises(ValueError, match="sliding window"):
    model(jnp.ones((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="context of 16"):
    fdjax.generate(model, [[1] * 10], max_new_tokens=7)


def test_unknown_fdjax_config_key():
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['colour'\]"):
    ModelConfig.from_dict({**tiny_model().config.to_dict(), "colour": "red"})
