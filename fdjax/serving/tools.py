"""Tool calls: the format a checkpoint's chat template writes them in, the grammar that makes
a model call a tool (`tool_choice` "required" or a named function), and the calls parsed
back out of its text.

Formats, told apart by the template's own text:
  hermes       `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen, Hermes)
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
  mistral_args `[TOOL_CALLS]name[ARGS]{...}`, once per call (Mistral's v11+ tokenizers:
               Mistral Small 3.2, Magistral, Devstral; a `[CALL_ID]id` before `[ARGS]` too)
  llama3_json  the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3),
               or several separated by ";", after `<|python_tag|>` where the text keeps it
"""
from __future__ import annotations

import json
import re
import uuid

FORMATS = ("hermes", "mistral", "mistral_args", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def detect(template_source: str | None) -> str:
  """The tool-call format of a chat template."""
  source = template_source or ""
  if "<tool_call>" in source:
    return "hermes"
  if "[TOOL_CALLS]" in source:
    return "mistral_args" if "[ARGS]" in source else "mistral"
  return "llama3_json"


def keeps_special_tokens(fmt: str) -> bool:
  """Whether the text calls are parsed from keeps special tokens: Mistral's [TOOL_CALLS] and
  [ARGS] are (decoded as usual, without them, the markers are gone and no call is found)."""
  return fmt in ("mistral", "mistral_args")


def _arguments_key(fmt: str) -> str:
  return "parameters" if fmt == "llama3_json" else "arguments"


def call_schema(fmt: str, tools: list[dict]) -> dict:
  """A JSON schema of one call of any of `tools` (OpenAI function tools, as dicts)."""
  key = _arguments_key(fmt)
  options = []
  for tool in tools:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                      key: params},
                    "required": ["name", key], "additionalProperties": False})
  schema = options[0] if len(options) == 1 else {"anyOf": options}
  return {**schema, "x-guidance": {"whitespace_flexible": False}}


def grammar(fmt: str, tools: list[dict]) -> str:
  """A Lark grammar (llguidance's, with %json) of an answer that is one call of `tools`."""
  if fmt == "mistral_args":  # the name outside the JSON: one alternative per tool
    names = " | ".join(f'{json.dumps(t["function"]["name"] + "[ARGS]")} args{i}'
                       for i, t in enumerate(tools))
    rules = "".join(f"\nargs{i}: %json " + json.dumps(
        {**(t["function"].get("parameters") or {"type": "object"}),
         "x-guidance": {"whitespace_flexible": False}}) for i, t in enumerate(tools))
    return f'start: "[TOOL_CALLS]" call\ncall: {names}{rules}'
  call = "%json " + json.dumps(call_schema(fmt, tools))
  if fmt == "hermes":
    return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {call}'
  if fmt == "mistral":
    return f'start: "[TOOL_CALLS][" call "]"\ncall: {call}'
  return f"start: call\ncall: {call}"


def _call(fmt: str, obj) -> dict | None:
  key = _arguments_key(fmt)
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
    return None
  args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
  return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
          "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _named_call(part: str) -> dict | None:
  """One `name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`) as a call, or None."""
  name, sep, args = part.partition("[ARGS]")
  name = name.partition("[CALL_ID]")[0].strip()
  value = _loads(args.strip()) if sep else None
  return _call("mistral", {"name": name, "arguments": value}) if isinstance(value, dict) \
      else None


PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's tool-call token, where the text keeps it


def _json_objects(text: str) -> list:
  """The JSON values of `text` written one after another, separated by ";" (Llama 3.x's
  parallel calls, `{...}; {...}`); [None] where any part is not JSON."""
  decoder, out, at = json.JSONDecoder(), [], 0
  while True:
    try:
      value, at = decoder.raw_decode(text, at)
    except (ValueError, RecursionError):
      return [None]
    out.append(value)
    rest = text[at:].lstrip()
    if not rest:
      return out
    if not rest.startswith(";"):
      return [None]
    at = len(text) - len(rest[1:].lstrip())


def _loads(text: str):
  """json.loads, None where the text is not JSON (nested past Python's recursion limit too:
  a model's 2000 "[" raised RecursionError)."""
  try:
    return json.loads(text)
  except (ValueError, RecursionError):
    return None


def parse(fmt: str, text: str, names) -> tuple[str | None, list[dict]]:
  """(the text around the calls, or None when nothing but calls; the calls) of a model's
  answer. Only calls of the offered tools (`names`) count: where any part meant as a call
  is not one (not JSON, another tool, cut off by max_tokens), the whole answer stays text."""
  calls, content = [], text
  if fmt == "hermes":
    found = list(_HERMES.finditer(text))
    calls = [_call(fmt, _loads(m.group(1))) for m in found]
    content = _HERMES.sub("", text)
    if "<tool_call>" in content:  # a call left open (cut off)
      calls.append(None)
  elif fmt == "mistral_args":
    at = text.find("[TOOL_CALLS]")
    if at >= 0:
      calls = [_named_call(part) for part in text[at:].split("[TOOL_CALLS]")[1:]]
      content = text[:at]
  elif fmt == "mistral":
    at = text.find("[TOOL_CALLS]")
    if at >= 0:
      items = _loads(text[at + len("[TOOL_CALLS]"):].strip())
      calls = [_call(fmt, x) for x in (items if isinstance(items, list) else [items])]
      content = text[:at]
  else:
    body = text.lstrip()
    body = body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body
    if body.startswith("{"):
      calls, content = [_call(fmt, x) for x in _json_objects(body)], ""
  if not calls or any(c is None or c["function"]["name"] not in names for c in calls):
    return text, []
  return (content.strip() or None), calls
