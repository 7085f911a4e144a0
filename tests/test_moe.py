"""Mixture of experts: the routing and the four expert strategies against a float64 dense
reference, the rule that picks a strategy, the model's MoE layers, their checkpoints and the
refusals. Parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE is in test_hf_parity."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fdjax
from fdjax.io import checkpoint
from fdjax.ops import dispatch, moe, quant, selection
from models import ModelConfig, Transformer, layout, parallel
from tests.models_util import compiled, forward

SILU = jax.nn.silu


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(key, e, h, f, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (e, h, 2 * f), jnp.float32).astype(dtype) * 0.3,
          jax.random.normal(k2, (e, f, h), jnp.float32).astype(dtype) * 0.3)


def _f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def _reference(x, weights, experts, w_gate_up, w_down):
  """The float64 dense computation (numpy): each token's experts, weighted."""
  x, weights, w_gate_up, w_down = _f64(x, weights, w_gate_up, w_down)
  f = w_down.shape[1]
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for w, e in zip(weights[t], np.asarray(experts)[t]):
      gu = x[t] @ w_gate_up[e]
      hidden = gu[:f] / (1 + np.exp(-gu[:f])) * gu[f:]
      out[t] += w * (hidden @ w_down[e])
  return out


def test_route_is_softmax_top_k_renormalised():
  logits = jax.random.normal(jax.random.key(0), (9, 6)) * 3
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(-1, keepdims=True)
  for normalize in (True, False):
    weights, experts = moe.route(logits, 2, normalize)
    top = np.argsort(-p, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(experts), top)
    want = np.take_along_axis(p, top, -1)
    if normalize:
      want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


@pytest.mark.parametrize("strategy", moe.STRATEGIES)
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (37, 16, 4), (3, 64, 8)])
def test_strategies_match_float64(strategy, t, e, k):
  key = jax.random.key(t * 100 + e + k)
  h, f = 24, 40  # off every tile multiple
  x = jax.random.normal(key, (t, h), jnp.float32)
  w_gate_up, w_down = _weights(jax.random.fold_in(key, 1), e, h, f)
  weights, experts = moe.route(jax.random.normal(jax.random.fold_in(key, 2), (t, e)), k, True)
  want = _reference(x, weights, experts, w_gate_up, w_down)
  for tile in (8, 16) if strategy == "grouped" else (8,):  # only grouped has tiles
    got = np.asarray(compiled(moe.run, strategy, x, weights, experts, w_gate_up, w_down, SILU,
                                tile=tile))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("strategy", moe.STRATEGIES)
def test_one_expert_takes_every_token_and_the_rest_none(strategy):
  """Every token's first choice is expert 5, the second expert 2: six of eight experts get no
  token; with 40 tokens expert 5's group spans several tiles, the last one partial."""
  t, e, h, f = 40, 8, 16, 24
  key = jax.random.key(3)
  x = jax.random.normal(key, (t, h), jnp.float32)
  w_gate_up, w_down = _weights(jax.random.fold_in(key, 1), e, h, f)
  experts = jnp.tile(jnp.array([[5, 2]], jnp.int32), (t, 1))
  weights = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 2), (t, 2)), -1)
  want = _reference(x, weights, experts, w_gate_up, w_down)
  got = np.asarray(compiled(moe.run, strategy, x, weights, experts, w_gate_up, w_down, SILU,
                              tile=16))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_experts_match_float64(method):
  """int8 / int4 experts (each quantized alone, K off the int4 group): every strategy against
  float64 on the dequantized weights, with an expert taking most tokens and several none."""
  t, e, h, f = 19, 16, 40, 24
  key = jax.random.key(5)
  x = jax.random.normal(key, (t, h), jnp.float32)
  w_gate_up, w_down = _weights(jax.random.fold_in(key, 1), e, h, f)
  q_gate_up, q_down = quant.quantize(w_gate_up, method), quant.quantize(w_down, method)
  for i in (0, 7):  # stacked quantization is each expert's own
    one = quant.quantize(w_gate_up[i], method)
    np.testing.assert_array_equal(np.asarray(q_gate_up.values[i]), np.asarray(one.values))
    np.testing.assert_array_equal(np.asarray(q_gate_up.scales[i]), np.asarray(one.scales))
  assert q_gate_up.shape == (e, h, 2 * f) and q_down.shape == (e, f, h)
  logits = jax.random.normal(jax.random.fold_in(key, 2), (t, e)).at[:12, 3].add(9.0)
  weights, experts = moe.route(logits, 3, True)
  deq = [quant.dequantize(w) for w in (q_gate_up, q_down)]
  want = _reference(x, weights, experts, *deq)
  assert np.max(np.abs(want - _reference(x, weights, experts, w_gate_up, w_down))) > 0
  for strategy in moe.STRATEGIES:
    got = np.asarray(compiled(moe.run, strategy, x, weights, experts, q_gate_up, q_down, SILU,
                                tile=8))
    assert np.all(np.isfinite(got)), strategy
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  auto = dispatch.moe(x, logits, q_gate_up, q_down, top_k=3)
  np.testing.assert_allclose(np.asarray(auto), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="both be float or both quantized by one method, got "
                                       f"{method} and float float32"):
    dispatch.moe(x, logits, q_gate_up, w_down, top_k=3)
  with pytest.raises(ValueError, match="dtype"):
    dispatch.moe(x.astype(jnp.bfloat16), logits, q_gate_up, q_down, top_k=3)


