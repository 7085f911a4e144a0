"""Speculative decoding: greedy tokens equal to plain decoding for every proposer and k, the
target's distribution kept when sampling (a statistical test), and bad settings refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import fdjax
from fdjax.engine import sampling, spec_steps, speculative
from fdjax.engine.sampling import RowSampling, Settings
from tests.models_util import forward, tiny_model

VOCAB = 61


def _hf_checkpoint(path, layers, hidden, seed):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden,
                                 intermediate_size=2 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, attn_implementation="eager")
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():  # larger than the default init, so logits are far from uniform
      p.normal_(0.0, 0.15)
  hf.save_pretrained(path)
  return fdjax.load_pretrained(str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(target, draft): a 2-layer Llama and a 1-layer one, read from HF checkpoints."""
  return (_hf_checkpoint(tmp_path_factory.mktemp("target"), 2, 64, 0),
          _hf_checkpoint(tmp_path_factory.mktemp("draft"), 1, 32, 1))


def _prompts():
  rng = np.random.default_rng(7)
  motif = rng.integers(0, VOCAB, 11).tolist()
  # ragged; the long ones cross several 8-token pages and repeat themselves (n-gram hits)
  return [motif * 3 + motif[:4], rng.integers(0, VOCAB, 3).tolist(), motif + [5, 9] + motif,
          rng.integers(0, VOCAB, 21).tolist(), [4]]


@pytest.mark.parametrize("k", [1, 7])
def test_greedy_ngram_and_draft_equal_plain_decoding(models, k):
  target, draft = models
  prompts = _prompts()
  plain = fdjax.generate(target, prompts, max_new_tokens=20, page_size=8).tokens
  ngram = fdjax.generate(target, prompts, max_new_tokens=20, page_size=8,
                         speculative={"method": "ngram", "k": k, "n": 3})
  assert ngram.tokens == plain
  assert ngram.accepted > 0 and ngram.drafted > ngram.accepted  # drafts both kept and refused
  drafted = fdjax.generate(target, prompts, max_new_tokens=20, page_size=8,
                           speculative={"method": "draft", "k": k, "model": draft})
  assert drafted.tokens == plain
  assert drafted.drafted > drafted.accepted
  # never more rounds than plain decoding's 19 (a round makes one token or more); a batch's
  # rounds are its slowest row's, here a row with no n-gram hit: that kept drafts cut the
  # rounds is test_self_draft_accepts_everything_and_takes_k_plus_one_per_round's
  assert ngram.decode_steps <= 19 and drafted.decode_steps <= 19


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_eos_inside_an_accepted_run_ends_the_row_there(models, method):
  target, _ = models
  prompts = _prompts()
  plain = fdjax.generate(target, prompts, max_new_tokens=24, page_size=8).tokens
  # the EOS: a row's first new token at index 3..6, inside the first round's run of 8
  r, j = next((r, j) for r in range(len(plain)) for j in range(3, 7)
              if plain[r][j] not in plain[r][:j])
  eos = plain[r][j]
  want = fdjax.generate(target, prompts, max_new_tokens=24, page_size=8, eos_token_id=eos)
  assert want.tokens[r] == plain[r][:j + 1]
  # the target as its own draft accepts its drafts: the EOS is a kept draft mid-run
  spec = ({"method": "draft", "k": 7, "model": target} if method == "draft" else
          {"method": "ngram", "k": 7, "n": 2})
  got = fdjax.generate(target, prompts, max_new_tokens=24, page_size=8, eos_token_id=eos,
                       speculative=spec)
  assert got.tokens == want.tokens


def test_self_draft_accepts_everything_and_takes_k_plus_one_per_round(models):
  target, _ = models
  prompts = [_prompts()[0]]
  got = fdjax.generate(target, prompts, max_new_tokens=24, page_size=8,
                       speculative={"method": "draft", "k": 3, "model": target})
  assert got.tokens == fdjax.generate(target, prompts, max_new_tokens=24, page_size=8).tokens
  # 23 tokens after the first, 4 a round: 6 rounds, all 3 drafts of the first 5 kept
  assert got.decode_steps == 6 and got.accepted >= 15


# ------------------------------------------------------------ the sampling distribution

def _rows(n, temperature=1.0, top_k=None, top_p=None, **extra):
  settings = [Settings(temperature, top_k, top_p, seed=i, **extra) for i in range(n)]
  return jax.tree.map(jnp.asarray, RowSampling.of(settings, np.zeros(n, np.int32)))


