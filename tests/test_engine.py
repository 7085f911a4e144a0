"""The serving engine (fdjax.engine.core) without HTTP: continuous batching gives each request what
generate gives it alone, per-row sampling, stop strings, cancellation, the prefix cache,
bucketed shapes (no recompilation after warm-up under a random load), errors."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.engine import admission, batch, detokenize, paging, request, steps
from fdjax.engine import core as eng
from fdjax.engine.sampling import RowSampling, filter_logits, sample_rows
from fdjax.engine.scheduler import Scheduler
from fdjax.io.tokenizer import ByteTokenizer
from tests.models_util import tiny_model

TOK = ByteTokenizer()


def _model(**kw):
  return tiny_model(seed=kw.pop("seed", 1), vocab_size=256, **kw)


def _engine(model, **kw):
  args = dict(max_batch=4, page_size=16, max_model_len=96, prefill_chunk=32, steps_per_call=4)
  args.update(kw)
  return eng.Engine(model, TOK, **args)


def _request(prompt, max_tokens, **kw):
  events = []
  req = request.Request(list(prompt), max_tokens, on_event=events.append, **kw)
  req.events = events
  return req


def _drain(engine, limit=10_000):
  for _ in range(limit):
    if engine.idle():
      return
    engine.step()
  raise AssertionError("the engine did not finish")


def _random_prompts(rng, n, lo=1, hi=60):
  return [rng.integers(0, 256, int(k)).tolist() for k in rng.integers(lo, hi, n)]


# ------------------------------------------------------------------------ sampling

def test_row_filters_equal_the_static_filter_row_by_row():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((5, 40)) * 3, jnp.float32)
  settings = [(0.7, 5, None, 0), (1.0, None, 0.6, 1), (1.3, 8, 0.9, 2), (0.5, None, None, 3),
              (2.0, 40, 1.0, 4)]
  got = np.asarray(jax.jit(lambda x, r: fdjax.engine.sampling.filter_rows(x, r))(
      logits, RowSampling.of(settings)))
  for b, (t, k, p, _) in enumerate(settings):
    want = np.asarray(filter_logits(logits[b:b + 1] / t, k, p))[0]
    np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(want))
    np.testing.assert_allclose(got[b][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_row_sampling_is_greedy_at_zero_and_keyed_by_seed_and_position():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((4, 30)) * 2, jnp.float32)
  draw = jax.jit(sample_rows)
  rows = RowSampling.of([(0.0, None, None, 0), (1.0, 3, None, 7), (1.0, None, None, 7),
                         (1.0, 3, None, 8)])
  pos = jnp.asarray([5, 5, 5, 5], jnp.int32)
  a = np.asarray(draw(logits, rows, pos))
  assert a[0] == int(jnp.argmax(logits[0]))
  top3 = set(np.argsort(-np.asarray(logits[1]))[:3].tolist())
  seen = {int(draw(logits, rows, pos + i)[1]) for i in range(60)}
  assert seen <= top3 and len(seen) > 1  # it samples, within the top 3
  # A row's draw depends on its own seed and position only, not on the other rows.
  alone = RowSampling(*(x[1:2] for x in rows))
  assert int(draw(logits[1:2], alone, pos[:1])[0]) == a[1]
  assert np.asarray(draw(logits, rows, pos)).tolist() == a.tolist()
  all_greedy = RowSampling.of([(0.0, None, None, s) for s in range(4)])
  np.testing.assert_array_equal(draw(logits, all_greedy, pos), np.argmax(logits, -1))


# ----------------------------------------------------------------- batching

_ALONE = {}


def _alone(model, prompt):
  """generate's greedy tokens for the prompt alone (30 of them: without EOS, fewer tokens
  are a prefix of these; one length compiles less)."""
  key = (id(model), tuple(prompt))
  if key not in _ALONE:
    _ALONE[key] = fdjax.generate(model, [prompt], max_new_tokens=30).tokens[0]
  return _ALONE[key]


_MODEL = _model()

@pytest.mark.parametrize("steps_per_call,prefill_chunk", [(4, 16), (1, 64)])
def test_continuous_batching_equals_generate_alone(steps_per_call, prefill_chunk):
  model = _MODEL
  engine = _engine(model, steps_per_call=steps_per_call, prefill_chunk=prefill_chunk)
  rng = np.random.default_rng(0)
  prompts = _random_prompts(rng, 9)
  reqs = [_request(p, int(m)) for p, m in zip(prompts, rng.integers(1, 30, len(prompts)))]
  for r in reqs[:5]:
    engine.submit(r)
  for _ in range(3):  # the rest arrive while the first ones run
    engine.step()
  for r in reqs[5:]:
    engine.submit(r)
  _drain(engine)
  for p, r in zip(prompts, reqs):
    want = _alone(model, p)[:r.max_tokens]
    assert r.tokens == want
    assert "".join(e.text for e in r.events) == TOK.decode(want)
    assert r.events[-1].finish_reason == "length"
    assert r.events[-1].completion_tokens == r.max_tokens == sum(e.tokens for e in r.events)
  assert engine.kv.pool.pages_in_use == 0
  engine.kv.pool.check()


def test_requests_past_a_sliding_window_equal_generate_alone():
  model = _model(sliding_window=8)
  engine = _engine(model, steps_per_call=4, prefill_chunk=16)
  rng = np.random.default_rng(3)
  prompts = _random_prompts(rng, 3, lo=5, hi=40)
  reqs = [_request(p, 24) for p in prompts]
  for r in reqs:
    engine.submit(r)
  _drain(engine)
  for p, r in zip(prompts, reqs):
    assert r.tokens == _alone(model, p)[:24]
  assert engine.kv.pool.pages_in_use == 0


def test_a_sampled_request_draws_the_same_tokens_whatever_its_batch():
  model = _model(seed=2)
  prompt = [5, 6, 7, 8, 9]
  engine = _engine(model)
  alone = _request(prompt, 20, temperature=1.0, top_k=20, seed=11)
  engine.submit(alone)
  _drain(engine)
  crowd = [_request(p, 25, temperature=0.8, seed=i)
           for i, p in enumerate(_random_prompts(np.random.default_rng(3), 3))]
  again = _request(prompt, 20, temperature=1.0, top_k=20, seed=11)
  other_seed = _request(prompt, 20, temperature=1.0, top_k=20, seed=12)
  for r in crowd[:2] + [again] + crowd[2:] + [other_seed]:
    engine.submit(r)
  _drain(engine)
  assert again.tokens == alone.tokens != other_seed.tokens


def test_stop_strings_end_the_text_before_them_and_eos_ends_a_request():
  model = _model(seed=4)
  prompt = list(b"def f(x):")
  engine = _engine(model)
  free = _request(prompt, 40)
  engine.submit(free)
  _drain(engine)
  text = TOK.decode(free.tokens)
  stop = text[10:13]
  cut = text.index(stop)
  stopped = _request(prompt, 40, stop=("\x00never", stop))
  engine.submit(stopped)
  _drain(engine)
  assert stopped.text == text[:cut] and stopped.finish_reason == "stop"
  assert "".join(e.text for e in stopped.events) == text[:cut]
  # usage counts the tokens up to the one that completed the stop string
  assert len(stopped.tokens) == min(n for n in range(len(free.tokens) + 1)
                                    if stop in TOK.decode(free.tokens[:n]))
  eos = free.tokens[7]
  engine = _engine(model, eos_token_ids=[eos])
  ended = _request(prompt, 40)
  engine.submit(ended)
  _drain(engine)
  assert ended.tokens == free.tokens[:free.tokens.index(eos) + 1]
  assert ended.finish_reason == "stop" and ended.text == TOK.decode(ended.tokens[:-1])


def test_text_is_held_back_while_it_may_begin_a_stop_string_or_a_character():
  assert detokenize.settled("abc", ("cd",)) == 2
  assert detokenize.settled("abc", ("bcz", "q")) == 1
  assert detokenize.settled("abc", ()) == 3
  assert detokenize.settled("ab\ufffd", ()) == 2
  assert detokenize.settled("abc", ("abcd",)) == 0


@pytest.mark.parametrize("stop", ["\u20ac", "b\u20ac", "\u20acb", "\U0001f600", "\ufffd"])
def test_a_stop_string_is_found_in_characters_that_span_tokens_one_at_a_time(stop):
  """Byte tokens one at a time, as the engine hands them to detokenize: a character of 2-4
  bytes is U+FFFD until its last byte comes, then shorter text; a stop string ending in it is
  still found, and an incomplete character's U+FFFD is never taken for a stop string."""
  text = "a\u20acb\U0001f600c\u20ac"
  req = request.Request([1], 100, stop=(stop,))
  out, reason = "", None
  for tok in text.encode():
    _, reason, delta = detokenize.accept(req, [tok], TOK, ())
    out += delta
    if reason:
      break
  want = text[:text.find(stop)] if stop in text else text
  assert req.text == want and out == want
  assert reason == ("stop" if stop in text else None)