def test_a_long_prompt_gathers_its_experts_a_chunk_at_a_time(monkeypatch):
  """Past GATHER_BYTES of tile weights the XLA grouped strategy maps over chunks of tiles (a
  long prompt would otherwise copy one expert per tile at once): the same result."""
  t, e, h, f = 50, 4, 16, 24
  key = jax.random.key(11)
  x = jax.random.normal(key, (t, h), jnp.float32)
  w_gate_up, w_down = _weights(jax.random.fold_in(key, 1), e, h, f)
  weights, experts = moe.route(jax.random.normal(jax.random.fold_in(key, 2), (t, e)), 2, True)
  whole = moe.run("grouped", x, weights, experts, w_gate_up, w_down, SILU, tile=8)
  monkeypatch.setattr(moe, "GATHER_BYTES", 3 * h * 2 * f * 4)  # three tiles' experts at once
  chunked = moe.run("grouped", x, weights, experts, w_gate_up, w_down, SILU, tile=8)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  assert moe.tile_count(0, e, 8) == 0 and moe.tile_count(16, 128, 8) == 16


def test_tile_count_bounds_every_routing():
  """The grouped strategy's static tile count covers the worst routing, and its tiles hold
  every pair exactly once."""
  rng = np.random.default_rng(0)
  for t, e, k, tile in [(1, 8, 2, 8), (7, 3, 2, 4), (33, 16, 4, 8), (64, 128, 8, 16)]:
    for _ in range(5):
      experts = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
      if rng.random() < 0.3:  # skewed: most pairs on one expert
        experts[:, 0] = 0
      counts = np.bincount(experts.reshape(-1), minlength=e)
      assert (-(-counts // tile)).sum() <= moe.tile_count(t * k, e, tile)
      expert, index, valid, order, _ = moe.tiles(jnp.asarray(experts), e, tile)
      pairs = np.asarray(order)[np.asarray(index)[np.asarray(valid)]]
      assert sorted(pairs.tolist()) == list(range(t * k))
      flat = experts.reshape(-1)
      rows_expert = np.broadcast_to(np.asarray(expert)[:, None], index.shape)[np.asarray(valid)]
      np.testing.assert_array_equal(flat[pairs], rows_expert)


@pytest.mark.parametrize("strategy", ["gather", "grouped", "ragged"])
def test_bfloat16_within_twice_the_plain_error(strategy):
  t, e, k, h, f = 19, 8, 2, 64, 96
  key = jax.random.key(7)
  x = jax.random.normal(key, (t, h), jnp.float32)
  w_gate_up, w_down = _weights(jax.random.fold_in(key, 1), e, h, f)
  weights, experts = moe.route(jax.random.normal(jax.random.fold_in(key, 2), (t, e)), k, True)
  bf = [a.astype(jnp.bfloat16) for a in (x, w_gate_up, w_down)]
  want = _reference(bf[0], weights, experts, bf[1], bf[2])

  def plain(x, w_gate_up, w_down):  # everything in bfloat16, as a plain XLA program would
    gu = jnp.einsum("th,tkhf->tkf", x, w_gate_up[experts], preferred_element_type=x.dtype)
    hidden = jax.nn.silu(gu[..., :f]) * gu[..., f:]
    out = jnp.einsum("tkf,tkfh->tkh", hidden, w_down[experts], preferred_element_type=x.dtype)
    return jnp.einsum("tk,tkh->th", weights.astype(x.dtype), out)

  plain_err = np.abs(np.asarray(plain(*bf), np.float64) - want).max()
  got = moe.run(strategy, *bf[:1], weights, experts, *bf[1:], SILU, tile=8)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float64) - want).max()
  assert np.isfinite(err) and err <= 2 * plain_err, (err, plain_err)


