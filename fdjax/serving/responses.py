"""OpenAI's Responses API on `fdjax serve`, as the official client's `client.responses` and
vLLM serve it:

  POST   /v1/responses        input (a string, or message / function_call /
                              function_call_output items) -> the chat template -> output items
  GET    /v1/responses/{id}   a stored response
  DELETE /v1/responses/{id}   forgets it
  GET    /v1/responses/{id}/input_items   its input items (limit, order, after)
  POST   /v1/responses/input_tokens       how many tokens a request's input takes

A request is a chat turn: `instructions` (a system message, not carried to the next turn), the
conversation of `previous_response_id` (its input and output, kept in memory by the server
while `store`, OpenAI's default, for the newest --max-stored-responses), then `input`. Its
answer runs through the same engine requests as /v1/chat/completions (fdjax.serving.
generation.Call): function tools and `tool_choice` (the checkpoint's tool-call format,
fdjax.serving.tools), `text.format` json_schema / json_object (a grammar), logprobs with
`include: ["message.output_text.logprobs"]` and `top_logprobs`, the sampling fields and vLLM's
extensions of chat (top_k, min_p, repetition_penalty, seed, stop, ...). The output is a
message item (output_text) and a function_call item per call; streamed as the typed events
the client parses (response.created ... response.output_text.delta ... response.completed,
each with its sequence_number). The request's other settings (metadata, user, reasoning,
service_tier, ...) are echoed; parallel_tool_calls false keeps the first call. With a
reasoning parser (fdjax.serving.reasoning) the thought is a reasoning item before the message.
Not here: built-in tools (web search, files, ...), images and files in the input, background
responses (so no cancel, no replayed stream) and item references (refused by name)."""
from __future__ import annotations

import collections
import itertools
import json
import time
import uuid
import weakref
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fdjax.engine.sampling import MAX_TOP_LOGPROBS
from fdjax.serving import api, generation
from fdjax.serving.events import EventStream

LOGPROBS = "message.output_text.logprobs"
# The engine's errors name chat's fields: this endpoint's names for them.
RENAMED_BY_ENGINE = {"max_tokens": "max_output_tokens", "prompt": "input"}
# What `include` may name: the tokens' logprobs; reasoning.encrypted_content (Codex sends it
# always) names what a reasoning item would carry, and this server writes none.
INCLUDE = (LOGPROBS, "reasoning.encrypted_content")
ROLES = ("user", "assistant", "system", "developer")  # of an input message
TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text")


class FunctionTool(api._Strict):
  """A function tool, in the Responses API's flat form (chat's nests it under "function")."""
  type: Literal["function"]
  name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
  description: str | None = None
  parameters: dict | None = None
  strict: bool | None = None
  # taken, changing nothing here (the SDK's FunctionToolParam sends them)
  defer_loading: bool | None = None
  output_schema: dict | None = None
  allowed_callers: list[str] | None = None


class NamedFunction(api._Strict):
  type: Literal["function"]
  name: str


class TextFormat(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                            allow_inf_nan=False)
  type: Literal["text", "json_object", "json_schema"]
  name: str | None = Field(None, min_length=1, max_length=64)
  schema_: dict | None = Field(None, alias="schema")
  strict: bool | None = None
  description: str | None = None


class TextConfig(api._Strict):
  format: TextFormat | None = None
  verbosity: Literal["low", "medium", "high"] | None = None  # taken; changes nothing here


