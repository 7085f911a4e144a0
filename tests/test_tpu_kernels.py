"""The Mosaic TPU kernels (pallas_kernels/tpu/) in TPU interpret mode on the CPU, with its
race detector on and fresh buffers filled with NaN, against float64 references: ragged
lengths, GQA, sizes off the blocks, paged caches with garbage, windows, soft-capping,
bfloat16, and adversarial scores for the guard. A race the detector reports fails the test.
The same kernels compiled for TPU v5e / v6e / v5p: tests/test_tpu_compile.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.ops import dispatch, kv_cache, reference, selection
from pallas_kernels.common.async_softmax import HI
from pallas_kernels.tpu import decode_attention as tdk
from pallas_kernels.tpu import flat_gemm as tfg
from pallas_kernels.tpu import gemv as tgv
from pallas_kernels.tpu import prefill_attention as tpk
from pallas_kernels.tpu import shared
from tests.helpers import np_decode_attention, np_prefill_attention, record_races, rel_err
from tests.test_attention_kernels import _check_low_precision, _f64, _inputs
from tests.test_paged import LENGTHS, PS, _paged_case

D = 32  # test_paged's cases are built at its D = 16; both are lane-padded alike


@pytest.fixture(autouse=True)
def no_races(monkeypatch):
  """Every test fails on any race the detector finds in any kernel it interprets."""
  races = record_races(monkeypatch)
  yield races
  assert not races, "the TPU interpret mode's race detector reported a race"


def test_the_race_detector_catches_a_planted_race(no_races):
  """A kernel that stores to a VMEM buffer while a DMA into it is in flight: the detector
  (as the kernels run it, shared.interpret_params(True)) reports it."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  def racy(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
    copy.start()
    buf[...] = jnp.zeros_like(buf)
    copy.wait()
    o_ref[...] = buf[...]

  pl.pallas_call(racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                 in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                 scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32),
                                 pltpu.SemaphoreType.DMA((1,))],
                 interpret=shared.interpret_params(True))(jnp.ones((8, 128)))
  assert no_races  # what the fixture of every test here would fail on
  no_races.clear()  # planted: not a failure of this test


# ------------------------------------------------------------------------ decode

@pytest.mark.parametrize("dtype,hq,hkv,mode,kw", [
    (jnp.float32, 8, 2, "async", {}),                         # GQA 4, three splits
    (jnp.float32, 4, 4, "online", {"window": 20, "softcap": 2.0}),
    (jnp.bfloat16, 8, 1, "async", {"window": 9}),             # GQA 8 in bfloat16
])
def test_decode_matches_reference(dtype, hq, hkv, mode, kw):
  rng = np.random.default_rng(hq * 10 + hkv)
  s = 77  # not a multiple of the block (16) nor of the split
  q, k, v = _inputs(rng, (3, hq, D), (3, s, hkv, D), dtype)
  lengths = jnp.asarray([1, 33, s], jnp.int32)
  out, stats = tdk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, mode=mode,
                                    settings=tdk.Settings(block_k=16, num_splits=3),
                                    interpret=True, return_stats=True, **kw)
  assert out.shape == q.shape and out.dtype == dtype
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5, **kw)
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5
    assert int(stats["recomputed_rows"]) == 0  # ordinary scores take the async path
  else:
    _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, D ** -0.5,
                                                                 plain=True, **kw))


def test_decode_default_settings_one_block_past_the_cache_end():
  rng = np.random.default_rng(5)
  q, k, v = _inputs(rng, (2, 4, D), (2, 100, 2, D), jnp.float32)
  lengths = jnp.asarray([100, 61], jnp.int32)
  out = tdk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, interpret=True)
  assert rel_err(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)) < 1e-5