def _chi2_ok(counts, probs, alpha=1e-4):
  """Pearson's chi-square test of counts against probs (cells with expectation under 5
  merged); False when the counts are that unlikely (false alarm rate alpha)."""
  from scipy import stats
  counts, expected = np.asarray(counts, float), np.asarray(probs, float) * np.sum(counts)
  order = np.argsort(expected)
  c, e = counts[order], expected[order]
  small = np.cumsum(e) < 5
  c = np.concatenate([[c[small].sum()], c[~small]]) if small.any() else c
  e = np.concatenate([[e[small].sum()], e[~small]]) if small.any() else e
  assert np.sum(c[e == 0]) == 0, "a token of probability 0 was drawn"
  keep = e > 0
  return stats.chisquare(c[keep], e[keep] * c[keep].sum() / e[keep].sum()).pvalue > alpha


@pytest.mark.parametrize("proposer, top_k", [("draft", None), ("bad_draft", None),
                                             ("ngram", None), ("bad_draft", 4)])
def test_rejection_sampling_keeps_the_target_distribution(proposer, top_k):
  """60000 rows with their own seeds: the first token follows p_0 and, among rows that kept
  the first draft, the second follows p_1 (each cell's chi-square at a 1e-4 false alarm
  rate; seeds fixed, so the test is deterministic). The bad draft puts its mass where p has
  little: most drafts are refused."""
  v, k, n = 6, 2, 60000
  rng = np.random.default_rng(11 if top_k is None else 12)
  target = jnp.asarray(rng.normal(0, 1.5, (k + 1, v)), jnp.float32)
  rows = _rows(n, top_k=top_k)
  ids = jnp.arange(n)
  if proposer == "ngram":
    drafts = jnp.tile(jnp.asarray([[2, 3]]), (n, 1))
    logq = None
  else:
    q = (rng.normal(0, 1.5, (k, v)) if proposer == "draft" else
         -4.0 * np.asarray(jax.nn.softmax(target[:k], axis=-1)) * 10)
    logq_one = jax.nn.log_softmax(jnp.asarray(q, jnp.float32), axis=-1)
    keys = jax.vmap(lambda i: jax.random.key(10_000 + i))(ids)
    drafts = jax.vmap(lambda key: jax.random.categorical(key, logq_one, axis=-1))(keys)
    logq = jnp.broadcast_to(logq_one, (n, k, v))
  logits = jnp.broadcast_to(target, (n, k + 1, v))
  hist = sampling.History(jnp.zeros((n, v), jnp.int32), jnp.zeros((n, v), bool))
  verdict = spec_steps.accept(logits, drafts.astype(jnp.int32), jnp.full((n,), k), logq, rows,
                              hist, ids * 0 + 5, jnp.asarray([-1]))
  p = np.asarray(jax.nn.softmax(sampling.filter_logits(target, top_k, None), axis=-1))
  tokens, a = np.asarray(verdict.tokens), np.asarray(verdict.accepted)
  assert _chi2_ok(np.bincount(tokens[:, 0], minlength=v), p[0])
  kept = a >= 1
  second = tokens[kept, 1]
  assert _chi2_ok(np.bincount(second, minlength=v), p[1])
  if proposer == "bad_draft":
    assert kept.mean() < 0.3  # rejections are the common case
  if proposer != "ngram":
    assert kept.sum() > 500  # enough kept first drafts for the second token's test
  # all drafts kept: the bonus token follows p_2
  assert _chi2_ok(np.bincount(tokens[a == 2, 2], minlength=v), p[2])


def test_speculative_sampling_end_to_end_follows_the_model():
  """A tiny model (vocabulary 8) samples 3 tokens for 2000 copies of one prompt with n-gram
  drafts and with a poor draft model; the 2nd and 3rd tokens' distributions equal the
  model's exact marginals (enumerated over every continuation), at a 1e-4 false alarm
  rate each."""
  model = tiny_model(seed=4, vocab_size=8)
  prompt = [1, 2, 3, 1, 2, 3, 1, 2]
  # exact: P(t1) from the prompt, P(t2 | t1), P(t3 | t1, t2) by one forward of all 64 paths
  paths = np.array([[a, b] for a in range(8) for b in range(8)])
  seqs = np.concatenate([np.tile(prompt, (64, 1)), paths], axis=1)
  probs = np.asarray(jax.nn.softmax(forward(model, jnp.asarray(seqs)), axis=-1), np.float64)
  p1 = probs[0, len(prompt) - 1]
  p2_given = probs[::8, len(prompt)]                 # [t1, t2]
  p3_given = probs[:, len(prompt) + 1].reshape(8, 8, 8)  # [t1, t2, t3]
  m2 = p1 @ p2_given
  m3 = np.einsum("a,ab,abc->c", p1, p2_given, p3_given)
  draft = tiny_model(seed=9, vocab_size=8, num_layers=1)
  for spec in ({"method": "ngram", "k": 2, "n": 2, "min_n": 1},
               {"method": "draft", "k": 2, "model": draft}):
    res = fdjax.generate(model, [prompt] * 2000, max_new_tokens=3, temperature=1.0, seed=3,
                         page_size=8, speculative=spec)
    toks = np.array(res.tokens)
    assert res.accepted > 100 and res.drafted - res.accepted > 100  # both paths taken
    assert _chi2_ok(np.bincount(toks[:, 0], minlength=8), p1)
    assert _chi2_ok(np.bincount(toks[:, 1], minlength=8), m2)
    assert _chi2_ok(np.bincount(toks[:, 2], minlength=8), m3)