class ResponsesRequest(api._Sampling):
  ENDPOINT: ClassVar[str] = "responses"
  RENAMED: ClassVar[dict] = {"max_tokens": "max_output_tokens",
                             "max_completion_tokens": "max_output_tokens",
                             "response_format": "text.format", "messages": "input",
                             "logprobs": f'include ["{LOGPROBS}"] and top_logprobs',
                             "n": None}
  input: str | list[dict]
  instructions: str | None = None
  max_output_tokens: int | None = Field(None, ge=1)
  top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  include: list[str] | None = None
  tools: list[FunctionTool] | None = None
  tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
  text: TextConfig | None = None
  store: bool = True
  previous_response_id: str | None = None
  parallel_tool_calls: bool = True  # false: the first call only
  # auto: the conversation's oldest turns dropped where it does not fit the context (else 400)
  truncation: Literal["disabled", "auto"] = "disabled"
  # echoed, changing nothing here: no reasoning items, built-in tools or tiers
  reasoning: dict | None = None
  max_tool_calls: int | None = Field(None, ge=1)
  metadata: dict[str, str] | None = None
  user: str | None = None
  prompt_cache_key: str | None = None
  safety_identifier: str | None = None
  service_tier: str | None = None

  def check(self):
    super().check()
    if isinstance(self.input, list) and not self.input:
      raise api.ApiError(400, "input is an empty list", "input")
    bad = [x for x in self.include or () if x not in INCLUDE]
    if bad:
      raise api.ApiError(400, f"include {bad[0]!r} is not supported by this server (it "
                         f"includes {LOGPROBS!r})", "include", reason="unsupported_field")
    fmt = self.text.format if self.text else None
    if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is None:
      raise api.ApiError(400, "text.format of type json_schema needs a schema", "text")
    api.check_tools([t.name for t in self.tools or []], self.tool_choice, self.named_tool,
                    self.constraint, bare=("none", "auto"))  # "auto" bare: as OpenAI echoes

  @property
  def named_tool(self) -> str | None:
    return self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else None

  def constraint(self):
    """text.format's grammar (json_schema, json_object), else the guided_* extensions'."""
    fmt = self.text.format if self.text else None
    other = super().constraint()
    if fmt is None or fmt.type == "text":
      return other
    if other is not None:
      raise api.ApiError(400, f"text.format and {other[2]} both constrain the output; give "
                         "one", other[2])
    schema = {"type": "object"} if fmt.type == "json_object" else fmt.schema_
    return "json_schema", schema, "text"

  def active_tools(self) -> list[dict]:
    """The tools the model is shown, in chat's form (what templates and fdjax.serving.tools
    take); none with tool_choice "none"."""
    if self.tool_choice == "none":
      return []
    return [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in self.tools or []]

  def forced_tools(self) -> list[dict] | None:
    return api.forced_tools(self.active_tools(), self.tool_choice, self.named_tool)

  @property
  def limit(self) -> int | None:
    return self.max_output_tokens

  @property
  def top_logprobs_count(self) -> int | None:
    wanted = LOGPROBS in (self.include or ()) or self.top_logprobs is not None
    return (self.top_logprobs or 0) if wanted else None


# ---------------------------------------------------------------------- the input

def _text(content, where: str) -> str:
  """A message's content: a string, or text parts joined by newlines (as chat's)."""
  if isinstance(content, str):
    return content
  if not isinstance(content, list):
    raise api.ApiError(400, f"{where} must be a string or a list of text parts", "input")
  texts = []
  for j, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS and isinstance(part.get("text"), str):
      texts.append(part["text"])
    elif kind == "refusal" and isinstance(part.get("refusal"), str):
      texts.append(part["refusal"])
    else:
      raise api.ApiError(400, f"{where}[{j}] is "
                         + (f"a {kind!r} part" if isinstance(kind, str) else "not a text part")
                         + f"; this server takes text parts ({', '.join(TEXT_PARTS)})", "input")
  return "\n".join(texts)


def _string(item: dict, key: str, where: str) -> str:
  value = item.get(key)
  if not isinstance(value, str):
    raise api.ApiError(400, f"{where}.{key} must be a string", "input")
  return value


def input_messages(body: ResponsesRequest) -> list[dict]:
  """The request's input as chat messages (chat's form: an assistant's calls as tool_calls,
  their results as "tool" messages); ApiError naming the item at fault. A function_call
  right after an assistant message, or another call, joins that turn; a reasoning item
  (a thinking model's, sent back) becomes the next assistant turn's reasoning."""
  if isinstance(body.input, str):
    return [{"role": "user", "content": body.input}]
  out, thought = [], None
  for k, item in enumerate(body.input):
    where = f"input[{k}]"
    if not isinstance(item, dict):
      raise api.ApiError(400, f"{where} must be an object: a message, a function_call or a "
                         "function_call_output", "input")
    kind = item.get("type", "message")
    if kind == "message":
      if item.get("role") not in ROLES:
        raise api.ApiError(400, f"{where}.role is {item.get('role')!r}; it must be one of "
                           f"{', '.join(ROLES)}", "input")
      if "content" not in item:
        raise api.ApiError(400, f"{where} has no content", "input")
      out.append({"role": item["role"], "content": _text(item["content"], where + ".content")})
      if item["role"] == "assistant" and thought is not None:
        out[-1]["reasoning"], thought = thought, None
    elif kind == "function_call":
      call = {"id": _string(item, "call_id", where), "type": "function",
              "function": {"name": _string(item, "name", where),
                           "arguments": _string(item, "arguments", where)}}
      if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
      else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        if thought is not None:
          out[-1]["reasoning"], thought = thought, None
    elif kind == "function_call_output":
      out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                  "content": _text(item.get("output"), where + ".output")
                  if not isinstance(item.get("output"), str) else item["output"]})
    elif kind == "reasoning":
      parts = item.get("content") or []
      thought = _text(parts, where + ".content") if isinstance(parts, list) else None
      if thought is None:
        raise api.ApiError(400, f"{where}.content must be a list of reasoning_text parts",
                           "input")
    else:
      raise api.ApiError(400, f"{where} is a {kind!r} item; this server takes message, "
                         "function_call, function_call_output and reasoning items", "input")
  return out


