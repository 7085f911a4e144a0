"""The model configuration: one frozen dataclass, read from and written to plain dicts."""
from __future__ import annotations

import dataclasses
import functools

import jax

from fdjax.ops import checks
from models import positions

LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
COPE_GATES = ("key", "value", "separate")
# The MLP's gate activation: SwiGLU's SiLU, GeGLU's tanh-approximated GELU (Gemma).
MLP_ACTIVATIONS = {"silu": jax.nn.silu,
                   "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None, or a tuple of (key, value) pairs such as (("rope_type", "llama3"), ("factor", 8.0), ...)
  rope_scaling: tuple | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  max_position_embeddings: int = 2048
  position_encoding: str = "rope"
  npos_max: int = 64
  # CoPE as the official code (facebookresearch/RAM, projects/cope) also runs it: gates
  # sigmoid(q . g / sqrt(d)) with g the keys ("key", the paper), the values ("value": its
  # --cope-val-gates) or keys of a projection of their own ("separate": --cope-sep-key,
  # checkpoint name self_attn.cope_key_proj, cached beside the keys); the position logits
  # added after the score scale (False: the paper's Appendix B, its --cope-nodiv) or before it
  # (True: the code's default, (q.k + z) / sqrt(d)).
  cope_gates: str = "key"
  cope_pos_scaled: bool = False
  # Sliding-window attention: a query sees its last `sliding_window` keys, in every layer, or
  # with `layer_types` only in the "sliding_attention" ones (Gemma 3, Qwen2/3's upper layers).
  sliding_window: int | None = None
  layer_types: tuple | None = None
  # RoPE base of the sliding layers when it differs from the others' (Gemma 3's local 10k;
  # they take no rope_scaling then); None: every layer uses rope_theta and rope_scaling.
  local_rope_theta: float | None = None
  nope_layers: tuple | None = None  # layers RoPE leaves unrotated (SmolLM3's NoPE layers)
  # FlashDecoding++'s unified max value per layer (from `fdjax calibrate`); None: the default.
  softmax_phi: tuple | None = None
  # What the model families differ in (defaults: Llama):
  qk_norm: bool = False              # RMSNorm of each q and k head before RoPE (Qwen3, Gemma 3)
  norm_offset: float = 0.0           # RMSNorm scales by (norm_offset + weight): Gemma's 1
  mlp_activation: str = "silu"       # of the gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
  sandwich_norms: bool = False       # norms after attention and after the MLP too (Gemma)
  pre_norms: bool = True             # norms before attention and the MLP (OLMo 2: none)
  qk_norm_whole: bool = False        # q / k each normed over all heads at once (OLMo 2)
  embed_scale: float | None = None   # token embeddings times this (Gemma: sqrt(hidden))
  attn_scale: float | None = None    # score scale; None: 1 / sqrt(head_dim)
  attn_softcap: float | None = None  # scores -> c * tanh(s / c)
  final_softcap: float | None = None  # logits -> c * tanh(logits / c)
  residual_scale: float | None = None  # attention / MLP outputs times this (Granite)
  logit_divisor: float | None = None  # logits / this (Granite's logits_scaling)
  fused_checkpoint: bool = False     # q/k/v and gate/up stored fused in checkpoints (Phi-3)
  # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; models/moe.py); 0 experts: dense.
  num_experts: int = 0
  experts_per_token: int = 0         # top-k
  moe_intermediate_size: int = 0     # each expert's F (the dense layers' is intermediate_size)
  norm_topk_prob: bool = True        # the k routing weights renormalised to sum to 1
  dense_layers: tuple | None = None  # layers with the dense MLP instead (Qwen's mlp_only_layers)
  shared_expert_size: int = 0        # F of Qwen2-MoE's sigmoid-gated shared expert; 0: none
  moe_naming: str = "qwen"           # checkpoint names: "qwen" (mlp.experts.j.gate_proj ...)
                                     # or "mixtral" (block_sparse_moe.experts.j.w1 ...)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      checks.positive_int("ModelConfig", name, getattr(self, name))
    _check_positive_numbers(self)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.position_encoding not in positions.ENCODINGS:
      raise ValueError(f"ModelConfig: unknown position_encoding {self.position_encoding!r}; "
                       f"expected one of {tuple(positions.ENCODINGS)}")
    if self.position_encoding in ("rope", "cope_rope") and self.head_dim % 2:
      raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
    if not isinstance(self.npos_max, int) or self.npos_max < 1:
      raise ValueError(f"ModelConfig: npos_max must be an integer >= 1, got {self.npos_max!r}")
    if self.softmax_phi is not None:
      object.__setattr__(self, "softmax_phi", tuple(float(p) for p in self.softmax_phi))
      if len(self.softmax_phi) != self.num_layers:
        raise ValueError(f"ModelConfig: softmax_phi has {len(self.softmax_phi)} values for "
                         f"{self.num_layers} layers")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    _check_families(self)

  @property
  def cope(self) -> bool:
    """Whether attention is CoPE's (alone or with RoPE)."""
    return self.position_encoding in ("cope", "cope_rope")

  @property
  def gate_keys(self) -> bool:
    """Whether each layer projects keys of its own for CoPE's gates (cached beside the keys,
    so a key cache entry is 2 * head_dim wide)."""
    return self.cope_gates == "separate"

  @property
  def key_cache_dim(self) -> int:
    """The width of a key cache entry: head_dim, or 2 * head_dim with separate gate keys."""
    return self.head_dim * (2 if self.gate_keys else 1)

  def sparse(self, layer: int) -> bool:
    """Whether a layer's MLP is a mixture of experts (else the dense MLP)."""
    return bool(self.num_experts) and layer not in (self.dense_layers or ())

  def window(self, layer: int) -> int | None:
    """The sliding window of a layer, or None (full causal attention)."""
    if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
      return None
    return self.sliding_window

  @property
  def windowed(self) -> int | None:
    """The window when every layer has one (Mistral): keys older than it are never read
    again, so their pages can be given back; else None."""
    windows = {self.window(i) for i in range(self.num_layers)}
    return windows.pop() if len(windows) == 1 else None

  def rope(self, layer: int) -> tuple[float, dict | None]:
    """(theta, scaling) of a layer's RoPE."""
    if self.local_rope_theta is not None and self.window(layer) is not None:
      return self.local_rope_theta, None
    return self.rope_theta, self.rope_scaling_dict

  def linear_shapes(self) -> dict:
    """The linear-layer weight shapes (K, N) of a block, as fdjax lays them out ([in, out],
    q/k/v and gate/up fused): the shapes FlashDecoding++ tunes for (a mixture of experts'
    dense MLP and shared expert where it has them; its experts run fdjax.ops.moe)."""
    h, d = self.hidden_size, self.head_dim
    kv_parts = 3 if self.gate_keys else 2
    shapes = {"qkv": (h, (self.num_heads + kv_parts * self.num_kv_heads) * d),
              "o": (self.num_heads * d, h)}
    if not all(self.sparse(i) for i in range(self.num_layers)):  # some dense MLP
      shapes.update(gate_up=(h, 2 * self.intermediate_size), down=(self.intermediate_size, h))
    if self.num_experts and self.shared_expert_size:
      f = self.shared_expert_size
      shapes.update(shared_gate_up=(h, 2 * f), shared_down=(f, h))
    return shapes

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_scaling_dict
    for name in ("softmax_phi", "layer_types", "dense_layers", "nope_layers"):
      d[name] = None if d[name] is None else list(d[name])
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown config key(s) {unknown}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.name not in d)
    if missing:
      raise ValueError(f"ModelConfig: missing config key(s) {missing}")
    return cls(**d)


