"""Per-row sampling controls and logprobs in the serving engine (no HTTP): the penalties,
logit_bias, min_tokens and ignore_eos against a step-by-step float64 reference on the model's
own full forward; logprobs of generated and prompt tokens against the model's log-softmax,
the same whatever the batch; max_tokens 0 with the prompt's logprobs; n siblings sharing
their prompt's pages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdjax.engine import core as eng
from fdjax.engine import request, sampling
from fdjax.engine.sampling import RowSampling, Settings
from fdjax.io.tokenizer import ByteTokenizer
from tests.models_util import tiny_model

TOK = ByteTokenizer()
MODEL = tiny_model(seed=5, vocab_size=256)


def _engine(**kw):
  args = dict(max_batch=4, page_size=16, max_model_len=96, prefill_chunk=16, steps_per_call=4)
  return eng.Engine(MODEL, TOK, **{**args, **kw})


def _request(prompt, max_tokens, **kw):
  events = []
  req = request.Request(list(prompt), max_tokens, on_event=events.append, **kw)
  req.events = events
  return req


def _run(engine, reqs):
  for r in reqs:
    engine.submit(r)
  for _ in range(10_000):
    if engine.idle():
      break
    engine.step()
  assert engine.idle() and engine.kv.pool.pages_in_use == 0
  engine.kv.pool.check()


_GRAPH, _STATE = nnx.split(MODEL)
_FORWARD = jax.jit(lambda state, ids: nnx.merge(_GRAPH, state)(ids))


def _logits(tokens) -> np.ndarray:
  """The model's next-token logits after `tokens` (a full forward, no cache, right-padded to
  96: causal, so the padding changes nothing before it), float64."""
  ids = np.zeros((1, 96), np.int32)
  ids[0, :len(tokens)] = tokens
  return np.asarray(_FORWARD(_STATE, jnp.asarray(ids))[0, len(tokens) - 1], np.float64)


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _adjusted(x, prompt, out, s: Settings, eos=()):
  """The reference of sampling.adjust for one row, in float64."""
  x = x.copy()
  seen = set(prompt) | set(out)
  for t in seen:
    x[t] = x[t] / s.repetition_penalty if x[t] > 0 else x[t] * s.repetition_penalty
  for t in set(out):
    x[t] -= s.frequency_penalty * out.count(t) + s.presence_penalty
  for t, b in s.logit_bias:
    x[t] += b
  if len(out) < s.min_tokens:
    x[list(eos)] = -np.inf
  return x


# ---------------------------------------------------------------------- the pieces

def test_adjust_equals_the_reference_row_by_row():
  rng = np.random.default_rng(0)
  v, eos = 40, jnp.asarray([3, 7], jnp.int32)
  rows = [Settings(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25,
                   logit_bias=((5, 2.5), (9, -100.0)), min_tokens=3),
          Settings(), Settings(frequency_penalty=-0.5, logit_bias=((0, 1.0),)),
          Settings(repetition_penalty=0.7, min_tokens=1)]
  prompts = [rng.integers(0, v, k).tolist() for k in (5, 3, 8, 2)]
  outs = [rng.integers(0, v, k).tolist() for k in (2, 4, 0, 6)]
  logits = rng.standard_normal((4, v)) * 3
  history = np.full((4, 16), -1, np.int32)
  for i, (p, o) in enumerate(zip(prompts, outs)):
    history[i, :len(p) + len(o)] = p + o
  rs = RowSampling.of(rows, [len(p) for p in prompts])
  positions = jnp.asarray([len(p) + len(o) for p, o in zip(prompts, outs)], jnp.int32)
  got = np.asarray(jax.jit(lambda x, h, r, pos: sampling.adjust(
      x, r, sampling.history(h, r, v), pos, eos))(jnp.asarray(logits, jnp.float32), history, rs,
                                                   positions))
  for i, s in enumerate(rows):
    want = _adjusted(logits[i], prompts[i], outs[i], s, eos=(3, 7))
    np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want))
    np.testing.assert_allclose(got[i][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5,
                               atol=1e-5)
  assert not np.isfinite(got[0][[3, 7]]).any() and np.isfinite(got[3][[3, 7]]).all()


def test_logprobs_are_the_models_or_those_of_the_distribution_drawn_from():
  """raw_logprobs (the default): the model's logits' log-softmax, whatever the row's
  adjustments and filters; processed_logprobs: those of the distribution it drew from; the
  *_logits modes: the values before log-softmax."""
  rng = np.random.default_rng(1)
  raw = rng.standard_normal((3, 50)) * 2
  logits = raw + rng.standard_normal((3, 50))  # as sampling.adjust's penalties leave them
  settings = [Settings(), Settings(0.7, 5, None, 1), Settings(1.3, None, 0.8, 2)]
  tokens = jnp.asarray([4, int(np.argmax(logits[1])), int(np.argmax(logits[2]))], jnp.int32)
  x = logits[2] / 1.3
  order = np.argsort(-x)
  p = np.exp(_log_softmax(x))[order]
  keep = order[(np.cumsum(p) - p) < 0.8]
  processed = [logits[0],
               np.where(logits[1] >= np.sort(logits[1])[-5], logits[1] / 0.7, -np.inf),
               np.where(np.isin(np.arange(50), keep), x, -np.inf)]
  want = {"raw_logprobs": [_log_softmax(r) for r in raw], "raw_logits": list(raw),
          "processed_logprobs": [_log_softmax(r) for r in processed],
          "processed_logits": processed}
  for mode, ref in want.items():
    rows = RowSampling.of([s._replace(logprobs=True, logprobs_mode=mode) for s in settings])
    lp = jax.jit(sampling.logprobs)(jnp.asarray(logits, jnp.float32), rows, tokens,
                                    jnp.asarray(raw, jnp.float32))
    for i, w in enumerate(ref):
      np.testing.assert_allclose(float(lp.chosen[i]), w[int(tokens[i])], rtol=1e-5)
      top, live = np.argsort(-w)[:20], min(20, int(np.isfinite(w).sum()))
      np.testing.assert_array_equal(np.asarray(lp.top_ids[i])[:live], top[:live])
      np.testing.assert_allclose(np.asarray(lp.top[i])[:live], w[top][:live], rtol=1e-5,
                                 atol=1e-6)
      assert np.isneginf(np.asarray(lp.top[i])[live:]).all()
  mixed = RowSampling.of([s._replace(logprobs=True, logprobs_mode=m) for s, m in
                          zip(settings, ["processed_logprobs", "raw_logits", "raw_logprobs"])])
  lp = jax.jit(sampling.logprobs)(jnp.asarray(logits, jnp.float32), mixed, tokens,
                                  jnp.asarray(raw, jnp.float32))
  np.testing.assert_allclose(np.asarray(lp.chosen),  # each row its own mode
                             [want["processed_logprobs"][0][4], raw[1][int(tokens[1])],
                              want["raw_logprobs"][2][int(tokens[2])]], rtol=1e-5)
  off = jax.jit(sampling.logprobs)(jnp.asarray(logits, jnp.float32),
                                   RowSampling.of([Settings()] * 3), tokens)
  assert not np.asarray(off.chosen).any()  # nothing asked: nothing computed


# ------------------------------------------------------------------ in the engine

def _reference(prompt, n, s: Settings, eos=()):
  """Greedy tokens under `s`'s adjustments, step by step on full forwards."""
  out = []
  for _ in range(n):
    x = _adjusted(_logits(prompt + out), prompt, out, s, eos)
    out.append(int(np.argmax(x)))
    if out[-1] in eos and not s.ignore_eos:
      break
  return out