def test_the_chi_square_check_can_fail():
  rng = np.random.default_rng(0)
  p = np.array([0.5, 0.3, 0.2])
  assert not _chi2_ok(np.bincount(rng.choice(3, 20000, p=[0.45, 0.35, 0.2]), minlength=3), p)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("value, msg", [
    ({"method": "ngram", "k": 0}, "k must be an integer from 1 to 16"),
    ({"method": "ngram", "k": 17}, "k must be an integer from 1 to 16"),
    ({"method": "ngram", "n": 9}, "n must be an integer from 1 to 8"),
    ("ngram:n=2,min_n=3", "min_n must be an integer from 1 to 2"),
    ({"method": "eagle"}, "method must be one of"),
    ({"k": 3}, "'method' is required"),
    ({"method": "ngram", "depth": 3}, "unknown field(s) ['depth']"),
    ("ngram:k=x", "k must be an integer, got 'x'"),
    ("ngram:q=3", "cannot read 'q=3'"),
    ("draft:k=4", "needs a draft model"),
    (3, "expected a dict, a string or a Speculation"),
])
def test_bad_settings_are_clear_errors(value, msg):
  with pytest.raises(ValueError, match=None) as err:
    fdjax.generate(tiny_model(), [[1, 2, 3]], max_new_tokens=4, speculative=value)
  assert msg in str(err.value)


def test_a_draft_with_another_vocabulary_or_larger_is_refused():
  target = tiny_model(num_layers=1)
  with pytest.raises(ValueError, match="vocabulary has 50 tokens, the target's 97"):
    fdjax.generate(target, [[1, 2]], max_new_tokens=4,
                   speculative={"method": "draft", "model": tiny_model(vocab_size=50)})
  with pytest.raises(ValueError, match="is larger than the target"):
    fdjax.generate(target, [[1, 2]], max_new_tokens=4,
                   speculative={"method": "draft", "model": tiny_model(num_layers=3)})


def test_a_draft_with_another_tokenizer_is_refused():
  class Tok:
    def __init__(self, vocab):
      self.vocab = vocab

    def get_vocab(self):
      return self.vocab

  spec = speculative.parse({"method": "draft", "model": tiny_model(num_layers=1)})
  with pytest.raises(ValueError, match="draft's tokenizer differs"):
    speculative.check_draft(spec, tiny_model(), Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}))
  speculative.check_draft(spec, tiny_model(), Tok({"a": 0}), Tok({"a": 0}))


def test_ngram_proposals():
  seq = jnp.asarray([[5, 6, 7, 8, 9, 5, 6, -1, -1, -1],     # "5 6" seen before: 7 8 9
                     [1, 2, 1, 2, 1, 2, -1, -1, -1, -1],    # latest earlier "1 2" is at 2
                     [3, 4, 5, 6, -1, -1, -1, -1, -1, -1]])  # no earlier match at all
  drafts, count = spec_steps.ngram_propose(seq, jnp.asarray([7, 6, 4]), k=3, n=2)
  np.testing.assert_array_equal(count, [3, 2, 0])
  np.testing.assert_array_equal(drafts[0], [7, 8, 9])
  np.testing.assert_array_equal(drafts[1, :2], [1, 2])
  # only a 1-gram matches "... 9 2 | 7 2": taken with min_n=1, not with the default min_n = n
  seq = jnp.asarray([[7, 2, 5, 9, 2, -1]])
  assert int(spec_steps.ngram_propose(seq, jnp.asarray([5]), 3, 2, 1)[1][0]) == 3
  assert int(spec_steps.ngram_propose(seq, jnp.asarray([5]), 3, 2, 2)[1][0]) == 0
  assert speculative.parse("ngram:k=2,n=3").low == 3
  assert speculative.parse("ngram:k=2,n=3,min_n=1").label == "ngram:k=2,n=3,min_n=1"


