"""A request to the serving engine, what it is told as it runs (events), and the checks that
refuse one the engine can never serve."""
from __future__ import annotations

import dataclasses
from typing import Callable


class QueueFull(RuntimeError):
  """The waiting queue holds max_queue requests already."""


class BadRequest(ValueError):
  """A request the engine cannot serve; `param` names the request field at fault."""

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass
class Event:
  """What a request got in one iteration: new text and tokens, and at its end the reason."""
  text: str
  tokens: int                    # new tokens (a stop string's cut may drop some of their text)
  finish_reason: str | None      # None, "stop", "length", "cancelled" or "error"
  prompt_tokens: int
  completion_tokens: int         # so far
  time: float                    # time.perf_counter() when produced
  gap: float = 0.0               # seconds since this request's previous tokens (or its submit)
  error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0
  stop: tuple[str, ...] = ()
  on_event: Callable[[Event], None] = lambda event: None
  # Owned by the engine.
  state: str = "new"             # new, waiting, prefill, decode, done
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0              # prompt tokens whose K/V are in the cache
  tokens: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  sent: int = 0                  # characters of text handed out
  searched: int = 0              # characters of text searched for stop strings
  finish_reason: str | None = None
  cancelled: bool = False
  t_submit: float = 0.0
  t_first: float | None = None
  t_last: float | None = None    # when its latest tokens came

  @property
  def cached_len(self) -> int:
    """Tokens whose K/V are in the cache: the prompt, then every token but the newest."""
    if self.state == "decode" or (self.state == "done" and self.tokens):
      return len(self.prompt) + len(self.tokens) - 1
    return self.computed

  def emit(self, event: Event):
    """Tells the request's owner; a listener that is gone (a closed event loop) stops
    nothing."""
    try:
      self.on_event(event)
    except Exception:  # noqa: BLE001
      pass


def check(req: Request, vocab_size: int, max_model_len: int):
  """Raises BadRequest for a request that can never be served."""
  if not req.prompt:
    raise BadRequest("prompt", "the prompt is empty (it encodes to no tokens)")
  bad = [t for t in req.prompt if not 0 <= t < vocab_size]
  if bad:
    raise BadRequest("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
  if len(req.prompt) >= max_model_len:
    raise BadRequest("prompt", f"the prompt has {len(req.prompt)} tokens; this model's "
                     f"context is {max_model_len} tokens, and at least one must be left "
                     "to generate")
  if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
    raise BadRequest("max_tokens", f"max_tokens must be >= 1, got {req.max_tokens!r}")
  if len(req.prompt) + req.max_tokens > max_model_len:
    raise BadRequest("max_tokens", f"the prompt ({len(req.prompt)} tokens) plus max_tokens "
                     f"({req.max_tokens}) exceeds this model's context of "
                     f"{max_model_len} tokens")
