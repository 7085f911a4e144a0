"""Who may use `fdjax serve` and how much one request may ask: API keys (the official openai
client with a good, a wrong and no key; /health open; /metrics behind a key when asked), CORS
(browsers' preflights answered before the key, any origin by default, one when given), every
request limit refused at its bound plus one and accepted at its bound, and a hypothesis fuzz
of both endpoints' parser (wrong types, deep nesting, huge numbers, NaN / Infinity, lone
surrogates, duplicate keys): only 200 or 4xx, the engine alive, and a normal request
answered afterwards."""
import json

import pytest

openai = pytest.importorskip("openai")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fdjax.engine import core as eng  # noqa: E402
from fdjax.io import loading  # noqa: E402
from fdjax.serving import auth, cors, limits, server  # noqa: E402

# Minutes of a live server: apart from the README's command, in CI's second step.
pytestmark = pytest.mark.integration

LIMITS = limits.Limits(body_bytes=3000, prompts=3, n=2, logit_bias=2, stop=2, stop_chars=10,
                       top_logprobs=3, schema_bytes=300, schema_depth=6, tools=2)
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def s():
  model, tok, template, name = loading.load(None, chat_template=True)[:4]
  engine = eng.Engine(model, tok, max_batch=4, max_model_len=128, page_size=16,
                      prefill_chunk=32, steps_per_call=4)
  srv = server.Server(engine, tok, template, name, api_keys=KEYS, limits=LIMITS)
  uv, url = server.start_in_thread(srv)
  client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)
  from types import SimpleNamespace
  yield SimpleNamespace(url=url, client=client, name=name, engine=engine, server=srv)
  uv.should_exit = True
  engine.stop()


def _post(s, path, body, key=KEYS[0], raw=None):
  import httpx2
  headers = {"content-type": "application/json"}
  if key is not None:
    headers["authorization"] = f"Bearer {key}"
  return httpx2.post(s.url + path, content=raw if raw is not None else json.dumps(body).encode(),
                     headers=headers, timeout=120)


# ------------------------------------------------------------------------------ keys

def test_api_keys_good_wrong_and_missing(s):
  import httpx2
  for key in KEYS:
    c = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
    assert c.completions.create(model=s.name, prompt="a", max_tokens=2).usage.completion_tokens
    assert [m.id for m in c.models.list().data] == [s.name]
  wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="key-three", max_retries=0)
  with pytest.raises(openai.AuthenticationError) as e:
    wrong.completions.create(model=s.name, prompt="a", max_tokens=2)
  assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
  with pytest.raises(openai.AuthenticationError):
    wrong.models.list()
  r = _post(s, "/v1/chat/completions", {"model": s.name, "messages": []}, key=None)
  assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
  assert _post(s, "/v1/completions", {}, key="key-one-and-more").status_code == 401
  assert _post(s, "/tokenize", {"prompt": "a"}, key=None).status_code == 401  # vLLM's, too
  assert _post(s, "/tokenize", {"prompt": "a"}, key=KEYS[0]).json()["count"] == 1
  assert httpx2.get(s.url + "/health").json() == {"status": "ok"}
  assert httpx2.get(s.url + "/metrics").status_code == 200  # open unless asked
  text = httpx2.get(s.url + "/metrics").text
  assert 'fdjax_requests_rejected_total{reason="unauthorized"} 5.0' in text


def test_metrics_behind_the_key_and_keys_from_flags_and_environment():
  import httpx2
  model, tok, template, name = loading.load(None, chat_template=True)[:4]
  engine = eng.Engine(model, tok, max_batch=1, max_model_len=32, page_size=16,
                      prefill_chunk=16)
  srv = server.Server(engine, tok, template, name, api_keys=("k",), metrics_require_key=True,
                      cors=cors.Cors(allowed_origins=("http://ui.example",)))
  uv, url = server.start_in_thread(srv)
  try:
    assert httpx2.get(url + "/metrics").status_code == 401
    assert httpx2.get(url + "/metrics", headers={"authorization": "Bearer k"}).status_code == 200
    assert httpx2.get(url + "/health").status_code == 200
    # CORS for the one origin given: others' preflights are refused, and get no header.
    ok = httpx2.options(url + "/v1/models", headers=_preflight("http://ui.example"))
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx2.options(url + "/v1/models", headers=_preflight("http://evil.example"))
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    got = httpx2.get(url + "/v1/models", headers={"origin": "http://evil.example",
                                                  "authorization": "Bearer k"})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
  finally:
    uv.should_exit = True
    engine.stop()
  assert auth.keys_from(["a", "b", "a"], {"FDJAX_API_KEY": "c"}) == ("a", "b", "c")
  assert auth.keys_from(None, {}) == ()
  with pytest.raises(ValueError, match="empty"):
    auth.keys_from([""], {})
  assert not auth.allowed(b"Basic key-one", KEYS) and auth.allowed(b"bearer key-two", KEYS)