# ------------------------------------------------------------------- the serving engine

# The engine tests' one setting (each setting is its own set of compiled programs: sharing
# one, the tests of this file share their programs)
ENGINE = dict(max_batch=4, page_size=16, max_model_len=64, prefill_chunk=16, steps_per_call=3)


def _engine_run(model, prompts, spec, **req_kw):
  from fdjax.engine import core, request
  from fdjax.io.tokenizer import ByteTokenizer
  engine = core.Engine(model, ByteTokenizer(), **ENGINE, speculative=spec)
  reqs = []
  for i, p in enumerate(prompts):
    kw = {key: (v[i] if isinstance(v, list) else v) for key, v in req_kw.items()}
    events = []
    r = request.Request(list(p), 20, on_event=events.append, **kw)
    r.events = events
    engine.submit(r)
    reqs.append(r)
  for _ in range(2000):
    if engine.idle():
      break
    engine.step()
  assert engine.idle()
  engine.kv.pool.check()
  assert engine.kv.pool.pages_in_use == 0
  return engine, reqs


@pytest.mark.parametrize("method", ["draft"])  # n-gram: the sampling and served tests below
def test_engine_speculation_is_greedy_exact_with_logprobs_and_penalties(method):
  """Six requests through four rows (continuous batching: some join mid-way), greedy, with
  logprobs and, on two of them, a repetition penalty: the tokens are those of the engine
  without speculation, the logprobs the same to 1e-4."""
  model = tiny_model(seed=2, vocab_size=256)
  draft = tiny_model(seed=3, vocab_size=256, num_layers=1)
  rng = np.random.default_rng(3)
  motif = rng.integers(0, 256, 9).tolist()
  prompts = [motif * 3, rng.integers(0, 256, 5).tolist(), motif + motif[:3],
             rng.integers(0, 256, 30).tolist(), motif * 2 + [7], [1, 2, 1, 2, 1]]
  penalty = [1.0, 1.3, 1.0, 1.0, 1.2, 1.0]
  spec = ({"method": "ngram", "k": 3, "n": 2} if method == "ngram" else
          {"method": "draft", "k": 3, "model": draft})
  _, plain = _engine_run(model, prompts, None, logprobs=True, repetition_penalty=penalty)
  engine, got = _engine_run(model, prompts, spec, logprobs=True, repetition_penalty=penalty)
  for a, b in zip(plain, got):
    assert b.tokens == a.tokens and b.finish_reason == a.finish_reason == "length"
    la = [x.logprob for e in a.events for x in e.logprobs]
    lb = [x.logprob for e in b.events for x in e.logprobs]
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4)
  d = engine.scheduler.decoder
  assert d.accepted > 0 and d.drafted > d.accepted and d.verified > 0
  if method == "draft":
    engine.scheduler.decoder.draft.kv.pool.check()
    assert engine.scheduler.decoder.draft.kv.pool.pages_in_use == 0


def test_engine_speculation_samples_with_seeds_and_stops_at_eos():
  """Sampled requests (seeded) give the same tokens twice; EOS and stop strings end rows
  inside a round; a request that is cancelled gives back its pages."""
  model = tiny_model(seed=2, vocab_size=256)
  prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9], [1, 2, 3]]
  spec = {"method": "ngram", "k": 3, "n": 2}
  _, a = _engine_run(model, prompts, spec, temperature=0.9, seed=[1, 2, 3])
  _, b = _engine_run(model, prompts, spec, temperature=0.9, seed=[1, 2, 3])
  assert [r.tokens for r in a] == [r.tokens for r in b]
  assert all(len(r.tokens) == 20 for r in a)
  # an EOS from the middle of row 0's output ends it there
  from fdjax.engine import core, request
  from fdjax.io.tokenizer import ByteTokenizer
  eos = a[0].tokens[5]
  cut = a[0].tokens.index(eos)
  engine = core.Engine(model, ByteTokenizer(), **ENGINE, speculative=spec, eos_token_ids=eos)
  r = request.Request(prompts[0], 20, temperature=0.9, seed=1)
  engine.submit(r)
  while not engine.idle():
    engine.step()
  assert r.tokens == a[0].tokens[:cut + 1] and r.finish_reason == "stop"


