"""The OpenAI wire format of `fdjax serve`: request bodies (validated, with the field at fault
named), the field policy, error objects, responses and the streamed chunks, for
/v1/completions and /v1/chat/completions (the Responses API's request, a _Sampling too, is
in fdjax.serving.responses; its field policy is here).

Fields taken, as OpenAI defines them: model, prompt (a string, a list of strings, a list of
token ids, or a list of token-id lists) or messages, max_tokens (chat: also
max_completion_tokens; completions take 0 with echo), temperature, top_p, seed (any int64),
stop, stream, stream_options (include_usage; continuous_usage_stats, vLLM's, puts the usage
so far in every chunk), n, presence_penalty, frequency_penalty, logit_bias, logprobs
(completions: how many top tokens; chat: true/false, with top_logprobs), echo, best_of (equal
to n), response_format (text, json_object, json_schema), tools and tool_choice (chat).
Extensions, as vLLM names them: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
guided_json, guided_regex, guided_choice, guided_grammar (Lark or GBNF); on chat
add_generation_prompt, continue_final_message and chat_template_kwargs.

The field policy, in one place: a field OpenAI defines that fdjax does not implement is a
400 saying it is not supported (UNSUPPORTED); a harmless client extra (IGNORED) is accepted
and ignored, unless the server runs with --strict-fields; any other unknown field, or a field
of the wrong type or out of range, is a 400 naming it.
"""
from __future__ import annotations

import codecs
import json
import math
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fdjax.engine.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from fdjax.io import generation_config
from fdjax.io.chat import SPECIAL_TOKENS

# Fields OpenAI defines that fdjax does not implement (on chat: the deprecated functions form
# of tools, audio, ...): refused by name.
UNSUPPORTED = {
    "completions": ("suffix",),
    "chat": ("audio", "modalities", "prediction", "web_search_options", "functions",
             "function_call"),
    "responses": ("background", "conversation", "prompt", "context_management"),
    "tokenize": (),
    "embeddings": (),
}
# Fields clients send that change nothing fdjax computes: accepted and ignored (with
# --strict-fields, refused as unknown). Dotted names are inside an object.
IGNORED = ("user", "store", "metadata", "service_tier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "safety_identifier", "moderation",
           "verbosity", "reasoning_effort", "parallel_tool_calls",
           "stream_options.include_obfuscation")
# Values of an unsupported field that mean "not used", as clients send them.
_UNSET = {"suffix": ("",), "modalities": (["text"],), "background": (False,)}
MAX_BODY_DEPTH = 128  # how deeply a request body may nest (JSON schemas: limits.schema_depth)
# How pydantic names the member of a union in an error's location (not a field).
_UNION_TAGS = {"str", "int", "float", "bool", "TextPart", "StreamOptions", "list[int]",
               "list[str]", "list[list[int]]", "dict[str,float]", "dict[any,any]",
               "ResponseFormat", "JsonSchemaFormat", "NamedToolChoice", "Tool", "FunctionDef",
               "literal['none','auto','required']"}


