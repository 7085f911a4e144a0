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
from tests.models_util import forward  # noqa: E402

VOCAB = 211
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
W = 8  # the sliding window of the windowed configs: prompts and generations run past it
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}

FAMILIES = {
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=4)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=1, sliding_window=4096)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # every layer windowed: pages before the window are given back during generation
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(num_key_value_heads=2, sliding_window=W)),
    # the layers from max_window_layers on are windowed
    "qwen2-window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=W,
                          max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=16)),
    "qwen3-tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
    # a local (windowed, RoPE base 1e4) and a global layer (1e6, linear scaling), the query
    # scale, final soft-capping (transformers' Gemma 3 attention applies no soft-capping)
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=W,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters=GEMMA3_ROPE,
                    query_pre_attn_scalar=24, final_logit_softcapping=30.0)),
    # Gemma 2: no q/k norms, alternating windowed layers, attention soft-capping (strong)
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=W,
                    query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    final_logit_softcapping=5.0)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(num_key_value_heads=2, sliding_window=W, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)),
    # mixtures of experts: Mixtral (top-2 of 4, renormalised), Qwen3-MoE (top-3 of 8,
    # norm_topk_prob, q/k norms, layer 1 dense through mlp_only_layers), Qwen2-MoE (a
    # sigmoid-gated shared expert, q/k/v bias, top-k not renormalised)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
                       moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2-moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48)),
    # SmolLM3: layer 1 takes no RoPE (its no_rope_layers' 0); windowed, that NoPE layer
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                dict(num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)),
    "smollm3-window": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                       dict(num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, use_sliding_window=True,
                            sliding_window=W)),
    # Granite: its four multipliers (granite-3.x's own values, a larger score scale)
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                dict(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                     attention_multiplier=0.1, logits_scaling=8.0)),
    # OLMo 2: norms after attention and the MLP only, q and k normed over all heads at once
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM,
              dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
WINDOWED = ["mistral-window", "qwen2-window", "gemma3", "gemma2", "phi3", "smollm3-window"]


def _old_style_rope(cfg):
  """config.json's `rope_parameters` written the older way (`rope_theta`, `rope_scaling`)."""
  params = cfg.pop("rope_parameters")
  cfg["rope_theta"] = params.pop("rope_theta")
  cfg["rope_scaling"] = params if params.get("rope_type") != "default" else None


def _rope_spelled_twice(cfg):
  """Both spellings, disagreeing, as a hand-edited config has them: transformers takes the
  older `rope_scaling` (and the rope_theta inside it) over `rope_parameters` and the
  top-level rope_theta, and a top-level original_max_position_embeddings (Phi-3 writes it
  there) over the scaling's own."""
  cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 2.0, "original_max_position_embeddings": 16,
                         "rope_theta": 1e6}
  cfg["rope_theta"], cfg["original_max_position_embeddings"] = 1e4, 64


def _gemma3_rope_scaling_too(cfg):
  """Gemma 3 with rope_scaling beside rope_parameters: merged into the global layers'."""
  cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}


def _gemma2_with_a_pattern(cfg):
  """Gemma 2 alternates its windowed layers whatever sliding_window_pattern says."""
  del cfg["layer_types"]
  cfg["sliding_window_pattern"] = 3


# name: (the family it is built as, how its config.json is rewritten after saving; the
# reference is then transformers' load of that file)
VARIANTS = {"llama3-old-rope-keys": ("llama3", _old_style_rope),
            "llama3-rope-spelled-twice": ("llama3", _rope_spelled_twice),
            "gemma3-rope-scaling-too": ("gemma3", _gemma3_rope_scaling_too),
            "gemma2-pattern-ignored": ("gemma2", _gemma2_with_a_pattern)}


_BUILT = {}


