"""OpenAI's Responses API (`/v1/responses`, fdjax.serving.responses) against a live `fdjax
serve` on the bundled model with the official client: a response is the chat completion of
its conversation (instructions, input items, the stored turns of previous_response_id),
streamed as the typed events the client parses, with logprobs, a JSON schema, storage (GET,
DELETE, store false, the newest N kept), and bad requests refused naming the field."""
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from fdjax.serving import api, responses  # noqa: E402


@pytest.fixture(scope="module")
def s():
  from fdjax.io import loading
  from tests.test_server import _start, _stop
  srv = _start(*loading.load(None, chat_template=True)[:4], max_model_len=512)
  yield srv
  _stop(srv)


GREEDY = dict(temperature=0, max_output_tokens=12)
ITEMS = [{"role": "developer", "content": "Answer in Python."},
         {"type": "message", "role": "user",
          "content": [{"type": "input_text", "text": "def add(a, b):"},
                      {"type": "input_text", "text": "    return"}]},
         {"type": "message", "role": "assistant",
          "content": [{"type": "output_text", "text": " a + b", "annotations": []}]},
         {"role": "user", "content": "def mul(a, b):"}]
# The same conversation as chat messages.
MESSAGES = [{"role": "developer", "content": "Answer in Python."},
            {"role": "user", "content": "def add(a, b):\n    return"},
            {"role": "assistant", "content": " a + b"},
            {"role": "user", "content": "def mul(a, b):"}]


def _chat(s, messages, **extra):
  return s.client.chat.completions.create(model=s.name, messages=messages, temperature=0,
                                          max_tokens=12, **extra)


