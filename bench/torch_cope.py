"""The PyTorch baseline for CoPE decoding: a CoPE decoder as a PyTorch user writes it from
the paper's Appendix B and the official code's ContextPosition module (gates sigmoid(q.k),
positions by a flipped cumulative sum, clamped, the position logits q.e gathered at floor and
ceil and interpolated), with a preallocated KV cache, eager, greedy. It reads an fdjax CoPE
checkpoint (a Llama with a `self_attn.pos_emb` [npos_max, head_dim] per layer, gates from
the keys, position logits added after the scale); bench/cope_decode.py checks its greedy
tokens against fdjax's before timing it. Transformers has no CoPE model to compare with."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F


class CopeDecoder(torch.nn.Module):

  def __init__(self, model_dir: str, dtype=torch.float32):
    super().__init__()
    from safetensors.torch import load_file
    with open(os.path.join(model_dir, "config.json")) as fh:
      cfg = json.load(fh)
    if cfg.get("position_encoding") != "cope" or cfg.get("cope_gates", "key") != "key" or (
        cfg.get("cope_pos_scaled", False) or cfg.get("qkv_bias") or cfg.get("sliding_window")):
      raise ValueError(f"{model_dir}: the PyTorch CoPE baseline takes the appendix's CoPE "
                       "(gates from the keys, no bias, no window)")
    self.cfg = cfg
    self.w = {k: v.to(dtype)
              for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    self.layers = cfg["num_layers"]
    self.heads, self.kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
    self.head_dim, self.eps = cfg["head_dim"], cfg["rms_norm_eps"]
    self.npos = cfg["npos_max"]
    self.dtype = dtype

  def _norm(self, x, name):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + self.eps)).to(self.dtype) * self.w[name]

  def _attend(self, q, k, v, e, n):
    """q [B, H, T, D] at positions n .. n + T - 1 against k, v [B, H, n + T, D]: CoPE
    attention, causal (the official code's form: the mask's log added to the logits, so
    masked keys have gate sigmoid(-inf) = 0)."""
    t, s = q.shape[2], k.shape[2]
    scale = self.head_dim ** -0.5
    causal = torch.arange(s)[None, :] <= n + torch.arange(t)[:, None]
    logits = q @ k.transpose(-1, -2) * scale + torch.where(causal, 0.0, float("-inf")).to(
        self.dtype)  # [B, H, T, S]
    gates = torch.sigmoid(logits)
    pos = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.npos - 1)
    z = q @ e.T  # [B, H, T, npos]: q . e[n]
    lo, hi = pos.floor(), pos.ceil()
    w = pos - lo
    pos_logits = z.gather(-1, hi.long()) * w + z.gather(-1, lo.long()) * (1 - w)
    p = torch.softmax((logits + pos_logits).float(), -1).to(self.dtype)
    return p @ v

  def forward(self, ids, cache, n):
    """The logits of one step's tokens ids [B, T] written at positions n .. n + T - 1 of
    `cache` (per layer (k, v) [B, Hkv, max_len, D]); each query attends causally."""
    b, t = ids.shape
    h, hkv, d = self.heads, self.kv_heads, self.head_dim
    x = self.w["model.embed_tokens.weight"][ids]
    for i in range(self.layers):
      pre = f"model.layers.{i}."
      y = self._norm(x, pre + "input_layernorm.weight")
      q = (y @ self.w[pre + "self_attn.q_proj.weight"].T).view(b, t, h, d).transpose(1, 2)
      k = (y @ self.w[pre + "self_attn.k_proj.weight"].T).view(b, t, hkv, d).transpose(1, 2)
      v = (y @ self.w[pre + "self_attn.v_proj.weight"].T).view(b, t, hkv, d).transpose(1, 2)
      kc, vc = cache[i]
      kc[:, :, n:n + t], vc[:, :, n:n + t] = k, v
      keys = kc[:, :, :n + t].repeat_interleave(h // hkv, 1)
      values = vc[:, :, :n + t].repeat_interleave(h // hkv, 1)
      o = self._attend(q, keys, values, self.w[pre + "self_attn.pos_emb"], n)
      o = o.transpose(1, 2).reshape(b, t, h * d)
      x = x + o @ self.w[pre + "self_attn.o_proj.weight"].T
      y = self._norm(x, pre + "post_attention_layernorm.weight")
      gate = y @ self.w[pre + "mlp.gate_proj.weight"].T
      up = y @ self.w[pre + "mlp.up_proj.weight"].T
      x = x + (F.silu(gate) * up) @ self.w[pre + "mlp.down_proj.weight"].T
    x = self._norm(x, "model.norm.weight")
    head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
    return x @ head.T

  @torch.no_grad()
  def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens for prompts of one length: the prompt in one call, then a step each."""
    ids = torch.tensor(prompts)
    b, t = ids.shape
    shape = (b, self.kv_heads, t + new_tokens, self.head_dim)
    cache = [(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
             for _ in range(self.layers)]
    logits = self.forward(ids, cache, 0)[:, -1]
    out = []
    for step in range(new_tokens):
      token = logits.argmax(-1)
      out.append(token)
      if step + 1 < new_tokens:
        logits = self.forward(token[:, None], cache, t + step)[:, -1]
    return torch.stack(out, 1).tolist()
