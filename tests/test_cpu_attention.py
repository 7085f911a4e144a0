"""The CPU's prefill attention (fdjax.ops.cpu_attention: the asynchronous softmax over blocks
of keys, picked by fdjax.ops.selection.cpu_prefill) against the float64 numpy reference:
ragged lengths, chunks after cached keys, GQA, windows, soft-caps, sizes off the blocks,
scores that leave the unified max value's window (the guard), rows with no key, bfloat16
within 2x of the plain bfloat16 computation, its gradients, and dispatch's rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.ops import cpu_attention, dispatch, reference, selection
from tests.helpers import np_prefill_attention, rel_err, spy


def _inputs(b, t, s, hq, hkv, d, dtype=jnp.float32, seed=0, q_scale=1.0, garbage=True):
  rng = np.random.default_rng(seed + 7 * t + s + hq + d)
  q = rng.standard_normal((b, t, hq, d)) * q_scale
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, d))
  lengths = rng.integers(max(1, t), s + 1, b) if s > t else np.full(b, s)
  lengths[0] = s
  if garbage:  # what a cache holds past a row's length must not leak in
    for i, n in enumerate(lengths):
      k[i, n:] = 1e4
      v[i, n:] = -1e4
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(lengths, jnp.int32))


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


CASES = [  # b, t, s, hq, hkv, d, chunk (queries after cached keys), window, softcap, causal
    (3, 37, 37, 8, 2, 16, False, None, None, True),    # ragged, GQA 4, off the blocks
    (2, 64, 64, 4, 4, 32, False, None, None, True),    # GQA 1, whole blocks
    (2, 40, 40, 8, 1, 16, False, None, None, True),    # GQA 8
    (2, 20, 70, 4, 1, 32, True, None, None, True),     # a chunk after cached keys
    (3, 37, 37, 8, 2, 16, False, 7, None, True),       # a sliding window
    (2, 19, 61, 4, 2, 16, True, 11, None, True),       # a window over a chunk
    (3, 37, 37, 8, 2, 16, False, None, 5.0, True),     # soft-capping
    (2, 33, 33, 8, 8, 16, False, None, None, False),   # bidirectional
]


def _case(b, t, s, hq, hkv, d, chunk, window, softcap, causal, dtype=jnp.float32, **kw):
  q, k, v, lengths = _inputs(b, t, s, hq, hkv, d, dtype, **kw)
  q_start = (lengths - t) if chunk else None
  want = np_prefill_attention(_np(q), _np(k), _np(v), np.asarray(lengths), causal, d ** -0.5,
                              window, softcap,
                              None if q_start is None else np.asarray(q_start))
  return q, k, v, lengths, q_start, want


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocks", [(16, 16), (8, 32), (128, 128)])
def test_float32_matches_the_float64_reference(case, blocks):
  q, k, v, lengths, q_start, want = _case(*case)
  *_, window, softcap, causal = case
  got = cpu_attention.prefill_attention(q, k, v, lengths, causal, q.shape[-1] ** -0.5,
                                        q_start=q_start, window=window, softcap=softcap,
                                        block_q=blocks[0], block_k=blocks[1])
  assert got.dtype == jnp.float32
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:5] + CASES[6:7])
def test_bfloat16_within_twice_the_plain_bfloat16_error(case):
  q, k, v, lengths, q_start, want = _case(*case, dtype=jnp.bfloat16)
  *_, window, softcap, causal = case
  scale = q.shape[-1] ** -0.5
  how = dict(q_start=q_start, window=window, softcap=softcap)
  got = cpu_attention.prefill_attention(q, k, v, lengths, causal, scale, block_q=16,
                                        block_k=16, **how)
  plain = reference.prefill_attention(q, k, v, lengths, causal, scale, plain=True, **how)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, want) <= 2 * rel_err(plain, want)


@pytest.mark.parametrize("q_scale,phi", [(60.0, None), (-60.0, None), (1.0, 200.0),
                                         (1.0, -200.0), (1.0, 45.0)])
def test_scores_outside_the_window_of_phi_are_recomputed(q_scale, phi):
  """Scores far above phi overflow exp(s - phi), far below it underflow: without the guard
  the first gives inf / NaN and the second zeros (or a row lost to rounding)."""
  q, k, v, lengths, q_start, want = _case(3, 37, 37, 8, 2, 16, False, None, None, True,
                                          q_scale=q_scale)
  got = cpu_attention.prefill_attention(q, k, v, lengths, True, 0.25, phi=phi, block_q=16,
                                        block_k=16)
  assert rel_err(got, want) < 1e-5


def test_a_row_with_no_key_and_padding_queries_give_zeros():
  """A row of length 0 gives zeros; so do a row's queries at or past its length (a chunk's
  padding: row 2's 5 tokens in 24, its second block of 8 all padding and skipped)."""
  q, k, v, _ = _inputs(3, 24, 24, 4, 2, 16)
  lengths = jnp.asarray([0, 24, 5], jnp.int32)
  got = np.asarray(cpu_attention.prefill_attention(q, k, v, lengths, True, 0.25, block_q=8,
                                                   block_k=8))
  assert np.all(np.isfinite(got)) and np.all(got[0] == 0) and np.all(got[2, 5:] == 0)
  want = np_prefill_attention(_np(q), _np(k), _np(v), np.asarray(lengths), True, 0.25)
  assert rel_err(got[1], want[1]) < 1e-5 and rel_err(got[2, :5], want[2, :5]) < 1e-5