# ----------------------------------------------------------------------- storage

class Turns:
  """A stored conversation as a chain: one response's messages (its input and its output)
  after those of the response it continued (shared, not copied: a chain of n turns holds
  each turn once). A link outlives its response's place in the Store while a later turn
  continues it."""
  __slots__ = ("messages", "before", "__weakref__")

  def __init__(self, messages: list[dict], before: "Turns | None" = None):
    self.messages, self.before = messages, before

  def conversation(self) -> list[dict]:
    """Every message of the chain, oldest first."""
    parts, link = [], self
    while link is not None:
      parts.append(link.messages)
      link = link.before
    return [m for part in reversed(parts) for m in part]


class Store:
  """Responses made with `store` (OpenAI's default), for GET and previous_response_id: the
  newest `size` of them, each with its conversation (Turns), in this process's memory, at
  most `max_bytes` of them as JSON (the oldest go first; a turn's messages count until no
  kept response's conversation holds them); ApiError 404 for one not (or no longer) kept."""

  def __init__(self, size: int = 1000, max_bytes: int = 256 << 20):
    if not isinstance(size, int) or size < 0:
      raise ValueError(f"--max-stored-responses must be an integer >= 0, got {size!r}")
    self.size, self.max_bytes, self.nbytes = size, max_bytes, 0
    self._kept = collections.OrderedDict()

  def put(self, rid: str, response: dict, messages: list[dict], items=(),
          before: Turns | None = None) -> Turns:
    """Keeps a response, its conversation (its own messages after `before`'s) and its input
    items (input_items); returns its Turns."""
    items = list(items)
    turns = Turns(messages, before)
    own = len(json.dumps(messages))
    self.nbytes += own
    weakref.finalize(turns, self._free, own).atexit = False
    nbytes = len(json.dumps(response)) + len(json.dumps(items))
    self._kept[rid] = (response, turns, nbytes, items)
    self.nbytes += nbytes
    while self._kept and (len(self._kept) > self.size or self.nbytes > self.max_bytes):
      self._drop(self._kept.popitem(last=False)[1])
    return turns

  def _drop(self, entry):
    # `entry` is held here, so its Turns' finalizer (_free, which changes nbytes too) runs
    # after this update (when the caller lets go of it), not inside it
    self.nbytes -= entry[2]

  def _free(self, nbytes: int):
    self.nbytes -= nbytes

  def get(self, rid: str, param: str | None = None) -> tuple[dict, Turns]:
    """A stored response and its conversation; ApiError 404 (400 naming `param` where a
    request's field names it, OpenAI's previous_response_not_found)."""
    if rid not in self._kept:
      message = (f"no response {rid!r} is stored here (made with store: false, or older than "
                 f"the newest {self.size})")
      if param:
        raise api.ApiError(400, message, param, code="previous_response_not_found")
      raise api.ApiError(404, message, code="not_found")
    return self._kept[rid][:2]

  def items(self, rid: str) -> list[dict]:
    self.get(rid)
    return self._kept[rid][3]

  def delete(self, rid: str):
    self.get(rid)
    self._drop(self._kept.pop(rid))


# ---------------------------------------------------------------------- the output

def _new_id(prefix: str) -> str:
  return f"{prefix}_{uuid.uuid4().hex}"


