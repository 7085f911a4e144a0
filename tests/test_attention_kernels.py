"""The async-softmax Pallas attention kernels, run in interpret mode on the CPU, against
float64 references: shapes, GQA, ragged lengths, bf16, and adversarial scores for the guard."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.ops import dispatch, reference
from pallas_kernels.common.async_softmax import HI
from pallas_kernels.triton import decode_attention as dk
from pallas_kernels.triton import prefill_attention as pk
from tests.helpers import cuda_text, np_decode_attention, np_prefill_attention, rel_err, spy
from tests.models_util import tiny_model

D = 16


def _inputs(rng, q_shape, kv_shape, dtype):
  mk = lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return mk(q_shape), mk(kv_shape), mk(kv_shape)


def _f64(*xs):
  return [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in xs]


def _check_low_precision(out, want, naive):
  """FlashAttention's rule: error vs float64 at most 2x the plain bf16 computation's."""
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  err = np.max(np.abs(np.asarray(out, np.float64) - want))
  base = np.max(np.abs(np.asarray(naive, np.float64) - want))
  assert err <= 2 * base + 1e-6, (err, base)
  assert rel_err(np.asarray(out, np.float32), want) < 1e-2


GQA = [(4, 4), (8, 2), (8, 1)]  # (query heads, KV heads): ratios 1, 4, 8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["async", "online"])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_decode_kernel_matches_reference(hq, hkv, mode, dtype):
  rng = np.random.default_rng(hq * 10 + hkv)
  s = 77  # not a multiple of the block (16) nor of the split
  q, k, v = _inputs(rng, (3, hq, D), (3, s, hkv, D), dtype)
  lengths = jnp.asarray([1, 33, s], jnp.int32)  # length 1, odd and block-crossing, full
  out, stats = dk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, mode=mode,
                                   settings=dk.Settings(block_k=16, num_splits=3),
                                   interpret=True, return_stats=True)
  assert out.shape == q.shape and out.dtype == dtype
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5
    assert int(stats["recomputed_rows"]) == 0  # ordinary scores take the async path
  else:
    _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, D ** -0.5,
                                                                 plain=True))


def test_decode_kernel_default_blocks_and_splits():
  rng = np.random.default_rng(7)
  q, k, v = _inputs(rng, (2, 8, 32), (2, 700, 2, 32), jnp.float32)
  lengths = jnp.asarray([700, 345], jnp.int32)
  out = dk.decode_attention(q, k, v, lengths, sm_scale=0.2, interpret=True)
  assert rel_err(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), 0.2)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_prefill_kernel_matches_reference(hq, hkv, causal, dtype):
  rng = np.random.default_rng(hq + hkv)
  t = 37
  q, k, v = _inputs(rng, (3, t, hq, D), (3, t, hkv, D), dtype)
  lengths = jnp.asarray([t, 1, 20], jnp.int32)
  out, stats = pk.prefill_attention(q, k, v, lengths, sm_scale=D ** -0.5, causal=causal,
                                    settings=pk.Settings(block_q=16, block_k=16),
                                    interpret=True, return_stats=True)
  want = np_prefill_attention(*_f64(q, k, v), np.asarray(lengths), causal, D ** -0.5)
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5
    assert int(stats["recomputed_rows"]) == 0
  else:
    _check_low_precision(out, want, reference.prefill_attention(
        q, k, v, lengths, causal, D ** -0.5, plain=True))


def test_prefill_online_mode_and_default_blocks():
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, (2, 100, 4, 32), (2, 100, 2, 32), jnp.float32)
  want = np_prefill_attention(*_f64(q, k, v), None, True, 0.2)
  for mode in ("online", "async"):
    assert rel_err(pk.prefill_attention(q, k, v, sm_scale=0.2, mode=mode, interpret=True),
                   want) < 1e-5


# ------------------------------------------------------------------ sliding windows

# (window, dtype, (query heads, KV heads), softcap): windows of one key, off the block
# multiples, wider than some rows; GQA 1, 4, 8; soft-capping as Gemma 2 sets it
WINDOWED = [(5, jnp.float32, (8, 2), None), (40, jnp.bfloat16, (8, 2), None),
            (13, jnp.float32, (4, 4), 2.0), (1, jnp.float32, (8, 1), None)]


@pytest.mark.parametrize("window,dtype,heads,softcap", WINDOWED)
def test_decode_kernel_with_a_window(window, dtype, heads, softcap):
  hq, hkv = heads
  rng = np.random.default_rng(window)
  s = 77
  q, k, v = _inputs(rng, (3, hq, D), (3, s, hkv, D), dtype)
  lengths = jnp.asarray([1, 33, s], jnp.int32)
  out, stats = dk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, window=window,
                                   softcap=softcap, interpret=True, return_stats=True,
                                   settings=dk.Settings(block_k=16, num_splits=2))
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5, window, softcap)
  xla = dispatch.decode_attention(q, k, v, lengths, window=window, softcap=softcap, impl="xla")
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5 and rel_err(xla, want) < 1e-5
    assert int(stats["recomputed_rows"]) == 0
  else:
    _check_low_precision(out, want, reference.decode_attention(
        q, k, v, lengths, D ** -0.5, window=window, softcap=softcap, plain=True))


@pytest.mark.parametrize("window,block_k", [(1, 16), (5, 16), (16, 16), (40, 32), (200, 16)])
def test_decode_splits_read_only_the_window(window, block_k):
  """Every row's splits together cover [its first visible key rounded down to a block,
  length) exactly once: at most W + block_k - 1 keys, whatever the length."""
  s = 300
  span = dk.key_span(s, window, block_k)
  split_len = -(-span // 3 // block_k) * block_k or block_k
  for length in (1, 2, 17, 64, 65, 299, 300):
    read = []
    for split in range(-(-span // split_len)):
      lo, start, end = (int(x) for x in dk.split_range(length, split, split_len, block_k,
                                                       window))
      read += range(start, max(start, end))
    assert lo == max(0, length - window)
    assert sorted(read) == list(range(lo // block_k * block_k, length)), (window, length)
    assert len(read) <= min(length, window + block_k - 1)


@pytest.mark.parametrize("window,dtype,heads,softcap", WINDOWED[:3])
def test_prefill_kernel_with_a_window(window, dtype, heads, softcap):
  hq, hkv = heads
  rng = np.random.default_rng(window + 1)
  t = 45
  q, k, v = _inputs(rng, (3, t, hq, D), (3, t, hkv, D), dtype)
  lengths = jnp.asarray([t, 1, 20], jnp.int32)
  out, stats = pk.prefill_attention(q, k, v, lengths, sm_scale=D ** -0.5, window=window,
                                    softcap=softcap, settings=pk.Settings(block_q=16, block_k=16),
                                    interpret=True, return_stats=True)
  want = np_prefill_attention(*_f64(q, k, v), np.asarray(lengths), True, D ** -0.5, window,
                              softcap)
  if dtype == jnp.float32:
    assert rel_err(out, want) < 1e-5
    assert int(stats["recomputed_rows"]) == 0
  else:
    _check_low_precision(out, want, reference.prefill_attention(
        q, k, v, lengths, True, D ** -0.5, window=window, softcap=softcap, plain=True))


@pytest.mark.parametrize("impl", ["pallas_interpret", "xla"])
def test_prefill_chunk_after_cached_keys_with_a_window(impl):
  """A chunk of 19 queries after 10 and 30 cached keys (and a row of 5 after 0), window 6:
  the first visible key of a block is mid-block and mid-cache."""
  rng = np.random.default_rng(21)
  q, k, v = _inputs(rng, (3, 19, 8, D), (3, 50, 2, D), jnp.float32)
  start = jnp.asarray([10, 30, 0], jnp.int32)
  lengths = jnp.asarray([29, 49, 5], jnp.int32)
  got = dispatch.prefill_attention(q, k, v, lengths=lengths, q_start=start, window=6,
                                   impl=impl)
  want = np_prefill_attention(*_f64(q, k, v), np.asarray(lengths), True, D ** -0.5, 6,
                              q_start=np.asarray(start))
  for row, n in enumerate((19, 19, 5)):  # query rows past a row's keys are padding
    assert rel_err(got[row, :n], want[row, :n]) < 1e-5


def test_window_and_softcap_are_checked():
  q, k = jnp.ones((1, 4, 16)), jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="window must be a positive integer"):
    dispatch.decode_attention(q, k, k, jnp.asarray([3]), window=0)
  with pytest.raises(ValueError, match="softcap must be a positive number"):
    dispatch.decode_attention(q, k, k, jnp.asarray([3]), softcap=-2.0)
  with pytest.raises(ValueError, match="sliding window needs causal"):
    dispatch.prefill_attention(k, k, k, causal=False, window=4)


# ------------------------------------------------------------------ the guard, adversarially

def _decode_case(rng, scale_q=1.0):
  q, k, v = _inputs(rng, (2, 8, D), (2, 64, 2, D), jnp.float32)
  return q * scale_q, k, v, jnp.asarray([64, 50], jnp.int32)


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_low", "phi_far_too_high"])
def test_decode_guard_recovers_every_row(case):
  rng = np.random.default_rng(11)
  q, k, v, lengths = _decode_case(rng, 1e4 if case == "scores_x1e4" else 1.0)
  phi = {"scores_x1e4": None, "phi_far_too_low": -1e4, "phi_far_too_high": 1e4}[case]
  out, stats = dk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, phi=phi,
                                   settings=dk.Settings(block_k=16, num_splits=4),
                                   interpret=True, return_stats=True)
  assert np.all(np.isfinite(np.asarray(out)))
  assert rel_err(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)) < 1e-5
  assert int(stats["recomputed_rows"]) == 16  # every query head of both rows


def test_decode_guard_one_huge_score_in_one_split_recomputes_only_that_group(guard_form):
  rng = np.random.default_rng(12)
  q, k, v, lengths = _decode_case(rng)
  # Key 40 (the third of four splits of 16) of batch row 1, KV head 0, made to align with the
  # query heads of that group: their scores there jump far above phi + HI.
  k = k.at[1, 40, 0].set(q[1, 0] * 40.0)
  out, stats = dk.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5,
                                   settings=dk.Settings(block_k=16, num_splits=4),
                                   interpret=True, return_stats=True)
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)
  assert np.all(np.isfinite(np.asarray(out)))
  assert rel_err(out, want) < 1e-5
  assert 1 <= int(stats["recomputed_rows"]) <= 4  # at most the 4 query heads of that group
  s = float(jnp.dot(q[1, 0], k[1, 40, 0])) * D ** -0.5
  assert s > HI  # the case really leaves the window


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_low", "phi_far_too_high"])
def test_prefill_guard_recovers_every_row(case):
  rng = np.random.default_rng(13)
  q, k, v = _inputs(rng, (2, 40, 4, D), (2, 40, 2, D), jnp.float32)
  q = q * (1e4 if case == "scores_x1e4" else 1.0)
  phi = {"scores_x1e4": None, "phi_far_too_low": -1e4, "phi_far_too_high": 1e4}[case]
  lengths = jnp.asarray([40, 23], jnp.int32)
  out, stats = pk.prefill_attention(q, k, v, lengths, sm_scale=D ** -0.5, phi=phi,
                                    settings=pk.Settings(block_q=16, block_k=16),
                                    interpret=True, return_stats=True)
  assert np.all(np.isfinite(np.asarray(out)))
  want = np_prefill_attention(*_f64(q, k, v), np.asarray(lengths), True, D ** -0.5)
  assert rel_err(out, want) < 1e-5
  assert int(stats["recomputed_rows"]) == 2 * 40 * 4  # every query row and head (row 1's
  #                                                      past its length too)


def test_prefill_guard_one_huge_score_recomputes_only_those_rows(guard_form):
  rng = np.random.default_rng(14)
  q, k, v = _inputs(rng, (1, 48, 2, D), (1, 48, 1, D), jnp.float32)
  k = k.at[0, 5, 0].set(q[0, 30, 0] * 40.0)  # one score of query row 30, head 0
  out, stats = pk.prefill_attention(q, k, v, sm_scale=D ** -0.5,
                                    settings=pk.Settings(block_q=16, block_k=16),
                                    interpret=True, return_stats=True)
  want = np_prefill_attention(*_f64(q, k, v), None, True, D ** -0.5)
  assert rel_err(out, want) < 1e-5
  assert 1 <= int(stats["recomputed_rows"]) < 48 * 2 // 4


# ------------------------------------------------------------------ dispatch and the model

def test_dispatch_pallas_interpret_equals_xla():
  rng = np.random.default_rng(15)
  q, k, v = _inputs(rng, (2, 8, 32), (2, 50, 2, 32), jnp.float32)
  lengths = jnp.asarray([50, 9], jnp.int32)
  a = dispatch.decode_attention(q, k, v, lengths, impl="pallas_interpret")
  b = dispatch.decode_attention(q, k, v, lengths, impl="xla")
  assert rel_err(a, b) < 1e-5
  qp, kp, vp = _inputs(rng, (2, 21, 4, 32), (2, 21, 1, 32), jnp.float32)
  short = jnp.asarray([21, 4], jnp.int32)
  a = dispatch.prefill_attention(qp, kp, vp, lengths=short, impl="pallas_interpret")
  b = dispatch.prefill_attention(qp, kp, vp, lengths=short, impl="xla")
  assert rel_err(a, b) < 1e-5


def test_model_generates_the_same_through_the_kernels(monkeypatch):
  model = tiny_model(seed=9, head_dim=16)
  prompts = [[5, 3, 9, 1, 1, 2, 7] * 3, [4, 4]]  # 21 tokens: two pages of 16, chunks of 8
  want = fdjax.generate(model, prompts, max_new_tokens=5).tokens
  decode_calls = spy(monkeypatch, dk, "paged_decode_attention")
  prefill_calls = spy(monkeypatch, pk, "prefill_attention")
  with dispatch.using("pallas_interpret"):  # same shapes: must not reuse the XLA trace
    got = fdjax.generate(model, prompts, max_new_tokens=5, page_size=16,
                         prefill_chunk=8).tokens
  assert got == want
  assert decode_calls and prefill_calls  # the kernels really ran


def test_kernel_refuses_what_it_cannot_take():
  q = jnp.ones((1, 4, 12), jnp.float32)
  k = jnp.ones((1, 8, 2, 12), jnp.float32)
  with pytest.raises(ValueError, match="not a power of two"):
    dispatch.decode_attention(q, k, k, jnp.asarray([3]), impl="pallas_interpret")
  qh = jnp.ones((1, 4, 16), jnp.float16)
  kh = jnp.ones((1, 8, 2, 16), jnp.float16)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    dispatch.decode_attention(qh, kh, kh, jnp.asarray([3]), impl="pallas_interpret")
  # "auto" takes XLA for what the kernel cannot take, on every backend
  rng = np.random.default_rng(3)
  q, k = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k))
  np.testing.assert_array_equal(dispatch.decode_attention(q, k, k, jnp.asarray([3])),
                                dispatch.decode_attention(q, k, k, jnp.asarray([3]), impl="xla"))


# ------------------------------------------------------------------ lowering for the GPU

@pytest.mark.parametrize("mode", ["async", "online"])
@pytest.mark.parametrize("hq,hkv,window,softcap", [(32, 32, None, None), (32, 8, None, None),
                                                   (16, 8, 512, 50.0)])
def test_kernels_lower_for_cuda(hq, hkv, mode, window, softcap):
  """Pallas' Triton lowering runs on this CPU: the kernels must lower for a CUDA GPU (with a
  sliding window and soft-capping too)."""
  bf = jnp.bfloat16
  spec = jax.ShapeDtypeStruct
  extra = dict(window=window, softcap=softcap)
  dec = jax.jit(functools.partial(dk.decode_attention, sm_scale=0.1, mode=mode, **extra))
  text = cuda_text(dec, spec((4, hq, 128), bf), spec((4, 1000, hkv, 128), bf),
                   spec((4, 1000, hkv, 128), bf), spec((4,), jnp.int32)
                   )
  assert "fdjax_decode" in text
  pre = jax.jit(functools.partial(pk.prefill_attention, sm_scale=0.1, mode=mode, **extra))
  text = cuda_text(pre, spec((2, 300, hq, 128), bf), spec((2, 300, hkv, 128), bf),
                   spec((2, 300, hkv, 128), bf), spec((2,), jnp.int32)
                   )
  assert "fdjax_prefill" in text
