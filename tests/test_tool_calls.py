"""Tool calls through the chat template, in the three formats models write them (Hermes /
Qwen `<tool_call>`, Mistral `[TOOL_CALLS]`, Llama 3.x JSON), against a live `fdjax serve` on
a tiny Llama-3-style checkpoint with the official client: the tools reach the template,
tool_choice "required" or a named function makes even a random model return a valid call
(llguidance enforces a schema of the call), streamed as tool_calls deltas, "none" hides the
tools, a conversation with tool results renders; bad tool fields are a 400."""
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from fdjax.io import chat, loading  # noqa: E402
from fdjax.serving import tools  # noqa: E402
from tests.test_server import _start, _stop  # noqa: E402

# Minutes of a live server: apart from the README's command, in CI's second step.
pytestmark = pytest.mark.integration

HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_MESSAGES = """{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if m.tool_calls %}{% for c in m.tool_calls %}CALL{{ c.function | tojson }}END{% endfor %}\
{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
TEMPLATES = {
    "hermes": ("{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
               "<tools>{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools> Call "
               "one as <tool_call>{\"name\": .., \"arguments\": ..}</tool_call><|eot_id|>"
               "{% endif %}" + _MESSAGES.replace("CALL", "<tool_call>\n")
               .replace("END", "\n</tool_call>")),
    "mistral": ("{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
                "[/AVAILABLE_TOOLS]{% endif %}" + _MESSAGES.replace("CALL", "[TOOL_CALLS][")
                .replace("END", "]")),
    # Mistral's v11+ tokenizers: the name, then [ARGS] and the arguments, per call
    "mistral_args": ("{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
                     "[/AVAILABLE_TOOLS]{% endif %}" + _MESSAGES.replace(
                         "CALL{{ c.function | tojson }}END",
                         "[TOOL_CALLS]{{ c.function.name }}[ARGS]"
                         "{{ c.function.arguments | tojson }}")),
    "llama3_json": ("{{ bos_token }}{% if tools %}<|start_header_id|>user<|end_header_id|>\n\n"
                    "Given the following functions, respond with a JSON for a function call "
                    "with its proper arguments, as {\"name\": function name, \"parameters\": "
                    "dictionary of argument name and its value}.{% for t in tools %}"
                    "{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
                    + _MESSAGES.replace("CALL", "").replace("END", "")),
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
  from bench.tiny_llama3 import build
  path = build(str(tmp_path_factory.mktemp("tools")), max_len=1024)
  srv = _start(*loading.load(path, chat_template=True)[:4], max_batch=4, max_model_len=1024)
  yield srv
  _stop(srv)


def _use(s, fmt):
  s.server.template = chat.ChatTemplate(TEMPLATES[fmt], s.server.template.special_tokens)
  assert tools.detect(TEMPLATES[fmt]) == fmt


def _check_call(call, names=("get_weather", "add")):
  assert call.type == "function" and call.id.startswith("call_")
  assert call.function.name in names
  jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "mistral_args", "llama3_json"])
def test_forced_tool_calls_in_each_format_streamed_or_not(s, fmt):
  _use(s, fmt)
  ask = dict(model=s.name, messages=ASK, max_tokens=200, temperature=1.0, seed=2)
  named = s.client.chat.completions.create(
      **ask, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
  choice = named.choices[0]
  # "stop" for a named function, as OpenAI and vLLM answer it ("tool_calls" otherwise).
  assert choice.finish_reason == "stop" and choice.message.content is None
  assert len(choice.message.tool_calls) == 1
  _check_call(choice.message.tool_calls[0], ("get_weather",))
  required = s.client.chat.completions.create(**ask, tools=TOOLS, tool_choice="required", n=3)
  for c in required.choices:
    _check_call(c.message.tool_calls[0])
  chunks = list(s.client.chat.completions.create(**ask, tools=TOOLS, tool_choice="required",
                                                 stream=True, logprobs=True, top_logprobs=2,
                                                 stream_options={"include_usage": True}))
  deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
  assert len(deltas) == 1 and deltas[0].index == 0
  _check_call(deltas[0])
  assert chunks[-2].choices[0].finish_reason == "tool_calls"
  # The held text's logprobs come with it: one per token, as without streaming.
  streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
  assert len(streamed) == chunks[-1].usage.completion_tokens > 0
  assert all(len(t.top_logprobs) == 2 for t in streamed)
  whole = s.client.chat.completions.create(**ask, tools=TOOLS, tool_choice="required",
                                           logprobs=True, top_logprobs=2)
  assert [t.token for t in whole.choices[0].logprobs.content] == [t.token for t in streamed]
  assert whole.choices[0].finish_reason == "tool_calls"
  # The tools reach the template; "none" hides them; "auto" answers either way.
  plain = s.client.chat.completions.create(model=s.name, messages=ASK, max_tokens=1)
  none = s.client.chat.completions.create(model=s.name, messages=ASK, max_tokens=1, tools=TOOLS,
                                          tool_choice="none")
  auto = s.client.chat.completions.create(**{**ask, "max_tokens": 8}, tools=TOOLS)
  assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
  assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("fmt", ["hermes", "mistral_args"])
def test_a_conversation_with_tool_results_renders(s, fmt):
  _use(s, fmt)
  messages = ASK + [
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
  r = s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=4,
                                       tools=TOOLS)
  assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
  # The past call's arguments rendered as the JSON object they are, not a string of it.
  call = '{"city": "Paris", "unit": "c"}'
  want = TEMPLATES[fmt].replace("{{ bos_token }}", "")
  text = chat.ChatTemplate(want, {}).render(
      ASK + [{"role": "assistant", "tool_calls": [{"function": {
          "name": "get_weather", "arguments": json.loads(call)}}]},
             {"role": "tool", "content": "21 degrees"}], tools=TOOLS)
  assert call in text and '\\"city' not in text
  bos = s.server.template.special_tokens.get("bos_token", "")
  assert r.usage.prompt_tokens == len(s.server.tokenizer.encode(bos + text,
                                                                add_special_tokens=False))


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_responses_api_function_calls_and_their_outputs_as_chat_renders_them(s, fmt):
  """/v1/responses with function tools (its flat form): a forced call is a function_call
  item (streamed as its arguments' events); the next turn, after previous_response_id or
  with the output items sent back, renders the calls and their outputs as chat does."""
  _use(s, fmt)
  flat = [{"type": "function", **t["function"]} for t in TOOLS]
  ask = dict(model=s.name, input=ASK[0]["content"], tools=flat, max_output_tokens=200,
             temperature=1.0, extra_body={"seed": 2})
  r = s.client.responses.create(**ask, tool_choice="required")
  calls = [o for o in r.output if o.type == "function_call"]
  assert calls and r.status == "completed" and r.tool_choice == "required"
  for c in calls:
    assert c.call_id.startswith("call_") and c.id.startswith("fc_") and c.status == "completed"
    jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
  named = s.client.responses.create(**ask, tool_choice={"type": "function", "name": "add"})
  assert [o.name for o in named.output] == ["add"]
  events = list(s.client.responses.create(**ask, tool_choice="required", stream=True))
  items = events[-1].response.output
  done = [e for e in events if e.type == "response.function_call_arguments.done"]
  assert [e.arguments for e in done] == [o.arguments for o in items] and done
  assert events[-1].type == "response.completed"
  outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "21 degrees"}
             for c in calls]
  want = s.client.chat.completions.create(
      model=s.name, tools=TOOLS, max_tokens=4, messages=ASK + [
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": c.call_id, "type": "function",
               "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}] + [
          {"role": "tool", "tool_call_id": c.call_id, "content": "21 degrees"} for c in calls])
  follow = s.client.responses.create(model=s.name, previous_response_id=r.id, input=outputs,
                                     tools=flat, max_output_tokens=4)
  again = s.client.responses.create(
      model=s.name, input=ASK + [o.model_dump(exclude_none=True) for o in r.output] + outputs,
      tools=flat, max_output_tokens=4, store=False)
  assert follow.usage.input_tokens == again.usage.input_tokens == want.usage.prompt_tokens
  if fmt == "hermes":  # parallel_tool_calls false: the first of two calls only
    two = "".join('<tool_call>\n{"name": "add", "arguments": {"a": %d, "b": 2}}\n</tool_call>'
                  % a for a in (1, 3))
    for parallel, calls in ((True, 2), (False, 1)):
      r = s.client.responses.create(**{**ask, "extra_body": {"guided_choice": [two]}},
                                    parallel_tool_calls=parallel)
      assert [o.type for o in r.output] == ["function_call"] * calls
      assert json.loads(r.output[0].arguments) == {"a": 1, "b": 2}


def test_langchains_chat_model_calls_tools_and_streams_against_the_server(s):
  """LangChain's ChatOpenAI pointed at the server: a tool bound and forced comes back as the
  AIMessage's parsed tool_calls, the tool's result goes back as a ToolMessage, and a streamed
  answer is the official client's text."""
  lc = pytest.importorskip("langchain_openai")
  messages = pytest.importorskip("langchain_core.messages")
  _use(s, "hermes")
  llm = lc.ChatOpenAI(model=s.name, base_url=s.url + "/v1", api_key="unused", temperature=1.0,
                      max_tokens=200, seed=2, max_retries=0)
  bound = llm.bind_tools([TOOLS[0]], tool_choice="get_weather")
  answer = bound.invoke(ASK[0]["content"])
  assert [c["name"] for c in answer.tool_calls] == ["get_weather"]
  jsonschema.validate(answer.tool_calls[0]["args"], WEATHER)
  assert answer.tool_calls[0]["id"].startswith("call_")
  follow = llm.bind_tools([TOOLS[0]]).invoke(
      [messages.HumanMessage(ASK[0]["content"]), answer,
       messages.ToolMessage("21 degrees", tool_call_id=answer.tool_calls[0]["id"])],
      max_tokens=4)
  assert follow.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
  greedy = lc.ChatOpenAI(model=s.name, base_url=s.url + "/v1", api_key="unused",
                         temperature=0, max_tokens=12, max_retries=0)
  streamed = "".join(chunk.content for chunk in greedy.stream("def add(a, b):"))
  want = s.client.chat.completions.create(model=s.name, temperature=0, max_tokens=12, messages=[
      {"role": "user", "content": "def add(a, b):"}]).choices[0].message.content
  assert streamed == want and want


def test_each_format_parses_its_own_calls():
  cases = {
      "hermes": 'Let me look.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                "</tool_call>",
      "mistral": 'Sure[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
      "mistral_args": 'Sure[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}',
      "llama3_json": '{"name": "add", "parameters": {"a": 1, "b": 2}}',
  }
  for fmt, text in cases.items():
    content, calls = tools.parse(fmt, text, {"add"})
    assert [c["function"]["name"] for c in calls] == ["add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert content == {"hermes": "Let me look.", "mistral": "Sure", "mistral_args": "Sure",
                       "llama3_json": None}[fmt]
    assert tools.parse(fmt, text, {"other"}) == (text, [])  # not an offered tool: text
  # Mistral v11+: one [TOOL_CALLS] per call, a [CALL_ID] maybe; a bad one leaves it all text
  content, calls = tools.parse("mistral_args", 'x [TOOL_CALLS]add[ARGS]{"a": 1}'
                               "[TOOL_CALLS]now[CALL_ID]a1b2c3d4e[ARGS]{}", {"add", "now"})
  assert content == "x" and [c["function"]["name"] for c in calls] == ["add", "now"]
  for text in ('[TOOL_CALLS]add[ARGS]{"a": 1', "[TOOL_CALLS]add", "[TOOL_CALLS]add[ARGS][1]",
               '[TOOL_CALLS]sub[ARGS]{"a": 1}'):
    assert tools.parse("mistral_args", text, {"add", "now"}) == (text, [])
  # Llama 3.x: parallel calls separated by ";", and the <|python_tag|> a text may keep.
  two = '{"name": "add", "parameters": {"a": 1}}; {"name": "now", "parameters": {}}'
  for text in (two, "<|python_tag|>" + two, " " + two.replace("; ", " ;\n") + "\n"):
    content, calls = tools.parse("llama3_json", text, {"add", "now"})
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "now"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1}, {}]
  for text in (two + " and more", two + ";", two.replace("now", "sub"),
               '{"name": "add", "parameters": {"a": 1}', '{"name": "add"} {"name": "now"}'):
    assert tools.parse("llama3_json", text, {"add", "now"}) == (text, [])
  assert tools.parse("llama3_json", "{not json", {"add"}) == ("{not json", [])