class ApiError(Exception):
  """An error the client gets as {"error": {...}} with this HTTP status; `reason` labels it in
  fdjax_requests_rejected_total."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type: str = "invalid_request_error", code: str | None = None,
               reason: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = (status, message, param, type,
                                                                   code)
    self.reason = reason or code or {404: "not_found", 405: "method_not_allowed",
                                     415: "unsupported_media_type"}.get(status, "bad_request")

  def body(self) -> dict:
    return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
  include_usage: bool = False
  continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                            allow_inf_nan=False)
  name: str = Field(min_length=1, max_length=64)
  schema_: dict = Field(default_factory=dict, alias="schema")
  strict: bool | None = None
  description: str | None = None


class ResponseFormat(_Strict):
  type: Literal["text", "json_object", "json_schema"]
  json_schema: JsonSchemaFormat | None = None


class _Sampling(_Strict):
  ENDPOINT: ClassVar[str] = "chat"  # its UNSUPPORTED entry
  # Fields of the other endpoints a client may send here by mistake: {name: this endpoint's
  # name for it, or None}, refused saying so.
  RENAMED: ClassVar[dict] = {}
  model: str
  max_tokens: int | None = Field(None, ge=1)
  # temperature, top_p, top_k, min_p, repetition_penalty: None (left out) takes the model's
  # generation_config.json default (fdjax.io.generation_config), else the neutral value
  temperature: float | None = Field(None, ge=0.0, le=100.0)
  top_p: float | None = Field(None, gt=0.0, le=1.0)
  top_k: int | None = Field(None, ge=-1, lt=2 ** 31)  # -1 and 0: off (vLLM's "disabled")
  min_p: float | None = Field(None, ge=0.0, le=1.0)
  seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 63)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(1, ge=1)  # its bound, like every request's, is fdjax.serving.limits
  presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
  frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
  repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
  logit_bias: dict[str, float] | None = None
  min_tokens: int = Field(0, ge=0, lt=2 ** 31)
  ignore_eos: bool = False
  response_format: ResponseFormat | None = None
  guided_json: dict | str | None = None
  guided_regex: str | None = None
  guided_choice: list[str] | None = Field(None, min_length=1)
  guided_grammar: str | None = None

  def constraint(self) -> tuple[str, object, str] | None:
    """The output's grammar, as (kind, spec, the field it came from) for
    fdjax.engine.grammar, or None; ApiError for two at once or a bad one."""
    given = []
    if self.response_format is not None and self.response_format.type != "text":
      fmt = self.response_format
      if fmt.type == "json_object":
        given.append(("json_schema", {"type": "object"}, "response_format"))
      elif fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs a json_schema",
                       "response_format")
      else:
        given.append(("json_schema", fmt.json_schema.schema_, "response_format"))
    if self.guided_json is not None:
      spec = self.guided_json
      if isinstance(spec, str):
        try:
          spec = json.loads(spec)
        except json.JSONDecodeError as e:
          raise ApiError(400, f"guided_json is not valid JSON: {e}", "guided_json") from None
      if not isinstance(spec, dict):
        raise ApiError(400, "guided_json must be a JSON schema (an object)", "guided_json")
      given.append(("json_schema", spec, "guided_json"))
    for kind, name in (("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
      if getattr(self, name) is not None:
        given.append((kind, getattr(self, name), name))
    if len(given) > 1:
      raise ApiError(400, f"{given[0][2]} and {given[1][2]} both constrain the output; give "
                     "one", given[1][2])
    return given[0] if given else None

  def sampling(self, defaults: dict) -> dict:
    """temperature, top_k, top_p, min_p, repetition_penalty as the engine takes them: as the
    request gives them, else the model's `defaults` (its generation_config.json), else
    neutral (temperature 1); top_k None and top_p None when off."""
    return generation_config.resolve({name: getattr(self, name)
                                      for name in generation_config.NEUTRAL}, defaults)

  @field_validator("logit_bias")
  @classmethod
  def _bias(cls, value):
    if value is None:
      return value
    if len(value) > MAX_LOGIT_BIAS:
      raise ValueError(f"takes up to {MAX_LOGIT_BIAS} entries, got {len(value)}")
    for key, bias in value.items():
      if not (key.isascii() and key.isdigit() and len(key) <= 10):
        raise ValueError(f"keys are token ids, got {ascii(key)[:40]}")
      if not -100 <= bias <= 100:
        raise ValueError(f"biases are in [-100, 100], got {bias} for token {key}")
    return value

  def stop_strings(self) -> tuple[str, ...]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if any(not s for s in stop):
      raise ApiError(400, "stop takes non-empty strings", "stop")
    return tuple(stop)

  def bias_pairs(self) -> tuple:
    return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

  def check(self):
    """Rules across fields."""
    if self.stream_options is not None and not self.stream:
      raise ApiError(400, "stream_options is only allowed when stream is true",
                     "stream_options")

  @property
  def top_logprobs_count(self) -> int | None:
    """How many top tokens each token's logprobs list, or None for no logprobs."""
    raise NotImplementedError


class CompletionRequest(_Sampling):
  ENDPOINT: ClassVar[str] = "completions"
  prompt: str | list[int] | list[str] | list[list[int]]
  max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo
  echo: bool = False
  logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  best_of: int | None = Field(None, ge=1)

  def check(self):
    super().check()
    if self.best_of is not None and self.best_of != self.n:
      raise ApiError(400, f"best_of ({self.best_of}) other than n ({self.n}) is not supported",
                     "best_of")

  @property
  def top_logprobs_count(self) -> int | None:
    return self.logprobs


class TextPart(_Strict):
  type: Literal["text"]
  text: str


ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's


