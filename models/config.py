"""The model configuration: one frozen dataclass, read from and written to plain dicts."""
from __future__ import annotations

import dataclasses

from models import positions


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
  sliding_window: int | None = None
  # FlashDecoding++'s unified max value per layer (from `fdjax calibrate`); None: the default.
  softmax_phi: tuple | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"ModelConfig: {name} must be a positive integer, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.position_encoding not in positions.ENCODINGS:
      raise ValueError(f"ModelConfig: unknown position_encoding {self.position_encoding!r}; "
                       f"expected one of {tuple(positions.ENCODINGS)}")
    if self.position_encoding == "rope" and self.head_dim % 2:
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

  def linear_shapes(self) -> dict:
    """The four linear-layer weight shapes (K, N) of a block, as fdjax lays them out
    ([in, out], q/k/v and gate/up fused): the shapes FlashDecoding++ tunes for."""
    h, d = self.hidden_size, self.head_dim
    return {"qkv": (h, (self.num_heads + 2 * self.num_kv_heads) * d),
            "o": (self.num_heads * d, h),
            "gate_up": (h, 2 * self.intermediate_size),
            "down": (self.intermediate_size, h)}

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_scaling_dict
    d["softmax_phi"] = None if self.softmax_phi is None else list(self.softmax_phi)
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
