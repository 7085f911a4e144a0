"""llama.cpp as a CPU baseline for bench/decode.py: a Hugging Face Llama written as GGUF with
the `gguf` package (float32, bfloat16, or Q8_0 linears beside a float32 LM head as fdjax's and
HF's int8 leave it), run by `llama-cpp-python` (built from its source distribution: PyPI has no
wheel: `pip install llama-cpp-python gguf` compiles llama.cpp). llama.cpp decodes
one sequence at a time through this API, so it is a batch-1 row.

The random benchmark model has no tokenizer: the GGUF says so (tokenizer model "none") and
token ids go in and out as they are.
"""
from __future__ import annotations

import os

import numpy as np

from bench import common

# GGUF tensor names of a Llama (llama.cpp's), per layer and for the whole model.
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
MODEL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LINEARS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def available() -> str | None:
  """Why the llama.cpp row cannot run here (None: it can)."""
  try:
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401
  except ImportError as e:
    return f"{e.name} is not installed (pip install llama-cpp-python gguf)"
  return None


def rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """q or k projection rows [heads * head_dim, in] from Hugging Face's rotary layout (a head's
  first half rotates with its second half) to llama.cpp's (adjacent pairs rotate together):
  row i of a head's first half and row i of its second half become rows 2i and 2i + 1."""
  out, inner = w.shape
  d = out // heads
  return w.reshape(heads, 2, d // 2, inner).swapaxes(1, 2).reshape(out, inner)


def gguf_name(hf_name: str) -> str:
  """The GGUF name of a Hugging Face Llama tensor ("model.layers.3.mlp.up_proj.weight" ->
  "blk.3.ffn_up.weight")."""
  stem, kind = hf_name.rsplit(".", 1)
  if stem.startswith("model.layers."):
    i, part = stem[len("model.layers."):].split(".", 1)
    return f"blk.{i}.{LAYER[part]}.{kind}"
  return f"{MODEL[stem]}.{kind}"


def write_gguf(hf, path: str, dtype: str) -> None:
  """The Hugging Face LlamaForCausalLM `hf` (float32) as a GGUF file at `path`: every tensor
  float32 ("float32"), the matrices bfloat16 ("bfloat16"), or the seven linears of each layer
  Q8_0 ("int8": blocks of 32 weights with one scale; embedding and LM head float32). Norms
  stay float32 (llama.cpp's requirement)."""
  import gguf
  cfg = hf.config
  if getattr(cfg, "tie_word_embeddings", False):
    raise ValueError("write_gguf: a model with tied embeddings is not handled")
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_rope_dimension_count(head_dim)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(getattr(cfg, "rope_theta", None)
                       or cfg.rope_parameters["rope_theta"])
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("none")
  types = gguf.GGMLQuantizationType
  files = gguf.LlamaFileType
  w.add_file_type({"float32": files.ALL_F32, "bfloat16": files.MOSTLY_BF16,
                   "int8": files.MOSTLY_Q8_0}[dtype])
  for hf_name, t in hf.state_dict().items():
    name = gguf_name(hf_name)
    x = t.detach().float().numpy()
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
      x = rope_rows(x, heads)
    part = name.split(".")[-2]
    if x.ndim == 2 and dtype == "bfloat16":
      w.add_tensor(name, gguf.quants.quantize(x, types.BF16), raw_dtype=types.BF16)
    elif x.ndim == 2 and dtype == "int8" and part in LINEARS:
      w.add_tensor(name, gguf.quants.quantize(x, types.Q8_0), raw_dtype=types.Q8_0)
    else:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def load(path: str, n_ctx: int):
  """llama-cpp-python's Llama on the GGUF at `path`, with every core for decode and prefill."""
  import llama_cpp
  cores = len(os.sched_getaffinity(0))
  return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=cores,
                         n_threads_batch=cores, verbose=False)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
  """n greedily chosen tokens after `prompt`, from an empty cache."""
  llm.reset()
  out = []
  for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                            repeat_penalty=1.0, reset=True):
    out.append(int(token))
    if len(out) == n:
      break
  return out


def timer(llm, prompt: list[int], new_tokens: int):
  """A function timing llama.cpp once, as bench/decode.py times Hugging Face
  (common.decode_rate)."""
  return common.decode_rate(lambda n: greedy(llm, prompt, n), new_tokens)