def test_penalties_and_bias_in_a_mixed_batch_equal_the_reference():
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 256, k).tolist() for k in (7, 20, 3, 33, 12)]
  settings = [dict(repetition_penalty=1.5, frequency_penalty=0.5),
              dict(presence_penalty=1.5, logit_bias=((65, 4.0), (66, 3.0))),
              dict(),
              dict(frequency_penalty=2.0, repetition_penalty=1.2, presence_penalty=0.5),
              dict(logit_bias=tuple((t, -100.0) for t in range(0, 256, 2)))]
  reqs = [_request(p, 12, **s) for p, s in zip(prompts, settings)]
  _run(_engine(), reqs)
  for p, s, r in zip(prompts, settings, reqs):
    assert r.tokens == _reference(p, 12, Settings(**s)), s
  assert all(t % 2 for t in reqs[4].tokens)


def test_min_tokens_and_ignore_eos():
  prompt = [5, 17, 200, 3]
  free = _reference(prompt, 10, Settings())
  at = next(j for j in range(1, 6) if free[j] not in free[:j])
  eos = free[at]  # the greedy run would end there
  engine = _engine(eos_token_ids=eos)
  plain, late, ignoring = (_request(prompt, 10), _request(prompt, 10, min_tokens=6),
                           _request(prompt, 10, ignore_eos=True))
  _run(engine, [plain, late, ignoring])
  assert plain.tokens == free[:at + 1] and plain.events[-1].finish_reason == "stop"
  assert late.tokens == _reference(prompt, 10, Settings(min_tokens=6), eos=(eos,))
  assert eos not in late.tokens[:6] and len(late.tokens) >= 6
  assert ignoring.tokens == free and ignoring.events[-1].finish_reason == "length"


def _want_logprobs(tokens, prompt):
  """Each of `tokens`' logprob after `prompt` and the tokens before it, and the top 20."""
  out = []
  for j, t in enumerate(tokens):
    lp = _log_softmax(_logits(prompt + tokens[:j]))
    out.append((lp[t], np.argsort(-lp)[:20], np.sort(lp)[::-1][:20]))
  return out