def _check_positive_numbers(cfg):
  """The epsilon and RoPE bases are positive finite numbers (a string or a negative base
  would reach the model as a type error, or NaN positions)."""
  for name in ("rms_norm_eps", "rope_theta", "local_rope_theta"):
    value = getattr(cfg, name)
    if value is None and name == "local_rope_theta":
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
        not 0 < value < float("inf"):
      raise ValueError(f"ModelConfig: {name} must be a positive finite number, got {value!r}")


def _check_families(cfg: ModelConfig):
  w = cfg.sliding_window
  if w is not None:
    checks.positive_int("ModelConfig", "sliding_window", w)
  if cfg.layer_types is not None:
    object.__setattr__(cfg, "layer_types", tuple(cfg.layer_types))
    if len(cfg.layer_types) != cfg.num_layers:
      raise ValueError(f"ModelConfig: layer_types has {len(cfg.layer_types)} entries for "
                       f"{cfg.num_layers} layers")
    bad = sorted(set(cfg.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ValueError(f"ModelConfig: unknown layer_types {bad}; expected {LAYER_TYPES}")
    if w is None and "sliding_attention" in cfg.layer_types:
      raise ValueError("ModelConfig: layer_types has sliding_attention layers but "
                       "sliding_window is not set")
  if cfg.nope_layers is not None:
    object.__setattr__(cfg, "nope_layers", tuple(cfg.nope_layers))
    bad = [i for i in cfg.nope_layers if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < cfg.num_layers]
    if bad:
      raise ValueError(f"ModelConfig: nope_layers must be layer indices in [0, "
                       f"{cfg.num_layers}), got {bad[0]!r}")
  if cfg.qk_norm_whole and not cfg.qk_norm:
    raise ValueError("ModelConfig: qk_norm_whole needs qk_norm")
  if not cfg.pre_norms and not cfg.sandwich_norms:
    raise ValueError("ModelConfig: without pre_norms a block needs sandwich_norms (its only "
                     "norms)")
  if cfg.mlp_activation not in MLP_ACTIVATIONS:
    raise ValueError(f"ModelConfig: unknown mlp_activation {cfg.mlp_activation!r}; "
                     f"expected one of {tuple(MLP_ACTIVATIONS)}")
  for name in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap",
               "local_rope_theta", "residual_scale", "logit_divisor"):
    v = getattr(cfg, name)
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                              and v > 0):
      raise ValueError(f"ModelConfig: {name} must be a positive number or None, got {v!r}")
  _check_experts(cfg)
  _check_cope(cfg)


