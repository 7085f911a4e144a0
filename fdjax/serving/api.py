"""The OpenAI wire format of `fdjax serve`: request bodies (validated, with the field at fault
named), error objects, responses and the streamed chunks, for /v1/completions and
/v1/chat/completions.

Fields taken: model, prompt (a string, a list of strings, or a list of token ids) or messages,
max_tokens (chat: also max_completion_tokens), temperature, top_p, top_k (an extension:
null or >= 1), seed, stop (a string or a list of strings), stream, stream_options
({"include_usage": bool}), and, at their only supported values, n (1), echo (false),
logprobs (null / false), presence_penalty and frequency_penalty (0), user (ignored). Any other
field, or a field of the wrong type or out of range, is a 400 naming it.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 16
# How pydantic names the member of a union in an error's location (not a field).
_UNION_TAGS = {"str", "int", "float", "bool", "TextPart", "StreamOptions"}


class ApiError(Exception):
  """An error the client gets as {"error": {...}} with this HTTP status."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = (status, message, param, type,
                                                                   code)

  def body(self) -> dict:
    return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
  include_usage: bool = False


class _Sampling(_Strict):
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int | None = Field(None, ge=1)
  seed: int | None = Field(None, ge=0, lt=2 ** 32)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: Literal[1] = 1
  presence_penalty: Literal[0] = 0
  frequency_penalty: Literal[0] = 0
  user: str | None = None

  def stop_strings(self) -> tuple[str, ...]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
      raise ApiError(400, f"stop takes up to {MAX_STOP} non-empty strings", "stop")
    return tuple(stop)


class CompletionRequest(_Sampling):
  prompt: str | list[int] | list[str]
  max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
  echo: Literal[False] = False
  logprobs: None = None
  suffix: None = None


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class Message(BaseModel):
  """A chat message; keys beyond these (tool_calls, ...) reach the template as they are."""
  model_config = ConfigDict(extra="allow", strict=True)
  role: str
  content: str | list[TextPart] | None = None
  name: str | None = None

  def for_template(self) -> dict:
    """The message as the template sees it: text parts joined into one string."""
    out = self.model_dump(exclude_none=True)
    if isinstance(self.content, list):
      out["content"] = "".join(p.text for p in self.content)
    return out


class ChatRequest(_Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: Literal[False] | None = None

  @property
  def limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else \
        self.max_tokens


def parse(kind: type[_Sampling], body: bytes) -> _Sampling:
  """The request body as `kind`, or ApiError 400 naming the first field at fault. A field
  sent as null takes its default, as OpenAI's API does."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}") from None
  if isinstance(data, dict):
    body = json.dumps({k: v for k, v in data.items() if v is not None})
  try:
    return kind.model_validate_json(body)
  except ValidationError as e:
    err = e.errors()[0]
    loc = [str(part) for part in err["loc"]]
    if not loc:
      raise ApiError(400, "the request body must be a JSON object") from None
    where = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]
                             if "[" not in p and p not in _UNION_TAGS)
    if err["type"] == "extra_forbidden":
      message = f"unknown field {where!r}"
    elif err["type"] == "missing":
      message = f"field {where!r} is required"
    else:
      message = f"field {where!r}: {err['msg']} (got {json.dumps(err.get('input'))[:80]})"
    raise ApiError(400, message, loc[0]) from None


# ------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid, obj, model, choices, extra=None):
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": choices, **(extra or {})}


def completion(rid, model, texts, reasons, prompt_tokens, completion_tokens) -> dict:
  return _envelope(rid, "text_completion", model, [
      {"index": i, "text": t, "finish_reason": r, "logprobs": None}
      for i, (t, r) in enumerate(zip(texts, reasons))],
      {"usage": usage(prompt_tokens, completion_tokens)})


def chat_completion(rid, model, text, reason, prompt_tokens, completion_tokens) -> dict:
  return _envelope(rid, "chat.completion", model, [
      {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
       "logprobs": None}], {"usage": usage(prompt_tokens, completion_tokens)})


def completion_chunk(rid, model, text, reason=None) -> dict:
  return _envelope(rid, "text_completion", model,
                   [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}])


def chat_chunk(rid, model, delta: dict, reason=None) -> dict:
  return _envelope(rid, "chat.completion.chunk", model,
                   [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}])


def usage_chunk(rid, model, obj, prompt_tokens, completion_tokens) -> dict:
  return _envelope(rid, obj, model, [], {"usage": usage(prompt_tokens, completion_tokens)})


def sse(data) -> str:
  """One server-sent event: `data: <json>` and a blank line; "[DONE]" as it is."""
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