def _check_logprobs(got, want):
  assert len(got) == len(want)
  for g, (lp, top_ids, top) in zip(got, want):
    assert abs(g.logprob - lp) < 1e-4
    ids, vals = zip(*g.top)
    np.testing.assert_allclose(vals, top, atol=1e-4)
    assert list(ids[:5]) == top_ids[:5].tolist()


def test_logprobs_of_greedy_tokens_match_the_model_whatever_the_batch():
  rng = np.random.default_rng(3)
  prompt = rng.integers(0, 256, 21).tolist()
  alone = _request(prompt, 9, logprobs=True)
  _run(_engine(), [alone])
  others = [_request(rng.integers(0, 256, k).tolist(), 11, temperature=0.9, seed=k,
                     logprobs=bool(k % 2)) for k in (4, 30, 9)]
  mixed = _request(prompt, 9, logprobs=True)
  _run(_engine(steps_per_call=3), others[:2] + [mixed] + others[2:])
  assert mixed.tokens == alone.tokens
  got = [lp for e in mixed.events for lp in e.logprobs]
  assert [g.token for g in got] == mixed.tokens
  for a, b in zip(got, [lp for e in alone.events for lp in e.logprobs]):
    assert abs(a.logprob - b.logprob) < 1e-5
  _check_logprobs(got, _want_logprobs(mixed.tokens, prompt))
  assert not any(e.logprobs for r in others if not r.logprobs for e in r.events)


def test_sampled_tokens_logprobs_are_the_models_unless_the_request_asks_for_processed():
  """Sampled rows with a presence penalty and top-k in one batch: the default (raw_logprobs)
  gives the model's log-softmax of each drawn token, processed_logprobs the distribution it
  was drawn from (penalised, divided by the temperature, cut to the top 5), raw_logits the
  model's logit; an unknown mode is refused, named."""
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, 256, k).tolist() for k in (13, 6, 20)]
  kw = dict(temperature=0.8, top_k=5, presence_penalty=2.0, logprobs=True)
  reqs = [_request(prompts[0], 7, seed=1, **kw),
          _request(prompts[1], 7, seed=2, logprobs_mode="processed_logprobs", **kw),
          _request(prompts[2], 5, seed=3, logprobs_mode="raw_logits", **kw)]
  _run(_engine(steps_per_call=3), reqs)
  got = [[lp for e in r.events for lp in e.logprobs] for r in reqs]
  _check_logprobs(got[0], _want_logprobs(reqs[0].tokens, prompts[0]))
  prompt, out = prompts[1], reqs[1].tokens
  for j, g in enumerate(got[1]):
    x = _adjusted(_logits(prompt + out[:j]), prompt, out[:j], Settings(presence_penalty=2.0))
    x = np.where(x >= np.sort(x)[-5], x / 0.8, -np.inf)
    want = _log_softmax(x)
    assert g.token == out[j] and abs(g.logprob - want[out[j]]) < 1e-4
    assert sorted(t for t, v in g.top if np.isfinite(v)) == sorted(np.argsort(-want)[:5])
  for j, g in enumerate(got[2]):
    x = _logits(prompts[2] + reqs[2].tokens[:j])
    assert abs(g.logprob - x[reqs[2].tokens[j]]) < 1e-4
  with pytest.raises(request.BadRequest, match="logprobs_mode must be one of raw_logprobs"):
    _engine().submit(_request(prompts[0], 3, logprobs=True, logprobs_mode="raw"))


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_prompt_logprobs_over_several_chunks_and_max_tokens_zero(max_tokens):
  rng = np.random.default_rng(4)
  prompt = rng.integers(0, 256, 40).tolist()  # 3 chunks of 16
  engine = _engine()
  _run(engine, [_request(prompt, 4)])  # its pages are in the prefix cache now ...
  echo = _request(prompt, max_tokens, prompt_logprobs=True, logprobs=True)
  _run(engine, [echo])  # ... and are not used: every position is computed
  first = echo.events[0].prompt_logprobs
  assert [p.token for p in first] == prompt and first[0].logprob is None
  _check_logprobs(first[1:], [_want_logprobs([t], prompt[:i])[0]
                              for i, t in enumerate(prompt) if i])
  assert len(echo.tokens) == max_tokens and echo.events[-1].finish_reason == "length"
  assert sum(len(e.logprobs) for e in echo.events) == max_tokens


def test_n_siblings_share_their_prompts_pages_and_sample_apart():
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, 256, 50).tolist()
  engine = _engine()
  lead = _request(prompt, 8, temperature=1.0, seed=1)
  rest = [_request(prompt, 8, temperature=1.0, seed=s, after=lead) for s in (2, 3)]
  _run(engine, [lead] + rest)
  # Each sibling found the leader's three full pages of the prompt (the last token is computed).
  assert engine.kv.pool.prefix_hit_tokens == 2 * 48
  assert len({tuple(r.tokens) for r in [lead] + rest}) == 3
  alone = _request(prompt, 8, temperature=1.0, seed=2)
  _run(_engine(), [alone])
  assert alone.tokens == rest[0].tokens
