"""A tiny random-weight Llama checkpoint with a Llama-3-style tokenizer and chat template,
in Hugging Face's format (transformers and fdjax both load it): what the server tests and
bench/serve.py run on.

The tokenizer is a byte-level BPE (as Llama 3's) trained here on a few standard-library
sources, with Llama 3's special tokens; tokenizer_config.json holds a Llama-3-style
chat_template (header tokens per message, <|eot_id|> after each, the BOS token first, an
error for a conversation that does not alternate user and assistant after the system
message).

  python bench/tiny_llama3.py OUT_DIR [--hidden 256 --layers 4]
"""
from __future__ import annotations

import argparse
import json
import os

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]

# Llama 3's template, written in the block style many Hub templates use (so trim_blocks and
# lstrip_blocks matter), with a raise_exception for a conversation out of turn.
LLAMA3_TEMPLATE = """{{- bos_token -}}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0] %}
    {% set rest = messages[1:] %}
{% else %}
    {% set system = none %}
    {% set rest = messages %}
{% endif %}
{% if system is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system['content'] | trim + '<|eot_id|>' -}}
{% endif %}
{% for message in rest %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}"""


def _corpus() -> list[str]:
  import difflib
  import json as json_module
  import textwrap
  texts = []
  for module in (textwrap, difflib, json_module.decoder):
    with open(module.__file__, encoding="utf-8") as fh:
      texts.append(fh.read())
  return texts


def build_tokenizer(vocab_size: int = 512):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_corpus(), trainer)
  return tok


def build(path: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          intermediate: int | None = None, max_len: int = 512, seed: int = 0,
          vocab_size: int = 512, eos: bool = True, init_std: float = 0.15) -> str:
  """Writes the checkpoint to `path` (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json, generation_config.json); eos=False leaves the model no EOS, so it
  always writes max_tokens."""
  import torch
  import transformers
  os.makedirs(path, exist_ok=True)
  tok = build_tokenizer(vocab_size)
  tok.save(os.path.join(path, "tokenizer.json"))
  eot = tok.token_to_id("<|eot_id|>")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False,
               "model_max_length": max_len, "chat_template": LLAMA3_TEMPLATE}, fh, indent=2)
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      intermediate_size=intermediate or 3 * hidden, max_position_embeddings=max_len,
      bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=eot if eos else None,
      rope_theta=500000.0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # far from uniform logits: greedy text is not all ties
      p.normal_(0.0, init_std)
  model.generation_config.eos_token_id = eot if eos else None
  model.generation_config.pad_token_id = 0
  model.save_pretrained(path)
  return path


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("out")
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--no-eos", action="store_true")
  a = ap.parse_args()
  print(build(a.out, hidden=a.hidden, layers=a.layers, eos=not a.no_eos))