def test_padding_queries_of_a_chunk_give_zeros():
  """A chunk padded to its bucket (steps.chunk_bucket): queries past each row's length are
  zeros (blocks of nothing else skipped) and the rows' real queries as the reference gives
  them; CoPE's form computes them as its reference does."""
  b, t, s, hq, hkv, d = 2, 40, 70, 4, 2, 16
  q, k, v, _ = _inputs(b, t, s, hq, hkv, d)
  q_start = jnp.asarray([30, 10], jnp.int32)
  lengths = q_start + jnp.asarray([40, 9])  # row 1: 9 real queries of 40
  got = np.asarray(cpu_attention.prefill_attention(q, k, v, lengths, True, 0.25,
                                                   q_start=q_start, block_q=8, block_k=8))
  want = np_prefill_attention(_np(q), _np(k), _np(v), np.asarray(lengths), True, 0.25, None,
                              None, np.asarray(q_start))
  assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1, :9], want[1, :9]) < 1e-5
  assert np.all(got[1, 9:] == 0)
  table = jnp.asarray(np.random.default_rng(1).standard_normal((12, d)), jnp.float32)
  cope = np.asarray(cpu_attention.cope_attention(q, k, v, table, lengths, 0.25,
                                                 q_start=q_start, block_q=8, block_k=8))
  ref = np.asarray(reference.cope_attention(q, k, v, table, lengths, 0.25, q_start=q_start))
  assert rel_err(cope, ref) < 1e-5


def test_float64_stays_float64():
  with jax.enable_x64(True):
    q, k, v, lengths = _inputs(2, 30, 30, 4, 2, 16, jnp.float64)
    got = cpu_attention.prefill_attention(q, k, v, lengths, True, 0.25, block_q=16,
                                          block_k=16)
    assert got.dtype == jnp.float64
    want = np_prefill_attention(*(np.asarray(x) for x in (q, k, v, lengths)), True, 0.25)
    assert rel_err(got, want) < 1e-12


