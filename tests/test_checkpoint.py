"""Checkpoint loading: round trips and every refusal names what is wrong."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fdjax
from fdjax.io.checkpoint import CheckpointError, config_from_hf
from models import ModelConfig
from tests.models_util import forward, tiny_model

HF_BASE = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, max_position_embeddings=64)


@pytest.mark.parametrize("overrides", [
    dict(), dict(position_encoding="none"), dict(tie_word_embeddings=True, qkv_bias=True),
    dict(qk_norm=True, norm_offset=1.0, sandwich_norms=True, mlp_activation="gelu_tanh",
         embed_scale=7.0, attn_scale=0.3, attn_softcap=10.0, final_softcap=20.0,
         sliding_window=4, layer_types=("sliding_attention", "full_attention"),
         local_rope_theta=100.0),
    dict(fused_checkpoint=True, sliding_window=4)])
def test_save_load_round_trip(tmp_path, overrides):
  model = tiny_model(**overrides)
  fdjax.save_pretrained(model, tmp_path)
  loaded = fdjax.load_pretrained(tmp_path)
  assert loaded.config == model.config
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)),
                                np.asarray(forward(model, ids)))


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


def _integers(t):
  t["model.norm.weight"] = np.ones(t["model.norm.weight"].shape, np.int32)


@pytest.mark.parametrize("edit,msg", [
    (_integers, r"model\.norm\.weight has dtype int32, not a floating-point type"),
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_a_nan_or_infinite_weight_is_named_with_where_it_is(saved, dtype, bad):
  path, tensors = saved
  tensors = {name: t.astype(jnp.dtype(dtype)) for name, t in tensors.items()}
  save_file(tensors, os.path.join(path, "model.safetensors"))
  fdjax.load_pretrained(path)  # finite: loads
  w = tensors["model.layers.1.self_attn.o_proj.weight"]
  w[3, 5] = w[7, 0] = bad
  save_file(tensors, os.path.join(path, "model.safetensors"))
  msg = r"o_proj\.weight holds 2 NaN or infinite value\(s\), the first at index \[3, 5\]"
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path)
  mesh = fdjax.make_mesh(tp=1, dp=1)  # the per-device slices are checked as they are read
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path, mesh=mesh)


def test_quantize_lm_head_without_quantize_is_refused(saved):
  with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize"):
    fdjax.load_pretrained(saved[0], quantize_lm_head=True)  # (it loaded unquantized)


def test_values_past_float16s_range_are_named_when_loading_as_float16(saved):
  path, tensors = saved
  tensors["model.layers.0.mlp.down_proj.weight"][2, 2] = 1e5  # finite in float32 / bfloat16
  save_file(tensors, os.path.join(path, "model.safetensors"))
  for dtype in ("float32", "bfloat16"):
    assert fdjax.load_pretrained(path, dtype=dtype).config.num_layers == 2
  msg = r"down_proj\.weight holds 1 value\(s\) past float16's range .* at index \[2, 2\]"
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path, dtype="float16")
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path, dtype="float16", mesh=fdjax.make_mesh(tp=1, dp=1))


def test_missing_shard_and_missing_config(tmp_path_factory, saved):
  path, _ = saved
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"weight_map": {"x": "model-00002-of-00002.safetensors"}}, fh)
  with pytest.raises(CheckpointError, match="shard.*missing"):
    fdjax.load_pretrained(path)
  with pytest.raises(CheckpointError, match="no config.json"):
    fdjax.load_pretrained(tmp_path_factory.mktemp("empty"))


def _config(path, edit):
  file = os.path.join(path, "config.json")
  with open(file) as fh:
    text = fh.read()
  with open(file, "w") as fh:
    fh.write(edit(text))


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t[:-5], r"config\.json: not valid JSON"),
    (lambda t: "[1, 2]", r"config\.json: must hold a JSON object, got list"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "vocab_size"}),
     r"config\.json: ModelConfig: missing config key\(s\) \['vocab_size'\]"),
    (lambda t: json.dumps({**json.loads(t), "rms_norm_eps": "1e-6"}),
     r"config\.json: ModelConfig: rms_norm_eps must be a positive finite number, got '1e-6'"),
    (lambda t: json.dumps({**json.loads(t), "rope_theta": -1.0}),
     r"config\.json: ModelConfig: rope_theta must be a positive finite number, got -1\.0"),
])
def test_a_broken_config_json_is_named_with_what_is_wrong(saved, edit, msg):
  path, _ = saved
  _config(path, edit)
  with pytest.raises(CheckpointError, match=msg):
    fdjax.load_pretrained(path)


def test_a_hugging_face_config_without_a_required_field_is_named(tmp_path):
  with open(tmp_path / "config.json", "w") as fh:
    json.dump({k: v for k, v in HF_BASE.items() if k != "hidden_size"}, fh)
  with pytest.raises(CheckpointError,
                     match=r"config\.json: the required field 'hidden_size' is missing"):
    fdjax.load_pretrained(tmp_path)


def test_saving_over_another_checkpoints_shards_is_refused_and_a_doubled_tensor_named(saved):
  path, tensors = saved
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"weight_map": {"model.norm.weight": "model.safetensors"}}, fh)
  with pytest.raises(CheckpointError, match=r"holds another checkpoint's "
                     r"\['model\.safetensors\.index\.json'\]; saving there would mix"):
    fdjax.save_pretrained(tiny_model(), path)
  os.remove(os.path.join(path, "model.safetensors.index.json"))
  save_file({"model.norm.weight": tensors["model.norm.weight"]},
            os.path.join(path, "zz-extra.safetensors"))
  with pytest.raises(CheckpointError, match=r"zz-extra\.safetensors: tensor model\.norm\.weight "
                     r"is stored a second time"):
    fdjax.load_pretrained(path)


def test_a_truncated_safetensors_file_is_named(saved):
  path, _ = saved
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as fh:
    head = fh.read(100)
  with open(file, "wb") as fh:
    fh.write(head)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
    fdjax.load_pretrained(path)


@pytest.mark.parametrize("extra,msg", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "unsupported rope_type 'dynamic'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(model_type="gemma3"), "multimodal Gemma 3.*gemma3_text"),
    (dict(layer_types=["chunked_attention"]), r"layer_types \['chunked_attention'\]"),
    (dict(model_type="phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                              "short_factor": [1.0] * 4,
                                              "long_factor": [2.0] * 4}),
     "unsupported rope_type 'longrope'"),
    (dict(model_type="phi3", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.75}),
     "partial_rotary_factor"),
    (dict(model_type="gemma3_text", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention"),
    (dict(model_type="gemma3_text", sliding_window=8, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "RoPE scaling of the sliding-window layers"),
    # a flat one, which transformers' Gemma 3 ignores (its global layers then unscaled)
    (dict(model_type="gemma3_text", sliding_window=8, rope_parameters={
        "rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}),
     "Gemma 3 takes rope_parameters per layer type"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
])
def test_unsupported_config_features_are_refused(extra, msg):
  with pytest.raises(CheckpointError, match=msg):
    config_from_hf({**HF_BASE, **extra})


LINEAR = {"rope_type": "linear", "rope_theta": 1e4}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0}


@pytest.mark.parametrize("extra,msg", [
    (dict(rope_parameters=LINEAR), "rope_parameters of rope_type 'linear' needs a factor"),
    (dict(rope_parameters={**LINEAR, "factor": 0}), r"rope_parameters\.factor must be a finite "
     r"number above 0, got 0"),
    (dict(rope_scaling={"type": "linear", "factor": "4"}), r"rope_scaling\.factor .* got '4'"),
    (dict(rope_parameters={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     "rope_type 'llama3' needs low_freq_factor"),
    (dict(rope_parameters={**LLAMA3, "high_freq_factor": 1.0}),
     "high_freq_factor must be above its low_freq_factor"),
    (dict(rope_parameters="x"), "rope_parameters must be an object, got 'x'"),
    (dict(rope_scaling="linear"), "rope_scaling must be an object, got 'linear'"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]),
     r"layer_types must list one type per layer \(2\)"),
    (dict(head_dim=0), "head_dim must be a positive integer, got 0"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer, got 0"),
    (dict(num_attention_heads=5, num_key_value_heads=5), r"hidden_size \(32\) is not a multiple "
     r"of num_attention_heads \(5\), and no head_dim"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(model_type="mistral", sliding_window=8.5), "sliding_window must be a positive "
     "integer, got 8.5"),
    (dict(model_type="gemma2", query_pre_attn_scalar=-16), "query_pre_attn_scalar must be a "
     "finite number above 0, got -16"),
    (dict(model_type="smollm3", num_hidden_layers=2, no_rope_layers=[1]), "no_rope_layers "
     "must list 0 or 1 for each of the 2 layers, got \\[1\\]"),
    (dict(model_type="smollm3", no_rope_layers=[1, 2]), "no_rope_layers must list 0 or 1"),
    (dict(model_type="smollm3", no_rope_layer_interval=0), "no_rope_layer_interval must be an "
     "integer >= 1, got 0"),
    (dict(model_type="granite", logits_scaling=0), "logits_scaling must be a finite number "
     "above 0, got 0"),
    (dict(model_type="granite", residual_multiplier="0.2"), "residual_multiplier must be a "
     "finite number"),
])
def test_bad_config_values_are_named_by_their_config_json_field(extra, msg):
  # each was loaded before: a missing or zero factor, a truncated window, a wrong-length
  # layer_types, a string read as true ... failed at the first forward, or went on wrong
  with pytest.raises(CheckpointError, match=msg):
    config_from_hf({**HF_BASE, **extra})


HF_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
              "qwen3": "Qwen3Config", "gemma2": "Gemma2Config",
              "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config",
              "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
              "qwen3_moe": "Qwen3MoeConfig", "smollm3": "SmolLM3Config",
              "granite": "GraniteConfig", "olmo2": "Olmo2Config"}


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_a_config_json_that_leaves_fields_out_reads_as_transformers_fills_them(family):
  # A hand-written config.json holding only the sizes: each field left out is what
  # transformers' config class takes for it (Gemma's gelu activation, 4096 window and
  # soft-caps, Mistral's window, Mixtral's RoPE base, Qwen3's head_dim, KV heads ...),
  # where fdjax took silu, no window, no cap, 1e4 ...: other logits, no error.
  transformers = pytest.importorskip("transformers")
  sizes = dict(vocab_size=211, hidden_size=256, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=64)
  if family.endswith("moe"):
    sizes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
  filled = getattr(transformers, HF_CONFIGS[family])(**sizes).to_dict()
  assert config_from_hf(dict(model_type=family, **sizes)) == config_from_hf(filled)
  # the llama3 RoPE's original context, left out, is the model's (transformers fills it so)
  rope = dict(rope_parameters={**LLAMA3, "rope_theta": 5e5})
  scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
  assert (config_from_hf({**HF_BASE, **rope}).rope_scaling_dict
          == {**scaling, "original_max_position_embeddings": 64})


def test_both_rope_spellings_read_the_same():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  old = config_from_hf({**HF_BASE, "rope_theta": 5e5, "rope_scaling": scaling})
  new = config_from_hf({**HF_BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}})
  assert old == new and old.rope_theta == 5e5 and old.rope_scaling_dict == scaling


@pytest.mark.parametrize("hf,window,types", [
    (dict(model_type="mistral", sliding_window=16), 16, None),
    (dict(model_type="mistral", sliding_window=None), None, None),
    (dict(model_type="phi3", sliding_window=16), 16, None),
    (dict(model_type="llama", sliding_window=16), None, None),  # Llama's attention has none
    (dict(model_type="qwen2", sliding_window=16), None, None),  # use_sliding_window is off
    (dict(model_type="qwen2", sliding_window=16, use_sliding_window=True,
          max_window_layers=1, num_hidden_layers=3), 16,
     ("full_attention", "sliding_attention", "sliding_attention")),
    (dict(model_type="qwen3", sliding_window=16, use_sliding_window=True,
          max_window_layers=0), 16, None),
    (dict(model_type="gemma3_text", sliding_window=16, num_hidden_layers=7), 16,
     ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")),
    (dict(model_type="gemma3_text", sliding_window=16, num_hidden_layers=2,
          sliding_window_pattern=2), 16, ("sliding_attention", "full_attention")),
    (dict(model_type="gemma2", sliding_window=16, num_hidden_layers=2,
          layer_types=["full_attention", "full_attention"]), None, None),
])
def test_which_layers_get_a_window(hf, window, types):
  """Each family's rule for which layers are windowed, as its transformers model applies it."""
  cfg = config_from_hf({**HF_BASE, **hf})
  assert (cfg.sliding_window, cfg.layer_types) == (window, types)


