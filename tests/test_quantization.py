"""Weight-only int8 / int4: quantize and dequantize, the quantized GEMV and flat GEMM (interpret
mode) against the XLA reference of the same weights, dispatch, models, checkpoints, memory, the
command line and the refusals."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fdjax
from fdjax.io.checkpoint import CheckpointError
from fdjax.ops import cpu_linear, dispatch, quant, reference, selection
from fdjax.tuning import tune
from models import layout
from models import quantize as mq
from pallas_kernels.common import quantized as quantized_format
from pallas_kernels.triton import flat_gemm as fg
from pallas_kernels.triton import gemv as gv
from pallas_kernels.triton import quantized_gemm as qg
from tests.helpers import cuda_text, rel_err, spy
from tests.models_util import forward, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["int8", "int4"]


def _xw(m, k, n, method, dtype=jnp.float32, seed=0):
  """Random x [M, K] and a random weight quantized to `method`, with float64 x @ dequantized."""
  rng = np.random.default_rng(seed + 7 * m + k + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = quant.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), method, dtype)
  exact = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  return x, w, np.asarray(x, np.float64) @ exact


# ------------------------------------------------------------------ quantize / dequantize

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k,n", [(300, 7), (129, 33), (5, 4)])
def test_round_trip_error_is_at_most_half_a_step(method, k, n):
  w = jnp.asarray(np.random.default_rng(k).standard_normal((k, n)) * 3, jnp.float32)
  w = w.at[:, 0].set(0.0)  # an all-zero column: zero scale, no NaN
  q = quant.quantize(w, method)
  values, scales = quant.stored_shapes(method, k, n)
  assert q.values.shape == values and q.scales.shape == scales and q.shape == (k, n)
  assert q.values.dtype == (jnp.int8 if method == "int8" else jnp.uint8)
  deq = np.asarray(quant.dequantize(q))
  assert deq.shape == (k, n) and np.all(np.isfinite(deq)) and np.all(deq[:, 0] == 0)
  step = np.asarray(q.scales, np.float64)
  step = (np.broadcast_to(step, (k, n)) if method == "int8"
          else np.repeat(step, quant.GROUP, axis=0)[:k])
  assert np.all(np.abs(deq - np.asarray(w)) <= step / 2 * (1 + 1e-6) + 1e-12)
  # symmetric: scale = max |w| / qmax over the column (int8) or group of 128 rows (int4)
  a = np.abs(np.asarray(w, np.float64))
  if method == "int8":
    want = a.max(axis=0) / 127
  else:
    a = np.pad(a, ((0, -k % quant.GROUP), (0, 0)))
    want = a.reshape(-1, quant.GROUP, n).max(axis=1) / 7
  np.testing.assert_allclose(np.asarray(q.scales), want, rtol=1e-6)


def test_int4_packing_round_trips_every_value_and_odd_k():
  q = jnp.asarray((np.arange(47)[:, None] + np.arange(3)) % 16 - 8, jnp.int32)  # K = 47: odd
  packed = quantized_format.pack_int4(q)
  assert packed.shape == (24, 3) and packed.dtype == jnp.uint8
  even, odd = quantized_format.unpack_int4(packed)
  np.testing.assert_array_equal(np.stack([even, odd], 1).reshape(-1, 3)[:47], q)
  assert np.all(np.asarray(odd)[-1] == 0)  # the padding nibble is a zero


def test_quantize_keeps_scales_in_the_model_dtype():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((200, 24)), jnp.bfloat16)
  for method in METHODS:
    q = quant.quantize(w, method)
    assert q.scales.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
    err = rel_err(np.asarray(quant.dequantize(q), np.float32), np.asarray(w, np.float32))
    assert err < {"int8": 0.01, "int4": 0.1}[method]  # 0.004 / 0.069 here: a half step


# ------------------------------------------------------------------------- the kernels

FLAT_SHAPES = [(1, 300, 50), (3, 257, 77), (8, 130, 40), (17, 200, 33), (64, 96, 70)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m,k,n", FLAT_SHAPES)
def test_flat_gemm_equals_the_xla_reference(m, k, n, split_k, method):
  x, w, want = _xw(m, k, n, method)
  out = qg.flat_gemm(x, w.values, w.scales, bits=w.bits, interpret=True,
                     settings=fg.Settings(block_n=32, block_k=64, split_k=split_k))
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert rel_err(out, reference.linear(x, w)) < 1e-5
  assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m,k,n", [s for s in FLAT_SHAPES if s[0] <= gv.MAX_M])
def test_gemv_equals_the_xla_reference(m, k, n, split_k, method):
  x, w, want = _xw(m, k, n, method)
  out = qg.gemv(x, w.values, w.scales, bits=w.bits, interpret=True,
                settings=gv.Settings(block_n=32, block_k=32, split_k=split_k))
  assert out.shape == (m, n)
  assert rel_err(out, reference.linear(x, w)) < 1e-5
  assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel", ["flat", "gemv"])
def test_bfloat16_within_twice_xla_error(kernel, method):
  x, w, want = _xw(3, 1000, 300, method, jnp.bfloat16)
  fn = qg.flat_gemm if kernel == "flat" else qg.gemv
  settings = (fg.Settings if kernel == "flat" else gv.Settings)(split_k=2)
  out = fn(x, w.values, w.scales, bits=w.bits, settings=settings, interpret=True)
  assert out.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(out, np.float64) - want))
  plain = jnp.dot(x, quant.dequantize(w), preferred_element_type=jnp.bfloat16)  # XLA in bf16
  assert err <= 2 * np.max(np.abs(np.asarray(plain, np.float64) - want)) + 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_kernels_lower_for_cuda(method):
  spec = jax.ShapeDtypeStruct
  k, n = 4096, 11008
  values, scales = quant.stored_shapes(method, k, n)
  for fn, settings in ((qg.flat_gemm, fg.Settings), (qg.gemv, gv.Settings)):
    for split_k in (1, 4):
      text = cuda_text(jax.jit(functools.partial(fn, bits=quant.bits_of(method),
                                       settings=settings(split_k=split_k))),
          spec((4, k), jnp.bfloat16), spec(values, jnp.int8 if method == "int8" else jnp.uint8),
          spec(scales, jnp.bfloat16))
      assert f"fdjax_{fn.__name__}_{method}" in text


def test_kernels_refuse_bad_input():
  x, w, _ = _xw(2, 64, 16, "int4")
  with pytest.raises(ValueError, match=r"int4 weights for K=64 must be values \(32, 16\)"):
    qg.flat_gemm(x, w.values[:-1], w.scales, bits=4, interpret=True)
  with pytest.raises(ValueError, match="values must be uint8"):
    qg.gemv(x, w.values.astype(jnp.int8), w.scales, bits=4, interpret=True)
  with pytest.raises(ValueError, match="bits must be one of"):
    qg.flat_gemm(x, w.values, w.scales, bits=3, interpret=True)
  with pytest.raises(ValueError, match="share one of"):
    qg.flat_gemm(x.astype(jnp.bfloat16), w.values, w.scales, bits=4, interpret=True)
  with pytest.raises(ValueError, match="at most 8"):
    qg.gemv(jnp.ones((9, 64)), w.values, w.scales, bits=4, interpret=True)


# ------------------------------------------------------------------------- dispatch

@pytest.fixture
def table(tmp_path, monkeypatch):
  """Tables for this device: [64, 80] as int8 with M1 = 2, M2 = 5; the float entry differs."""
  shapes = {"64x80:int8": {"m1": 2, "m2": 5, "source": "test",
                           "gemv": {"block_n": 32, "block_k": 32, "split_k": 2},
                           "flat": {"block_n": 32, "block_k": 32, "split_k": 1}},
            "64x80": {"m1": 1, "m2": 1, "source": "test", "gemv": {}, "flat": {}}}
  with open(tmp_path / "t.json", "w") as fh:
    json.dump({"device": selection.device_kind(), "shapes": shapes}, fh)
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  yield
  monkeypatch.delenv("FDJAX_TABLES")
  selection.reload()


def test_dispatch_follows_the_quantized_table_entry(table, monkeypatch):
  gemv_calls, flat_calls = spy(monkeypatch, qg, "gemv"), spy(monkeypatch, qg, "flat_gemm")
  float_calls = spy(monkeypatch, gv, "gemv") + spy(monkeypatch, fg, "flat_gemm")
  for m, expected in [(1, "gemv"), (2, "flat"), (4, "flat"), (5, "xla")]:
    assert selection.linear(m, 64, 80, quantization="int8").impl == expected
    assert selection.linear(m, 64, 80).impl == "xla"  # the float entry is its own
    gemv_calls.clear()
    flat_calls.clear()
    x, w, want = _xw(m, 64, 80, "int8")
    out = dispatch.linear(x, w, impl="pallas_interpret")
    assert rel_err(out, want) < 1e-5
    assert (len(gemv_calls), len(flat_calls)) == {"gemv": (1, 0), "flat": (0, 1),
                                                  "xla": (0, 0)}[expected]
  assert not float_calls
  assert selection.entry(64, 80, quantization="int4")["source"] == "analytic"
  assert "64x80:int4" in str(selection.linear(1, 64, 80, quantization="int4"))


@pytest.mark.parametrize("method", METHODS)
def test_linear_takes_a_quantized_weight_with_leading_dims(method):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 3, 130)), jnp.float32)
  w = quant.quantize(jnp.asarray(rng.standard_normal((130, 24)), jnp.float32), method)
  want = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(w), np.float64)
  for impl in ("xla", "pallas_interpret"):
    out = dispatch.linear(x, w, impl=impl)
    assert out.shape == (2, 3, 24) and rel_err(out, want) < 1e-5
  # "auto" on the CPU: the CPU's rule (int8 may be the int8 x int8 dot, tests/test_cpu_linear)
  form = selection.cpu_linear(6, 130, jnp.float32, method).settings
  cpu = np.asarray(cpu_linear.linear(x.reshape(6, 130), w, form)).reshape(2, 3, 24)
  for out in (dispatch.linear(x, w), jax.jit(dispatch.linear)(x, w)):
    assert out.shape == (2, 3, 24)
    np.testing.assert_array_equal(np.asarray(out), cpu)
  assert rel_err(cpu, want) < (0.02 if form.group else 1e-5)


def test_linear_refuses_mismatched_quantized_weights():
  x, w, _ = _xw(2, 64, 16, "int8")
  with pytest.raises(ValueError, match="scales are float32, x is bfloat16"):
    dispatch.linear(x.astype(jnp.bfloat16), w)
  with pytest.raises(ValueError, match=r"last dimension \(63\) must equal w's K \(64\)"):
    dispatch.linear(x[:, :63], w)
  with pytest.raises(ValueError, match="unknown method 'int3'"):
    quant.quantize(jnp.ones((4, 4)), "int3")
  with pytest.raises(ValueError, match=r"must be \[K, N\] or stacked experts' \[E, K, N\], got "
                                       r"shape \(4,\)"):
    quant.quantize(jnp.ones((4,)), "int8")
  with pytest.raises(TypeError, match="read whole"):
    w[0]


def test_describe_names_the_quantized_entries():
  cfg = tiny_model().config
  d = dispatch.describe(cfg, platform="cuda", quantization="int4")
  assert all(":int4" in v for k, v in d.items() if k.startswith("linear"))


# --------------------------------------------------------------------------- models

@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_follows_the_float_one_and_the_kernels_agree(method):
  model = tiny_model()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)))
  want = np.asarray(forward(model, ids))
  fdjax.quantize(model, method)
  assert mq.of(model) == mq.Quantization(method, False)
  assert isinstance(model.layers[0].mlp.w_down[...], quant.QuantizedWeight)
  assert not isinstance(model.lm_head[...], quant.QuantizedWeight)  # only if asked
  assert model.embed[...].dtype == jnp.float32 and model.norm.weight[...].dtype == jnp.float32
  with dispatch.using("xla"):  # the weight-only reference (on the CPU "auto" may differ)
    got = np.asarray(forward(model, ids))
  # the weight-only form is the float model with the dequantized weights (the bound against
  # the float model is int4's error on this tiny random model: 0.49)
  deq = tiny_model()
  for e in layout.layout(deq.config):
    w = layout.param_at(model, e.param)[...]
    if isinstance(w, quant.QuantizedWeight):
      layout.param_at(deq, e.param).set_value(quant.dequantize(w))
  assert rel_err(got, np.asarray(forward(deq, ids))) < 1e-6
  assert rel_err(got, want) < (0.05 if method == "int8" else 0.5)
  assert rel_err(forward(model, ids), want) < (0.05 if method == "int8" else 0.5)
  with dispatch.using("pallas_interpret"):
    assert rel_err(forward(model, ids), got) < 1e-5
  res = fdjax.generate(model, [[1, 2, 3], [4]], max_new_tokens=4)
  assert [len(t) for t in res.tokens] == [4, 4]


def test_model_quantize_refusals():
  model = tiny_model(tie_word_embeddings=True)
  with pytest.raises(ValueError, match="tied embeddings"):
    fdjax.quantize(model, "int8", lm_head=True)
  with pytest.raises(ValueError, match="unknown method 'int2'"):
    fdjax.quantize(model, "int2")
  fdjax.quantize(model, "int8")
  with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
    fdjax.quantize(model, "int4")


@pytest.mark.parametrize("method,lm_head", [("int8", True), ("int4", False)])
def test_saved_quantized_checkpoint_loads_without_requantizing(tmp_path, method, lm_head):
  model = fdjax.quantize(tiny_model(qkv_bias=True), method, lm_head=lm_head)
  fdjax.save_pretrained(model, tmp_path)
  with open(tmp_path / "config.json") as fh:
    assert json.load(fh)["quantization"]["method"] == method
  tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
  stored = tensors["model.layers.0.self_attn.k_proj.weight"]
  assert stored.dtype == (np.int8 if method == "int8" else np.uint8)
  assert "model.layers.0.self_attn.k_proj.weight_scale" in tensors
  assert ("lm_head.weight_scale" in tensors) == lm_head
  loaded = fdjax.load_pretrained(tmp_path)
  for path in (("layers", 1, "attn", "wqkv"), ("layers", 0, "mlp", "w_gate_up"), ("lm_head",)):
    a, b = (layout.param_at(m, path)[...] for m in (model, loaded))
    assert type(a) is type(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)), np.asarray(forward(model, ids)))
  other = "int4" if method == "int8" else "int8"
  with pytest.raises(CheckpointError, match="loads as saved"):
    fdjax.load_pretrained(tmp_path, quantize=other)
  tensors["model.layers.0.self_attn.k_proj.weight"] = stored.astype(np.float32)
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"k_proj\.weight has dtype float32"):
    fdjax.load_pretrained(tmp_path)


def test_quantize_at_load_equals_quantize_in_memory(tmp_path):
  fdjax.save_pretrained(tiny_model(), tmp_path)
  # (with a dtype given, loading quantizes the checkpoint's own values, before the cast)
  at_load = fdjax.load_pretrained(tmp_path, quantize="int4")
  in_memory = fdjax.quantize(fdjax.load_pretrained(tmp_path), "int4")
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 7)))
  np.testing.assert_array_equal(np.asarray(at_load(ids)), np.asarray(in_memory(ids)))
  with pytest.raises(ValueError, match="unknown method 'int2'"):
    fdjax.load_pretrained(tmp_path, quantize="int2")


def test_int4_model_holds_about_a_quarter_of_the_bf16_weight_bytes(tmp_path):
  fdjax.save_pretrained(tiny_model(hidden_size=128, intermediate_size=384, num_heads=4,
                                   head_dim=32), tmp_path)
  plain = mq.weight_bytes(fdjax.load_pretrained(tmp_path, dtype="bfloat16"))
  int4 = mq.weight_bytes(fdjax.load_pretrained(tmp_path, dtype="bfloat16", quantize="int4"))
  # 4 bits per weight + a bf16 scale per 128 input rows: 0.2578 of bf16
  ratio = int4["linear"] / plain["linear"]
  assert 0.25 < ratio < 0.26, ratio
  assert plain["total"] - plain["linear"] == int4["total"] - int4["linear"]


def test_hugging_face_model_with_the_dequantized_weights_gives_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.15)
  hf.save_pretrained(tmp_path)
  model = fdjax.load_pretrained(tmp_path, quantize="int4")
  with torch.no_grad():  # each linear weight as int4 would give it: [out, in] -> [in, out]
    for name, p in hf.named_parameters():
      if name.endswith("proj.weight"):
        q = quant.quantize(jnp.asarray(p.numpy().T), "int4")
        p.copy_(torch.tensor(np.asarray(quant.dequantize(q)).T))
  ids = np.random.default_rng(0).integers(0, 101, (2, 13))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  got = np.asarray(forward(model, jnp.asarray(ids)))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


# ------------------------------------------------------------------- tune, command line

def test_tune_writes_quantized_entries(tmp_path, monkeypatch):
  cfg = tiny_model(hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1,
                   head_dim=16).config
  out = tune.tune_model(cfg, [1, 2], dtype="float32", iters=1, out=str(tmp_path / "q.json"),
                        progress=lambda s: None, quantization="int8")
  with open(out) as fh:
    keys = set(json.load(fh)["shapes"])
  assert keys == {selection.key(k, n, "int8") for k, n in cfg.linear_shapes().values()}
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  try:
    k, n = cfg.linear_shapes()["down"]
    assert selection.entry(k, n, quantization="int8")["source"] == "measured"
    assert selection.entry(k, n)["source"] == "analytic"
  finally:
    monkeypatch.delenv("FDJAX_TABLES")
    selection.reload()


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "fdjax", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


def test_cli_generate_quantize(tmp_path):
  r = _cli("generate", "def f(x):", "--max-new-tokens", "4", "--preset", "random-tiny",
           "--quantize", "int4")
  assert r.returncode == 0, r.stderr
  assert "int4 weights" in r.stdout.splitlines()[-1]
  r = _cli("generate", "hi", "--preset", "random-tiny", "--quantize", "int3")
  assert r.returncode == 2 and "invalid choice: 'int3'" in r.stderr
  from fdjax import cli
  assert cli.build_parser().parse_args(["tune", "--preset", "x", "--quantize",
                                        "int4"]).quantize == "int4"