def _metaspace_tokenizer():
  """A SentencePiece-style tokenizer (Llama 2, Mistral): pieces with U+2581 for a space, whose
  decoder strips the leading space of what it decodes."""
  from tokenizers import Tokenizer, decoders, models

  from fdjax.io.tokenizer import HFTokenizer
  vocab = {"<unk>": 0, "\u2581if": 1, "\u2581x": 2, ":": 3, "\u2581blo": 4, "9": 5}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.decoder = decoders.Metaspace()
  return HFTokenizer(tok, None)


def test_a_requests_text_keeps_the_space_before_its_first_word_as_decode_of_all_gives_it():
  """The text new tokens add after the prompt, as transformers' decode(prompt + new) and
  vLLM give it: a SentencePiece decoder strips the space of "\u2581blo" decoded alone."""
  tok = _metaspace_tokenizer()
  prompt, new = [1, 2, 3], [4, 5, 4]
  assert tok.decode(new) == "blo9 blo" and tok.decode(prompt + new) == "if x: blo9 blo"
  req = request.Request(prompt, 10, stop=(" blo",))
  out = ""
  for t in new:
    _, reason, delta = detokenize.accept(req, [t], tok, ())
    out += delta
    if reason:
      break
  # the stop string is found at the text's start (decoded alone, "blo9 blo" kept "blo9")
  assert out == req.text == "" and reason == "stop" and len(req.tokens) == 1
  req = request.Request(prompt, 3)
  out = "".join(detokenize.accept(req, [t], tok, ())[2] for t in new)
  assert out == req.text == " blo9 blo"
  assert detokenize.continuation(tok, prompt, new) == " blo9 blo"
  assert detokenize.continuation(tok, [], new) == "blo9 blo"
  assert detokenize.continuation(TOK, [ord("a"), 0xE2], [0x82, 0xAC]) == TOK.decode(
      [0x82, 0xAC])  # the prompt ends inside a character: the tokens' own text


