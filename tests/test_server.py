"""`fdjax serve` over HTTP: a real server (uvicorn, on 127.0.0.1 and a free port) talked to
with the official `openai` client. Greedy completions under concurrency equal generate's,
streams equal whole answers, stop strings, usage, chat templates as transformers renders
them, 64 clients with disconnects (no page leaks, /metrics agrees), bad input, a full queue,
and the README's one command."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import fdjax  # noqa: E402
from fdjax.engine import core as eng  # noqa: E402
from fdjax.io import loading  # noqa: E402
from fdjax.serving import server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(max_batch=16, max_queue=64, page_size=16, max_model_len=128, prefill_chunk=32,
              steps_per_call=8)


def _start(model, tok, template, name, lifespan="on", **engine_args):
  engine = eng.Engine(model, tok, **{**ENGINE, **engine_args})
  srv = server.Server(engine, tok, template, name)
  if lifespan == "on":
    uv, url = server.start_in_thread(srv)
  else:  # the engine is not started: requests stay queued until the test starts it
    uv, url = _start_without_lifespan(srv)
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
  return SimpleNamespace(engine=engine, server=srv, uv=uv, url=url, client=client, tok=tok,
                         model=model, name=name)


def _start_without_lifespan(srv):
  import uvicorn
  sock = server.bind("127.0.0.1", 0)
  uv = uvicorn.Server(uvicorn.Config(srv.app, log_level="warning", lifespan="off"))
  threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
  while not uv.started:
    time.sleep(0.02)
  return uv, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _stop(s):
  s.uv.should_exit = True
  s.engine.stop()


@pytest.fixture(scope="module")
def default():
  s = _start(*loading.load(None, chat_template=True)[:4])
  yield s
  _stop(s)


def _metrics(s) -> dict:
  import httpx2
  from prometheus_client.parser import text_string_to_metric_families
  text = httpx2.get(s.url + "/metrics").text
  out = {}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      key = sample.name + "".join(f"[{v}]" for v in sample.labels.values() if "." not in v)
      if "le" not in sample.labels:
        out[key] = sample.value
  return out


def _wait_idle(s, timeout=120):
  deadline = time.time() + timeout
  while not s.engine.idle() and time.time() < deadline:
    time.sleep(0.02)
  assert s.engine.idle()


PROMPTS = [f"def {name}(x):" for name in ("f", "fib", "parse_args", "main", "__init__")] + [
    "import os\nimport sys\n", "class Config:\n    ", "# Copyright 2024\n", "for i in range(",
    "    return ", "try:\n    import json\nexcept ImportError:", "x = [", "if __name__ == ",
    "def read(path, mode='r'):\n    with open(", "@property\ndef", "while True:\n        line"]


def _greedy(s, prompt, n):
  return s.tok.decode(fdjax.generate(s.model, [s.tok.encode(prompt)], max_new_tokens=n).tokens[0])


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_16_concurrent_greedy_completions_equal_generate_alone_streamed_or_not(default):
  s, n = default, 24
  assert len(set(PROMPTS)) == 16
  ask = lambda p: s.client.completions.create(model=s.name, prompt=p, max_tokens=n,
                                              temperature=0)

  def stream(p):
    chunks = list(s.client.completions.create(model=s.name, prompt=p, max_tokens=n,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    return chunks

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    whole = list(pool.map(ask, PROMPTS))
    streams = list(pool.map(stream, PROMPTS))
  for p, r, chunks in zip(PROMPTS, whole, streams):
    want = _greedy(s, p, n)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(p.encode()) and r.usage.completion_tokens == n
    assert r.usage.total_tokens == len(p.encode()) + n and r.model == s.name
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_stop_strings_end_the_text_before_them(default):
  s, n = default, 40
  prompt = "def parse_args(argv):\n"
  text = _greedy(s, prompt, n)
  stop = text[12:15]
  want = text[:text.index(stop)]
  tokens = fdjax.generate(s.model, [s.tok.encode(prompt)], max_new_tokens=n).tokens[0]
  used = min(k for k in range(n + 1) if stop in s.tok.decode(tokens[:k]))
  r = s.client.completions.create(model=s.name, prompt=prompt, max_tokens=n, temperature=0,
                                  stop=["\x01never", stop])
  assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
  assert r.usage.completion_tokens == used
  chunks = list(s.client.completions.create(model=s.name, prompt=prompt, max_tokens=n,
                                            temperature=0, stop=stop, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == want
  assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_is_seeded_and_the_bundled_chat_template_applies(default):
  s = default
  ask = lambda seed: s.client.completions.create(model=s.name, prompt="def f(", max_tokens=16,
                                                 temperature=0.9, top_p=0.95, seed=seed,
                                                 extra_body={"top_k": 40}).choices[0].text
  assert ask(3) == ask(3) != ask(4)
  messages = [{"role": "system", "content": "You write Python."},
              {"role": "user", "content": "a function\nthat adds"}]
  r = s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=8,
                                       temperature=0)
  prompt = "# system: You write Python.\n# user: a function\n# that adds\n# assistant:\n"
  assert r.usage.prompt_tokens == len(prompt.encode())
  assert r.choices[0].message.content == _greedy(s, prompt, 8)
  assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_models_health_and_metrics_endpoints(default):
  import httpx2
  s = default
  assert [m.id for m in s.client.models.list().data] == ["fdjax-default"]
  assert httpx2.get(s.url + "/health").json() == {"status": "ok"}
  r = httpx2.get(s.url + "/metrics")
  assert r.headers["content-type"].startswith("text/plain")
  for name in ("fdjax_requests_finished_total", "fdjax_queue_length", "fdjax_running_requests",
               "fdjax_kv_pages_in_use", "fdjax_prefix_cache_hit_tokens_total",
               "fdjax_time_to_first_token_seconds_bucket",
               "fdjax_inter_token_latency_seconds_bucket", "fdjax_generation_tokens_total"):
    assert name in r.text


@pytest.mark.integration  # a load test (CI's integration step; the README's command: the rest)
def test_64_clients_with_disconnects_complete_free_their_pages_and_match_metrics(default):
  s = default
  _wait_idle(s)
  before = _metrics(s)
  rng = np.random.default_rng(0)
  plans = []
  for i in range(64):
    kind = ["whole", "stream", "whole", "leave"][i % 4]
    n = int(rng.integers(1, 8 if kind == "leave" else 80))
    prompt = "".join(chr(c) for c in rng.integers(32, 127, n))
    max_tokens = 120 if kind == "leave" else int(rng.integers(1, 128 - n))
    plans.append((kind, prompt, max_tokens, float(rng.choice([0.0, 0.8])), i))

  def client(plan):
    kind, prompt, max_tokens, temperature, seed = plan
    time.sleep(seed * 0.005)
    args = dict(model=s.name, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                seed=seed)
    if kind == "whole":
      r = s.client.completions.create(**args)
      return r.choices[0].text, r.choices[0].finish_reason, r.usage
    stream = s.client.completions.create(**args, stream=True,
                                         stream_options={"include_usage": True})
    text, reasons, usage = "", [], None
    for i, chunk in enumerate(stream):
      if kind == "leave" and i == 2:
        stream.close()  # hangs up mid-stream
        return None
      if chunk.choices:
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
      usage = chunk.usage or usage
    return text, reasons[-1], usage

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    results = list(pool.map(client, plans))
  _wait_idle(s)
  done = [(plan, r) for plan, r in zip(plans, results) if plan[0] != "leave"]
  for (kind, prompt, max_tokens, _, _), (text, reason, usage) in done:
    assert reason == "length" and usage.completion_tokens == max_tokens  # no EOS, no stop
    assert usage.prompt_tokens == len(prompt)
  left = sum(plan[0] == "leave" for plan in plans)
  pool_ = s.engine.kv.pool
  assert pool_.pages_in_use == 0
  pool_.check()
  after = _metrics(s)
  delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
  assert delta("fdjax_requests_finished_total[length]") == len(done)
  assert delta("fdjax_requests_finished_total[cancelled]") == left
  assert delta("fdjax_generation_tokens_total[length]") == sum(r[2].completion_tokens
                                                               for _, r in done)
  assert delta("fdjax_prompt_tokens_total[length]") == sum(r[2].prompt_tokens for _, r in done)
  assert delta("fdjax_requests_received_total") == 64
  assert len(done) <= delta("fdjax_time_to_first_token_seconds_count") <= 64
  assert after["fdjax_queue_length"] == after["fdjax_running_requests"] == 0
  assert after["fdjax_kv_pages_in_use"] == 0


@pytest.mark.parametrize("args,param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(prompt="x" * 200), "prompt"),
    (dict(prompt="x" * 100, max_tokens=100), "max_tokens"),
    (dict(stop=["a"] * 20), "stop"),
    (dict(extra_body={"colour": "blue"}), "colour"),
    (dict(extra_body={"top_k": -2}), "top_k"),
    (dict(n=0), "n"),
    (dict(n=65), "n"),
    (dict(extra_body={"suffix": "x"}), "suffix"),
    (dict(seed=2 ** 63), "seed"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"300": 1}), "logit_bias"),
    (dict(logprobs=21), "logprobs"),
    (dict(best_of=3), "best_of"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_tokens": -1}), "min_tokens"),
    (dict(extra_body={"ignore_eos": "yes"}), "ignore_eos"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=[1, 300]), "prompt"),
    (dict(prompt=[[1, 2], []]), "prompt"),
    (dict(prompt=["a", ""]), "prompt[1] is empty"),
    (dict(prompt=""), "prompt is empty (it encodes to no tokens)"),
])
def test_bad_completion_requests_get_a_400_naming_the_field(default, args, param):
  s = default
  call = {**dict(model=s.name, prompt="def f(x):", max_tokens=4), **args}
  with pytest.raises(openai.BadRequestError) as e:
    s.client.completions.create(**call)
  assert e.value.status_code == 400
  assert e.value.body["param"] == param.split()[0].split("[")[0]
  assert e.value.body["type"] == "invalid_request_error" and param in e.value.body["message"]


def test_malformed_bodies_and_bad_chat_requests_get_a_400(default):
  import httpx2
  s = default
  deep = '{"model": "fdjax-default", "prompt": "x", "x": ' + "[" * 300 + "]" * 300 + "}"
  for body, param, says in [(b"{not json", None, "not valid JSON"),
                            (b"[1, 2]", None, "a JSON object"),
                            (b'{"model": "fdjax-default"}', "prompt", "'prompt' is required"),
                            (deep.encode(), None, "nests 300 levels deep; at most 128")]:
    r = httpx2.post(s.url + "/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert says in r.json()["error"]["message"]
  for messages, says in [
      ("hello", "messages"), ([], "messages"),
      ([{"role": "user", "content": 5}], "messages"),
      ([{"role": "wizard", "content": "hi"}], "messages[0].role is 'wizard'"),
      ([{"role": "system", "content": "be brief"}, {"role": "user"}],
       "messages[1] (user) has no content"),
      ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
       "content[0] is a 'image_url' part; this server takes text parts only")]:
    with pytest.raises(openai.BadRequestError) as e:
      s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=4)
    assert e.value.body["param"] == "messages" and says in e.value.body["message"]


def test_text_parts_reach_the_template_joined_by_newlines():
  from fdjax.serving import api
  m = api.Message(role="user", content=[{"type": "text", "text": "Translate:"},
                                        {"type": "text", "text": "bonjour"}])
  assert m.for_template() == {"role": "user", "content": "Translate:\nbonjour"}


def test_past_tool_calls_reach_the_template_with_their_arguments_as_a_dict():
  """As vLLM passes them: transformers' tool-use templates write `arguments | tojson` (or
  iterate `arguments | items`), which a JSON string would double-encode (or break)."""
  from fdjax.io import chat
  from fdjax.serving import api

  def call(arguments):
    return {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}
  m = api.Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
      call('{"city": "Paris"}'), call(""), call("{not json"), call("[1]"), call({"a": 1})]})
  assert [c["function"]["arguments"] for c in m.for_template()["tool_calls"]] == [
      {"city": "Paris"}, {}, {}, {}, {"a": 1}]
  assert m.tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'  # the body's own
  template = chat.ChatTemplate("{% for m in messages %}{% for c in m.tool_calls %}"
                               "{{ c.function.arguments | tojson }}|"
                               "{% for k, v in c.function.arguments | items %}{{ k }}={{ v }}"
                               "{% endfor %}{% endfor %}{% endfor %}", {})
  assert template.render([api.Message.model_validate(
      {"role": "assistant", "tool_calls": [call('{"city": "Paris"}')]}).for_template()]) == \
      '{"city": "Paris"}|city=Paris'
  empty = api.Message.model_validate({"role": "assistant", "content": "hi", "tool_calls": []})
  assert empty.for_template() == {"role": "assistant", "content": "hi"}
  for key in ("reasoning", "reasoning_content"):  # a past turn's thinking: both names
    m = api.Message.model_validate({"role": "assistant", "content": "4", key: "2 + 2"})
    assert m.for_template() == {"role": "assistant", "content": "4", "reasoning": "2 + 2",
                                "reasoning_content": "2 + 2"}
  with pytest.raises(api.ApiError, match="tool_calls"):
    api.Message.model_validate({"role": "assistant", "tool_calls": ["x"]}).for_template()


def test_continue_final_message_leaves_the_last_message_open_as_transformers_does():
  from fdjax.io import chat
  t = chat.ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}", {})
  msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is "}]
  assert t.render(msgs, add_generation_prompt=False, continue_final_message=True) == \
      "<user>2+2?</s><assistant>It is "
  trims = chat.ChatTemplate("{% for m in messages %}{{ m.content | trim }}|{% endfor %}", {})
  assert trims.render(msgs, False, continue_final_message=True) == "2+2?|It is"
  drops = chat.ChatTemplate("{% for m in messages %}{{ m.content[:3] }}{% endfor %}", {})
  with pytest.raises(chat.TemplateError, match="leaves out part of the last message"):
    drops.render(msgs, False, continue_final_message=True)


def test_chat_template_variables_and_continuing_a_message_through_the_api(default):
  """vLLM's chat extras: add_generation_prompt, continue_final_message (the answer goes on
  from the assistant's last message) and chat_template_kwargs (Qwen3's enable_thinking);
  what the server sets itself cannot be set through them."""
  from fdjax.io import chat
  s = default
  ask = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}]
  count = lambda text: len(s.tok.encode(text, add_special_tokens=False))
  go_on = s.client.chat.completions.create(
      model=s.name, messages=ask, max_tokens=2,
      extra_body={"add_generation_prompt": False, "continue_final_message": True})
  assert go_on.usage.prompt_tokens == count("# user: 2+2?\n# assistant: It is")
  new_turn = s.client.chat.completions.create(model=s.name, messages=ask, max_tokens=2)
  assert new_turn.usage.prompt_tokens == count("# user: 2+2?\n# assistant: It is\n"
                                               "# assistant:\n")
  for extra, says in [({"continue_final_message": True}, "takes add_generation_prompt: false"),
                      ({"chat_template_kwargs": {"bos_token": "x", "messages": []}},
                       "cannot set bos_token, messages")]:
    with pytest.raises(openai.BadRequestError) as e:
      s.client.chat.completions.create(model=s.name, messages=ask, max_tokens=2,
                                       extra_body=extra)
    assert says in e.value.body["message"]
  with pytest.raises(openai.BadRequestError, match="continues an assistant's last message"):
    s.client.chat.completions.create(model=s.name, messages=ask[:1], max_tokens=2, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
  was = s.server.template
  try:
    s.server.template = chat.ChatTemplate(
        "{{ messages[-1].content }}{% if enable_thinking is false %} /no_think{% endif %}", {})
    think = lambda **kw: s.client.chat.completions.create(
        model=s.name, messages=ask[:1], max_tokens=1, extra_body=kw).usage.prompt_tokens
    assert think() == count("2+2?") and think(
        chat_template_kwargs={"enable_thinking": False}) == count("2+2? /no_think")
  finally:
    s.server.template = was


def test_top_k_minus_one_or_zero_is_off_as_in_vllm(default):
  s = default
  ask = dict(model=s.name, prompt="x = ", max_tokens=6, temperature=1.0, seed=3)
  off = s.client.completions.create(**ask).choices[0].text
  for k in (-1, 0):
    assert s.client.completions.create(**ask, extra_body={"top_k": k}).choices[0].text == off
  greedy = s.client.completions.create(**{**ask, "temperature": 0.0}).choices[0].text
  assert s.client.completions.create(**ask, extra_body={"top_k": 1}).choices[0].text == greedy
  assert off != greedy


def test_the_models_generation_config_is_the_default_sampling_as_in_vllm(default):
  """What a request leaves out (temperature, top_k, ...; a chat's max_tokens) is the model's
  generation_config.json's (Server.defaults, what `fdjax serve` reads), as vLLM serves it;
  what it gives wins, top_k -1 too (off). min_p 1 sampled is greedy."""
  s = default
  ask = dict(model=s.name, prompt="x = ", max_tokens=8, seed=3)
  text = lambda **kw: s.client.completions.create(**{**ask, **kw}).choices[0].text
  greedy, sampled = text(temperature=0.0), text()  # OpenAI's default: temperature 1
  assert sampled != greedy
  assert text(temperature=1.0, extra_body={"min_p": 1.0}) == greedy
  try:
    s.server.defaults = {"temperature": 0.0}
    assert text() == greedy and text(temperature=1.0) == sampled
    s.server.defaults = {"temperature": 1.0, "top_k": 1}
    assert text() == greedy and text(extra_body={"top_k": -1}) == sampled
    s.server.defaults = {"min_p": 1.0}
    assert text() == greedy and text(extra_body={"min_p": 0.0}) == sampled
    s.server.defaults = {"max_tokens": 3}
    chat = s.client.chat.completions.create(model=s.name, seed=1, messages=[
        {"role": "user", "content": "write a long story"}], extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
  finally:
    s.server.defaults = {}


def test_a_full_queue_is_refused_at_once_and_accepted_requests_are_answered():
  import httpx2
  model, tok, template, name = loading.load(None, chat_template=True)[:4]
  s = _start(model, tok, template, name, lifespan="off", max_batch=1, max_queue=3)
  try:
    args = dict(model=name, prompt="def f(x):", max_tokens=6, temperature=0)
    # More completions in one request than the queue holds: a 400 naming the limit (a 429
    # would be retried, and never succeed)
    with pytest.raises(openai.BadRequestError) as e:
      s.client.completions.create(**{**args, "prompt": ["a", "b"]}, n=2)
    assert e.value.body["param"] == "n" and "queues at most 3" in e.value.body["message"]
    # A client that gives up while its request waits: the request is cancelled.
    with pytest.raises(httpx2.TimeoutException):
      httpx2.post(s.url + "/v1/completions", json=args, timeout=0.5)
    deadline = time.time() + 10
    while not any(r.cancelled for r in s.engine._inbox) and time.time() < deadline:
      time.sleep(0.02)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      waiting = [pool.submit(s.client.completions.create, **args)]
      while s.engine.queue_length < 2:
        time.sleep(0.02)
      # n=2 where one place is left: refused whole (none of its choices queued, nor
      # counted received and then cancelled, nor holding the place a moment longer)
      with pytest.raises(openai.RateLimitError):
        s.client.completions.create(**args, n=2)
      assert s.engine.queue_length == 2
      waiting.append(pool.submit(s.client.completions.create, **args))
      while s.engine.queue_length < 3:
        time.sleep(0.02)
      t0 = time.perf_counter()
      with pytest.raises(openai.RateLimitError) as e:
        s.client.completions.create(**args)
      assert time.perf_counter() - t0 < 2.0
      assert e.value.status_code == 429 and "queue is full" in e.value.body["message"]
      s.engine.start()
      texts = [f.result(timeout=120).choices[0].text for f in waiting]
    assert texts == [_greedy(s, "def f(x):", 6)] * 2
    _wait_idle(s)
    assert s.engine.kv.pool.pages_in_use == 0
    m = _metrics(s)
    assert m["fdjax_requests_finished_total[cancelled]"] == 1
    assert m["fdjax_requests_finished_total[length]"] == 2
    assert m["fdjax_requests_received_total"] == 3
    assert m["fdjax_requests_rejected_total[queue_full]"] == 2
  finally:
    _stop(s)


def test_an_int8_server_answers_what_generate_gives_the_int8_model():
  from fdjax.ops.quant import QuantizedWeight
  s = _start(*loading.load(None, quantize="int8", chat_template=True)[:4], max_batch=2)
  try:
    assert isinstance(s.model.layers[0].attn.wqkv[...], QuantizedWeight)
    got = s.client.completions.create(model=s.name, prompt="import os", max_tokens=8,
                                      temperature=0)
    assert got.choices[0].text == _greedy(s, "import os", 8)
  finally:
    _stop(s)


# ------------------------------------------------------- a Llama-3-style checkpoint

@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  pytest.importorskip("transformers")
  from bench.tiny_llama3 import build
  path = build(str(tmp_path_factory.mktemp("llama3")))
  s = _start(*loading.load(path, chat_template=True)[:4], max_batch=4)
  s.path = path
  yield s
  _stop(s)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "  You answer in one line.\n"},
     {"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "return a + b"},
     {"role": "user", "content": "and multiply?"}],
]


def test_token_bytes_of_a_byte_level_tokenizer_are_what_it_decodes(llama3):
  """HFTokenizer.token_bytes on the Llama-3-style byte-level BPE: every token whose bytes are
  whole characters decodes to them, a text's tokens' bytes joined are its UTF-8 (pieces of a
  character included), and a special token is its text."""
  tok = llama3.tok
  whole = 0
  for i in range(tok.vocab_size):
    raw = tok.token_bytes(i)
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue
    if text.startswith("<|") and tok.decode([i]) == "":  # decoding skips special tokens
      continue
    assert tok.decode([i]) == text, i
    whole += 1
  assert whole > tok.vocab_size // 2
  for text in ["caf\u00e9 \u20ac\U0001f600", "def f(x):\n    return x"]:
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text, False)) == text.encode()
  assert tok.token_bytes(tok.encode("<|eot_id|>", False)[0]) == b"<|eot_id|>"


def test_the_chat_template_renders_as_transformers_does(llama3):
  import transformers

  from fdjax.io import chat
  hf = transformers.AutoTokenizer.from_pretrained(llama3.path)
  template = chat.load(llama3.path)
  for messages in CONVERSATIONS:
    for gen in (True, False):
      want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert template.render(messages, add_generation_prompt=gen) == want
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert llama3.tok.encode(template.render(messages), add_special_tokens=False) == ids


def test_named_templates_and_tools_render_as_transformers_does(llama3, tmp_path):
  # A "tool_use" template beside "default" is the one a request with tools renders with, and
  # tools / documents are None (not undefined) when not given: transformers' rules both.
  import shutil

  import transformers

  from fdjax.io import chat
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(llama3.path, name), tmp_path / name)
  with open(tmp_path / "tokenizer_config.json") as fh:
    config = json.load(fh)
  body = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
  config["chat_template"] = [
      {"name": "default", "template": "{% if tools is not none %}TOOLS{% endif %}"
                                      "{% if documents is none %}NODOCS{% endif %}" + body},
      {"name": "tool_use", "template": "{% for t in tools %}[{{ t.function.name }}]"
                                       "{% endfor %}" + body}]
  with open(tmp_path / "tokenizer_config.json", "w") as fh:
    json.dump(config, fh)
  offered = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for layout in ("tokenizer_config.json", "files"):  # transformers 5 writes them as files
    if layout == "files":
      hf.save_pretrained(tmp_path)
      assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").exists()
      hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = chat.load(tmp_path)
    for kw in ({}, {"tools": offered}):
      want = hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, **kw)
      assert template.render(CONVERSATIONS[1], add_generation_prompt=False, **kw) == want
    assert want.startswith("[add]<system>") and template.with_tools.startswith("{% for t")


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_chat_completions_on_the_llama3_checkpoint(llama3):
  import transformers
  s = llama3
  hf = transformers.AutoTokenizer.from_pretrained(s.path)
  eot = hf.convert_tokens_to_ids("<|eot_id|>")
  for messages in CONVERSATIONS:
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    tokens = fdjax.generate(s.model, [ids], max_new_tokens=12, eos_token_id=eot).tokens[0]
    ended = tokens[-1] == eot
    r = s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=12,
                                         temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    assert r.choices[0].message.content == s.tok.decode(tokens[:-1] if ended else tokens)
    assert r.choices[0].finish_reason == ("stop" if ended else "length")
    chunks = list(s.client.chat.completions.create(model=s.name, messages=messages,
                                                   max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        r.choices[0].message.content
  with pytest.raises(openai.BadRequestError) as e:  # the template's raise_exception
    s.client.chat.completions.create(model=s.name, max_tokens=4, messages=[
        {"role": "assistant", "content": "hi"}])
  assert e.value.body["param"] == "messages" and "alternate" in e.value.body["message"]


# ---------------------------------------------------------------- the command line

def _serve_once(port, cache, *extra):
  """`python -m fdjax serve` until a completion is answered: (seconds to /health 200, the
  /health statuses seen on the way, its output)."""
  import httpx2
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  t0 = time.time()
  proc = subprocess.Popen([sys.executable, "-m", "fdjax", "serve", "--port", str(port),
                           "--max-model-len", "64", "--compile-cache", cache, *extra], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  try:
    deadline = time.time() + 300
    while time.time() < deadline:
      try:
        r = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1)
        seen.append(r.json().get("status"))
        if r.status_code == 200:
          break
        time.sleep(0.1)
      except httpx2.TransportError:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    ready = time.time() - t0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    r = client.completions.create(model="fdjax-default", prompt="import ", max_tokens=5)
    assert r.usage.completion_tokens == 5
  finally:
    proc.terminate()
    out = proc.communicate(timeout=60)[0]
  return ready, seen, out


@pytest.mark.integration  # two `fdjax serve` processes (CI's integration step)
def test_the_readme_command_serves_and_a_missing_dependency_is_named(monkeypatch, tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  # A warm-up: the port is open at once, /health says so until every shape is compiled, and
  # the second start loads them all from the persistent compilation cache (nothing new).
  cache = str(tmp_path / "xla")
  args = ("--warmup", "--max-batch", "1", "--prefill-chunk", "16")
  _, seen, out = _serve_once(port, cache, *args)
  assert "fdjax serve: model 'fdjax-default'" in out
  assert "warming up" in seen and seen[-1] == "ok"
  assert "warming up [" in out and f"kept in {cache}" in out
  first = set(os.listdir(cache))
  assert first
  _, _, out = _serve_once(port, cache, *args)
  assert set(os.listdir(cache)) == first
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "uvicorn" else real(name, *a))
  with pytest.raises(ValueError, match="fdjax serve needs uvicorn"):
    server.check_dependencies()


def test_serve_with_the_compilation_cache_off_says_so(monkeypatch, capsys):
  """`fdjax serve --compile-cache off` (the on-demand compiles of a server without --warmup
  are the live-server tests' own): no persistent cache, and the first line says so."""
  import jax

  from fdjax import cli
  args = cli.build_parser().parse_args(["serve", "--compile-cache", "off", "--port", "0"])
  served, real_serve = [], server.serve
  monkeypatch.setattr(server, "serve", lambda model, **kw: served.append((model, kw)))
  was = jax.config.jax_enable_compilation_cache
  try:
    args.fn(args)
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
  assert "fdjax serve: no compilation cache (--compile-cache off)" in capsys.readouterr().out
  assert served and served[0][0] is None and served[0][1]["port"] == 0
  from fdjax.serving.cors import Cors
  assert served[0][1]["generation_config"] == "auto" and served[0][1]["cors"] == Cors()
  with pytest.raises(ValueError, match="--generation-config is 'auto', 'vllm' or a directory"):
    real_serve(generation_config="/nonexistent")  # before the model loads
