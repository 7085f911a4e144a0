"""Sampling: greedy, top-k, top-p, min-p, seeds; generation_config.json's defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.engine import sampling
from fdjax.engine.sampling import Sampler, sample
from tests.models_util import tiny_model


def _logits(seed=0, b=4, v=50):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, v)) * 2.0, jnp.float32)


def _draws(logits, sampler, n=300):
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.vmap(lambda k: sample(logits, k, sampler))(keys))  # [n, B]


def test_temperature_zero_is_greedy():
  logits = _logits()
  np.testing.assert_array_equal(sample(logits, jax.random.key(1), Sampler(0.0)),
                                np.argmax(np.asarray(logits), -1))
  model = tiny_model()
  prompts = [[1, 2, 3], [4, 5]]
  assert (fdjax.generate(model, prompts, max_new_tokens=6, temperature=0.0, seed=1).tokens
          == fdjax.generate(model, prompts, max_new_tokens=6, seed=99).tokens)


def test_a_temperature_below_1e_5_is_greedy_in_both_samplers():
  # logits / 1e-38 overflow float32: the draw went to token 0 (generate's sampler), the
  # logprob of the right token came out -0.72 (the server's)
  logits = jnp.asarray([[1.0, 4.9, 5.0, 3.0, -2.0]], jnp.float32)
  for t in (1e-38, 1e-40, 9e-6):
    assert int(sample(logits, jax.random.key(0), Sampler(t).validate(5))[0]) == 2
    rows = jax.tree.map(jnp.asarray, sampling.RowSampling.of([sampling.Settings(
        t, seed=0, logprobs=True)]))
    token = sampling.sample_rows(logits, rows, jnp.asarray([3]))
    assert int(token[0]) == 2
    expected = jax.nn.log_softmax(logits)[0, 2]  # a greedy row's: temperature 1
    assert float(sampling.logprobs(logits, rows, token).chosen[0]) == pytest.approx(expected)
  assert Sampler(1e-5).validate(5).temperature == 1e-5  # from 1e-5 on it samples


def test_a_negative_seed_samples_with_speculative_decoding_too():
  # (numpy's SeedSequence refused it: "expected non-negative integer")
  model = tiny_model(seed=2)
  run = lambda s: fdjax.generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=8, temperature=1.0,
                                 seed=s, speculative="ngram:k=2,n=2").tokens
  assert run(-1) == run(-1) and run(-1) != run(-2)


def test_top_k_never_samples_outside_the_k_best():
  logits = _logits(1)
  draws = _draws(logits, Sampler(1.5, top_k=5))
  top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
  for row in range(logits.shape[0]):
    assert set(draws[:, row]) <= set(top5[row])
  assert len(set(draws[:, 0])) > 1  # it does sample


def test_top_p_never_samples_outside_the_nucleus():
  logits = _logits(2)
  p = 0.6
  draws = _draws(logits, Sampler(1.0, top_p=p))
  lg = np.asarray(logits, np.float64)
  for row in range(lg.shape[0]):
    order = np.argsort(-lg[row])
    probs = np.exp(lg[row][order] - lg[row].max())
    probs /= probs.sum()
    n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest set with mass >= p
    assert set(draws[:, row]) <= set(order[:n_keep])
  assert len(set(draws[:, 1])) > 1


def test_a_top_p_of_zero_or_below_float32s_range_keeps_the_most_likely_token():
  """top_p 0, and 1e-40 (a float32 flushed to zero), keep the top token alone: sampling is
  greedy, never a draw from nothing (every logit -inf)."""
  logits = _logits(3)
  best = np.argmax(np.asarray(logits), -1)
  for p in (0.0, 1e-40):
    for row in (False, True):
      if row:
        rows = sampling.RowSampling.of([sampling.Settings(1.0, None, p, seed=i) for i in
                                        range(logits.shape[0])], np.zeros(4, np.int32))
        kept = sampling.filter_rows(logits, jax.tree.map(jnp.asarray, rows))
      else:
        kept = sampling.filter_logits(logits, None, p)
      assert np.array_equal(np.isfinite(np.asarray(kept)),
                            np.arange(logits.shape[1])[None] == best[:, None]), (p, row)
  np.testing.assert_array_equal(_draws(logits, Sampler(1.0, top_p=0.0), 20),
                                np.broadcast_to(best, (20, 4)))


def test_min_p_keeps_the_tokens_at_least_that_likely_relative_to_the_best():
  """Against float64: a token stays when p / p_max >= min_p (at the row's temperature), in
  both samplers, before top-k and top-p as vLLM orders them; min_p 0 cuts nothing, 1 leaves
  the likeliest; generate() takes it (min_p 1 sampled is greedy)."""
  logits = _logits(4, v=60)
  lg = np.asarray(logits, np.float64)
  for t, min_p, top_p in [(1.0, 0.1, None), (0.7, 0.02, None), (1.3, 0.3, 0.5), (1.0, 0.0, None),
                          (1.0, 1.0, None)]:
    x = lg / t
    ratio = np.exp(x - x.max(-1, keepdims=True))
    want = ratio >= min_p
    if top_p is not None:  # the nucleus of what min-p kept
      for row in range(x.shape[0]):
        kept = np.where(want[row], x[row], -np.inf)
        order = np.argsort(-kept)
        probs = np.exp(kept[order] - kept.max())
        probs /= probs.sum()
        cut = order[(np.cumsum(probs) - probs) >= top_p]
        want[row, cut] = False
    got = np.isfinite(np.asarray(sampling.filter_logits(logits / t, None, top_p, min_p)))
    np.testing.assert_array_equal(got, want, err_msg=f"{t} {min_p} {top_p}")
    rows = jax.tree.map(jnp.asarray, sampling.RowSampling.of(
        [sampling.Settings(t, None, top_p, seed=i, min_p=min_p) for i in range(4)]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(sampling.filter_rows(logits, rows))),
                                  want, err_msg=f"rows {t} {min_p} {top_p}")
  # a batch mixing rows with and without it
  rows = jax.tree.map(jnp.asarray, sampling.RowSampling.of(
      [sampling.Settings(1.0, seed=i, min_p=p) for i, p in enumerate((0.0, 0.5, 0.0, 0.5))]))
  kept = np.isfinite(np.asarray(sampling.filter_rows(logits, rows))).sum(-1)
  ratio = np.exp(lg - lg.max(-1, keepdims=True))
  assert kept.tolist() == [60, int((ratio[1] >= 0.5).sum()), 60, int((ratio[3] >= 0.5).sum())]
  model = tiny_model(seed=2)
  run = lambda **kw: fdjax.generate(model, [[3, 1, 4, 1, 5], [2, 7]], max_new_tokens=12,
                                    seed=5, **kw).tokens
  assert run(temperature=1.0, min_p=1.0) == run(temperature=0.0)
  with pytest.raises(ValueError, match="min_p must be in"):
    run(temperature=1.0, min_p=1.5)


def test_generation_config_sampling_defaults_are_read_and_checked(tmp_path):
  from fdjax.io import generation_config
  assert generation_config.sampling_defaults(tmp_path) == {}
  assert generation_config.sampling_defaults(None) == {}
  file = tmp_path / "generation_config.json"
  file.write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20, '
                  '"min_p": null, "max_new_tokens": 256, "eos_token_id": [1, 2]}')
  assert generation_config.sampling_defaults(tmp_path) == {
      "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 256}
  for body, says in [('{"temperature": -1}', r"temperature must be a number in \[0.0"),
                     ('{"top_p": 0}', r"top_p must be a number in \(0.0"),
                     ('{"top_k": 2.5}', "top_k must be an integer"),
                     ('{"repetition_penalty": "1.1"}', "repetition_penalty must be a number"),
                     ('{"max_new_tokens": 0}', r"max_new_tokens must be an integer in \[1"),
                     ('{"min_p": true}', "min_p must be a number"), ("[1]", "a JSON object"),
                     ("{", "not valid JSON")]:
    file.write_text(body)
    with pytest.raises(ValueError, match=says):
      generation_config.sampling_defaults(tmp_path)


def test_same_seed_same_tokens_other_seed_other_tokens():
  model = tiny_model(seed=2)
  prompts = [[3, 1, 4, 1, 5]]
  run = lambda s: fdjax.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=s)
  assert run(7).tokens == run(7).tokens
  assert run(7).tokens != run(8).tokens


def test_argmax_is_jnp_argmax_with_ties_nan_and_infinities():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # many ties: the first one wins
  x[3] = -np.inf
  x[4, 5] = x[4, 9] = np.inf
  x[5, 7] = x[5, 2] = np.nan
  x[6] = np.nan
  x[7, 36] = 100
  for arr in (x, x.astype(jnp.bfloat16), rng.standard_normal((3, 5, 32000)).astype(np.float32)):
    want = np.asarray(jnp.argmax(jnp.asarray(arr), axis=-1))
    got = jax.jit(sampling.argmax)(jnp.asarray(arr))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