@pytest.mark.parametrize("stops", [("b",), ("b", "abcdef"), ("abcdef", "b")])
def test_a_stop_string_ended_before_min_tokens_does_not_end_the_request(stops):
  # whatever the other stop strings: a longer one's search start took in the "b" before
  req = request.Request([1], 6, stop=stops, min_tokens=3)
  out, reason = "", None
  for tok in b"xbqrbt":
    _, reason, delta = detokenize.accept(req, [tok], TOK, ())
    out += delta
    if reason:
      break
  assert req.text == out == "xbqr" and reason == "stop" and len(req.tokens) == 5


def test_cancelled_requests_free_their_pages_and_prefixes_are_reused():
  model = _model(seed=5)
  engine = _engine(model)
  prompt = list(range(40, 80))
  first = _request(prompt, 30)
  waiting = [_request([1, 2, 3], 30) for _ in range(4)]  # one more than max_batch in all
  for r in [first] + waiting:
    engine.submit(r)
  engine.step()
  engine.step()
  assert engine.kv.pool.pages_in_use > 0 and len(engine.waiting) == 1
  engine.cancel(first)
  engine.cancel(waiting[-1])  # never admitted
  _drain(engine)
  assert first.finish_reason == "cancelled" and waiting[-1].finish_reason == "cancelled"
  assert waiting[-1].tokens == [] and all(r.finish_reason == "length" for r in waiting[:-1])
  assert engine.kv.pool.pages_in_use == 0
  engine.kv.pool.check()
  hits = engine.kv.pool.prefix_hit_tokens
  again = _request(prompt, 10)
  engine.submit(again)
  _drain(engine)
  assert engine.kv.pool.prefix_hit_tokens - hits == 32  # 2 full pages of 16 of the prompt
  assert again.tokens == fdjax.generate(model, [prompt], max_new_tokens=10).tokens[0]


# ------------------------------------------------------------------ data replicas

