"""The CPU's own forms of the linear layer (fdjax.ops.cpu_linear, picked by
fdjax.ops.selection.cpu_linear): the int8 x int8 dot with activations quantized in groups
against its error bound over the weight-only reference, the padded bfloat16 row against the
plain dot, the rule's reasons, and models and generate through them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.ops import cpu_linear, dispatch, quant, reference, selection
from tests.helpers import rel_err
from tests.models_util import forward, tiny_model

VNNI = frozenset({"avx512_vnni"})


def _xw(m, k, n, dtype=jnp.float32, seed=0, method="int8"):
  rng = np.random.default_rng(seed + 13 * m + k + n)
  x = rng.standard_normal((m, k)) * rng.uniform(0.1, 3, (m, 1))
  x[:, rng.integers(0, k, 2)] *= 30  # outlier channels, as LLM activations have
  w = quant.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), method, dtype)
  return jnp.asarray(x, jnp.float32).astype(dtype), w


def _bound(x, wd, group):
  """Per output: sum over groups of half the group's step times sum |w| over the group."""
  m, k = x.shape
  xg = np.abs(x).reshape(m, k // group, group)
  step = xg.max(axis=-1) / 127  # [M, G]
  col = np.abs(wd).reshape(k // group, group, -1).sum(axis=1)  # [G, N]
  return step / 2 @ col


@pytest.mark.parametrize("m,k,n,group", [(1, 128, 48, 128), (5, 384, 33, 128),
                                         (16, 512, 200, 128), (3, 704, 20, 64),
                                         (2, 96, 7, 32)])
def test_int8_dot_stays_within_half_a_group_step_of_the_weight_only_reference(m, k, n, group):
  assert cpu_linear.group_for(k) == group
  x, w = _xw(m, k, n)
  form = cpu_linear.Form(rows=2, group=group)
  got = np.asarray(cpu_linear.linear(x, w, form), np.float64)
  wd = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  xd = np.asarray(x, np.float64)
  want = xd @ wd
  slack = 1e-5 * np.abs(xd) @ np.abs(wd)  # float32 rounding of the rescale
  assert got.shape == (m, n) and np.all(np.isfinite(got))
  assert np.all(np.abs(got - want) <= _bound(xd, wd, group) + slack)
  assert np.max(np.abs(got - want)) > 0  # the activations were quantized
  # groups bound the outliers' damage: one scale per row errs more
  per_row = np.asarray(cpu_linear.linear(x, w, cpu_linear.Form(group=k)), np.float64)
  if k // group > 2:
    assert np.linalg.norm(got - want) < np.linalg.norm(per_row - want)
  # exact where x already sits on its groups' grids
  step = np.repeat(np.abs(xd).reshape(m, k // group, group).max(-1) / 127, group, axis=1)
  xg = jnp.asarray(np.round(xd / step) * step, jnp.float32)
  exact = np.asarray(xg, np.float64) @ wd
  assert rel_err(cpu_linear.linear(xg, w, form), exact) < 1e-5


@pytest.mark.parametrize("m,k,n", [(1, 128, 48), (5, 384, 33), (16, 512, 200)])
def test_int4_dot_stays_within_half_a_group_step_of_the_weight_only_reference(m, k, n):
  """int4 bytes unpacked to int8, x quantized in the weights' groups of 128: the same bound
  over the dequantized weight, and exact where x sits on its groups' grids."""
  x, w = _xw(m, k, n, method="int4")
  form = cpu_linear.Form(rows=2, group=128)
  got = np.asarray(cpu_linear.linear(x, w, form), np.float64)
  wd = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  xd = np.asarray(x, np.float64)
  want = xd @ wd
  slack = 1e-5 * np.abs(xd) @ np.abs(wd)
  assert got.shape == (m, n) and np.all(np.isfinite(got))
  assert np.all(np.abs(got - want) <= _bound(xd, wd, 128) + slack)
  assert np.max(np.abs(got - want)) > 0
  step = np.repeat(np.abs(xd).reshape(m, k // 128, 128).max(-1) / 127, 128, axis=1)
  xg = jnp.asarray(np.round(xd / step) * step, jnp.float32)
  assert rel_err(cpu_linear.linear(xg, w, form), np.asarray(xg, np.float64) @ wd) < 1e-5
  # bfloat16 x and scales: the same integer products, rounded to bfloat16 at the end
  xb, wb = _xw(m, k, n, jnp.bfloat16, method="int4")
  gb = cpu_linear.linear(xb, wb, form)
  w32 = quant.QuantizedWeight(wb.values, wb.scales.astype(jnp.float32), 4, k)
  assert gb.dtype == jnp.bfloat16
  assert rel_err(gb, cpu_linear.linear(xb.astype(jnp.float32), w32, form)) < 4e-3


def test_int4_dot_refuses_other_weights_and_groups():
  x, w4 = _xw(2, 256, 8, method="int4")
  _, w8 = _xw(2, 256, 8)
  with pytest.raises(ValueError, match="int4 weights only"):
    cpu_linear.int4_dot(x, w8, 128)
  with pytest.raises(ValueError, match=r"group \(64\) must be the weights' 128"):
    cpu_linear.int4_dot(x, w4, 64)
  x3, w3 = _xw(2, 200, 8, method="int4")
  with pytest.raises(ValueError, match=r"divide K \(200\)"):
    cpu_linear.int4_dot(x3, w3, 128)


def test_int8_dot_zero_groups_give_zeros_and_bfloat16_scales_work():
  x, w = _xw(4, 256, 40, jnp.bfloat16)
  x = x.at[1].set(0).at[2, :128].set(0)
  got = cpu_linear.linear(x, w, cpu_linear.Form(group=128))
  assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
  assert not np.any(np.asarray(got[1], np.float32))
  want = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  assert rel_err(got, want) < 0.03


def test_int8_dot_refuses_other_weights_and_groups():
  x, w = _xw(2, 64, 8)
  w4 = quant.quantize(jnp.ones((64, 8)), "int4")
  with pytest.raises(ValueError, match="int8 weights only"):
    cpu_linear.int8_dot(x, w4, 32)
  with pytest.raises(ValueError, match=r"int4 dot's group \(32\) must be the weights' 128"):
    cpu_linear.linear(x, w4, cpu_linear.Form(group=32))
  with pytest.raises(ValueError, match="int8 weights only"):
    cpu_linear.linear(x, jnp.ones((64, 8)), cpu_linear.Form(group=32))
  with pytest.raises(ValueError, match=r"group \(128\) must divide K \(64\)"):
    cpu_linear.linear(x, w, cpu_linear.Form(group=128))
  assert cpu_linear.group_for(130) == 0 and cpu_linear.group_for(4096) == 128


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
  int8 = selection.cpu_linear(1, 4096, jnp.float32, "int8", flags=VNNI)
  assert int8.settings == cpu_linear.Form(rows=2, group=128)
  assert "avx512_vnni" in int8.reason and "groups of 128" in int8.reason
  assert selection.cpu_linear(8, 704, jnp.bfloat16, "int8", flags=VNNI).settings == (
      cpu_linear.Form(group=64))
  odd = selection.cpu_linear(8, 130, jnp.float32, "int8", flags=VNNI)
  assert odd.settings == cpu_linear.Form() and "K 130 is not a multiple of 32" in odd.reason
  plain = selection.cpu_linear(1, 4096, jnp.float32, "int8", flags=frozenset({"avx2"}))
  assert plain.settings == cpu_linear.Form() and "no VNNI" in plain.reason
  assert selection.cpu_linear(1, 64, jnp.bfloat16).settings == cpu_linear.Form(rows=2)
  assert selection.cpu_linear(2, 64, jnp.bfloat16).settings == cpu_linear.Form()
  assert selection.cpu_linear(1, 64, jnp.float32).settings == cpu_linear.Form()
  int4 = selection.cpu_linear(1, 4096, jnp.float32, "int4", flags=VNNI)
  assert int4.settings == cpu_linear.Form(rows=2, group=128) and "int4 unpacked" in int4.reason
  odd4 = selection.cpu_linear(4, 200, jnp.float32, "int4", flags=VNNI)
  assert odd4.settings == cpu_linear.Form() and "K 200 is not a multiple of 128" in odd4.reason
  assert "no VNNI" in selection.cpu_linear(4, 256, jnp.float32, "int4", flags=frozenset()).reason
  described = dispatch.describe(platform="cpu", quantization="int8")["linear"]
  assert described == str(selection.cpu_linear(1, 4096, "bfloat16", "int8"))


def test_dispatch_runs_the_rule_under_auto_and_the_reference_under_xla(monkeypatch):
  x, w = _xw(3, 256, 24)
  monkeypatch.setattr(selection, "cpu_flags", lambda: VNNI)
  dot = cpu_linear.linear(x, w, cpu_linear.Form(group=128))
  np.testing.assert_allclose(np.asarray(jax.jit(dispatch.linear)(x, w)), np.asarray(dot),
                             rtol=1e-6, atol=1e-6 * float(np.max(np.abs(np.asarray(dot)))))
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w, impl="xla")),
                                np.asarray(reference.linear(x, w)))
  with dispatch.using("xla"):
    np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w)),
                                  np.asarray(reference.linear(x, w)))
  monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset())
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x, w)),
                                np.asarray(reference.linear(x, w)))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_on_the_cpu_follows_the_weight_only_one_and_generates(method,
                                                                              monkeypatch):
  monkeypatch.setattr(selection, "cpu_flags", lambda: VNNI)
  model = fdjax.quantize(tiny_model(hidden_size=128, intermediate_size=256), method)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)))
  with dispatch.using("xla"):
    weight_only = np.asarray(forward(model, ids))
  got = np.asarray(forward(model, ids))
  assert 0 < rel_err(got, weight_only) < 0.1
  res = fdjax.generate(model, [[1, 2, 3], [4]], max_new_tokens=4)
  assert [len(t) for t in res.tokens] == [4, 4]