def _build(name, tmp_path_factory):
  """(name, checkpoint path, the transformers model, fdjax's load of it), made once."""
  if name in _BUILT:
    return _BUILT[name]
  family, rewrite = VARIANTS.get(name, (name, None))
  cfg_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(len(name))
  hf_cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128,
                   attn_implementation="eager", **extra)
  hf = model_cls(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():  # larger than the default init, so logits are far from uniform
      p.normal_(0.0, 0.15)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  path = str(tmp_path_factory.mktemp(name))
  hf.save_pretrained(path, max_shard_size="100KB" if name == "llama2" else "1GB")
  if rewrite is not None:
    file = os.path.join(path, "config.json")
    with open(file) as fh:
      cfg = json.load(fh)
    rewrite(cfg)
    with open(file, "w") as fh:
      json.dump(cfg, fh)
    hf = model_cls.from_pretrained(path, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
  _BUILT[name] = name, path, hf, fdjax.load_pretrained(path)
  return _BUILT[name]


@pytest.fixture(scope="module", params=list(FAMILIES) + list(VARIANTS))
def pair(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


# The variants that only spell a config differently: their logits say it all.
@pytest.fixture(scope="module", params=list(FAMILIES) + ["llama3-old-rope-keys"])
def generating(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


def test_sharded_checkpoint_really_sharded(tmp_path_factory):
  """The llama2 checkpoint is saved in 100 KB shards (the others whole): the parity tests
  read a sharded checkpoint through its index."""
  _, path, _, _ = _build("llama2", tmp_path_factory)
  with open(os.path.join(path, "model.safetensors.index.json")) as fh:
    assert len(set(json.load(fh)["weight_map"].values())) > 1


def test_logits_match(pair):
  _, _, hf, model = pair
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 23))  # 23 > W
  want = hf(torch.tensor(ids)).logits.detach().numpy()
  got = np.asarray(forward(model, jnp.asarray(ids)))
  assert np.all(np.isfinite(got))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def _hf_greedy(hf, prompts, n):
  return [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n)[0, len(p):].tolist()
          for p in prompts]


def test_greedy_generation_token_for_token(generating):
  _, _, hf, model = generating
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, VOCAB, n).tolist() for n in (7, 3, 12)]  # 12 + 10 > W
  ours = fdjax.generate(model, prompts, max_new_tokens=10).tokens
  assert ours == _hf_greedy(hf, prompts, 10)


def _hf_penalised(hf, prompts, n, penalty):
  return [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n,
                      repetition_penalty=penalty)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("name", ["llama3", "mistral-window"])
def test_greedy_with_a_repetition_penalty_token_for_token(name, tmp_path_factory):
  """generate's repetition_penalty is transformers': greedy, the same tokens for a ragged
  batch, also with the decode loop in segments (pages of 4 given back behind the window) and
  with speculative decoding; a penalty of 1 is plain greedy, and the penalty changes the
  tokens (short prompts of few distinct tokens: without it they repeat)."""
  _, _, hf, model = _build(name, tmp_path_factory)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, 7, n).tolist() for n in (9, 2, 5)]  # (0 is the pad token)
  n = 3 * W
  want = _hf_penalised(hf, prompts, n, 1.8)
  assert want != _hf_greedy(hf, prompts, n)
  assert fdjax.generate(model, prompts, max_new_tokens=n, repetition_penalty=1.8,
                        page_size=4).tokens == want
  assert fdjax.generate(model, prompts, max_new_tokens=n, repetition_penalty=1.8,
                        speculative="ngram:k=3,n=2").tokens == want
  assert fdjax.generate(model, prompts, max_new_tokens=n, repetition_penalty=1).tokens == \
      _hf_greedy(hf, prompts, n)


@pytest.mark.parametrize("name", WINDOWED)
def test_generation_far_past_the_window_on_few_pages(name, tmp_path_factory):
  """Pages of 4 tokens, a prompt prefilled 5 tokens at a time, four windows of new tokens;
  where every layer is windowed the 45-token sequence (12 pages) lives in a pool of 5, its
  pages given back as it goes, and the pool is whole again afterwards."""
  _, _, hf, model = _build(name, tmp_path_factory)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, VOCAB, n).tolist() for n in (13, 2)]
  every = model.config.windowed is not None
  assert every == (name in ("mistral-window", "phi3"))
  kv = fdjax.KVStore.for_model(model, num_pages=5 if every else 16, page_size=4)
  ours = fdjax.generate(model, prompts[:1], max_new_tokens=4 * W, kv=kv, prefill_chunk=5)
  assert ours.tokens == _hf_greedy(hf, prompts[:1], 4 * W)
  kv.pool.check()
  assert kv.pool.pages_in_use == 0 and kv.pool.pages_available == kv.pool.num_pages
  both = fdjax.generate(model, prompts, max_new_tokens=3 * W, page_size=4).tokens
  assert both == _hf_greedy(hf, prompts, 3 * W)