def test_a_batch_lays_each_data_replicas_requests_in_its_block_of_rows():
  a, b, c, d = (request.Request([1], 1, replica=i) for i in (0, 1, 0, 0))
  assert batch.rows_of([a, b, c], 2) == [a, c, b, None]
  assert batch.rows_of([b], 2) == [None, b]
  assert batch.rows_of([a, c, d, b], 2) == [a, c, d, None, b, None, None, None]
  assert batch.rows_of([a, c, d]) == [a, c, d, None]  # one replica: a power of two of rows
  rows = batch.rows_of([a, b, c, d], 2)
  for i, r in enumerate(rows):  # the rows a mesh gives each replica
    assert r is None or paging.replica_of(i, len(rows), 2) == r.replica
  assert batch.live(rows[:5], 8).tolist() == [True, True, True, False, True, False, False,
                                              False]


def _two_replicas(pages, max_batch, prefill_rows=4):
  """A scheduler over two data replicas' pools of `pages` pages of 4 tokens (no model)."""
  kv = type("KV", (), {"pools": [paging.PagePool(pages, 4), paging.PagePool(pages, 4)],
                       "page_size": 4})()
  return Scheduler(type("Runner", (), {"kv": kv})(), TOK, (), max_batch=max_batch,
                   max_model_len=32, prefill_chunk=16, prefill_rows=prefill_rows,
                   steps_per_call=4)


def _route(sched, req):
  return admission.replicas_for(req, sched.active, sched.runner.kv.pools, sched.per_replica)


def test_requests_go_to_the_least_busy_replica_with_room_a_cached_prefix_counting_one():
  """Two replicas' pools of 8 pages of 4 tokens: a request goes to the least busy replica
  whose pool can hold it (one whose prefix cache holds part of its prompt counts as running
  one request fewer), else waits."""
  sched = _two_replicas(8, max_batch=6)
  kv = sched.runner.kv
  big, small, mid, more = (_request(list(range(10 * i, 10 * i + n)), m)
                           for i, (n, m) in enumerate([(12, 12), (4, 4), (8, 8), (4, 8)]))
  sched.waiting.extend([big, small, mid, more])
  sched._admit()
  # big takes 6 of replica 0's pages, small 2 of replica 1's; mid (4 pages) finds replica 0
  # (as busy as 1) short of pages and goes to 1; more (3 pages) finds replica 0 short of
  # pages and replica 1 too, and waits
  assert [r.replica for r in (big, small, mid)] == [0, 1, 1] and list(sched.waiting) == [more]
  assert [p.pages_available for p in kv.pools] == [2, 2]
  kv.pools[1].publish(mid.pages, mid.prompt)  # mid's prompt is cached on replica 1
  again, fresh = _request(mid.prompt + [7], 3), _request([5, 5, 5, 5, 5], 3)
  assert _route(sched, fresh) == [0, 1]  # the less busy first
  assert _route(sched, again) == [1, 0]  # one busier, but its two cached pages are there
  sched.finish(big, "length")
  assert _route(sched, again) == [0, 1]  # two busier: the load wins
  sched.finish(small, "length")
  assert _route(sched, again) == [1, 0] and _route(sched, fresh) == [0, 1]
  sched.per_replica = 1
  assert _route(sched, again) == [0]  # replica 1 runs its share
  for pool in kv.pools:
    pool.check()


def test_every_batch_the_replicas_make_is_a_shape_warmup_compiles():
  """Whatever requests each replica runs (up to its share of max_batch, 5 here: 3 each), a
  decode batch's rows and a prefill's (up to prefill_rows = 4 requests, more than a
  replica's share) are among compiled.shapes()'s."""
  sched = _two_replicas(64, max_batch=5)
  shapes = sched.shapes()
  decode_rows, prefill_rows = {r for r, _ in shapes.decode}, {r for r, _, _ in shapes.prefill}
  assert decode_rows == {2, 4, 8} and prefill_rows == {2, 4, 8} == set(shapes.first)
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 6))
    reqs = [request.Request([1], 1, replica=int(i)) for i in rng.integers(0, 2, n)]
    if max(sum(r.replica == i for r in reqs) for i in (0, 1)) > sched.per_replica:
      continue
    assert len(batch.rows_of(reqs, 2)) in decode_rows
    assert len(batch.rows_of(reqs[:sched.prefill_rows], 2)) in prefill_rows


# ------------------------------------------------------------------- no recompiles