@pytest.mark.parametrize("dtype,window", [(jnp.float32, None), (jnp.bfloat16, 20)])
def test_paged_decode_matches_the_gathered_cache(dtype, window):
  """Shuffled page ids, a page shared by two rows, garbage table entries past each row's
  pages; with a window the pages wholly before it are given back (NO_PAGE) and filled with
  NaN: the kernel never reads them."""
  rng = np.random.default_rng(7)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, 8, 2, dtype, LENGTHS)
  if window is not None:
    gone = np.zeros(table.shape, bool)
    for i, length in enumerate(LENGTHS):
      gone[i, :max(0, length - window) // PS] = True
    nan_pages = np.unique(np.asarray(table)[gone])
    nan_pages = nan_pages[~np.isin(nan_pages, np.asarray(table)[~gone])]
    assert nan_pages.size
    table = jnp.where(jnp.asarray(gone), kv_cache.NO_PAGE, table)
    kp, vp = (x.at[:, nan_pages].set(jnp.nan) for x in (kp, vp))
  d = q.shape[-1]
  out = tdk.paged_decode_attention(q, kp, vp, table, n, sm_scale=d ** -0.5, window=window,
                                   settings=tdk.Settings(num_splits=2), interpret=True)
  want = np_decode_attention(*_f64(q, kf, vf), np.asarray(n), d ** -0.5, window)
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5
  else:
    _check_low_precision(out, want, reference.decode_attention(q, kf, vf, n, d ** -0.5,
                                                                 window=window, plain=True))


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_high"])
def test_decode_guard_recovers_every_row(case):
  rng = np.random.default_rng(11)
  q, k, v = _inputs(rng, (2, 8, D), (2, 64, 2, D), jnp.float32)
  q = q * (1e4 if case == "scores_x1e4" else 1.0)
  lengths = jnp.asarray([64, 50], jnp.int32)
  out, stats = tdk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5,
                                    phi=1e4 if case == "phi_far_too_high" else None,
                                    settings=tdk.Settings(block_k=16, num_splits=4),
                                    interpret=True, return_stats=True)
  assert rel_err(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)) < 1e-5
  assert int(stats["recomputed_rows"]) == 16  # every query head of both rows


def test_decode_guard_one_huge_score_recomputes_only_its_group():
  rng = np.random.default_rng(12)
  q, k, v = _inputs(rng, (2, 8, D), (2, 64, 2, D), jnp.float32)
  lengths = jnp.asarray([64, 50], jnp.int32)
  k = k.at[1, 40, 0].set(q[1, 0] * 40.0)  # key 40 of row 1, KV head 0: far above phi + HI
  assert float(jnp.dot(q[1, 0], k[1, 40, 0])) * D ** -0.5 > HI
  out, stats = tdk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5,
                                    settings=tdk.Settings(block_k=16, num_splits=4),
                                    interpret=True, return_stats=True)
  assert rel_err(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)) < 1e-5
  assert 1 <= int(stats["recomputed_rows"]) <= 4  # at most the 4 query heads of that group


# ------------------------------------------------------------------------ prefill

@pytest.mark.parametrize("dtype,kw", [
    (jnp.float32, {}),
    (jnp.float32, {"window": 7, "softcap": 3.0}),
    (jnp.bfloat16, {"window": 30}),
])
def test_prefill_matches_reference(dtype, kw):
  rng = np.random.default_rng(13)
  t = 300  # 19 query blocks of 16, 3 key blocks of 128: neither divides it
  q, k, v = _inputs(rng, (2, t, 4, D), (2, t, 2, D), dtype)
  lengths = jnp.asarray([t, 131], jnp.int32)
  out, stats = tpk.prefill_attention(q, k, v, lengths, sm_scale=D ** -0.5, interpret=True,
                                     settings=tpk.Settings(block_q=16 * (1 + (t > 200) * 3),
                                                           block_k=128),
                                     return_stats=True, **kw)
  valid = np.arange(t)[None, :, None, None] < np.asarray(lengths)[:, None, None, None]
  want = np_prefill_attention(*_f64(q, k, v), np.asarray(lengths), True, D ** -0.5, **kw)
  got = np.where(valid, np.asarray(out, np.float32), 0.0)  # rows past a length are padding
  want = np.where(valid, want, 0.0)
  if dtype == jnp.float32:
    assert rel_err(got, want) < 1e-5 and int(stats["recomputed_rows"]) == 0
  else:
    naive = reference.prefill_attention(q, k, v, lengths, True, D ** -0.5, plain=True, **kw)
    _check_low_precision(got, want, np.where(valid, np.asarray(naive, np.float32), 0.0))


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_low"])
def test_prefill_guard_recovers_every_row(case):
  rng = np.random.default_rng(16)
  q, k, v = _inputs(rng, (1, 24, 2, D), (1, 24, 1, D), jnp.float32)
  q = q * (1e4 if case == "scores_x1e4" else 1.0)
  out, stats = tpk.prefill_attention(q, k, v, sm_scale=D ** -0.5,
                                     phi=-1e4 if case == "phi_far_too_low" else None,
                                     settings=tpk.Settings(block_q=16), interpret=True,
                                     return_stats=True)
  assert rel_err(out, np_prefill_attention(*_f64(q, k, v), None, True, D ** -0.5)) < 1e-5
  assert int(stats["recomputed_rows"]) == 24 * 2  # every query row and head