@pytest.mark.integration
def test_a_response_is_the_chat_completion_of_its_conversation_streamed_or_not(s):
  for ask, messages in [(dict(input="def f(x):", instructions="Write Python."),
                         [{"role": "system", "content": "Write Python."},
                          {"role": "user", "content": "def f(x):"}]),
                        (dict(input=ITEMS), MESSAGES)]:
    r = s.client.responses.create(model=s.name, **ask, **GREEDY)
    want = _chat(s, messages)
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.usage.output_tokens == want.usage.completion_tokens == 12
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.role, o.status) for o in r.output] == [
        ("message", "assistant", "incomplete")]
    assert r.id.startswith("resp_") and r.output[0].id.startswith("msg_")
    events = list(s.client.responses.create(model=s.name, **ask, **GREEDY, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == (["response.created", "response.in_progress",
                      "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * deltas
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.incomplete"])
    assert deltas >= 1 and events[0].response.status == "in_progress"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text == r.output_text
    assert events[-1].response.output[0].id == events[2].item.id == events[4].item_id
  # A stop string (vLLM's extension, as on chat) ends it: "completed".
  done = s.client.responses.create(model=s.name, input="def f(x):", temperature=0,
                                   max_output_tokens=40, extra_body={"stop": ["\n"]})
  assert done.status == "completed" and done.incomplete_details is None
  assert "\n" not in done.output_text


@pytest.mark.integration
def test_logprobs_with_include_are_chats_streamed_or_not(s):
  ask = dict(model=s.name, input="import os\n", include=[responses.LOGPROBS], top_logprobs=2,
             **GREEDY)
  r = s.client.responses.create(**ask)
  want = _chat(s, [{"role": "user", "content": "import os\n"}], logprobs=True, top_logprobs=2)
  got = r.output[0].content[0].logprobs
  expected = want.choices[0].logprobs.content
  assert [t.token for t in got] == [t.token for t in expected] and len(got) == 12
  for g, w in zip(got, expected):
    assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
    assert [t.token for t in g.top_logprobs] == [t.token for t in w.top_logprobs]
    assert len(g.top_logprobs) == 2
  events = list(s.client.responses.create(**ask, stream=True))
  streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
  assert [t.token for t in streamed] == [t.token for t in got]
  # Without include (or top_logprobs), none.
  plain = s.client.responses.create(model=s.name, input="import os\n", **GREEDY)
  assert plain.output[0].content[0].logprobs == []


@pytest.mark.integration
def test_previous_response_id_continues_the_stored_conversation(s):
  first = s.client.responses.create(model=s.name, input="def f(x):", instructions="Be short.",
                                    **GREEDY)
  second = s.client.responses.create(model=s.name, input="def g(y):",
                                     previous_response_id=first.id, **GREEDY)
  # The first turn's input and output, then the new input; its instructions not carried.
  want = _chat(s, [{"role": "user", "content": "def f(x):"},
                   {"role": "assistant", "content": first.output_text},
                   {"role": "user", "content": "def g(y):"}])
  assert second.output_text == want.choices[0].message.content
  assert second.usage.input_tokens == want.usage.prompt_tokens
  assert second.previous_response_id == first.id
  third = s.client.responses.create(model=s.name, input="def h(z):",
                                    previous_response_id=second.id, **GREEDY)
  assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
  # The prefix cache served the stored turns' pages (16 tokens a page on this server).
  assert third.usage.input_tokens_details.cached_tokens >= 16
  kept = s.client.responses.retrieve(first.id)
  assert kept.id == first.id and kept.output_text == first.output_text
  s.client.responses.delete(first.id)
  with pytest.raises(openai.NotFoundError):
    s.client.responses.retrieve(first.id)
  with pytest.raises(openai.BadRequestError) as e:  # OpenAI's 400 and code
    s.client.responses.create(model=s.name, input="x", previous_response_id=first.id)
  assert e.value.body["param"] == "previous_response_id"
  assert e.value.body["code"] == "previous_response_not_found"
  unkept = s.client.responses.create(model=s.name, input="x", store=False, max_output_tokens=2)
  assert unkept.store is False
  with pytest.raises(openai.NotFoundError):
    s.client.responses.retrieve(unkept.id)


@pytest.mark.integration
def test_truncation_auto_drops_the_oldest_turns_to_fit_the_context(s):
  """A conversation past the context (512 tokens here, a byte per token) is a 400 naming
  input; with truncation "auto" its oldest turns go, from the front, the instructions stay,
  until it leaves room for max_output_tokens."""
  long = "x = 1\n" * 20  # a turn takes about 200 tokens with the template's
  first = s.client.responses.create(model=s.name, input=long + "# one", **GREEDY)
  second = s.client.responses.create(model=s.name, input=long + "# two",
                                     previous_response_id=first.id, **GREEDY)
  with pytest.raises(openai.BadRequestError) as e:
    s.client.responses.create(model=s.name, input=long + "# three",
                              previous_response_id=second.id, instructions="Be short.",
                              **GREEDY)
  assert e.value.body["param"] == "input"
  third = s.client.responses.create(model=s.name, input=long + "# three", truncation="auto",
                                    previous_response_id=second.id,
                                    instructions="Be short.", **GREEDY)
  assert third.truncation == "auto"
  want = _chat(s, [{"role": "system", "content": "Be short."},
                   {"role": "user", "content": long + "# two"},
                   {"role": "assistant", "content": second.output_text},
                   {"role": "user", "content": long + "# three"}])
  assert third.usage.input_tokens == want.usage.prompt_tokens <= 512 - 12
  assert third.output_text == want.choices[0].message.content
  # the stored conversation is whole: the next turn truncates again, from all of it
  fourth = s.client.responses.create(model=s.name, input="def g(y):", truncation="auto",
                                     previous_response_id=third.id, **GREEDY)
  assert fourth.output_text and fourth.usage.input_tokens <= 512 - 12


@pytest.mark.integration
def test_text_format_json_schema_makes_output_that_validates(s):
  jsonschema = pytest.importorskip("jsonschema")
  pytest.importorskip("llguidance")
  schema = {"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["a", "b"]},
      "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
               "maxItems": 3}},
      "required": ["name", "kind", "tags"], "additionalProperties": False}
  fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
  for seed in range(3):
    r = s.client.responses.create(model=s.name, input="a thing", text=fmt, temperature=1.0,
                                  max_output_tokens=120, extra_body={"seed": seed})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"
  events = list(s.client.responses.create(model=s.name, input="a thing", text=fmt,
                                          max_output_tokens=120, stream=True))
  jsonschema.validate(json.loads(events[-1].response.output_text), schema)


@pytest.mark.integration
@pytest.mark.parametrize("body, status, param, words", [
    ({"max_tokens": 4}, 400, "max_tokens", "max_output_tokens instead"),
    ({"n": 2}, 400, "n", "this endpoint has none"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "text.format"),
    ({"input": []}, 400, "input", "empty list"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input", "input[0].content[0] is a 'input_image' part"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input", "'item_reference' item"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input", "no message"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, "input", "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input",
     "input[0].call_id must be a string"),
    ({"include": ["file_search_call.results"]}, 400, "include", "not supported"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools", "tools[0].type"),
    ({"tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "name": "f"}],
      "tool_choice": {"type": "function", "name": "g"}}, 400, "tool_choice", "'g'"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text", "needs a schema"),
    ({"truncation": "middle"}, 400, "truncation", "disabled"),
    ({"max_output_tokens": 5000}, 400, "max_output_tokens", "max_output_tokens (5000)"),
    ({"input": "x" * 600}, 400, "input", "context"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, 400, "input",
     "input[0].output must be a string or a list of text parts"),
    ({"background": True}, 400, "background", "not supported"),
    ({"previous_response_id": "resp_nothing"}, 400, "previous_response_id", "resp_nothing"),
])
def test_bad_responses_requests_are_refused_naming_the_field(s, body, status, param, words):
  import httpx2
  r = httpx2.post(s.url + "/v1/responses", json={"model": s.name, "input": "x", **body})
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert error["param"] == param and words in error["message"], error


@pytest.mark.integration
def test_stored_responses_are_got_and_deleted_by_id_and_unknown_ids_are_404(s):
  import httpx2
  r = s.client.responses.create(model=s.name, input="x", max_output_tokens=2)
  got = httpx2.get(s.url + f"/v1/responses/{r.id}").json()
  assert got["id"] == r.id and got["output"][0]["content"][0]["text"] == r.output_text
  gone = httpx2.delete(s.url + f"/v1/responses/{r.id}")
  assert gone.status_code == 200 and gone.json() == {"id": r.id, "object": "response",
                                                    "deleted": True}
  for call in (httpx2.get, httpx2.delete):
    assert call(s.url + f"/v1/responses/{r.id}").status_code == 404


def test_the_store_keeps_the_newest_n():
  store = responses.Store(2)
  for i in range(3):
    store.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
  with pytest.raises(api.ApiError) as e:
    store.get("r0", "previous_response_id")
  assert e.value.status == 400 and e.value.param == "previous_response_id"
  with pytest.raises(api.ApiError) as e:
    store.get("r0")  # GET /v1/responses/r0
  assert e.value.status == 404 and e.value.code == "not_found"
  assert store.get("r2")[1].conversation() == [{"role": "user", "content": "2"}]
  store.delete("r1")
  with pytest.raises(api.ApiError):
    store.get("r1")
  with pytest.raises(ValueError, match="max-stored-responses"):
    responses.Store(-1)
  # and at most max_bytes of them, the oldest dropped first
  small = responses.Store(10, max_bytes=300)
  for i in range(3):
    small.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": "x" * 100}])
  assert small.get("r2") and small.get("r1") and small.nbytes <= 300
  with pytest.raises(api.ApiError):
    small.get("r0")


def test_a_stored_chain_holds_each_turn_once_and_outlives_its_first_responses():
  """A conversation continued n times costs n turns of bytes (not n**2: each response's
  Turns links to the one before); a kept response's conversation is whole after the first
  responses are dropped, and their messages count until no kept response holds them."""
  turn = lambda i: [{"role": "user", "content": f"q{i:03d}" + "x" * 96},
                    {"role": "assistant", "content": f"a{i:03d}" + "y" * 96}]
  each = len(json.dumps(turn(0))) + len(json.dumps({"id": "r000"})) + len(json.dumps([]))
  store, before = responses.Store(1000), None
  for i in range(200):
    before = store.put(f"r{i:03d}", {"id": f"r{i:03d}"}, turn(i), before=before)
  assert store.nbytes == 200 * each
  assert store.get("r199")[1].conversation() == [m for i in range(200) for m in turn(i)]
  assert store.get("r010")[1].conversation() == [m for i in range(11) for m in turn(i)]
  small, before = responses.Store(2), None
  for i in range(5):
    before = small.put(f"r{i:03d}", {"id": f"r{i:03d}"}, turn(i), before=before)
  del before
  with pytest.raises(api.ApiError):
    small.get("r002")
  assert small.get("r004")[1].conversation() == [m for i in range(5) for m in turn(i)]
  assert small.nbytes == 5 * len(json.dumps(turn(0))) + 2 * (each - len(json.dumps(turn(0))))
  small.delete("r003")
  small.delete("r004")
  assert small.nbytes == 0  # every turn freed with the last response holding it


def test_truncation_keeps_this_requests_input_and_bisects_the_stored_turns():
  """truncation "auto" cuts only stored turns (from a user message on; the leading system
  message stays), keeps as many as fit, never the request's own input (its developer message
  too), and renders the conversation a few times, not once per turn."""
  from types import SimpleNamespace

  from fdjax.io import loading
  loaded = loading.load(None, chat_template=True)
  renders = []

  class Counting:
    def render(self, messages, **kw):
      renders.append(len(messages))
      return loaded.chat_template.render(messages, **kw)

  store = responses.Store()
  before = store.put("r0", {}, [{"role": "system", "content": "Be short."}])
  for i in range(40):
    before = store.put(f"r{i + 1}", {}, [{"role": "user", "content": f"q{i:02d} " + "x" * 40},
                                         {"role": "assistant", "content": "a" * 40}], (),
                       before)
  server = SimpleNamespace(responses=store, template=Counting(), tokenizer=loaded.tokenizer,
                           engine=SimpleNamespace(max_model_len=1000), model_name="m")
  body = api.parse(responses.ResponsesRequest, json.dumps({
      "model": "m", "previous_response_id": "r40", "truncation": "auto",
      "max_output_tokens": 10, "input": [{"role": "developer", "content": "Use tabs."},
                                         {"role": "user", "content": "go"}]}))
  ids, _, turn = responses._prompt(server, body)
  text = loaded.tokenizer.decode(ids)
  assert 900 < len(ids) <= 990 and len(renders) <= 8
  assert "Be short." in text and "Use tabs." in text and "go" in text
  kept = [i for i in range(40) if f"q{i:02d} " in text]
  assert kept == list(range(40 - len(kept), 40)) and 0 < len(kept) < 40
  # one stored turn fewer does not fit: the fewest were cut
  longer = [{"role": "system", "content": "Be short."}]
  for i in range(39 - len(kept), 40):
    longer += [{"role": "user", "content": f"q{i:02d} " + "x" * 40},
               {"role": "assistant", "content": "a" * 40}]
  whole = loaded.chat_template.render(longer + turn, add_generation_prompt=True)
  assert len(loaded.tokenizer.encode(whole, add_special_tokens=False)) > 990
  # the input alone too long: not cut into, the engine's 400 follows
  server.engine.max_model_len = 30
  assert "Use tabs." in loaded.tokenizer.decode(responses._prompt(server, body)[0])


def test_input_items_become_chat_messages_a_call_joining_its_assistant_turn():
  body = api.parse(responses.ResponsesRequest, json.dumps({"model": "m", "input": [
      {"role": "user", "content": "weather?"},
      {"type": "message", "role": "assistant",
       "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
      {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"a\": 1}",
       "id": "fc_1", "status": "completed"},
      {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{}"},
      {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
      {"type": "function_call_output", "call_id": "c2",
       "output": [{"type": "input_text", "text": "rain"}]}]}).encode())
  assert responses.input_messages(body) == [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "Looking.", "tool_calls": [
          {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"a\": 1}"}},
          {"id": "c2", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
      {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
  # store is the Responses API's own field here (an ignored client extra elsewhere)
  assert api.parse(responses.ResponsesRequest, b'{"model": "m", "input": "x", "store": false}'
                   ).store is False


@pytest.mark.integration
def test_settings_are_echoed_and_input_items_tokens_and_cancel_answer_as_openai(s):
  import httpx2
  r = s.client.responses.create(
      model=s.name, input=[{"role": "user", "content": "def f(x):"},
                           {"role": "assistant", "content": "    return x"},
                           {"role": "user", "content": [{"type": "input_text", "text": "g"}]}],
      max_output_tokens=3, metadata={"a": "b"}, user="u1", reasoning={"effort": "low"},
      prompt_cache_key="k", safety_identifier="s", service_tier="flex",
      text={"verbosity": "low"}, parallel_tool_calls=False, max_tool_calls=5,
      truncation="auto", tool_choice="auto", store=True)
  for name, value in (("metadata", {"a": "b"}), ("user", "u1"), ("prompt_cache_key", "k"),
                      ("safety_identifier", "s"), ("service_tier", "flex"),
                      ("parallel_tool_calls", False), ("max_tool_calls", 5),
                      ("truncation", "auto")):
    assert getattr(r, name) == value, name
  assert r.reasoning.effort == "low" and r.text.verbosity == "low"
  assert s.client.responses.retrieve(r.id).metadata == {"a": "b"}
  newest = s.client.responses.input_items.list(r.id)
  oldest = s.client.responses.input_items.list(r.id, order="asc", limit=2)
  assert [i.role for i in newest.data] == ["user", "assistant", "user"]
  assert [i.id for i in oldest.data] == [i.id for i in newest.data][::-1][:2]
  assert oldest.has_more and oldest.data[0].content[0].text == "def f(x):"
  assert oldest.data[1].content[0].type == "output_text"
  rest = s.client.responses.input_items.list(r.id, order="asc", after=oldest.data[-1].id)
  assert [i.content[0].text for i in rest.data] == ["g"] and not rest.has_more
  count = s.client.responses.input_tokens.count(model=s.name, input=r.output_text or "x",
                                                 instructions="Be short.")
  want = s.client.responses.create(model=s.name, input=r.output_text or "x",
                                   instructions="Be short.", max_output_tokens=1)
  assert count.input_tokens == want.usage.input_tokens > 0
  with pytest.raises(openai.BadRequestError, match="only background responses"):
    s.client.responses.cancel(r.id)
  replay = httpx2.get(s.url + f"/v1/responses/{r.id}", params={"stream": "true"})
  assert replay.status_code == 400 and replay.json()["error"]["param"] == "stream"


@pytest.mark.parametrize("parser, text, want", [
    ("qwen3", "<think>\nplan\n</think>\n\nHello", ("\nplan\n", "\n\nHello")),
    ("qwen3", "Hello", (None, "Hello")),                  # thinking off: all content
    ("qwen3", "Hi <think>x</think>y", (None, "Hi <think>x</think>y")),  # not opened first
    ("qwen3", "<think>cut off", ("cut off", None)),       # max_tokens inside the thought
    ("deepseek_r1", "plan</think>Hello", ("plan", "Hello")),  # <think> was in the prompt
    ("deepseek_r1", "plan", ("plan", None)),
    ("deepseek_r1", "<think>a</think>", ("a", None)),
    (None, "<think>a</think>b", (None, "<think>a</think>b")),
])
def test_reasoning_is_split_off_whole_or_streamed_in_any_pieces(parser, text, want):
  from fdjax.serving import reasoning
  assert reasoning.split(parser, text) == want
  if parser is None:
    return
  for size in (1, 2, 3, 7):
    stream, thought, content = reasoning.Stream(parser), "", ""
    for i in range(0, len(text), size):
      t, c = stream.feed(text[i:i + size])
      thought, content = thought + t, content + c
    t, c = stream.feed("", end=True)
    assert ((thought + t) or None, (content + c) or None) == want


@pytest.mark.integration
def test_a_reasoning_parser_splits_the_thinking_off_chat_and_responses(s):
  """--reasoning-parser qwen3: the <think> part is chat's reasoning_content (and reasoning),
  streamed as its own deltas, and the Responses API's reasoning item; sent back as input,
  it is the assistant turn's reasoning."""
  forced = {"guided_choice": ["<think>\nadd them\n</think>\n\nx + y"]}
  ask = [{"role": "user", "content": "a"}]
  s.server.reasoning_parser = "qwen3"
  try:
    msg = s.client.chat.completions.create(model=s.name, messages=ask, max_tokens=60,
                                           extra_body=forced).choices[0].message
    assert msg.content == "\n\nx + y"
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == "\nadd them\n"
    chunks = [c.choices[0].delta for c in s.client.chat.completions.create(
        model=s.name, messages=ask, max_tokens=60, extra_body=forced, stream=True)
              if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in chunks) == \
        "\nadd them\n"
    assert "".join(d.content or "" for d in chunks) == "\n\nx + y"
    r = s.client.responses.create(model=s.name, input="a", max_output_tokens=60,
                                  extra_body=forced)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "\nadd them\n" and r.output_text == "\n\nx + y"
    events = list(s.client.responses.create(model=s.name, input="a", max_output_tokens=60,
                                            extra_body=forced, stream=True))
    done = [e for e in events if e.type == "response.reasoning_text.done"]
    assert [e.text for e in done] == ["\nadd them\n"] and done[0].output_index == 0
    assert events[-1].response.output_text == "\n\nx + y"
    again = s.client.responses.create(
        model=s.name, max_output_tokens=1, store=False,
        input=ask + [o.model_dump(exclude_none=True) for o in r.output] + [
            {"role": "user", "content": "b"}])
    want = s.client.chat.completions.create(model=s.name, max_tokens=1, messages=ask + [
        {"role": "assistant", "content": r.output_text}, {"role": "user", "content": "b"}])
    assert again.usage.input_tokens == want.usage.prompt_tokens
  finally:
    s.server.reasoning_parser = None