@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_no_recompilation_under_a_random_load_after_warmup():
  model = _model(seed=6, hidden_size=40, num_heads=2, num_kv_heads=1, head_dim=20)
  engine = _engine(model, max_batch=2, page_size=16, max_model_len=48, prefill_chunk=16,
                   prefill_rows=1, steps_per_call=4, max_queue=100)
  before = sum(steps.TRACE_COUNT.values())
  engine.warmup()  # (first_token's shapes do not depend on the model: some may be compiled)
  assert 0 < sum(steps.TRACE_COUNT.values()) - before <= engine.shapes().count()
  traced = dict(steps.TRACE_COUNT)
  engine.start()
  rng = np.random.default_rng(7)
  reqs = []
  for i in range(30):  # Poisson arrivals, random prompt and output lengths and sampling
    time.sleep(rng.exponential(0.01))
    n = int(rng.integers(1, 40))
    r = _request(rng.integers(0, 256, n).tolist(), int(rng.integers(1, 48 - n)),
                 temperature=float(rng.choice([0.0, 0.9])), seed=i,
                 top_k=int(rng.integers(1, 50)) if i % 3 == 0 else None)
    engine.submit(r)
    reqs.append(r)
  deadline = time.time() + 120
  while not all(r.state == "done" for r in reqs) and time.time() < deadline:
    time.sleep(0.02)
  engine.stop()
  assert all(r.finish_reason == "length" and len(r.tokens) == r.max_tokens for r in reqs)
  assert dict(steps.TRACE_COUNT) == traced
  assert engine.kv.pool.pages_in_use == 0


# --------------------------------------------------------------- refusals, errors

def test_bad_requests_name_the_field_and_a_full_queue_refuses():
  engine = _engine(_model(), max_queue=2)
  for req, param, says in [
      (_request([], 4), "prompt", "the prompt is empty"),
      (_request([300], 4), "prompt", "token id 300 is outside the vocabulary"),
      (_request([1] * 96, 4), "prompt", "the prompt has 96 tokens"),
      (_request([1] * 90, 7), "max_tokens", "plus max_tokens"),
      (_request([1], -1), "max_tokens", "max_tokens must be >= 0, got -1")]:
    with pytest.raises(request.BadRequest, match=says) as e:
      engine.submit(req)
    assert e.value.param == param
  engine.submit(_request([1], 4))
  # several requests are queued all or none: a bad one, or one place for two, queues nothing
  pair = [_request([2], 4), _request([3], 4)]
  with pytest.raises(request.BadRequest, match="outside the vocabulary"):
    engine.submit(pair[0], _request([300], 4))
  with pytest.raises(request.QueueFull, match="1 requests waiting, 2 more asked for"):
    engine.submit(*pair)
  assert engine.queue_length == 1 and all(r.state != "waiting" for r in pair)
  engine.submit(pair[0])
  with pytest.raises(request.QueueFull, match="queue is full"):
    engine.submit(pair[1])


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(monkeypatch):
  model = _model(seed=8)
  engine = _engine(model).start()
  real = engine.runner.decode
  monkeypatch.setattr(engine.runner, "decode", lambda *a, **k: 1 / 0)
  doomed = [_request([1, 2, 3], 10), _request([4, 5], 10)]
  for r in doomed:
    engine.submit(r)
  deadline = time.time() + 60
  while not all(r.state == "done" for r in doomed) and time.time() < deadline:
    time.sleep(0.01)
  assert [r.events[-1].finish_reason for r in doomed] == ["error", "error"]
  assert "ZeroDivisionError" in doomed[0].events[-1].error
  monkeypatch.setattr(engine.runner, "decode", real)
  fine = _request([1, 2, 3], 10)
  engine.submit(fine)
  while fine.state != "done" and time.time() < deadline:
    time.sleep(0.01)
  assert engine.alive  # the failed step did not end the engine's thread
  engine.stop()
  assert not engine.alive
  assert fine.tokens == fdjax.generate(model, [[1, 2, 3]], max_new_tokens=10).tokens[0]


def test_engine_threads_are_reused():
  """Jobs run one after another reuse idle engine threads (a failing one too): the number of
  engine threads grows by at most one however many run."""
  from fdjax.engine import threads
  engine_threads = lambda: sum(t.name == "fdjax-engine" for t in threading.enumerate())
  seen = []

  def job(fail):
    seen.append(threading.current_thread().name)
    if fail:
      raise RuntimeError("a job's error does not end its thread")

  before = engine_threads()
  for i in range(6):
    h = threads.run(job, (i % 2 == 0,))
    h.join(10)
    assert not h.is_alive()
  assert seen == ["fdjax-engine"] * 6
  assert engine_threads() <= before + 1
  gate = threading.Event()
  h = threads.run(gate.wait, (10,))
  assert h.is_alive()
  gate.set()
  h.join(10)
  assert not h.is_alive()