def test_gradients_are_the_references():
  q, k, v, lengths = _inputs(2, 40, 40, 4, 2, 16, garbage=False)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

  ours = jax.grad(loss(lambda q, k, v: cpu_attention.prefill_attention(
      q, k, v, lengths, True, 0.25, block_q=16, block_k=16)), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(lambda q, k, v: reference.prefill_attention(
      q, k, v, lengths, True, 0.25)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    assert rel_err(a, b) < 1e-6


def test_the_rule_takes_the_blocked_form_from_64_queries():
  big = dict(keys=4096, batch=8, heads=8)  # 64 MiB of float32 scores at 64 queries
  assert selection.cpu_prefill(64, **big).settings == {"block_q": 256, "block_k": 256}
  assert "fdjax.ops.cpu_attention" in selection.cpu_prefill(64, **big).reason
  assert selection.cpu_prefill(63, **big).settings is None
  assert "reference" in selection.cpu_prefill(63, **big).reason
  # the reference's scores in the cache: 16 x 8 x 160 x 160 float32 = 12.5 MiB
  assert selection.cpu_prefill(160, 160, batch=16, heads=8).settings is None
  assert "fit the cache" in selection.cpu_prefill(160, 160, batch=16, heads=8).reason
  assert selection.cpu_prefill(256, 256, batch=16, heads=8).settings is not None  # 32 MiB
  assert selection.cpu_prefill(512, 512, batch=1, heads=8).settings is not None  # > 256
  # CoPE's reference holds about four score-sized arrays: a quarter of the line
  assert selection.cpu_prefill(160, 160, batch=16, heads=8, cope=True).settings is not None
  assert selection.cpu_prefill(128, 192, batch=4, heads=4, cope=True).settings is None
  # from 128 queries, keys at least twice the queries (a chunk after cached keys, a table
  # rounded up to a power of two pages): the blocks, which skip what no query sees
  for cope in (False, True):
    wide = selection.cpu_prefill(128, 256, batch=4, heads=4, cope=cope)
    assert wide.settings is not None and "2x the queries" in wide.reason
    assert selection.cpu_prefill(128, 255, batch=4, heads=4, cope=cope).settings is None
    assert selection.cpu_prefill(127, 1024, batch=1, heads=4, cope=cope).settings is None
  assert selection.cpu_prefill(128, 2048, batch=1, heads=8).settings is not None  # 8 MiB
  assert "cpu_attention" in selection.describe(platform="cpu")["prefill_attention"]


def test_blocks_grow_while_a_blocks_scores_fit_four_mib():
  """cpu_blocks: a block's float32 scores (heads x block_q x block_k) within 4 MiB, the
  largest blocks first; CoPE keeps 128 x 128."""
  assert selection.cpu_blocks(16) == (256, 256)  # 4 MiB
  assert selection.cpu_blocks(17) == (256, 128)
  assert selection.cpu_blocks(32) == (256, 128)  # 4 MiB
  assert selection.cpu_blocks(64) == (128, 128)
  assert selection.cpu_blocks(128) == (128, 128)  # the smallest
  for heads in (1, 8, 24, 40, 64):
    bq, bk = selection.cpu_blocks(heads)
    assert 4 * heads * bq * bk <= selection.CPU_PREFILL_BLOCK_SCORES
  assert selection.cpu_prefill(512, 512, heads=32).settings == {"block_q": 256, "block_k": 128}
  assert selection.cpu_prefill(512, 512, heads=8, cope=True).settings == {
      "block_q": 128, "block_k": 128}


@pytest.mark.parametrize("t", [63, 64, 100])
def test_dispatch_runs_the_rules_choice_on_the_cpu(t, monkeypatch):
  monkeypatch.setattr(selection, "CPU_PREFILL_CACHED_SCORES", 0)  # these scores are tiny
  calls = spy(monkeypatch, cpu_attention, "prefill_attention", keywords=True)
  q, k, v, lengths = _inputs(2, t, t, 4, 2, 16)
  got = jax.jit(lambda q, k, v, n: dispatch.prefill_attention(q, k, v, lengths=n, phi=3.0))(
      q, k, v, lengths)
  assert len(calls) == (1 if t >= 64 else 0)
  if calls:
    assert calls[0]["phi"] == 3.0 and calls[0]["block_q"] == 256
  want = np_prefill_attention(_np(q), _np(k), _np(v), np.asarray(lengths), True, 0.25)
  assert rel_err(got, want) < 1e-5


# CoPE in the same blocks (cpu_attention.cope_attention) against the Appendix B loops
COPE = {  # name: one of test_cope's CASES, gate keys (None / "value" / "separate"), position
    # logits before the scale
    "prompt_gqa_ragged": ("prompt_gqa_ragged", None, False),
    "positions_hit_the_clamp": ("gates_near_1_positions_hit_clamp", None, False),
    "gates_near_0_and_1": ("gates_near_0_and_1_mixed", None, True),
    "chunk_value_gates": ("chunk_of_queries", "value", False),
    "chunk_separate_gate_keys": ("chunk_of_queries", "separate", True),
}


def _cope_case(name, dtype=jnp.float32, q_scale=None):
  from tests.test_cope import CASES, _case, np_cope
  case, gates, pos_scaled = COPE[name]
  b, t, s, hq, hkv, d, npos, scale_q, lens = CASES[case]
  q, k, v, e, lengths = _case(len(name), b, t, s, hq, hkv, d, npos,
                              scale_q if q_scale is None else q_scale, dtype, lengths=lens)
  gk = {None: None, "value": v, "separate": jnp.asarray(
      np.random.default_rng(3).standard_normal(k.shape), jnp.float32).astype(dtype)}[gates]
  want = np_cope(*(_np(x) for x in (q, k, v, e)), np.asarray(lengths), 0.3,
                 gate_keys=None if gk is None else _np(gk), pos_scaled=pos_scaled)
  how = dict(gate_keys=gk, pos_scale=0.3 if pos_scaled else 1.0)
  return (q, k, v, e, lengths), how, want


@pytest.mark.parametrize("name", COPE)
@pytest.mark.parametrize("blocks", [(4, 4), (8, 16), (128, 128)])
def test_cope_float32_matches_the_formulas(name, blocks):
  args, how, want = _cope_case(name)
  got = cpu_attention.cope_attention(*args, 0.3, block_q=blocks[0], block_k=blocks[1], **how)
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["prompt_gqa_ragged", "chunk_separate_gate_keys"])
def test_cope_scores_outside_the_window_of_phi_are_recomputed(name):
  args, how, want = _cope_case(name, q_scale=80.0)
  got = cpu_attention.cope_attention(*args, 0.3, block_q=8, block_k=8, **how)
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["prompt_gqa_ragged", "chunk_separate_gate_keys"])
def test_cope_bfloat16_within_twice_the_references_error(name):
  """The reference in bfloat16 (inputs and result bfloat16, float32 inside) is the bar."""
  args, how, want = _cope_case(name, jnp.bfloat16)
  got = cpu_attention.cope_attention(*args, 0.3, block_q=8, block_k=8, **how)
  base = reference.cope_attention(*args, 0.3, None, how["gate_keys"], how["pos_scale"])
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, want) <= 2 * rel_err(base, want)


