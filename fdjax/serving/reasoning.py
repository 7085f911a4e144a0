"""Reasoning parsers, as vLLM's --reasoning-parser: a thinking model's answer split into its
reasoning (between <think> and </think>) and its content, for chat's `reasoning_content` and
the Responses API's reasoning item.

  deepseek_r1  DeepSeek-R1 and its distills: the template opens <think> in the prompt, so the
               answer is reasoning until </think> (all of it, where it never closes)
  qwen3        Qwen3, QwQ: reasoning only where the answer opens <think> itself (with
               enable_thinking false the template closes it in the prompt: all content)

Either way a <think> the answer opens is taken off, and text after </think> is the content
(None where empty). Streamed (Stream), a tail that may begin a marker is held back until the
next text shows what it is."""
from __future__ import annotations

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def check(parser: str | None):
  """ValueError for a parser that is not one of PARSERS."""
  if parser is not None and parser not in PARSERS:
    raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {parser!r}")


def split(parser: str | None, text: str) -> tuple[str | None, str | None]:
  """(reasoning, content) of a whole answer; (None, text) without a parser."""
  if parser is None:
    return None, text
  stripped = text.lstrip()
  opened = stripped.startswith(START)
  body = stripped[len(START):] if opened else text
  if END in body and (opened or parser == "deepseek_r1"):
    reasoning, _, content = body.partition(END)
    return reasoning or None, content or None
  if opened or parser == "deepseek_r1":
    return body or None, None
  return None, text


def fields(thought: str | None) -> dict:
  """A message's reasoning under both names clients read (vLLM's reasoning_content, and
  reasoning as newer vLLM and OpenRouter write it)."""
  return {"reasoning_content": thought, "reasoning": thought}


def _held(text: str) -> int:
  """How many trailing characters may begin a marker still to come (held back)."""
  return max([0] + [k for marker in (START, END) for k in range(1, len(marker))
                    if text.endswith(marker[:k])])


class Stream:
  """One streamed answer's split: feed(new text) -> (reasoning delta, content delta), holding
  back what may begin a marker until it is known; feed(new text, end=True) sends the rest."""

  def __init__(self, parser: str):
    self.parser, self.text, self.sent = parser, "", ("", "")

  def feed(self, text: str, end: bool = False) -> tuple[str, str]:
    self.text += text
    visible = self.text if end else self.text[:len(self.text) - _held(self.text)]
    if not end and START.startswith(visible.lstrip()):
      visible = ""  # nothing yet, or the answer may be opening <think>
    reasoning, content = split(self.parser, visible)
    reasoning, content = reasoning or "", content or ""
    sent_r, sent_c = self.sent
    # each part only grows (a part that would not is held: it cannot happen with the rules)
    reasoning = reasoning if reasoning.startswith(sent_r) else sent_r
    content = content if content.startswith(sent_c) else sent_c
    self.sent = (reasoning, content)
    return reasoning[len(sent_r):], content[len(sent_c):]