def _preflight(origin):
  return {"origin": origin, "access-control-request-method": "POST",
          "access-control-request-headers": "authorization, content-type"}


def test_browsers_may_call_it_from_any_origin_as_vllm_lets_them(s):
  """vLLM's CORS defaults: a preflight (no key: browsers send none) is answered, and every
  answer, a 401 too, lets any origin read it; the flags' values are JSON lists."""
  import httpx2
  pre = httpx2.options(s.url + "/v1/chat/completions", headers=_preflight("http://ui.example"))
  assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
  assert "POST" in pre.headers["access-control-allow-methods"]
  assert "authorization" in pre.headers["access-control-allow-headers"].lower()
  origin = {"origin": "http://ui.example"}
  denied = httpx2.post(s.url + "/v1/completions", json={}, headers=origin)
  assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"
  r = httpx2.post(s.url + "/v1/completions", json={"model": s.name, "prompt": "a",
                                                   "max_tokens": 2},
                  headers={**origin, "authorization": f"Bearer {KEYS[0]}"})
  assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
  assert cors.json_list('["http://a", "http://b"]') == ("http://a", "http://b")
  for bad in ("*", '"*"', "[1]", "{}"):
    with pytest.raises(ValueError, match="JSON list of strings"):
      cors.json_list(bad)


# ---------------------------------------------------------------------------- limits

def _nested(depth):
  """A JSON schema whose limits.depth() is `depth` (arrays of arrays ... of integers)."""
  schema = {"type": "integer"}
  while limits.depth(schema) < depth:
    schema = {"type": "array", "items": schema, "maxItems": 1}
  assert limits.depth(schema) == depth
  return schema


def _sized(size):
  """A JSON schema whose json.dumps is `size` bytes long."""
  schema = {"type": "string", "maxLength": 2, "description": ""}
  schema["description"] = "x" * (size - len(json.dumps(schema)))
  assert len(json.dumps(schema)) == size
  return schema


def _tools(k):
  return [{"type": "function", "function": {"name": f"f{i}", "parameters": {
      "type": "object", "properties": {}}}} for i in range(k)]


def _body_of(size):
  body = {"model": "fdjax-default", "prompt": "a", "max_tokens": 1, "user": ""}
  body["user"] = "u" * (size - len(json.dumps(body)))
  assert len(json.dumps(body)) == size
  return body


CHAT = [{"role": "user", "content": "a"}]
# (limit, path, body at the bound, body past it, the param named)
CASES = [
    ("prompts", "/v1/completions", {"prompt": ["a"] * 3}, {"prompt": ["a"] * 4}, "prompt"),
    ("n", "/v1/completions", {"prompt": "a", "n": 2}, {"prompt": "a", "n": 3}, "n"),
    ("n", "/v1/completions", {"prompt": "a", "n": 2, "best_of": 2},
     {"prompt": "a", "n": 3, "best_of": 3}, "n"),
    ("logit_bias", "/v1/completions", {"prompt": "a", "logit_bias": {"1": 1, "2": 1}},
     {"prompt": "a", "logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias"),
    ("stop", "/v1/completions", {"prompt": "a", "stop": ["x", "y"]},
     {"prompt": "a", "stop": ["x", "y", "z"]}, "stop"),
    ("stop_chars", "/v1/completions", {"prompt": "a", "stop": ["abcde", "fghij"]},
     {"prompt": "a", "stop": ["abcde", "fghijk"]}, "stop"),
    ("top_logprobs", "/v1/completions", {"prompt": "a", "logprobs": 3},
     {"prompt": "a", "logprobs": 4}, "logprobs"),
    ("top_logprobs", "/v1/chat/completions",
     {"messages": CHAT, "logprobs": True, "top_logprobs": 3},
     {"messages": CHAT, "logprobs": True, "top_logprobs": 4}, "top_logprobs"),
    ("schema_bytes", "/v1/completions", {"prompt": "a", "guided_json": _sized(300)},
     {"prompt": "a", "guided_json": _sized(301)}, "guided_json"),
    ("schema_depth", "/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": _nested(6)}}},
     {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": _nested(7)}}}, "response_format"),
    ("tools", "/v1/chat/completions", {"messages": CHAT, "tools": _tools(2)},
     {"messages": CHAT, "tools": _tools(3)}, "tools"),
]


@pytest.mark.parametrize("limit,path,ok,past,param", CASES,
                         ids=[f"{c[0]}-{c[1].split('/')[-1]}" for c in CASES])
def test_each_limit_refuses_its_bound_plus_one_and_takes_its_bound(s, limit, path, ok, past,
                                                                   param):
  base = {"model": s.name, "max_tokens": 2}
  r = _post(s, path, {**base, **ok})
  assert r.status_code == 200, r.text
  r = _post(s, path, {**base, **past})
  assert r.status_code == 400 and r.json()["error"]["param"] == param
  assert f"--max-{limits.flag(limit)}" in r.json()["error"]["message"]


