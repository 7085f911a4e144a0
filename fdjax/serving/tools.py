"""Tool calls: the format a checkpoint's chat template writes them in, the grammar that makes
a model call a tool (`tool_choice` "required" or a named function), and the calls parsed
back out of its text.

Formats, told apart by the template's own text:
  hermes       `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen, Hermes)
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
  llama3_json  the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3)
"""
from __future__ import annotations

import json
import re
import uuid

FORMATS = ("hermes", "mistral", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def detect(template_source: str | None) -> str:
  """The tool-call format of a chat template."""
  source = template_source or ""
  if "<tool_call>" in source:
    return "hermes"
  if "[TOOL_CALLS]" in source:
    return "mistral"
  return "llama3_json"


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
          "function": {"name": obj["name"], "arguments": json.dumps(args)}}


def parse(fmt: str, text: str, names) -> tuple[str | None, list[dict]]:
  """(the text before the calls, or None when nothing but calls; the calls) of a model's
  answer. Only calls of the offered tools (`names`) count; text that is not a call stays
  text."""
  calls, content = [], text
  if fmt == "hermes":
    found = list(_HERMES.finditer(text))
    for match in found:
      try:
        calls.append(_call(fmt, json.loads(match.group(1))))
      except json.JSONDecodeError:
        calls.append(None)
    if found:
      content = text[:found[0].start()]
  elif fmt == "mistral":
    at = text.find("[TOOL_CALLS]")
    if at >= 0:
      try:
        items = json.loads(text[at + len("[TOOL_CALLS]"):].strip())
        calls = [_call(fmt, x) for x in (items if isinstance(items, list) else [items])]
        content = text[:at]
      except json.JSONDecodeError:
        calls = [None]
  elif text.lstrip().startswith("{"):
    try:
      calls, content = [_call(fmt, json.loads(text))], ""
    except json.JSONDecodeError:
      calls = [None]
  if not calls or any(c is None or c["function"]["name"] not in names for c in calls):
    return text, []
  return (content.strip() or None), calls
