"""Chat templates: a checkpoint's jinja2 template turning a list of messages into the prompt
text, rendered the way Hugging Face transformers renders it (`apply_chat_template`).

Where the template comes from, as transformers reads it: `chat_template.jinja` beside the
checkpoint (and `additional_chat_templates/tool_use.jinja`), else the `chat_template` of its
`tokenizer_config.json` (a string, or a list of named templates: "default", and "tool_use"
for a request with tools where there is one). The
template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None unless
given, as transformers passes them) and the special tokens named in tokenizer_config.json
(`bos_token`, `eos_token`, ...), in a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, loop controls, a `raise_exception(message)` helper, `strftime_now(format)`,
a `tojson` filter that leaves non-ASCII and HTML characters alone, and the
`{% generation %}` block (rendered as its body). The result is tokenized without adding
special tokens (the template writes them).

The bundled default model's template (in its tokenizer_config.json) writes each message as
a Python comment line, `# role: content` (newlines inside content continue the comment),
and, for the generation prompt, `# assistant:` and a newline: the model, trained on Python
sources, answers with code.
"""
from __future__ import annotations

import datetime
import functools
import json
import os

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


class TemplateError(ValueError):
  """The template refused the messages (its raise_exception) or failed to render them."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering keeps its body as it is."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


class ChatTemplate:

  def __init__(self, source: str, special_tokens: dict | None = None,
               tool_source: str | None = None):
    for s in (source,) if tool_source is None else (source, tool_source):
      if not isinstance(s, str) or not s:
        raise ValueError("a chat template must be a non-empty string")
    self.source = source
    self.tool_source = tool_source  # the "tool_use" template: for requests with tools
    self.special_tokens = dict(special_tokens or {})
    _compile(source)  # a syntax error shows now, not at the first request
    if tool_source:
      _compile(tool_source)

  @property
  def with_tools(self) -> str:
    """The template a request with tools renders with."""
    return self.tool_source or self.source

  def render(self, messages, add_generation_prompt: bool = True,
             continue_final_message: bool = False, **kwargs) -> str:
    """The prompt text for `messages` (a list of dicts with "role" and "content"); keys
    whose value is None are dropped, as transformers does. continue_final_message: the text
    ends inside the last message (no end-of-turn after it), for the model to go on with it,
    as transformers does it: a tag after its content, the rendered text cut there
    (TemplateError where the template drops the tag or the content)."""
    import jinja2
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    final = None
    if continue_final_message:
      final = messages[-1].get("content") if messages else None
      if not isinstance(final, str):
        raise TemplateError("continue_final_message needs a last message with text content")
      messages[-1] = {**messages[-1], "content": final + _CONTINUE_TAG}
    source = self.with_tools if kwargs.get("tools") else self.source
    try:
      text = _compile(source).render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     **{"tools": None, "documents": None,
                                        **self.special_tokens, **kwargs})
    except jinja2.exceptions.TemplateError as e:
      raise TemplateError(f"the chat template refused the messages: {e}") from e
    if final is None:
      return text
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0 or final.strip() not in text:
      raise TemplateError("continue_final_message: the chat template leaves out part of the "
                          "last message, so it cannot be continued")
    whole = text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG  # its spacing kept
    return text[:at] if whole else text[:at].rstrip()


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _token_text(value):
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _read(file: str) -> str | None:
  if not os.path.exists(file):
    return None
  with open(file, encoding="utf-8") as fh:
    return fh.read()


def load(path: str | os.PathLike) -> ChatTemplate | None:
  """The chat template of a checkpoint directory, or None when it has none."""
  path = os.fspath(path)
  config = {}
  config_file = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(config_file):
    try:
      with open(config_file, encoding="utf-8") as fh:
        config = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e})") from e
  source, tool_source = config.get("chat_template"), None
  if isinstance(source, list):
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source, tool_source = named.get("default"), named.get("tool_use")
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):  # (transformers 5 writes its named ones beside it)
    source, tool_source = _read(jinja_file), _read(os.path.join(
        path, "additional_chat_templates", "tool_use.jinja"))
  if source is None:
    return None
  special = {k: _token_text(config[k]) for k in SPECIAL_TOKENS if config.get(k) is not None}
  try:
    return ChatTemplate(source, {k: v for k, v in special.items() if isinstance(v, str)},
                        tool_source)
  except Exception as e:  # a template jinja2 cannot compile
    raise ValueError(f"{path}: the chat template does not compile: {e}") from e
