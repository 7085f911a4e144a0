"""The OpenAI API's fields as clients use them, against a live `fdjax serve` (uvicorn on
127.0.0.1) with the official `openai` client: logprobs (completions and chat, streamed and
not) equal to the bundled model's own log-softmax, echo with max_tokens 0 (lm-eval's
loglikelihood request), token-id prompts and batches, n choices sharing one prefill, the
penalties, logit_bias, min_tokens and ignore_eos, int64 seeds, and the field policy (ignored
extras, unsupported fields named, --strict-fields, 415, JSON 404s, 4xx counted by reason)."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from fdjax.io import loading  # noqa: E402
from tests.test_server import _metrics, _start, _stop, _wait_idle  # noqa: E402

# A live server's minutes: apart from the README's command (its 15 minutes), in CI's second
# step.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s():
  srv = _start(*loading.load(None, chat_template=True)[:4])
  graph, state = nnx.split(srv.model)
  srv.forward = jax.jit(lambda st, ids: nnx.merge(graph, st)(ids))
  srv.state = state
  yield srv
  _stop(srv)


def _log_softmax(s, tokens) -> np.ndarray:
  """[len(tokens), V]: the bundled model's logprobs of the next token after each prefix
  (a full forward, right-padded to 128: causal)."""
  ids = np.zeros((1, 128), np.int32)
  ids[0, :len(tokens)] = tokens
  x = np.asarray(s.forward(s.state, jnp.asarray(ids))[0, :len(tokens)], np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _post(s, path, body, **headers):
  import httpx2
  return httpx2.post(s.url + path, content=json.dumps(body).encode(),
                     headers={"content-type": "application/json", **headers})


# ---------------------------------------------------------------------------- logprobs

def test_completion_logprobs_are_the_models_streamed_or_not(s):
  prompt = "def parse(line):\n"
  ask = dict(model=s.name, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
  r = s.client.completions.create(**ask)
  lp = r.choices[0].logprobs
  ids = s.tok.encode(prompt)
  out = [t[0] for t in [s.tok.encode(x) for x in lp.tokens]]
  assert "".join(lp.tokens) == r.choices[0].text  # one byte per token, all ASCII here
  want = _log_softmax(s, ids + out)[len(ids) - 1:]
  for j, t in enumerate(out):
    assert abs(lp.token_logprobs[j] - want[j, t]) < 1e-4
    assert t == int(np.argmax(want[j]))  # greedy
    top = sorted(lp.top_logprobs[j].items(), key=lambda kv: -kv[1])
    assert [s.tok.encode(k)[0] for k, _ in top[:3]] == np.argsort(-want[j])[:3].tolist()
  assert lp.text_offset == list(range(10))
  chunks = list(s.client.completions.create(**ask, stream=True))
  streamed = [x for c in chunks for x in (c.choices[0].logprobs.token_logprobs
                                          if c.choices[0].logprobs else [])]
  np.testing.assert_allclose(streamed, lp.token_logprobs, atol=1e-5)


def test_sampled_tokens_logprobs_are_the_models_or_processed_with_the_flag(s, monkeypatch,
                                                                          capsys):
  """A sampled request (temperature, top_k, presence_penalty): its logprobs are the model's
  (raw_logprobs, the default, as vLLM's); with --logprobs-mode processed_logprobs those of
  the distribution each token was drawn from. A mode fdjax does not know stops
  `fdjax serve` before the model loads."""
  prompt = "class Parser:\n"
  ids = s.tok.encode(prompt)
  ask = dict(model=s.name, prompt=prompt, max_tokens=8, temperature=0.8, seed=11,
             presence_penalty=1.5, logprobs=5, extra_body={"top_k": 4})

  def byte(name):  # the bundled model's tokens are bytes: "x", or "bytes:\\xNN" for a lone one
    return int(name[8:], 16) if name.startswith("bytes:") else name.encode()[0]

  def run():
    lp = s.client.completions.create(**ask).choices[0].logprobs
    out = [byte(x) for x in lp.tokens]
    return lp, out, _log_softmax(s, ids + out)[len(ids) - 1:]

  lp, out, want = run()
  for j, t in enumerate(out):
    assert abs(lp.token_logprobs[j] - want[j, t]) < 1e-4
    assert len(lp.top_logprobs[j]) == 5  # the model's top 5, not the 4 top_k keeps
  monkeypatch.setattr(s.server, "logprobs_mode", "processed_logprobs")
  lp, out, want = run()  # the same seed: the same tokens
  for j, t in enumerate(out):
    x = want[j].copy()
    x[list(set(out[:j]))] -= 1.5  # presence: once per token generated before
    x = np.where(x >= np.sort(x)[-4], x / 0.8, -np.inf)
    x = x - x.max() - np.log(np.exp(x - x.max()).sum())
    assert abs(lp.token_logprobs[j] - x[t]) < 1e-4
    assert sorted(byte(k) for k in lp.top_logprobs[j]) == sorted(np.argsort(-x)[:4])
  from fdjax import cli
  assert cli.main(["serve", "--logprobs-mode", "raw", "--compile-cache", "off"]) == 2
  assert "logprobs_mode must be one of raw_logprobs, processed_logprobs" in capsys.readouterr().err


def test_echo_with_max_tokens_zero_gives_the_prompts_logprobs_as_lm_eval_asks(s):
  context, continuation = "import os\nimport ", "sys\n"
  ids = s.tok.encode(context + continuation)
  # lm-eval's local-completions loglikelihood: token ids, echo, max_tokens 0 (or 1), logprobs 1
  r = s.client.completions.create(model=s.name, prompt=[ids, ids[:-2]], max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
  assert [c.index for c in r.choices] == [0, 1]
  lp = r.choices[0].logprobs
  assert r.choices[0].text == context + continuation and lp.token_logprobs[0] is None
  want = _log_softmax(s, ids)
  np.testing.assert_allclose(lp.token_logprobs[1:], [want[i - 1, t] for i, t in
                                                    enumerate(ids) if i], atol=1e-4)
  ctx = len(s.tok.encode(context))
  greedy = all(max(top, key=top.get) == tok for tok, top in
               zip(lp.tokens[ctx:], lp.top_logprobs[ctx:]))
  assert greedy == all(int(np.argmax(want[i - 1])) == ids[i] for i in range(ctx, len(ids)))
  assert len(r.choices[1].logprobs.tokens) == len(ids) - 2
  assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 2 * len(ids) - 2
  one = s.client.completions.create(model=s.name, prompt=ids, max_tokens=1, echo=True,
                                    logprobs=1, temperature=0).choices[0].logprobs
  assert len(one.tokens) == len(ids) + 1
  np.testing.assert_allclose(one.token_logprobs[1:-1], lp.token_logprobs[1:], atol=1e-5)


def test_logprobs_name_a_piece_of_a_character_by_its_bytes_and_offsets_count_characters(s):
  """Byte tokens of "é€x": a lone byte of a character is "bytes:\\xNN" (no two tokens share a
  name in top_logprobs), its offset is where its character begins in the text; streamed
  chunks carry the count on."""
  ask = dict(model=s.name, prompt="\u00e9\u20acx", max_tokens=3, temperature=0, echo=True,
             logprobs=5)
  lp = s.client.completions.create(**ask).choices[0].logprobs
  assert lp.tokens[:6] == ["bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe2", "bytes:\\x82",
                           "bytes:\\xac", "x"]
  assert lp.text_offset[:7] == [0, 0, 1, 1, 1, 2, 3]
  for j, top in enumerate(lp.top_logprobs[1:], 1):
    assert len(top) >= 5 and top[lp.tokens[j]] == pytest.approx(lp.token_logprobs[j], abs=1e-5)
  chunks = list(s.client.completions.create(**ask, stream=True))
  streamed = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
  assert streamed == lp.text_offset
  chat = s.client.chat.completions.create(
      model=s.name, messages=[{"role": "user", "content": "caf\u00e9"}], max_tokens=6,
      temperature=0, logprobs=True, top_logprobs=2, extra_body={"guided_regex": "\u20ac+"})
  for c in chat.choices[0].logprobs.content:
    assert c.token == "bytes:" + "".join(f"\\x{b:02x}" for b in c.bytes)
    assert bytes(c.bytes) in (b"\xe2", b"\x82", b"\xac")


def test_chat_logprobs_and_top_logprobs_streamed_or_not(s):
  ask = dict(model=s.name, messages=[{"role": "user", "content": "add two numbers"}],
             max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
  r = s.client.chat.completions.create(**ask)
  content = r.choices[0].logprobs.content
  assert "".join(c.token for c in content) == r.choices[0].message.content
  for c in content:
    assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
    assert abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6 and bytes(c.bytes) == c.token.encode()
  chunks = list(s.client.chat.completions.create(**ask, stream=True))
  streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
              for c in ch.choices[0].logprobs.content]
  assert [c.token for c in streamed] == [c.token for c in content]
  plain = s.client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None})
  assert plain.choices[0].logprobs is None


# ------------------------------------------------------------- n, prompts, sampling

def test_n_choices_share_one_prefill_streamed_or_not(s):
  prompt = "class Parser:\n    def __init__(self, text):\n        "
  before = s.engine.kv.pool.prefix_hit_tokens
  r = s.client.completions.create(model=s.name, prompt=prompt, max_tokens=12, n=4,
                                  temperature=1.0, seed=11)
  assert [c.index for c in r.choices] == [0, 1, 2, 3]
  assert len({c.text for c in r.choices}) > 1
  full = len(s.tok.encode(prompt)) - 1  # the last prompt token is always computed
  assert s.engine.kv.pool.prefix_hit_tokens - before >= 3 * (full // s.engine.page_size * 16)
  assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 48
  again = s.client.completions.create(model=s.name, prompt=prompt, max_tokens=12, n=4,
                                      temperature=1.0, seed=11)
  assert [c.text for c in again.choices] == [c.text for c in r.choices]
  # the prompt's whole pages came from the prefix cache, counted once (not per choice)
  held = full // s.engine.page_size * s.engine.page_size
  assert again.usage.prompt_tokens_details.cached_tokens == held > 0
  # seed 12's first choice is not seed 11's second (each choice's seed is its own draw)
  other = s.client.completions.create(model=s.name, prompt=prompt, max_tokens=12, n=1,
                                      temperature=1.0, seed=12)
  assert other.choices[0].text != r.choices[1].text
  chunks = list(s.client.completions.create(model=s.name, prompt=prompt, max_tokens=12, n=4,
                                            temperature=1.0, seed=11, stream=True))
  texts = ["", "", "", ""]
  for c in chunks:
    texts[c.choices[0].index] += c.choices[0].text
  assert texts == [c.text for c in r.choices]
  assert sum(1 for c in chunks if c.choices[0].finish_reason == "length") == 4
  chat = s.client.chat.completions.create(model=s.name, n=2, max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
  assert len(chat.choices) == 2 and chat.choices[0].message.content == \
      chat.choices[1].message.content


def test_token_id_prompts_batch_and_strings_agree(s):
  prompts = ["for x in ", "while "]
  ids = [s.tok.encode(p) for p in prompts]
  by_text = s.client.completions.create(model=s.name, prompt=prompts, max_tokens=6,
                                        temperature=0)
  by_ids = s.client.completions.create(model=s.name, prompt=ids, max_tokens=6, temperature=0)
  one = s.client.completions.create(model=s.name, prompt=ids[1], max_tokens=6, temperature=0)
  assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
  assert one.choices[0].text == by_ids.choices[1].text
  chunks = list(s.client.completions.create(model=s.name, prompt=ids, max_tokens=6,
                                            temperature=0, stream=True))
  assert {c.choices[0].index for c in chunks} == {0, 1}


def test_penalties_bias_min_tokens_and_ignore_eos_through_the_api(s):
  ask = dict(model=s.name, prompt="x = [1, 1, 1, 1, ", max_tokens=12, temperature=0)
  plain = s.client.completions.create(**ask).choices[0].text
  forced = s.client.completions.create(**ask, logit_bias={str(ord("7")): 100}).choices[0].text
  assert forced == "7" * 12
  first = plain[0]
  banned = s.client.completions.create(**ask, logit_bias={str(ord(first)): -100}).choices[0].text
  assert banned[0] != first
  penalised = s.client.completions.create(**ask, frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"repetition_penalty": 1.5})
  text = penalised.choices[0].text
  assert text != plain and len(text) == 12
  rest = s.client.completions.create(**ask, extra_body={"min_tokens": 4, "ignore_eos": True})
  assert rest.choices[0].text == plain  # no EOS in the bundled model: nothing changes
  sampled = {**ask, "temperature": 0.8}
  assert s.client.completions.create(**sampled, seed=-5).choices[0].text == \
      s.client.completions.create(**sampled, seed=-5).choices[0].text
  s.client.completions.create(**sampled, seed=2 ** 62)


# ------------------------------------------------------------------------ the fields

def test_ignored_extras_pass_unsupported_fields_are_named_and_strict_refuses(s):
  ok = _post(s, "/v1/completions", {"model": s.name, "prompt": "a", "max_tokens": 2,
                                    "store": False, "metadata": {"a": "b"}, "user": "u",
                                    "service_tier": "auto", "stream": True,
                                    "stream_options": {"include_usage": True,
                                                       "continuous_usage_stats": True}})
  assert ok.status_code == 200
  events = [json.loads(line[6:]) for line in ok.text.splitlines()
            if line.startswith("data: {")]
  assert all("usage" in e for e in events) and events[-1]["usage"]["completion_tokens"] == 2
  # include_usage alone: every chunk has "usage", null until the last (OpenAI's chunks)
  plain = _post(s, "/v1/completions", {"model": s.name, "prompt": "a", "max_tokens": 2,
                                       "stream": True, "stream_options": {"include_usage": True}})
  events = [json.loads(line[6:]) for line in plain.text.splitlines()
            if line.startswith("data: {")]
  assert [e["usage"] is None for e in events] == [True] * (len(events) - 1) + [False]
  assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # 1 token
  for body, field in [({"functions": [{"name": "f"}]}, "functions"),
                      ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
                      ({"audio": {}}, "audio")]:
    r = _post(s, "/v1/chat/completions", {"model": s.name, "messages": [
        {"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert "not supported" in r.json()["error"]["message"]
  r = _post(s, "/v1/chat/completions", {"model": s.name, "messages": [
      {"role": "user", "content": "x"}], "max_tokens": 1, "tools": [], "modalities": ["text"]})
  assert r.status_code == 200
  s.server.strict_fields = True
  try:
    r = _post(s, "/v1/completions", {"model": s.name, "prompt": "a", "store": False})
    assert r.status_code == 400 and "unknown field 'store'" in r.json()["error"]["message"]
  finally:
    s.server.strict_fields = False


def test_content_type_paths_models_and_rejections_counted(s):
  import httpx2
  before = _metrics(s)
  r = httpx2.post(s.url + "/v1/completions", content=b'{"model": "x", "prompt": "a"}',
                  headers={"content-type": "text/plain"})
  assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
  r = httpx2.get(s.url + "/v1/nothing")
  assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
  assert httpx2.get(s.url + "/v1/completions").status_code == 405
  assert s.client.models.retrieve(s.name).id == s.name
  with pytest.raises(openai.NotFoundError):
    s.client.models.retrieve("gpt-4")
  with pytest.raises(openai.NotFoundError) as e:
    s.client.completions.create(model="gpt-4", prompt="a")
  assert e.value.body["code"] == "model_not_found"
  with pytest.raises(openai.BadRequestError):
    s.client.completions.create(model=s.name, prompt="a", extra_body={"colour": 1})
  with pytest.raises(openai.BadRequestError):
    s.client.chat.completions.create(model=s.name, messages=[{"role": "user", "content": "a"}],
                                     top_logprobs=2)
  _wait_idle(s)
  after = _metrics(s)
  delta = lambda k: after.get(k, 0) - before.get(k, 0)
  assert delta("fdjax_requests_rejected_total[unsupported_media_type]") == 1
  assert delta("fdjax_requests_rejected_total[not_found]") == 1
  assert delta("fdjax_requests_rejected_total[method_not_allowed]") == 1
  assert delta("fdjax_requests_rejected_total[model_not_found]") == 2
  assert delta("fdjax_requests_rejected_total[unknown_field]") == 1
  assert delta("fdjax_requests_rejected_total[bad_request]") == 1


def test_a_warming_server_answers_health_503_and_serves_what_waited():
  import threading

  import httpx2

  from fdjax.serving import server
  model, tok, template, name = loading.load(None, chat_template=True)[:4]
  gate, calls = threading.Event(), []

  def progress(done, total):
    calls.append((done, total))
    if done == 1:
      gate.wait(60)  # held here until the test has seen the 503

  engine_args = dict(max_batch=1, max_model_len=32, prefill_chunk=16, page_size=16,
                     steps_per_call=4)
  from fdjax.engine import core as eng
  engine = eng.Engine(model, tok, **engine_args)
  srv = server.Server(engine, tok, template, name, warmup=True, progress=progress)
  uv, url = server.start_in_thread(srv)
  try:
    deadline = time.time() + 60
    while not calls and time.time() < deadline:
      time.sleep(0.02)
    r = httpx2.get(url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "warming up"
    assert r.json()["shapes"] == engine.shapes().count() and r.json()["shapes_compiled"] >= 1
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    answer = []
    t = threading.Thread(target=lambda: answer.append(client.completions.create(
        model=name, prompt="def ", max_tokens=3, temperature=0)))
    t.start()
    time.sleep(0.5)
    assert not answer  # it waits in the queue
    gate.set()
    t.join(120)
    assert answer and answer[0].usage.completion_tokens == 3
    assert httpx2.get(url + "/health").json() == {"status": "ok"}
    total = engine.shapes().count()
    assert calls == [(i, total) for i in range(1, total + 1)]
  finally:
    gate.set()
    uv.should_exit = True
    engine.stop()


def test_tokenize_and_detokenize_as_vllm_has_them(s):
  """vLLM's /tokenize (a prompt, or chat messages as chat renders them) and /detokenize."""
  r = _post(s, "/tokenize", {"model": s.name, "prompt": "def f(x):"}).json()
  assert r["tokens"] == s.tok.encode("def f(x):") and r["count"] == len(r["tokens"])
  assert r["max_model_len"] == s.engine.max_model_len and r["token_strs"] is None
  ask = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "hi"}]
  chat = _post(s, "/tokenize", {"messages": ask, "return_token_strs": True}).json()
  want = s.client.chat.completions.create(model=s.name, messages=ask, max_tokens=1)
  assert chat["count"] == want.usage.prompt_tokens == len(chat["token_strs"])
  assert "".join(chat["token_strs"]).startswith("# system: Be short.")
  assert _post(s, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "def f(x):"}
  for path, body, status, param in [
      ("/tokenize", {"prompt": "a", "messages": ask}, 400, "prompt"),
      ("/tokenize", {}, 400, "prompt"),
      ("/tokenize", {"prompt": "a", "max_tokens": 3}, 400, "max_tokens"),
      ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
      ("/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens"),
      ("/detokenize", {"tokens": "abc"}, 400, "tokens")]:
    got = _post(s, path, body)
    assert got.status_code == status and got.json()["error"]["param"] == param, (body, got.text)
