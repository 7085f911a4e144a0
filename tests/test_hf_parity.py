"""fdjax against Hugging Face transformers (PyTorch, CPU) on small random models of each
family: same logits (float32), and greedy generation token-for-token equal."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import fdjax  # noqa: E402

VOCAB = 211
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

FAMILIES = {
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=4)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=1, sliding_window=4096)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def _old_style_rope(path):
  """Rewrites config.json's `rope_parameters` the older way (`rope_theta`, `rope_scaling`)."""
  file = os.path.join(path, "config.json")
  with open(file) as fh:
    cfg = json.load(fh)
  params = cfg.pop("rope_parameters")
  cfg["rope_theta"] = params.pop("rope_theta")
  cfg["rope_scaling"] = params if params.get("rope_type") != "default" else None
  with open(file, "w") as fh:
    json.dump(cfg, fh)


@pytest.fixture(scope="module", params=list(FAMILIES) + ["llama3-old-rope-keys"])
def pair(request, tmp_path_factory):
  name = request.param
  cfg_cls, model_cls, extra = FAMILIES[name.split("-")[0]]
  torch.manual_seed(len(name))
  hf_cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128, **extra)
  hf = model_cls(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():  # larger than the default init, so logits are far from uniform
      p.normal_(0.0, 0.15)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  path = str(tmp_path_factory.mktemp(name))
  hf.save_pretrained(path, max_shard_size="100KB" if name == "llama2" else "1GB")
  if name.endswith("old-rope-keys"):
    _old_style_rope(path)
  return name, path, hf, fdjax.load_pretrained(path)


def test_sharded_checkpoint_really_sharded(pair):
  name, path, _, _ = pair
  if name == "llama2":
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))


def test_logits_match(pair):
  _, _, hf, model = pair
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 23))
  want = hf(torch.tensor(ids)).logits.detach().numpy()
  got = np.asarray(model(jnp.asarray(ids)))
  assert np.all(np.isfinite(got))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_greedy_generation_token_for_token(pair):
  _, _, hf, model = pair
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, VOCAB, n).tolist() for n in (7, 3, 12)]
  ours = fdjax.generate(model, prompts, max_new_tokens=10).tokens
  for prompt, got in zip(prompts, ours):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10)
    assert got == out[0, len(prompt):].tolist()