def test_prefill_chunk_after_cached_keys_and_the_guard():
  """A chunk of 24 queries after 40 cached keys (q_start), with one score of query 10 far
  above the window: recomputed, and only its query block's rows may be."""
  rng = np.random.default_rng(14)
  q, k, v = _inputs(rng, (1, 24, 2, D), (1, 64, 1, D), jnp.float32)
  start = jnp.asarray([40], jnp.int32)
  k = k.at[0, 5, 0].set(q[0, 10, 0] * 40.0)
  out, stats = tpk.prefill_attention(q, k, v, jnp.asarray([64], jnp.int32), q_start=start,
                                     sm_scale=D ** -0.5, settings=tpk.Settings(block_q=16),
                                     interpret=True, return_stats=True)
  want = np_prefill_attention(*_f64(q, k, v), np.asarray([64]), True, D ** -0.5,
                              q_start=np.asarray(start))
  assert rel_err(out, want) < 1e-5
  assert 1 <= int(stats["recomputed_rows"]) <= 16 * 2


# ------------------------------------------------------------------------ GEMM / GEMV

@pytest.mark.parametrize("kernel", [tfg.flat_gemm, tgv.gemv])
@pytest.mark.parametrize("m,k,n,dtype", [(3, 300, 200, jnp.float32), (1, 256, 384, jnp.bfloat16),
                                         (8, 1000, 130, jnp.float32)])
def test_linear_kernels_match_reference(kernel, m, k, n, dtype):
  rng = np.random.default_rng(m * k + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32).astype(dtype)
  y = kernel(x, w, settings=tfg.Settings(block_n=128, block_k=128), interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  if dtype == jnp.float32:
    assert rel_err(y, want) < 1e-5
  else:  # bf16 out of a float32 accumulator: the rounding of the result, as XLA's
    plain = jnp.dot(x, w, preferred_element_type=jnp.bfloat16)
    err = np.max(np.abs(np.asarray(y, np.float64) - want))
    assert err <= 2 * np.max(np.abs(np.asarray(plain, np.float64) - want)) + 1e-6


def test_linear_kernels_refuse_bad_input():
  x = jnp.ones((2, 64), jnp.float32)
  with pytest.raises(ValueError, match="multiples of 128"):
    tfg.flat_gemm(x, jnp.ones((64, 128), jnp.float32), settings=tfg.Settings(block_n=100))
  with pytest.raises(ValueError, match="M must be at most"):
    tgv.gemv(jnp.ones((9, 64), jnp.float32), jnp.ones((64, 128), jnp.float32))
  with pytest.raises(ValueError, match="block_k 24 must be a multiple of 16"):
    tdk.paged_decode_attention(jnp.ones((1, 2, D)), jnp.ones((2, 4, 48, D)),
                               jnp.ones((2, 4, 48, D)), jnp.zeros((1, 2), jnp.int32),
                               jnp.ones((1,), jnp.int32), sm_scale=1.0,
                               settings=tdk.Settings(block_k=24))


# ------------------------------------------------------------------------ dispatch, selection

def test_dispatch_pallas_tpu_interpret_equals_xla():
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((256, 200)), jnp.float32)
  assert rel_err(dispatch.linear(x, w, impl="pallas_tpu_interpret"),
                 dispatch.linear(x, w, impl="xla")) < 1e-5
  q, k, v = _inputs(rng, (2, 4, D), (2, 40, 2, D), jnp.float32)
  n = jnp.asarray([40, 3], jnp.int32)
  assert rel_err(dispatch.decode_attention(q, k, v, n, impl="pallas_tpu_interpret"),
                 dispatch.decode_attention(q, k, v, n, impl="xla")) < 1e-5
  with pytest.raises(ValueError, match="no Mosaic TPU kernel"):
    dispatch.cope_attention(q[:, None], k, v, jnp.ones((4, D)), impl="pallas_tpu")