def test_text_around_hermes_calls_is_kept_and_a_cut_off_call_leaves_all_text():
  call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "Zü"}}\n</tool_call>'
  content, calls = tools.parse("hermes", f"Let me check.\n{call}\nThen: {call} done", {"add"})
  assert content == "Let me check.\n\nThen:  done" and len(calls) == 2  # (the end was lost)
  assert calls[0]["function"]["arguments"] == '{"a": 1, "b": "Zü"}'
  cut = call + '\n<tool_call>\n{"name": "add", "argum'  # max_tokens ended the second call
  assert tools.parse("hermes", cut, {"add"}) == (cut, [])


@pytest.mark.parametrize("fmt,text", [("hermes", "<tool_call>\n" + "[" * 5000 + "\n</tool_call>"),
                                      ("mistral", "[TOOL_CALLS]" + "[" * 5000),
                                      ("mistral_args", "[TOOL_CALLS]a[ARGS]" + "[" * 5000),
                                      ("llama3_json", '{"a":' * 5000)])
def test_output_nested_past_pythons_recursion_limit_is_text(fmt, text):
  assert tools.parse(fmt, text, {"add"}) == (text, [])  # (a RecursionError before: a 500)


def test_a_tool_call_marker_that_is_a_special_token_reaches_the_parser():
  # Mistral's [TOOL_CALLS] is a special token: decoded with special tokens skipped (as a
  # request's text is by default), the call came back as content
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  from fdjax.engine import detokenize, request
  from fdjax.io.tokenizer import HFTokenizer
  chars = sorted(set('[]{}":, abcdefghijklmnopqrstuvwxyz0123456789'))
  raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>"] + chars)}, "<unk>"))
  raw.pre_tokenizer, raw.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
  raw.add_special_tokens(["</s>", "[TOOL_CALLS]"])
  eos, marker = raw.token_to_id("</s>"), raw.token_to_id("[TOOL_CALLS]")
  body = '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
  tok = HFTokenizer(raw, eos)
  out = [marker] + tok.encode(body, add_special_tokens=False) + [eos]
  texts = {}
  for skip in (True, False):
    req = request.Request([1], 100, skip_special_tokens=skip)
    texts[skip] = "".join(detokenize.accept(req, [t], tok, (eos,))[2] for t in out)
  assert texts[True] == body and texts[False] == "[TOOL_CALLS]" + body
  assert tools.parse("mistral", texts[False], {"add"})[1][0]["function"]["name"] == "add"


@pytest.mark.parametrize("extra,param", [
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
     "tool_choice"),
])
def test_bad_tool_fields_get_a_400_naming_the_field(s, extra, param):
  with pytest.raises(openai.BadRequestError) as e:
    s.client.chat.completions.create(model=s.name, messages=ASK, max_tokens=4, **extra)
  assert e.value.body["param"] == param
