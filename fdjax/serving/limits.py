"""What one request to `fdjax serve` may ask for: every dimension a client controls has a
limit, a flag of its own (`--max-...`), and a refusal naming it (a 400; 413 for the body).
The engine's own widths bound two of them: logit_bias (sampling.MAX_LOGIT_BIAS entries) and
the top logprobs (sampling.MAX_TOP_LOGPROBS)."""
from __future__ import annotations

import dataclasses
import json

from fdjax.engine.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from fdjax.serving.api import ApiError, depth, parse_schema


@dataclasses.dataclass(frozen=True)
class Limits:
  body_bytes: int = 8 << 20      # the request body (413 past it)
  prompts: int = 64              # prompts in one completions request
  n: int = 64                    # choices per prompt (and best_of)
  logit_bias: int = MAX_LOGIT_BIAS  # logit_bias entries
  stop: int = 16                 # stop strings
  stop_chars: int = 1024         # their total length
  top_logprobs: int = MAX_TOP_LOGPROBS  # top tokens per position (chat top_logprobs,
  #                                       completions logprobs)
  schema_bytes: int = 64 << 10   # a JSON schema / grammar (response_format, guided_*, tools)
  schema_depth: int = 32         # a JSON schema's nesting
  tools: int = 64                # tools per request
  embedding_inputs: int = 2048   # inputs in one embeddings request (OpenAI's bound)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"limits: --max-{flag(f.name)} must be an integer >= 1, got {value!r}")
    for name, cap in (("logit_bias", MAX_LOGIT_BIAS), ("top_logprobs", MAX_TOP_LOGPROBS)):
      if getattr(self, name) > cap:
        raise ValueError(f"limits: --max-{flag(name)} can be at most {cap} (the engine's "
                         f"width), got {getattr(self, name)}")


def flag(name: str) -> str:
  return name.replace("_", "-")


def refuse(name: str, what: str, value, limit: int, param: str, status: int = 400):
  raise ApiError(status, f"{what} is {value}; this server takes at most {limit} "
                 f"(--max-{flag(name)})", param, reason="limit")


def check_body_size(size: int, limits: Limits):
  if size > limits.body_bytes:
    refuse("body_bytes", "the request body's size in bytes", size, limits.body_bytes, None,
            413)


def check(body, limits: Limits, prompts: int = 1):
  """Refuses (ApiError) a parsed request (fdjax.serving.api) past any limit."""
  if prompts > limits.prompts:
    refuse("prompts", "the number of prompts", prompts, limits.prompts, "prompt")
  if body.n > limits.n:
    refuse("n", "n", body.n, limits.n, "n")
  best_of = getattr(body, "best_of", None)
  if best_of is not None and best_of > limits.n:
    refuse("n", "best_of", best_of, limits.n, "best_of")
  if len(body.logit_bias or {}) > limits.logit_bias:
    refuse("logit_bias", "the number of logit_bias entries", len(body.logit_bias),
            limits.logit_bias, "logit_bias")
  stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  if len(stop) > limits.stop:
    refuse("stop", "the number of stop strings", len(stop), limits.stop, "stop")
  if sum(len(s) for s in stop) > limits.stop_chars:
    refuse("stop_chars", "the stop strings' total length", sum(len(s) for s in stop),
            limits.stop_chars, "stop")
  top = body.top_logprobs_count
  if top is not None and top > limits.top_logprobs:
    refuse("top_logprobs", "the number of top logprobs", top, limits.top_logprobs,
            "top_logprobs" if hasattr(body, "top_logprobs") else "logprobs")
  tools = getattr(body, "tools", None) or []
  if len(tools) > limits.tools:
    refuse("tools", "the number of tools", len(tools), limits.tools, "tools")
  for param, value in _schemas(body):
    if not isinstance(value, str) and depth(value) > limits.schema_depth:
      refuse("schema_depth", f"{param}'s nesting depth", depth(value), limits.schema_depth,
              param)
    size = len(value.encode()) if isinstance(value, str) else len(json.dumps(value))
    if size > limits.schema_bytes:
      refuse("schema_bytes", f"{param}'s size in bytes", size, limits.schema_bytes, param)


def _schemas(body):
  """(field, schema or grammar text) of everything that becomes a grammar."""
  fmt = body.response_format
  if fmt is not None and fmt.json_schema is not None:
    yield "response_format", fmt.json_schema.schema_
  if isinstance(body.guided_json, str):  # a schema sent as text: its depth counts too
    yield "guided_json", body.guided_json
    yield "guided_json", parse_schema(body.guided_json, "guided_json")
  elif body.guided_json is not None:
    yield "guided_json", body.guided_json
  for name in ("guided_regex", "guided_grammar"):
    if getattr(body, name) is not None:
      yield name, getattr(body, name)
  if body.guided_choice is not None:
    yield "guided_choice", body.guided_choice
  text = getattr(body, "text", None)  # the Responses API's text.format
  if text is not None and text.format is not None and text.format.schema_ is not None:
    yield "text", text.format.schema_
  for tool in getattr(body, "tools", None) or []:
    fn = getattr(tool, "function", tool)  # chat's tools nest it; the Responses API's do not
    if fn.parameters is not None:
      yield "tools", fn.parameters