def test_selection_on_tpu_per_generation():
  d = dispatch.describe(platform="tpu:v6e")
  assert d["decode_attention"].startswith("pallas (Mosaic TPU") and "TPU v6 lite" in \
      d["decode_attention"] and d["decode_attention"].endswith("[Pallas Mosaic TPU]")
  assert selection.attention("cope_attention", 64, "bfloat16", "tpu").impl == "xla"
  assert selection.attention("decode_attention", 80, "bfloat16", "tpu").impl == "xla"
  assert selection.attention("paged_decode_attention", 128, "bfloat16", "tpu", 24).impl == "xla"
  v5e = "TPU v5 lite"
  assert [selection.linear(m, 4096, 4096, kind=v5e).impl for m in (1, 2, 64, 65)] == [
      "gemv", "flat", "flat", "xla"]
  assert isinstance(selection.linear(2, 4096, 4096, kind=v5e).settings, tfg.Settings)
  assert selection.linear(1, 4096, 4096, kind=v5e, quantization="int8").impl == "xla"
  # v5p's two cores: the flat GEMM's N blocks are split so both get some
  assert tfg.Settings.default(4096, 1024, generation="v5p").block_n == 512
  assert tfg.Settings.default(4096, 1024, generation="v5e").block_n == 1024
  assert tdk.Settings.default(1, 8, 8192, generation="v5p").num_splits == 2
  assert tdk.Settings.default(1, 8, 8192, generation="v6e").num_splits == 1
  with pytest.raises(ValueError, match="platform"):
    with dispatch.lowering_for("tpu:v9"):
      pass


def test_model_generates_the_same_through_the_tpu_kernels(monkeypatch):
  """A whole model through the Mosaic kernels in TPU interpret mode (paged decode, chunked
  prefill, the linear layers): greedy tokens equal to the XLA path's."""
  import fdjax
  from tests.helpers import spy
  from tests.models_util import tiny_model
  model = tiny_model(seed=9, head_dim=16)
  prompts = [[5, 3, 9, 1, 1, 2, 7] * 3, [4, 4]]  # 21 tokens: two pages of 16, chunks of 8
  want = fdjax.generate(model, prompts, max_new_tokens=3).tokens
  decode_calls = spy(monkeypatch, tdk, "paged_decode_attention")
  prefill_calls = spy(monkeypatch, tpk, "prefill_attention")
  gemm_calls = spy(monkeypatch, tfg, "flat_gemm")
  with dispatch.using("pallas_tpu_interpret"):
    got = fdjax.generate(model, prompts, max_new_tokens=3, page_size=16, prefill_chunk=8).tokens
  assert got == want
  assert decode_calls and prefill_calls and gemm_calls  # the TPU kernels really ran


def test_tune_takes_the_tpu_kernels_and_their_tiles_on_a_tpu(monkeypatch):
  """`fdjax tune`'s code path on a TPU (run here with the kernels interpreted): the Mosaic
  GEMV and flat GEMM, TPU tile candidates, an entry selection reads back for that kind."""
  from fdjax.tuning import tune
  monkeypatch.setattr(selection, "device_kind", lambda: "TPU v6 lite")
  assert tune.kernels() == {"gemv": tgv.gemv, "flat": tfg.flat_gemm}
  with pytest.raises(ValueError, match="no Mosaic TPU kernel for int8"):
    tune.kernels("int8")
  cfg = [tune.TPU_CONFIGS[0]]
  e = tune.tune_shape(256, 256, (1, 2), dtype=jnp.float32, iters=1, interpret=True,
                      gemv_configs=cfg, flat_configs=cfg, progress=lambda s: None)
  assert e["gemv"] == e["flat"] == cfg[0] and 1 <= e["m1"] <= e["m2"] <= 3
  assert {"gemv_us", "flat_us", "xla_us"} <= set(e["profile"][0])