def test_gemma3_older_config_spelling_reads_the_same():
  base = {**HF_BASE, "model_type": "gemma3_text", "sliding_window": 16, "num_hidden_layers": 6}
  new = config_from_hf({**base, "rope_parameters": {
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
  old = config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert old == new
  assert new.rope(0) == (1e4, None) and new.rope(5) == (1e6, {"rope_type": "linear",
                                                              "factor": 8.0})
  # a flat rope_parameters that says nothing but the default: the defaults, as transformers
  assert config_from_hf({**base, "rope_parameters": {"rope_type": "default"}}).rope(5) == \
      (1e6, None)
  assert new.embed_scale == 32 ** 0.5 and new.attn_scale == 256 ** -0.5 and new.qk_norm


def test_a_sliding_window_is_attention_to_the_last_w_tokens():
  """One layer, window 5: the logits at position i depend on tokens i-4..i only (changing
  token 0 changes positions 0-4 and nothing after), with and without the cache."""
  model = tiny_model(sliding_window=5, num_layers=1)
  ids = np.random.default_rng(3).integers(1, 97, (1, 12))
  other = ids.copy()
  other[0, 0] = 0
  a, b = (np.asarray(forward(model, jnp.asarray(x))) for x in (ids, other))
  changed = np.max(np.abs(a - b), axis=-1)[0] > 1e-6
  assert changed.tolist() == [True] * 5 + [False] * 7
  # generation far past the window: the paged decode and chunked prefill agree with the
  # plain forward pass of the whole sequence
  out = fdjax.generate(model, [ids[0].tolist()], max_new_tokens=20, page_size=4,
                       prefill_chunk=3).tokens[0]
  seq = jnp.asarray([ids[0].tolist() + out])
  assert np.argmax(np.asarray(forward(model, seq))[0, 11:-1], -1).tolist() == out


@pytest.mark.parametrize("overrides,msg", [
    (dict(layer_types=("sliding_attention", "full_attention")), "sliding_window is not set"),
    (dict(layer_types=("full_attention",)), "1 entries for 2 layers"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(sliding_window=4, position_encoding="cope"), "CoPE attention with a sliding window"),
    (dict(mlp_activation="relu"), "unknown mlp_activation 'relu'"),
    (dict(final_softcap=-1.0), "final_softcap must be a positive number"),
])
def test_bad_family_settings_are_refused(overrides, msg):
  with pytest.raises(ValueError, match=msg):
    tiny_model(**overrides)


def test_unknown_fdjax_config_key():
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['colour'\]"):
    ModelConfig.from_dict({**tiny_model().config.to_dict(), "colour": "red"})


def test_fields_transformers_ignores_for_a_family_are_ignored_here_too():
  """Mistral's, Mixtral's, Phi-3's and Qwen2's transformers layers have no attention_bias or
  mlp_bias to turn on (Qwen2's q/k/v bias is always there): read as without them, where
  Llama's mlp_bias and Qwen3's attention_bias stay refused; "swish" is SiLU."""
  for mtype in ("mistral", "mixtral", "phi3", "qwen2"):
    base = {**HF_BASE, "model_type": mtype}
    assert config_from_hf({**base, "attention_bias": True, "mlp_bias": True}) == \
        config_from_hf(base)
  assert config_from_hf({**HF_BASE, "hidden_act": "swish"}) == \
      config_from_hf({**HF_BASE, "hidden_act": "silu"})