def test_selection_by_tokens_per_expert():
  """Qwen3-30B-A3B (128 experts, top-8) in bfloat16 on the CPU, as bench/results/moe.md
  measured it: grouped tiles of 8 up to 64 tokens (126 of 128 experts hit), tiles of 128 for a
  long prompt (every expert on every token multiplies 16x the rows); on an H100's balance
  every expert once at 64 tokens."""
  decode = selection.moe(tokens=4, top_k=8, num_experts=128)
  assert decode.impl == "grouped" and decode.settings == 8 and "32 pairs" in decode.reason
  assert selection.moe(tokens=8, top_k=8, num_experts=128).impl == "grouped"
  assert selection.moe(tokens=64, top_k=8, num_experts=128).impl == "grouped"
  assert selection.moe(tokens=64, top_k=8, num_experts=128, platform="cuda").impl == "dense"
  prompt = selection.moe(tokens=4096, top_k=8, num_experts=128)
  assert prompt.impl == "grouped" and prompt.settings == 128
  # Mixtral at batch 8: 16 pairs, up to 9 tiles of 8 rows, against its 8 experts once
  few = selection.moe(tokens=8, top_k=2, num_experts=8)
  assert few.impl == "dense" and few.settings is None


def _moe_table(path, kind, entries):
  with open(path, "w") as fh:
    json.dump({"device": kind, "shapes": {}, "moe": entries}, fh)