def test_engine_with_a_grammar_request_in_a_speculative_batch():
  """A constrained request drafts nothing and still keeps its grammar; the others speculate."""
  pytest.importorskip("llguidance")
  from fdjax.engine import grammar
  from fdjax.io.tokenizer import ByteTokenizer
  model = tiny_model(seed=2, vocab_size=256)
  vocab = grammar.Vocabulary(ByteTokenizer(), 256, ())
  constraint = grammar.Constraint(vocab, vocab.compile("regex", "(yes|no)"))
  prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9]]
  engine, reqs = _engine_run(model, prompts, {"method": "ngram", "k": 3, "n": 2},
                             constraint=[constraint, None])
  assert bytes(t for t in reqs[0].tokens if t < 256).decode() in ("yes", "no")
  assert reqs[0].finish_reason == "stop"
  assert len(reqs[1].tokens) == 20


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_served_speculative_completions_and_metrics():
  """`fdjax serve --speculative ngram:k=4`: greedy completions, streamed or not, are the bundled
  model's own greedy tokens, and /metrics counts the drafts."""
  pytest.importorskip("openai")
  from fdjax.io import loading
  from tests.test_server import _metrics, _start, _stop
  model, tok, template, name = loading.load(None, chat_template=True)[:4]
  s = _start(model, tok, template, name, speculative="ngram:k=4,n=3")
  try:
    prompt = "    if self.verbose:\n        self.log('a')\n    if self.verbose:\n"
    want = tok.decode(fdjax.generate(model, [tok.encode(prompt)], max_new_tokens=40).tokens[0])
    r = s.client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in s.client.completions.create(
        model=name, prompt=prompt, max_tokens=40, temperature=0, stream=True))
    assert streamed == want
    m = _metrics(s)
    assert m["fdjax_spec_draft_tokens_total"] > m["fdjax_spec_accepted_tokens_total"] > 0
    assert 0 < m["fdjax_spec_mean_accepted_length"] <= 4
  finally:
    _stop(s)


def test_serve_flags_are_checked():
  import os
  import subprocess
  import sys
  root = __file__.rsplit("/tests/", 1)[0]
  r = subprocess.run([sys.executable, "-m", "fdjax", "serve", "--num-speculative-tokens", "3",
                      "--port", "0", "--compile-cache", "off"], capture_output=True, text=True,
                     cwd=root, timeout=300,
                     env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and "--num-speculative-tokens needs --speculative" in r.stderr


def test_quantized_target_and_draft_and_a_table_shorter_than_a_round():
  """int8 weights on both models (sizes counted through the quantized weights), and a cache
  whose page table is shorter than k + 1 positions until it is widened."""
  target = fdjax.quantize(tiny_model(seed=5), "int8")
  draft = fdjax.quantize(tiny_model(seed=6, num_layers=1), "int8")
  speculative.check_draft(speculative.parse({"method": "draft", "model": draft}), target)
  with pytest.raises(ValueError, match="is larger than the target"):
    speculative.check_draft(speculative.parse({"method": "draft", "model": target}), draft)
  short = fdjax.generate(target, [[1, 2, 3]], max_new_tokens=4, page_size=4)
  assert fdjax.generate(target, [[1, 2, 3]], max_new_tokens=4, page_size=4,
                        speculative="ngram:k=8,n=1").tokens == short.tokens


def test_a_draft_on_another_mesh_than_the_target_is_refused():
  """(Speculation on a mesh itself: tests/test_sharding.py.)"""
  from types import SimpleNamespace
  draft = SimpleNamespace(mesh=object())
  for where in (tiny_model(seed=5), SimpleNamespace(mesh=object())):
    with pytest.raises(ValueError, match="the draft model is on another mesh than the target"):
      speculative.check_draft(speculative.parse({"method": "draft", "model": draft}), where)
  speculative.check_draft(speculative.parse("ngram:k=2"), SimpleNamespace(mesh=object()))


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_engine_warmup_covers_every_speculative_program():
  """--warmup with a draft model, small pages and k = 8: every program compiled first, none
  traced while requests of every length then run."""
  from fdjax.engine import core, request, steps
  from fdjax.io.tokenizer import ByteTokenizer
  model = tiny_model(seed=2, vocab_size=256)
  draft = tiny_model(seed=3, vocab_size=256, num_layers=1)
  engine = core.Engine(model, ByteTokenizer(), max_batch=1, page_size=8, max_model_len=32,
                       prefill_chunk=16, steps_per_call=2,
                       speculative={"method": "draft", "k": 8, "model": draft})
  engine.warmup()
  before = dict(steps.TRACE_COUNT)
  rng = np.random.default_rng(0)
  for n in (1, 7, 20):
    r = request.Request(rng.integers(0, 256, n).tolist(), 32 - n, temperature=0.5, seed=n)
    engine.submit(r)
  while not engine.idle():
    engine.step()
  assert dict(steps.TRACE_COUNT) == before