class Message(BaseModel):
  """A chat message; keys beyond these (tool_calls, ...) reach the template as they are."""
  model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
  role: str
  content: str | list[TextPart] | None = None
  name: str | None = None

  @field_validator("content", mode="before")
  @classmethod
  def _text_parts_only(cls, value):
    for j, part in enumerate(value if isinstance(value, list) else []):
      kind = part.get("type") if isinstance(part, dict) else None
      if isinstance(kind, str) and kind != "text":
        raise ValueError(f"content[{j}] is a {kind!r} part; this server takes text parts only")
    return value

  def check(self, i: int):
    """ApiError unless the role is OpenAI's and the message has content (an assistant's may
    carry tool_calls instead)."""
    if self.role not in ROLES:
      raise ApiError(400, f"messages[{i}].role is {self.role!r}; it must be one of "
                     f"{', '.join(ROLES)}", "messages")
    extra = self.model_extra or {}
    if self.content is None and not (self.role == "assistant" and (
        extra.get("tool_calls") or extra.get("function_call"))):
      raise ApiError(400, f"messages[{i}] ({self.role}) has no content", "messages")

  def for_template(self) -> dict:
    """The message as the template sees it: text parts joined into one string, a newline
    between parts (as vLLM and TensorRT-LLM join them); an assistant's tool calls with their
    arguments as a dict (what transformers' tool-use templates take, `| tojson` or `|
    items`; OpenAI clients send a JSON string), and its `reasoning` as `reasoning_content`
    too (and the other way), as vLLM passes them."""
    out = self.model_dump(exclude_none=True)
    if isinstance(self.content, list):
      out["content"] = "\n".join(p.text for p in self.content)
    if self.role == "assistant" and "tool_calls" in out:
      if out["tool_calls"] == []:  # no calls: the template's plain assistant path
        del out["tool_calls"]
      else:
        out["tool_calls"] = [_call_for_template(c) for c in out["tool_calls"]]
    if self.role == "assistant":  # a past turn's thinking, under both names templates read
      thought = out.get("reasoning", out.get("reasoning_content"))  # (Qwen3: the second)
      if thought is not None:
        out.setdefault("reasoning", thought)
        out.setdefault("reasoning_content", thought)
    return out


def _call_for_template(call) -> dict:
  """A past tool call (OpenAI's form, arguments a JSON string) with its arguments decoded to
  a dict; arguments that are empty, not JSON or not an object become {} (as vLLM: a bad call
  in the history must not make every later turn a 400)."""
  if not isinstance(call, dict) or not isinstance(call.get("function"), dict) or \
      call.get("type", "function") != "function":
    raise ApiError(400, "an assistant's tool_calls are objects of type 'function' with a "
                   "'function' object", "messages")
  args = call["function"].get("arguments")
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except (ValueError, RecursionError):
      args = {}
  return {**call, "function": {**call["function"],
                               "arguments": args if isinstance(args, dict) else {}}}


class FunctionDef(_Strict):
  name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
  description: str | None = None
  parameters: dict | None = None
  strict: bool | None = None


class Tool(_Strict):
  type: Literal["function"]
  function: FunctionDef


class NamedFunction(_Strict):
  name: str


class NamedToolChoice(_Strict):
  type: Literal["function"]
  function: NamedFunction


# What the server hands the chat template itself, the tokenizer's special tokens too.
TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt",
                      "continue_final_message", *SPECIAL_TOKENS}


def check_template_options(messages, add_generation_prompt: bool,
                           continue_final_message: bool, kwargs: dict | None):
  """ApiError for chat template options that do not go together (chat and /tokenize): a
  continued last message is an assistant's, with no generation prompt after it; kwargs may
  not set what the server sets."""
  if add_generation_prompt and continue_final_message:
    raise ApiError(400, "continue_final_message continues the last message; it takes "
                   "add_generation_prompt: false", "continue_final_message")
  if continue_final_message and messages[-1].role != "assistant":
    raise ApiError(400, "continue_final_message continues an assistant's last message; "
                   f"the last is {messages[-1].role!r}", "continue_final_message")
  reserved = sorted(set(kwargs or ()) & TEMPLATE_VARIABLES)
  if reserved:
    raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}: the "
                   "server sets them from the request", "chat_template_kwargs")


def check_tools(names: list[str], choice, named: str | None, constraint, bare=("none",)):
  """ApiError for tools and tool_choice that do not go together (chat and the Responses
  API): one function per name; a tool_choice other than `bare` needs tools, a named one among
  them; a forced call (required, named) with no other grammar (`constraint()`) on the
  output."""
  if len(set(names)) != len(names):
    raise ApiError(400, "tools have two functions of one name", "tools")
  if choice not in (None, *bare) and not names:
    raise ApiError(400, "tool_choice needs tools", "tool_choice")
  if named is not None and named not in names:
    raise ApiError(400, f"tool_choice names {named!r}, which is not among the tools",
                   "tool_choice")
  if (choice == "required" or named is not None) and constraint() is not None:
    raise ApiError(400, f"tool_choice and {constraint()[2]} both constrain the output; give "
                   "one", "tool_choice")