def test_a_measured_moe_table_overrides_the_rule(tmp_path, monkeypatch):
  """A table's "moe" entry (fdjax tune --moe) decides by the measured times at the smallest
  token count measured at or above the call's (the largest past them); other layers, other
  quantizations and other platforms keep the analytic rule; dispatch.moe and describe follow it."""
  kind = selection.device_kind()
  qwen = selection.moe_key(128, 2048, 768, 8)
  assert qwen == "E128xH2048xF768xk8"
  assert selection.moe_key(8, 64, 32, 2, "int4") == "E8xH64xF32xk2:int4"
  # against the rule (grouped tiles at 1 to 64 tokens): every expert measured faster at 1 and 2
  profile = [{"tokens": 1, "grouped_ms": 5.0, "dense_ms": 4.0, "tile": 8},
             {"tokens": 2, "grouped_ms": 6.0, "dense_ms": 5.5, "tile": 8},
             {"tokens": 16, "grouped_ms": 7.0, "dense_ms": 9.0, "tile": 8}]
  small = selection.moe_key(4, 16, 8, 2)  # test_dispatch_moe_picks_and_checks's layer
  _moe_table(tmp_path / "t.json", kind, {qwen: {"source": "measured", "profile": profile},
                                         small: {"source": "measured", "profile": [
                                             {"tokens": 64, "grouped_ms": 1.0, "dense_ms": 2.0,
                                              "tile": 8}]}})
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  try:
    here = jax.default_backend()
    layer = dict(hidden=2048, width=768)
    one = selection.moe(1, 8, 128, 2, here, **layer)
    assert one.impl == "dense" and "measured at 1 tokens" in one.reason and "4 ms" in one.reason
    assert selection.moe(2, 8, 128, 2, here, **layer).impl == "dense"
    three = selection.moe(3, 8, 128, 2, here, **layer)  # the next measured: 16
    assert three.impl == "grouped" and three.settings == 8 and "at 16 tokens" in three.reason
    assert "at 16 tokens" in selection.moe(4096, 8, 128, 2, here, **layer).reason
    assert selection.moe(1, 8, 128, 2, here).impl == "grouped"  # no shape: the rule
    assert selection.moe(1, 8, 128, 1, here, **layer, quantization="int8").impl == "grouped"
    assert selection.moe(1, 8, 128, 2, "tpu", **layer).impl == "grouped"  # not this device
    cfg = dataclasses.replace(MOE, num_experts=128, experts_per_token=8, hidden_size=2048,
                              moe_intermediate_size=768)
    assert dispatch.describe(cfg, batch=1)["moe"].startswith("dense (")
    # dispatch.moe runs what the table says (the tiles, where the rule takes every expert)
    assert selection.moe(6, 2, 4, 4, "cpu").impl == "dense"
    ran = []
    real = moe.run
    monkeypatch.setattr(moe, "run", lambda how, *a, **k: ran.append(how) or real(how, *a, **k))
    x = jax.random.normal(jax.random.key(0), (6, 16))
    w_gate_up, w_down = _weights(jax.random.key(1), 4, 16, 8)
    logits = jax.random.normal(jax.random.key(2), (6, 4))
    y = dispatch.moe(x, logits, w_gate_up, w_down, top_k=2)
    assert ran == ["grouped"]
    np.testing.assert_allclose(y, dispatch.moe(x, logits, w_gate_up, w_down, top_k=2,
                                               strategy="grouped"), rtol=1e-5, atol=1e-6)
  finally:
    monkeypatch.delenv("FDJAX_TABLES")
    selection.reload()


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_tune_moe_measures_the_layer_and_selection_follows(tmp_path, monkeypatch):
  """fdjax tune --moe on the CPU (real timings: XLA runs both ways), through the command line:
  the layer's entry with both times at each token count, which selection then follows."""
  out = tmp_path / "cpu.json"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "tune", "--moe", "--preset",
                      "random-tiny-moe", "--tokens", "1", "16", "--iters", "3", "--dtype",
                      "float32", "--out", str(out)], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  table = json.loads(out.read_text())
  entry = table["moe"][selection.moe_key(8, 128, 64, 2)]
  assert table["device"] == selection.device_kind() and entry["source"] == "measured"
  assert [row["tokens"] for row in entry["profile"]] == [1, 16]
  assert all(row["grouped_ms"] > 0 and row["dense_ms"] > 0 for row in entry["profile"])
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  try:
    for row in entry["profile"]:
      c = selection.moe(row["tokens"], 2, 8, 4, jax.default_backend(), hidden=128, width=64)
      assert c.impl == ("dense" if row["dense_ms"] < row["grouped_ms"] else "grouped")
      assert f"measured at {row['tokens']} tokens" in c.reason
  finally:
    monkeypatch.delenv("FDJAX_TABLES")
    selection.reload()
  bad = subprocess.run([sys.executable, "-m", "fdjax", "tune", "--moe", "--preset",
                        "random-tiny", "--out", str(tmp_path / "x.json")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
  assert bad.returncode != 0 and "no mixture-of-experts layer" in bad.stderr


def test_dispatch_moe_picks_and_checks():
  t, e, h, f = 6, 4, 16, 8
  x = jax.random.normal(jax.random.key(0), (2, 3, h))
  w_gate_up, w_down = _weights(jax.random.key(1), e, h, f)
  logits = jax.random.normal(jax.random.key(2), (2, 3, e))
  y = dispatch.moe(x, logits, w_gate_up, w_down, top_k=2)
  weights, experts = moe.route(logits.reshape(t, e), 2, True)
  np.testing.assert_allclose(np.asarray(y).reshape(t, h),
                             _reference(x.reshape(t, h), weights, experts, w_gate_up, w_down),
                             rtol=1e-5, atol=1e-6)
  for strategy in moe.STRATEGIES:
    np.testing.assert_allclose(dispatch.moe(x, logits, w_gate_up, w_down, top_k=2,
                                            strategy=strategy), y, rtol=1e-5, atol=1e-6)
  with dispatch.using("pallas_interpret"):  # no kernel yet: auto still runs XLA
    np.testing.assert_allclose(dispatch.moe(x, logits, w_gate_up, w_down, top_k=2), y,
                               rtol=1e-6)
  bad = [(dict(top_k=5), "top_k must be an integer in \\[1, 4\\]"),
         (dict(top_k=2, impl="pallas"), "no 'pallas' kernel"),
         (dict(top_k=2, strategy="fused"), "unknown strategy"),
         (dict(top_k=2, strategy="dense", impl="pallas_mosaic"), "runs the grouped strategy"),
         (dict(top_k=2, w_down=w_down[:, :4]), "needs w_down"),
         (dict(top_k=2, router_logits=logits[..., :3]), "router_logits must be"),
         (dict(top_k=2, x=x[..., :8]), "last dimension"),
         (dict(top_k=2, w_gate_up=w_gate_up.astype(jnp.bfloat16)), "dtype")]
  for kwargs, match in bad:
    args = dict(x=x, router_logits=logits, w_gate_up=w_gate_up, w_down=w_down)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      dispatch.moe(**args)


MOE = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, num_experts=6, experts_per_token=2,
                  moe_intermediate_size=16, dense_layers=(1,), shared_expert_size=24)


def test_config_checks():
  for bad, match in [(dict(experts_per_token=7), "experts_per_token must be in"),
                     (dict(moe_intermediate_size=0), "moe_intermediate_size"),
                     (dict(dense_layers=(3,)), "dense_layers \\[3\\]"),
                     (dict(moe_naming="deepseek"), "moe_naming"),
                     (dict(num_experts=0), "need num_experts > 0")]:
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(MOE, **bad)
  assert [MOE.sparse(i) for i in range(3)] == [True, False, True]
  assert ModelConfig.from_dict(MOE.to_dict()) == MOE
  assert set(MOE.linear_shapes()) == {"qkv", "o", "gate_up", "down", "shared_gate_up",
                                      "shared_down"}


def test_hf_configs():
  base = dict(vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=4,
              intermediate_size=12, num_key_value_heads=1)  # (transformers' default: 4 to 16)
  cfg = checkpoint.config_from_hf({**base, "model_type": "qwen3_moe", "num_experts": 8,
                                   "num_experts_per_tok": 2, "moe_intermediate_size": 4,
                                   "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                   "norm_topk_prob": True})
  assert cfg.dense_layers == (0, 2, 3) and cfg.qk_norm and cfg.norm_topk_prob
  assert not cfg.qkv_bias and cfg.shared_expert_size == 0
  cfg = checkpoint.config_from_hf({**base, "model_type": "qwen2_moe", "num_experts": 4,
                                   "num_experts_per_tok": 2, "moe_intermediate_size": 4,
                                   "shared_expert_intermediate_size": 6})
  assert cfg.qkv_bias and cfg.shared_expert_size == 6 and not cfg.norm_topk_prob
  cfg = checkpoint.config_from_hf({**base, "model_type": "mixtral", "num_local_experts": 8,
                                   "num_experts_per_tok": 2, "sliding_window": 16})
  assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.moe_naming) == (8, 12, "mixtral")
  assert cfg.sliding_window == 16
  with pytest.raises(checkpoint.CheckpointError, match="use_sliding_window"):
    checkpoint.config_from_hf({**base, "model_type": "qwen3_moe", "num_experts": 4,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 4,
                               "use_sliding_window": True})
  qwen = {**base, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 4}
  with pytest.raises(checkpoint.CheckpointError, match="decoder_sparse_step must be"):
    checkpoint.config_from_hf({**qwen, "decoder_sparse_step": 0})
  with pytest.raises(checkpoint.CheckpointError, match="needs \\['moe_intermediate_size'\\]"):
    checkpoint.config_from_hf({k: v for k, v in qwen.items() if k != "moe_intermediate_size"})
  with pytest.raises(checkpoint.CheckpointError, match="deepseek_v3"):
    checkpoint.config_from_hf({**base, "model_type": "deepseek_v3"})


def _model(cfg=MOE):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  for e in layout.layout(cfg):  # larger weights: routing far from uniform, logits apart
    p = layout.param_at(model, e.param)
    p.set_value(p[...] * 8)
  return model


def test_checkpoint_round_trip_per_expert_tensors(tmp_path):
  model = _model()
  tensors = layout.to_hf_tensors(model)
  assert tensors["model.layers.0.mlp.experts.5.up_proj.weight"].shape == (16, 32)
  assert tensors["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 32)
  assert "model.layers.1.mlp.gate_proj.weight" in tensors  # the dense layer
  np.testing.assert_array_equal(tensors["model.layers.0.mlp.experts.3.down_proj.weight"],
                                np.asarray(model.layers[0].mlp.w_down[3]).T)
  fdjax.save_pretrained(model, tmp_path)
  loaded = fdjax.load_pretrained(tmp_path)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)),
                                np.asarray(forward(model, ids)))
  mixtral = dataclasses.replace(MOE, moe_naming="mixtral", dense_layers=None,
                                shared_expert_size=0)
  names = {name for e in layout.layout(mixtral) for name in e.names}
  assert "model.layers.2.block_sparse_moe.experts.5.w3.weight" in names
  assert "model.layers.2.block_sparse_moe.gate.weight" in names