def test_cope_gradients_are_the_references():
  (q, k, v, e, lengths), how, _ = _cope_case("chunk_separate_gate_keys")
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
  gk = how["gate_keys"]

  def grads(fn):
    return jax.grad(lambda q, e, g: jnp.sum(fn(q, e, g) * w), argnums=(0, 1, 2))(q, e, gk)

  ours = grads(lambda q, e, g: cpu_attention.cope_attention(
      q, k, v, e, lengths, 0.3, gate_keys=g, pos_scale=0.3, block_q=4, block_k=4))
  ref = grads(lambda q, e, g: reference.cope_attention(q, k, v, e, lengths, 0.3, None, g, 0.3))
  for a, b in zip(ours, ref):
    assert float(jnp.max(jnp.abs(b))) > 0 and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("t", [40, 64])
def test_dispatch_runs_the_rules_choice_for_cope(t, monkeypatch):
  from tests.test_cope import _case, np_cope
  monkeypatch.setattr(selection, "CPU_PREFILL_CACHED_SCORES", 0)  # these scores are tiny
  calls = spy(monkeypatch, cpu_attention, "cope_attention", keywords=True)
  q, k, v, e, lengths = _case(t, 2, t, t, 4, 2, 16, 16, 1.0, lengths=(t, t - 9))
  got = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.25)
  assert len(calls) == (1 if t >= 64 else 0)
  assert rel_err(got, np_cope(q, k, v, e, np.asarray(lengths), 0.25)) < 1e-5


def test_describe_names_the_cpu_form_for_cope_models():
  from tests.models_util import tiny_config
  described = selection.describe(tiny_config(position_encoding="cope"), platform="cpu")
  assert "cpu_attention" in described["cope_attention"]