def _check_cope(cfg: ModelConfig):
  if cfg.cope and (cfg.sliding_window is not None or cfg.attn_softcap is not None):
    raise ValueError("ModelConfig: CoPE attention with a sliding window or attention "
                     "soft-capping is not implemented")
  if cfg.cope_gates not in COPE_GATES:
    raise ValueError(f"ModelConfig: unknown cope_gates {cfg.cope_gates!r}; expected one of "
                     f"{COPE_GATES}")
  if not isinstance(cfg.cope_pos_scaled, bool):
    raise ValueError(f"ModelConfig: cope_pos_scaled must be true or false, got "
                     f"{cfg.cope_pos_scaled!r}")
  if not cfg.cope and (cfg.cope_gates != "key" or cfg.cope_pos_scaled):
    raise ValueError(f"ModelConfig: cope_gates / cope_pos_scaled apply to CoPE attention, "
                     f"not to position_encoding {cfg.position_encoding!r}")


def _check_experts(cfg: ModelConfig):
  """Refuses (ValueError, naming the field) an inconsistent mixture-of-experts config."""
  if cfg.dense_layers is not None:
    object.__setattr__(cfg, "dense_layers", tuple(int(i) for i in cfg.dense_layers))
  if not cfg.num_experts:
    if cfg.experts_per_token or cfg.shared_expert_size or cfg.dense_layers:
      raise ValueError("ModelConfig: experts_per_token, shared_expert_size and dense_layers "
                       "need num_experts > 0")
    return
  checks.positive_int("ModelConfig", "num_experts", cfg.num_experts)
  checks.choice("ModelConfig", "moe_naming", cfg.moe_naming, ("qwen", "mixtral"))
  checks.positive_int("ModelConfig", "moe_intermediate_size", cfg.moe_intermediate_size)
  if not (isinstance(cfg.experts_per_token, int)
          and 1 <= cfg.experts_per_token <= cfg.num_experts):
    raise ValueError(f"ModelConfig: experts_per_token must be in [1, num_experts="
                     f"{cfg.num_experts}], got {cfg.experts_per_token!r}")
  if cfg.shared_expert_size:
    checks.positive_int("ModelConfig", "shared_expert_size", cfg.shared_expert_size)
  bad = [i for i in cfg.dense_layers or () if not 0 <= i < cfg.num_layers]
  if bad:
    raise ValueError(f"ModelConfig: dense_layers {bad} are not layers of a "
                     f"{cfg.num_layers}-layer model")