def _message(mid: str, text: str, status: str, logprobs: list) -> dict:
  return {"type": "message", "id": mid, "status": status, "role": "assistant",
          "content": [{"type": "output_text", "text": text, "annotations": [],
                       "logprobs": logprobs}]}


def _usage(prompt: int, cached: int, completion: int) -> dict:
  return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
          "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
          "total_tokens": prompt + completion}


class _Answer:
  """One request's answer as a Response object: the request's settings echoed, the output
  items made from the model's text once it ends."""

  def __init__(self, server, body: ResponsesRequest, call, fmt, offered):
    self.server, self.body, self.call, self.fmt = server, body, call, fmt
    self.names = {t["function"]["name"] for t in offered}
    self.rid, self.mid, self.created = _new_id("resp"), _new_id("msg"), int(time.time())
    self.sampled = body.sampling(server.defaults)
    self.turn = None  # the output as a chat message (for the conversation kept)

  def logprobs(self, items) -> list:
    k = self.body.top_logprobs_count
    return [] if k is None else api.chat_logprobs(self.server.tokenizer, items, k)["content"]

  def response(self, status: str, output: list, usage=None, error=None,
               incomplete=None) -> dict:
    body = self.body
    fmt = body.text.format if body.text and body.text.format else None
    return {"id": self.rid, "object": "response", "created_at": self.created,
            "status": status, "background": False, "error": error,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "max_tool_calls": body.max_tool_calls,
            "metadata": body.metadata or {}, "model": self.server.model_name,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "prompt_cache_key": body.prompt_cache_key,
            "reasoning": {"effort": None, "summary": None, **(body.reasoning or {})},
            "safety_identifier": body.safety_identifier,
            "service_tier": body.service_tier if body.service_tier not in (None, "auto")
            else "default",
            "store": body.store, "temperature": self.sampled["temperature"],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                     else {"type": "text"},
                     **({"verbosity": body.text.verbosity} if body.text and
                        body.text.verbosity else {})},
            "tool_choice": (body.tool_choice.model_dump()
                            if isinstance(body.tool_choice, NamedFunction)
                            else body.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_logprobs": body.top_logprobs or 0,
            "top_p": 1.0 if self.sampled["top_p"] is None else self.sampled["top_p"],
            "truncation": body.truncation, "usage": usage, "user": body.user}

  def finish(self, text: str, reason: str, logprob_items: list, completion: int) -> dict:
    """The whole response: a reasoning item (a reasoning parser's), a message item (unless
    the answer is nothing but reasoning or tool calls) and a function_call item per call;
    "incomplete" where max_output_tokens cut it."""
    thought, content, calls = generation.split_answer(self.server, self.fmt, self.names, text)
    if not self.body.parallel_tool_calls:  # the first call only (as vLLM trims chat's)
      calls = calls[:1]
    status = {"length": "incomplete", "cancelled": "cancelled"}.get(reason, "completed")
    done = "completed" if status == "completed" else "incomplete"
    output = [] if thought is None else [
        {"type": "reasoning", "id": _new_id("rs"), "summary": [], "status": done,
         "content": [{"type": "reasoning_text", "text": thought}]}]
    if content is not None or not (calls or thought is not None):
      output.append(_message(self.mid, content or "", done, self.logprobs(logprob_items)))
    for c in calls:
      output.append({"type": "function_call", "id": _new_id("fc"), "call_id": c["id"],
                     "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                     "status": "completed"})
    self.turn = {"role": "assistant", "content": content, **({"tool_calls": calls}
                                                             if calls else {}),
                 **({"reasoning": thought} if thought is not None else {})}
    usage = _usage(self.call.prompt_tokens, self.call.cached_tokens, completion)
    return self.response(status, output, usage, incomplete={"reason": "max_output_tokens"}
                         if reason == "length" else None)


def _prompt(server, body: ResponsesRequest) -> tuple[list[int], Turns | None, list[dict]]:
  """(the prompt's token ids, the stored conversation before this turn, this turn's
  messages): instructions, previous_response_id's stored turns and the input through the
  template. With truncation "auto", a conversation that leaves no room in the context for
  max_output_tokens (else one token) loses its fewest oldest stored turns (each from a user
  message to the next; the leading system / developer messages stay, and so does all of this
  request's input) that make it fit, found by bisection (a few renders, whatever its
  length); where even none of them does not fit, the engine's 400."""
  before = (server.responses.get(body.previous_response_id, "previous_response_id")[1]
            if body.previous_response_id else None)
  history = before.conversation() if before is not None else []
  turn = input_messages(body)
  if not history + turn:
    raise api.ApiError(400, "input holds no message (a reasoning item alone is none)", "input")
  system = [{"role": "system", "content": body.instructions}] if body.instructions else []
  conversation = history + turn
  pinned = next((i for i, m in enumerate(conversation)
                 if m.get("role") not in ("system", "developer")), len(conversation))

  def render(messages):
    messages = [api.Message.model_validate(m).for_template() for m in system + messages]
    return generation.chat_prompt(server, messages, body.active_tools(), "input",
                                  add_generation_prompt=True)

  ids = render(conversation)
  room = server.engine.max_model_len - (body.limit or 1)
  if body.truncation == "auto" and len(ids) > room:
    # where the kept conversation may start: a user message of the stored turns, or this
    # request's input; the more is cut, the shorter the prompt
    cuts = [i for i in range(pinned + 1, len(history) + 1)
            if i < len(conversation) and conversation[i].get("role") == "user"]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
      mid = (lo + hi) // 2
      cut = render(conversation[:pinned] + conversation[cuts[mid]:])
      if len(cut) <= room:
        best, hi = cut, mid - 1
      else:
        lo = mid + 1
    ids = best if best is not None else ids
  return ids, before, turn


async def create(server, request):
  body = await generation.parse_body(server, request, ResponsesRequest)
  ids, before, turn = _prompt(server, body)
  offered = body.active_tools()
  call, fmt = generation.chat_call(server, ids, body, offered)
  try:
    call.submit()
  except api.ApiError as e:  # the engine names chat's fields: this endpoint's instead
    if e.param in RENAMED_BY_ENGINE:
      e.param = RENAMED_BY_ENGINE[e.param]
      e.message = e.message.replace("max_tokens", "max_output_tokens")
    raise
  answer = _Answer(server, body, call, fmt, offered)

  def keep(response):
    if body.store and response["status"] != "failed":
      server.responses.put(answer.rid, response, turn + [answer.turn], input_items(body),
                           before)

  if body.stream:
    # held to the end where tool calls or reasoning must be parsed out first
    held = bool(offered) or server.reasoning_parser is not None
    return EventStream(_events(answer, held, keep), call.close)
  res = await server.wait(request, call)
  response = answer.finish(res.texts[0], res.reasons[0], res.logprobs[0],
                           res.completion_tokens[0])
  keep(response)
  return server.json_response(response)


async def _events(answer: _Answer, held: bool, keep):
  """The response as the Responses API streams it. The text streams as it comes unless the
  request offers tools (then it is held, as chat holds it, until the calls can be parsed)."""
  numbers = itertools.count()

  def event(kind: str, **fields) -> str:
    data = {"type": kind, "sequence_number": next(numbers), **fields}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

  def opened(index: int, item: dict):
    """The events that open an item (its empty form)."""
    if item["type"] == "message":
      part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
      return [event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "content": []}),
              event("response.content_part.added", item_id=item["id"], output_index=index,
                    content_index=0, part=part)]
    if item["type"] == "reasoning":
      return [event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "content": []})]
    return [event("response.output_item.added", output_index=index,
                  item={**item, "arguments": "", "status": "in_progress"})]

  yield event("response.created", response=answer.response("in_progress", []))
  yield event("response.in_progress", response=answer.response("in_progress", []))
  if not held:
    for e in opened(0, _message(answer.mid, "", "in_progress", [])):
      yield e
  text, items, reason, completion = "", [], None, 0
  async for _, ev in answer.call.events():
    if ev.error:
      error = {"code": "server_error", "message": ev.error}
      yield event("error", code="server_error", message=ev.error, param=None)
      yield event("response.failed", response=answer.response("failed", [], error=error))
      return
    text, items, completion = text + ev.text, items + ev.logprobs, ev.completion_tokens
    reason = ev.finish_reason or reason
    if not held and (ev.text or ev.logprobs):
      yield event("response.output_text.delta", item_id=answer.mid, output_index=0,
                  content_index=0, delta=ev.text, logprobs=answer.logprobs(ev.logprobs))
  final = answer.finish(text, reason, items, completion)
  for index, item in enumerate(final["output"]):
    if item["type"] == "message":
      part = item["content"][0]
      if held:
        for e in opened(index, item):
          yield e
        yield event("response.output_text.delta", item_id=item["id"], output_index=index,
                    content_index=0, delta=part["text"], logprobs=part["logprobs"])
      yield event("response.output_text.done", item_id=item["id"], output_index=index,
                  content_index=0, text=part["text"], logprobs=part["logprobs"])
      yield event("response.content_part.done", item_id=item["id"], output_index=index,
                  content_index=0, part=part)
    elif item["type"] == "reasoning":
      for e in opened(index, item):
        yield e
      thought = item["content"][0]["text"]
      yield event("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                  content_index=0, delta=thought)
      yield event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                  content_index=0, text=thought)
    else:
      for e in opened(index, item):
        yield e
      yield event("response.function_call_arguments.delta", item_id=item["id"],
                  output_index=index, delta=item["arguments"])
      yield event("response.function_call_arguments.done", item_id=item["id"],
                  output_index=index, name=item["name"], arguments=item["arguments"])
    yield event("response.output_item.done", output_index=index, item=item)
  keep(final)
  yield event("response.completed" if final["status"] == "completed" else
              "response.incomplete", response=final)