@pytest.mark.parametrize("method", quant.METHODS)
def test_a_quantized_moe_model(method, tmp_path):
  """quantize() takes the stacked experts (router, norms and the shared expert's gate stay
  float): logits are the model's with the dequantized weights, the checkpoint saves each
  expert's values and scales under its own names and loads back exactly."""
  model = _model()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 11)))
  fdjax.quantize(model, method)
  mlp = model.layers[0].mlp
  assert isinstance(mlp.w_gate_up[...], quant.QuantizedWeight)
  assert isinstance(mlp.w_down[...], quant.QuantizedWeight)
  assert not isinstance(mlp.router[...], quant.QuantizedWeight)
  assert not isinstance(model.layers[2].mlp.shared_gate[...], quant.QuantizedWeight)
  with dispatch.using("xla"):  # weight-only (on a CPU with VNNI "auto" runs int8 as W8A8)
    weight_only = np.asarray(forward(model, ids))
  got = np.asarray(forward(model, ids))
  float_model = _model()
  for e in layout.layout(MOE):
    w = layout.param_at(model, e.param)[...]
    if isinstance(w, quant.QuantizedWeight):
      layout.param_at(float_model, e.param).set_value(quant.dequantize(w))
  want = np.asarray(forward(float_model, ids))
  np.testing.assert_allclose(weight_only, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # W8A8 moves the hidden states a little, which can flip a token's routed experts: the
  # logits follow in norm (7.8 % here), not everywhere
  assert np.linalg.norm(got - want) <= 0.15 * np.linalg.norm(want)
  tensors = layout.to_hf_tensors(model)
  assert tensors["model.layers.0.mlp.experts.5.up_proj.weight"].dtype == (
      np.int8 if method == "int8" else np.uint8)
  assert "model.layers.0.mlp.experts.5.up_proj.weight_scale" in tensors
  fdjax.save_pretrained(model, tmp_path)
  loaded = fdjax.load_pretrained(tmp_path)
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)), got)


