"""Position encodings behind one interface: which parameter an encoding adds (to the model
or to each attention layer, and under which checkpoint name), how it changes the token
embeddings and q / k, and which attention op runs. A new encoding is one new class here."""
from __future__ import annotations

import jax.numpy as jnp

from fdjax.ops import dispatch
from models import rope


class NoPositions:
  """No position information; every hook's default. A parameter spec is (checkpoint name
  (within the layer for layer_param), shape, init "normal" | "zeros")."""
  name = "none"

  def model_param(self, cfg):
    return None

  def layer_param(self, cfg):
    return None

  def embed(self, x, positions, table):
    return x

  def rotate(self, cfg, layer, q, k, positions):
    return q, k

  def options(self, cfg) -> dict:
    """What this encoding's attend / attend_pages take from the config beside `how`."""
    return {}

  def attend(self, q, k, v, lengths, *, q_start, table, **how):
    """Queries [B, T] at positions q_start + i, causally against the first `lengths` of k, v;
    `how`: the layer's sm_scale, phi, window and softcap."""
    return dispatch.prefill_attention(q, k, v, lengths=lengths, q_start=q_start, causal=True,
                                      **how)

  def attend_pages(self, q, k_pages, v_pages, page_table, lengths, *, table, **how):
    """A decode step, q [B, 1, Hq, D], against the first `lengths` entries of a paged cache."""
    return dispatch.paged_decode_attention(q[:, 0], k_pages, v_pages, page_table, lengths,
                                           **how)[:, None]


class Rope(NoPositions):
  name = "rope"

  def rotate(self, cfg, layer, q, k, positions):
    if layer in (cfg.nope_layers or ()):  # SmolLM3's NoPE layers: no rotation
      return q, k
    freq = rope.inv_freq(cfg.head_dim, *cfg.rope(layer))  # at trace time
    return rope.apply(q, positions, freq), rope.apply(k, positions, freq)


class Cope(NoPositions):
  """One [npos_max, D] table per layer shared by its heads, zero-initialised (the paper);
  positions come from the gates, so decode steps attend with the CoPE op too. With separate
  gate keys (cfg.cope_gates) a key is [key, gate key] along its last axis, in the cache too."""
  name = "cope"

  def layer_param(self, cfg):
    return "self_attn.pos_emb", (cfg.npos_max, cfg.head_dim), "zeros"

  def options(self, cfg):
    return dict(gates=cfg.cope_gates, pos_scaled=cfg.cope_pos_scaled)

  def attend(self, q, k, v, lengths, *, q_start, table, gates, pos_scaled, sm_scale=None, **_):
    # (ModelConfig refuses a window or soft-capping with CoPE; phi is the async kernels')
    d = q.shape[-1]
    gate_keys = {"key": None, "value": v, "separate": k[..., d:]}[gates]
    return dispatch.cope_attention(q, k[..., :d], v, table, lengths=lengths, q_start=q_start,
                                   sm_scale=sm_scale, gate_keys=gate_keys,
                                   pos_scaled=pos_scaled)

  def attend_pages(self, q, k_pages, v_pages, page_table, lengths, *, table, gates, pos_scaled,
                   sm_scale=None, **_):
    return dispatch.paged_cope_decode_attention(q[:, 0], k_pages, v_pages, page_table, lengths,
                                                table, sm_scale=sm_scale, gates=gates,
                                                pos_scaled=pos_scaled)[:, None]


class CopeRope(Cope):
  """CoPE on RoPE-rotated queries and keys (the official code's combination is CoPE with
  learned relative positions, "cope+rel"; this is its RoPE form): the scores, the gates and
  the position logits all read the rotated q, and separate gate keys are rotated as keys."""
  name = "cope_rope"
  rotate = Rope.rotate


class Absolute(NoPositions):
  """Learned positions added to the token embeddings (the CoPE paper's baseline)."""
  name = "absolute"

  def model_param(self, cfg):
    return ("model.embed_positions.weight", (cfg.max_position_embeddings, cfg.hidden_size),
            "normal")

  def embed(self, x, positions, table):
    return x + jnp.take(table, positions, axis=0)


ENCODINGS = {e.name: e for e in (NoPositions(), Rope(), Cope(), CopeRope(), Absolute())}


def get(name: str) -> NoPositions:
  return ENCODINGS[name]  # ModelConfig has checked the name