def forced_tools(active: list[dict], choice, named: str | None) -> list[dict] | None:
  """Of the `active` tools (chat's form), those one of which the answer must call
  (tool_choice "required", or the `named` function), or None."""
  if choice == "required":
    return active
  if named is not None:
    return [t for t in active if t["function"]["name"] == named]
  return None


class ChatRequest(_Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  tools: list[Tool] | None = None
  tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
  # vLLM's: the template's generation prompt (an assistant turn's opening), or the last
  # message left open to be continued; more variables for the template (Qwen3's
  # enable_thinking, ...)
  add_generation_prompt: bool = True
  continue_final_message: bool = False
  chat_template_kwargs: dict | None = None

  def check(self):
    super().check()
    for i, message in enumerate(self.messages):
      message.check(i)
    if self.top_logprobs is not None and not self.logprobs:
      raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    check_tools([t.function.name for t in self.tools or []], self.tool_choice,
                self.named_tool, self.constraint)
    check_template_options(self.messages, self.add_generation_prompt,
                           self.continue_final_message, self.chat_template_kwargs)

  @property
  def named_tool(self) -> str | None:
    return (self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice)
            else None)

  def active_tools(self) -> list[dict]:
    """The tools the model is shown (none with tool_choice "none"), as the template takes
    them."""
    if self.tool_choice == "none":
      return []
    return [t.model_dump(exclude_none=True) for t in self.tools or []]

  def forced_tools(self) -> list[dict] | None:
    return forced_tools(self.active_tools(), self.tool_choice, self.named_tool)

  @property
  def limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else \
        self.max_tokens

  @property
  def top_logprobs_count(self) -> int | None:
    return (self.top_logprobs or 0) if self.logprobs else None


_KNOWN = set()  # every field name of both requests (filled below)


def _policy(kind: type[_Sampling], data: dict, strict: bool) -> dict:
  """The body with ignored extras dropped (not when strict); ApiError for a field OpenAI
  defines that fdjax does not implement."""
  for name, instead in kind.RENAMED.items():
    if name in data:
      raise ApiError(400, f"unknown field {name!r}: " + (
          f"this endpoint takes {instead} instead" if instead else "this endpoint has none"),
          name, reason="unknown_field")
  for name in UNSUPPORTED[kind.ENDPOINT]:
    if name in data and data[name] not in _UNSET.get(name, ()):
      raise ApiError(400, f"field {name!r} is not supported by this server", name,
                     reason="unsupported_field")
    data.pop(name, None)
  if strict:
    return data
  for name in IGNORED:
    outer, _, inner = name.partition(".")
    if outer in kind.model_fields and not inner:  # a field of this endpoint (the Responses
      continue                                    # API's store)
    if not inner:
      data.pop(name, None)
    elif isinstance(data.get(outer), dict):
      data[outer] = {k: v for k, v in data[outer].items() if k != inner}
  return data


def parse_schema(text: str, field: str):
  """A JSON schema sent as a string, or ApiError naming the field."""
  try:
    return json.loads(text)
  except (json.JSONDecodeError, RecursionError) as e:
    raise ApiError(400, f"{field} is not valid JSON (or nests too deeply): {e}", field) from None


def _check_text(data: dict):
  """ApiError for a string holding a lone UTF-16 surrogate (JSON's \\ud800 escapes decode to
  one; it is no Unicode character and cannot be encoded)."""
  stack = [(k, v) for k, v in data.items()] + [(k, k) for k in data]
  while stack:
    field, value = stack.pop()
    items = (value.items() if isinstance(value, dict) else enumerate(value)
             if isinstance(value, list) else ())
    stack.extend((field, x) for pair in items for x in pair)
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ApiError(400, f"field {ascii(field)} holds a lone surrogate "
                       f"({ascii(value[e.start])}, a \\ud800-\\udfff escape not in a pair): "
                       "not Unicode text", field if field in _KNOWN else None,
                       reason="bad_text") from None


def depth(value) -> int:
  """How deeply a JSON value nests (a scalar: 0)."""
  stack, deepest = [(value, 0)], 0
  while stack:
    item, d = stack.pop()
    deepest = max(deepest, d)
    children = item.values() if isinstance(item, dict) else item if isinstance(
        item, list) else ()
    stack.extend((c, d + 1) for c in children)
  return deepest