def test_refusals_and_describe(tmp_path):
  model = _model()
  with pytest.raises(ValueError, match="does not divide the model's moe_intermediate_size"):
    parallel.local_config(dataclasses.replace(MOE, moe_intermediate_size=18), 4)
  # on a one-device mesh (8 devices: tests/test_sharding.py) the same logits
  fdjax.save_pretrained(model, tmp_path)
  sharded = fdjax.load_pretrained(tmp_path, mesh=fdjax.make_mesh(tp=1, devices=jax.devices()[:1]))
  ids = jnp.asarray([[3, 1, 4, 1, 5]])
  got, want = np.asarray(sharded(ids)), np.asarray(model(ids))
  # float32 through weights scaled by 8 (logits near 25): XLA's fusions on and off the mesh
  # sum in different orders, 1.7e-5 of the largest logit apart on an AVX-512 machine
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
  assert dispatch.describe(MOE, platform="cpu", batch=1)["moe"].startswith("grouped")
  assert dispatch.describe(MOE, platform="cuda", batch=64)["moe"].startswith("dense")


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_served_requests_equal_generate_alone():
  """The serving engine (continuous batching over the paged cache, chunked prefill) on a MoE
  model: each request's greedy tokens are what generate gives the prompts."""
  from fdjax.engine import core as eng
  from tests.test_engine import TOK, _drain, _request
  model = _model()
  engine = eng.Engine(model, TOK, max_batch=4, page_size=8, max_model_len=64, prefill_chunk=8,
                      steps_per_call=3)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 97, int(n)).tolist() for n in (3, 17, 9, 12)]
  reqs = [_request(p, 7) for p in prompts]
  for r in reqs[:3]:
    engine.submit(r)
  engine.step()
  engine.submit(reqs[3])  # arrives while the others run
  _drain(engine)
  alone = fdjax.generate(model, prompts, max_new_tokens=7).tokens
  assert [r.tokens for r in reqs] == alone
  assert engine.kv.pool.pages_in_use == 0