def test_the_body_size_limit_is_a_413(s):
  assert _post(s, "/v1/completions", _body_of(LIMITS.body_bytes)).status_code == 200
  r = _post(s, "/v1/completions", _body_of(LIMITS.body_bytes + 1))
  assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]


def test_limits_are_checked_when_made():
  with pytest.raises(ValueError, match="--max-n"):
    limits.Limits(n=0)
  with pytest.raises(ValueError, match="at most 20"):
    limits.Limits(top_logprobs=21)


# ------------------------------------------------------------------------------ fuzz

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 63)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.sampled_from(["\ud800", "a\udfffb", "fdjax-default"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n",
           "stop", "stream", "stream_options", "seed", "logprobs", "top_logprobs", "echo",
           "logit_bias", "presence_penalty", "response_format", "tools", "tool_choice",
           "guided_regex", "guided_json", "min_tokens", "user", "\ud800"]
_bodies = st.one_of(
    st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6),
    st.fixed_dictionaries({"model": st.just("fdjax-default"), "prompt": _json,
                           "max_tokens": st.integers(-2, 3)}),
    st.fixed_dictionaries({"model": st.just("fdjax-default"), "messages": _json,
                           "max_tokens": st.integers(0, 3)}),
    _json)
FUZZ_SEED, FUZZ_RUNS = 20261204, 300


def _encode(body, deep):
  text = json.dumps(body, allow_nan=True)  # NaN / Infinity literals, \ud800 escapes
  if deep:
    text = "[" * deep + text + "]" * deep
  return text.encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_bodies_get_200_or_4xx_never_a_5xx(s, path):
  statuses = []

  @settings(max_examples=FUZZ_RUNS, deadline=None, derandomize=False, database=None,
            suppress_health_check=list(HealthCheck))
  @hypothesis.seed(FUZZ_SEED)
  @given(body=_bodies, deep=st.sampled_from([0, 0, 0, 5000]),
         dup=st.booleans())
  def run(body, deep, dup):
    raw = _encode(body, deep)
    if dup and raw.startswith(b"{") and len(raw) > 2:  # a duplicate key
      raw = b'{"model": 1, "model": "fdjax-default", ' + raw[1:]
    r = _post(s, path, None, raw=raw)
    statuses.append(r.status_code)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (raw[:300], r.text[:300])
    r.json() if r.headers["content-type"].startswith("application/json") else None

  run()
  assert len(statuses) >= FUZZ_RUNS // 2 and s.engine.alive
  assert any(400 <= c < 500 for c in statuses)
  r = s.client.completions.create(model=s.name, prompt="def f(", max_tokens=3)
  assert r.usage.completion_tokens == 3
  lone = _post(s, path, None, raw=b'{"model": "fdjax-default", "prompt": "a\\ud800", '
                                   b'"messages": [{"role": "user", "content": "\\ud800"}]}')
  assert lone.status_code == 400 and "lone surrogate" in lone.json()["error"]["message"]


# Bodies a review found to fail the whole engine (every request in flight), answer a 500 or
# write NaN into JSON: each is now a 400 naming its field, and the engine serves on.
_DEEP = "[" * 1200 + "]" * 1200  # json.loads: RecursionError
BREAKERS = [
    ({"prompt": "a", "top_k": 10 ** 10}, "top_k"),
    ({"prompt": "a", "min_tokens": 10 ** 10}, "min_tokens"),
    ({"prompt": "a", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "a", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"1" * 40: 1}}, "logit_bias"),
    ({"prompt": "a", "guided_json": '{"items": ' + _DEEP + "}"}, "guided_json"),
    ({"prompt": "a", "guided_json": '{"type": "array", "items": ' * 10 + "{}" + "}" * 10},
     "guided_json"),
    ({"prompt": "a", "guided_choice": [""]}, "guided_choice"),
    ({"prompt": "a", "guided_regex": ""}, "guided_regex"),
    ({"prompt": "a", "guided_regex": "[a-z]+", "min_tokens": 1}, "min_tokens"),
    ({"prompt": "a", "repetition_penalty": 1e-40, "logprobs": 2}, "repetition_penalty"),
    ({"prompt": "a", "temperature": 1e39, "logprobs": 1}, "temperature"),
]


@pytest.mark.parametrize("body,param", BREAKERS, ids=[b[1] for b in BREAKERS])
def test_bodies_that_once_broke_the_engine_are_400s(s, body, param):
  r = _post(s, "/v1/completions", {"model": s.name, "max_tokens": 4, **body})
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"] == param
  assert s.engine.alive
  ok = s.client.completions.create(model=s.name, prompt="x = ", max_tokens=2)
  assert ok.usage.completion_tokens == 2