def parse(kind: type[_Sampling], body: bytes, strict: bool = False) -> _Sampling:
  """The request body as `kind`, or ApiError 400 naming the first field at fault. A field
  sent as null takes its default, as OpenAI's API does."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}", reason="bad_json") from None
  if not isinstance(data, dict):
    raise ApiError(400, "the request body must be a JSON object", reason="bad_json")
  nesting = depth(data)
  if nesting > MAX_BODY_DEPTH:  # pydantic's own parser stops at about 255 levels
    raise ApiError(400, f"the request body nests {nesting} levels deep; at most "
                   f"{MAX_BODY_DEPTH}", reason="bad_json")
  _check_text(data)
  data = _policy(kind, {k: v for k, v in data.items() if v is not None}, strict)
  try:
    request = kind.model_validate_json(json.dumps(data))
  except ValidationError as e:
    err = e.errors()[0]
    loc = [str(part) for part in err["loc"]] or ["body"]  # no field: the body as a whole
    where = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]
                             if "[" not in p and p not in _UNION_TAGS)
    if err["type"] == "extra_forbidden":
      message, reason = f"unknown field {where!r}", "unknown_field"
    elif err["type"] == "missing":
      message, reason = f"field {where!r} is required", "missing_field"
    else:
      message, reason = (f"field {where!r}: {err['msg']} (got "
                         f"{json.dumps(err.get('input'))[:80]})", "invalid_value")
    raise ApiError(400, message, loc[0] if err["loc"] else None, reason=reason) from None
  request.check()
  return request


# ------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
  """OpenAI's usage of a completion or chat call: cached_tokens, of the prompt tokens, those
  the prefix cache held (not computed again)."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(rid, obj, model, choices, extra=None):
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": choices, **(extra or {})}


def token_bytes(tokenizer, token: int) -> bytes:
  exact = getattr(tokenizer, "token_bytes", None)
  return exact(token) if exact else tokenizer.decode([token]).encode()


def _finite(pairs, k):
  """The first k (id, logprob) pairs that are candidates at all (filtered tokens are -inf)."""
  return [(t, lp) for t, lp in pairs[:k] if math.isfinite(lp)]


def _lp(value):
  """A logprob JSON can carry: a non-finite one (which no sampled token should have) is
  written as OpenAI writes an impossible one, -9999.0."""
  return value if value is None or math.isfinite(value) else -9999.0


def token_text(raw: bytes) -> str:
  """A token (its bytes) as logprobs name it: its text, or, where its bytes are not whole
  UTF-8 characters (a piece of one), "bytes:" and the bytes as \\xNN escapes, as OpenAI
  writes them, so that no two tokens share a name."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextOffsets:
  """Where each token of a choice begins in its text, in characters: a token's bytes count
  as the characters they complete, so a byte that leaves a character unfinished begins where
  that character does. One per choice, carried across a stream's chunks."""

  def __init__(self, start: int = 0):
    self.at = start
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def advance(self, raw: bytes) -> int:
    start = self.at
    self.at += len(self._decoder.decode(raw))
    return start


def completion_logprobs(tokenizer, items, k: int, offsets: TextOffsets | None = None) -> dict:
  """OpenAI's completions logprobs of TokenLogprobs: tokens, token_logprobs, top_logprobs
  (the k most likely and the token itself; null where nothing predicts it; tokens named by
  token_text) and text_offset (TextOffsets: a fresh one counts from 0)."""
  offsets = offsets or TextOffsets()
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for item in items:
    raw = token_bytes(tokenizer, item.token)
    text = token_text(raw)
    out["tokens"].append(text)
    out["token_logprobs"].append(_lp(item.logprob))
    out["text_offset"].append(offsets.advance(raw))
    if item.logprob is None:
      out["top_logprobs"].append(None)
    else:
      top = {token_text(token_bytes(tokenizer, t)): lp for t, lp in _finite(item.top, k)}
      top.setdefault(text, _lp(item.logprob))
      out["top_logprobs"].append(top)
  return out


def chat_logprobs(tokenizer, items, k: int) -> dict:
  """OpenAI's chat logprobs of TokenLogprobs: content [{token, logprob, bytes,
  top_logprobs [k of the same]}]."""
  def entry(token, logprob):
    raw = token_bytes(tokenizer, token)
    return {"token": token_text(raw), "logprob": _lp(logprob), "bytes": list(raw)}
  return {"content": [{**entry(i.token, i.logprob),
                       "top_logprobs": [entry(t, lp) for t, lp in _finite(i.top, k)]}
                      for i in items], "refusal": None}


def completion_choice(index, text, reason, logprobs=None) -> dict:
  return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}


def chat_delta(index, delta: dict, reason=None, logprobs=None) -> dict:
  return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}


def sse(data) -> str:
  """One server-sent event: `data: <json>` and a blank line; "[DONE]" as it is."""
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


_KNOWN.update(CompletionRequest.model_fields, ChatRequest.model_fields)
