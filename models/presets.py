"""Named model shapes: real architectures (random weights, for benchmarks and tuning) and a
tiny randomly initialised byte-level model."""
from __future__ import annotations

from models.config import ModelConfig

PRESETS = {
    # Randomly initialised: produces noise. Stands in where no trained model is given.
    "random-tiny": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                               max_position_embeddings=1024),
    "random-tiny-moe": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                                   max_position_embeddings=1024, num_experts=8,
                                   experts_per_token=2, moe_intermediate_size=64),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                              rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              rms_norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192},
                              max_position_embeddings=8192),
    # Mixtures of experts: 128 experts of width 768, 8 a token (3.3B of 30.5B parameters
    # active); 8 experts of width 14336, 2 a token.
    "qwen3-30b-a3b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                                 rope_theta=1e6, qk_norm=True, max_position_embeddings=40960,
                                 num_experts=128, experts_per_token=8,
                                 moe_intermediate_size=768, norm_topk_prob=True),
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                                num_experts=8, experts_per_token=2,
                                moe_intermediate_size=14336, moe_naming="mixtral"),
}


def get(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]