def input_items(body: ResponsesRequest) -> list[dict]:
  """The request's input as the input_items list gives it back: items with their type and an
  id, a message's string content as one input_text part."""
  given = ([{"role": "user", "content": body.input}] if isinstance(body.input, str)
           else body.input)
  out = []
  for item in given:
    item = {"type": "message", **item}
    prefix = {"message": "msg", "function_call": "fc"}.get(item["type"], "fco")
    item.setdefault("id", _new_id(prefix))
    if item["type"] == "message" and isinstance(item.get("content"), str):
      kind = "output_text" if item.get("role") == "assistant" else "input_text"
      item["content"] = [{"type": kind, "text": item["content"]}]
    if item["type"] == "message":
      item.setdefault("status", "completed")
    out.append(item)
  return out


async def list_input_items(server, request):
  """GET /v1/responses/{id}/input_items: a stored response's input items (newest first
  unless order=asc), `limit` (1 to 100, 20) after the item `after`."""
  items = server.responses.items(request.path_params["response_id"])
  query = request.query_params
  order = query.get("order", "desc")
  if order not in ("asc", "desc"):
    raise api.ApiError(400, f"order must be asc or desc, got {order!r}", "order")
  limit = query.get("limit", "20")
  if not limit.isdigit() or not 1 <= int(limit) <= 100:
    raise api.ApiError(400, f"limit must be an integer in [1, 100], got {limit!r}", "limit")
  items = items if order == "asc" else items[::-1]
  if "after" in query:
    ids = [item["id"] for item in items]
    if query["after"] not in ids:
      raise api.ApiError(400, f"after: no input item {query['after']!r} in this response",
                         "after")
    items = items[ids.index(query["after"]) + 1:]
  page = items[:int(limit)]
  return server.json_response({"object": "list", "data": page,
                               "first_id": page[0]["id"] if page else None,
                               "last_id": page[-1]["id"] if page else None,
                               "has_more": len(items) > len(page)})


async def count_input_tokens(server, request):
  """POST /v1/responses/input_tokens: the tokens a request's input would take (its prompt
  through the chat template), as the Responses API counts them."""
  body = await generation.parse_body(server, request, ResponsesRequest)
  return server.json_response({"object": "response.input_tokens",
                               "input_tokens": len(_prompt(server, body)[0])})


async def cancel(server, request):
  server.responses.get(request.path_params["response_id"])  # 404 for one not kept
  raise api.ApiError(400, "only background responses can be cancelled, and this server makes "
                     "none: a response is cancelled by closing its request",
                     reason="unsupported_field")


async def stored(server, request):
  """GET (the response) and DELETE (forget it) of /v1/responses/{id}."""
  rid = request.path_params["response_id"]
  for name in ("stream", "starting_after"):  # a replay of a background response's events
    if name in request.query_params:
      raise api.ApiError(400, f"{name}: this server streams a response only while it is "
                         "made (it makes no background responses)", name,
                         reason="unsupported_field")
  if request.method == "DELETE":
    server.responses.delete(rid)
    return server.json_response({"id": rid, "object": "response", "deleted": True})
  return server.json_response(server.responses.get(rid)[0])
