"""The CPU's own forms of the linear layer (fdjax.ops.cpu_linear, picked by
fdjax.ops.selection.cpu_linear): the int8 x int8 dot with per-row activation scales against its
error bound over the weight-only reference, the padded bfloat16 row against the plain dot, the
rule's reasons, and models and generate through them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.ops import cpu_linear, dispatch, quant, reference, selection
from tests.helpers import rel_err
from tests.models_util import tiny_model

VNNI = frozenset({"avx512_vnni"})


def _xw(m, k, n, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed + 13 * m + k + n)
  x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 3, (m, 1)), jnp.float32)
  w = quant.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), "int8", dtype)
  return x.astype(dtype), w


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (5, 130, 33), (16, 512, 200), (3, 7, 5)])
def test_int8_dot_stays_within_half_an_activation_step_of_the_weight_only_reference(m, k, n):
  x, w = _xw(m, k, n)
  got = np.asarray(cpu_linear.linear(x, w, cpu_linear.Form(rows=2, int8_dot=True)), np.float64)
  wd = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  xd = np.asarray(x, np.float64)
  want = xd @ wd
  # each activation moves by at most half its row's step (absmax / 127 / 2)
  step = np.max(np.abs(xd), axis=1, keepdims=True) / 127
  bound = step / 2 * np.abs(wd).sum(axis=0, keepdims=True)
  slack = 1e-5 * np.abs(xd) @ np.abs(wd)  # float32 rounding of the rescale
  assert got.shape == (m, n) and np.all(np.isfinite(got))
  assert np.all(np.abs(got - want) <= bound + slack)
  # and it is not the weight-only product itself: the activations were quantized
  assert np.max(np.abs(got - want)) > 0
  # the activations' quantization is exact where x already sits on the grid
  xg = jnp.asarray(np.round(xd / step) * step, jnp.float32)
  exact = np.asarray(xg, np.float64) @ wd
  got_grid = cpu_linear.linear(xg, w, cpu_linear.Form(int8_dot=True))
  assert rel_err(got_grid, exact) < 1e-5


def test_int8_dot_zero_rows_give_zeros_and_bfloat16_scales_work():
  x, w = _xw(4, 96, 40, jnp.bfloat16)
  x = x.at[1].set(0)
  got = cpu_linear.linear(x, w, cpu_linear.Form(int8_dot=True))
  assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
  assert not np.any(np.asarray(got[1], np.float32))
  want = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  assert rel_err(got, want) < 0.03


def test_int8_dot_refuses_other_weights():
  x, _ = _xw(2, 64, 8)
  w4 = quant.quantize(jnp.ones((64, 8)), "int4")
  with pytest.raises(ValueError, match="int8 weights only"):
    cpu_linear.linear(x, w4, cpu_linear.Form(int8_dot=True))
  with pytest.raises(ValueError, match="int8 weights only"):
    cpu_linear.linear(x, jnp.ones((64, 8)), cpu_linear.Form(int8_dot=True))


@pytest.mark.parametrize("m", [1, 2, 5])
def test_padded_rows_give_the_plain_dot(m):
  rng = np.random.default_rng(m)
  x = jnp.asarray(rng.standard_normal((m, 70)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((70, 30)), jnp.bfloat16)
  got = cpu_linear.linear(x, w, cpu_linear.Form(rows=2))
  assert got.shape == (m, 30)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(reference.linear(x, w), np.float32))


def test_the_rule_and_its_reasons():
  int8 = selection.cpu_linear(1, jnp.float32, "int8", flags=VNNI)
  assert int8.settings == cpu_linear.Form(rows=2, int8_dot=True) and "avx512_vnni" in int8.reason
  assert selection.cpu_linear(8, jnp.bfloat16, "int8", flags=VNNI).settings.rows == 1
  plain = selection.cpu_linear(1, jnp.float32, "int8", flags=frozenset({"avx2"}))
  assert plain.settings == cpu_linear.Form() and "no VNNI" in plain.reason
  assert selection.cpu_linear(1, jnp.bfloat16).settings == cpu_linear.Form(rows=2)
  assert selection.cpu_linear(2, jnp.bfloat16).settings == cpu_linear.Form()
  assert selection.cpu_linear(1, jnp.float32).settings == cpu_linear.Form()
  assert selection.cpu_linear(1, jnp.float32, "int4", flags=VNNI).settings == cpu_linear.Form()
  described = dispatch.describe(platform="cpu", quantization="int8")["linear"]
  assert described == str(selection.cpu_linear(1, "bfloat16", "int8"))


def test_dispatch_runs_the_rule_under_auto_and_the_reference_under_xla(monkeypatch):
  x, w = _xw(3, 64, 24)
  monkeypatch.setattr(selection, "cpu_flags", lambda: VNNI)
  dot = cpu_linear.linear(x, w, cpu_linear.Form(int8_dot=True))
  np.testing.assert_array_equal(np.asarray(jax.jit(dispatch.linear)(x, w)), np.asarray(dot))
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w, impl="xla")),
                                np.asarray(reference.linear(x, w)))
  with dispatch.using("xla"):
    np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w)),
                                  np.asarray(reference.linear(x, w)))
  monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset())
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w)),
                                np.asarray(reference.linear(x, w)))


def test_int8_model_on_the_cpu_follows_the_weight_only_one_and_generates(monkeypatch):
  monkeypatch.setattr(selection, "cpu_flags", lambda: VNNI)
  model = fdjax.quantize(tiny_model(), "int8")
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)))
  with dispatch.using("xla"):
    weight_only = np.asarray(model(ids))
  got = np.asarray(model(ids))
  assert 0 < rel_err(got, weight_only) < 0.03
  res = fdjax.generate(model, [[1, 2, 3], [4]], max_new_tokens=4)
  assert [len(t) for t in res.tokens] == [4, 4]
