"""A request to the serving engine, what it is told as it runs (events), and the checks that
refuse one the engine can never serve."""
from __future__ import annotations

import dataclasses
from typing import Callable

from fdjax.engine.sampling import MAX_LOGIT_BIAS, Settings, logprobs_mode_error


class QueueFull(RuntimeError):
  """The waiting queue holds max_queue requests already."""


class BadRequest(ValueError):
  """A request the engine cannot serve; `param` names the request field at fault."""

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass
class TokenLogprob:
  """A token's logprob (None for a prompt's first token, which nothing predicts) and the most
  likely tokens at its position, best first: [(token id, logprob)], sampling.MAX_TOP_LOGPROBS
  of them."""
  token: int
  logprob: float | None
  top: list


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
  logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob of each new token
  prompt_logprobs: list | None = None  # TokenLogprob of each prompt token (first event only)


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0
  stop: tuple[str, ...] = ()
  min_p: float = 0.0             # tokens under min_p times the likeliest's probability cut
  on_event: Callable[[Event], None] = lambda event: None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: tuple = ()         # ((token id, bias), ...)
  min_tokens: int = 0            # no EOS and no stop string before this many tokens
  ignore_eos: bool = False
  logprobs: bool = False         # record each new token's logprob and the top tokens'
  logprobs_mode: str = "raw_logprobs"  # of what: sampling.LOGPROBS_MODES
  prompt_logprobs: bool = False  # and the prompt's (computed in full: no prefix cache)
  after: "Request | None" = None  # admitted once this one's prompt is in the cache (n > 1)
  constraint: object = None      # a grammar.Constraint: the tokens it may take (structured)
  skip_special_tokens: bool = True  # its text without the special tokens (a tool-call marker
                                    # that is one, Mistral's [TOOL_CALLS], kept: False)
  # Owned by the engine.
  state: str = "new"             # new, waiting, prefill, decode, done
  pages: list[int] = dataclasses.field(default_factory=list)
  draft_pages: list[int] = dataclasses.field(default_factory=list)  # a draft model's cache
  replica: int = 0               # the data replica whose pages it holds (a mesh's)
  computed: int = 0              # prompt tokens whose K/V are in the cache
  cached_prompt: int = 0         # of them, those the prefix cache held when it was admitted
  tokens: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  sent: int = 0                  # characters of text handed out
  searched: int = 0              # characters of text searched for stop strings
  finish_reason: str | None = None
  cancelled: bool = False
  t_submit: float = 0.0
  t_first: float | None = None
  t_last: float | None = None    # when its latest tokens came
  prompt_lp: list | None = None  # the prompt's TokenLogprobs, as prefill computes them

  def settings(self) -> Settings:
    return Settings(self.temperature, self.top_k, self.top_p, self.seed, self.presence_penalty,
                    self.frequency_penalty, self.repetition_penalty, tuple(self.logit_bias),
                    self.min_tokens, self.ignore_eos, self.logprobs, self.logprobs_mode,
                    self.min_p)

  @property
  def needs_history(self) -> bool:
    """Whether its penalties read the tokens so far."""
    return (self.presence_penalty != 0 or self.frequency_penalty != 0
            or self.repetition_penalty != 1)

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
  if not isinstance(req.max_tokens, int) or req.max_tokens < 0:
    raise BadRequest("max_tokens", f"max_tokens must be >= 0, got {req.max_tokens!r}")
  if not req.repetition_penalty > 0:
    raise BadRequest("repetition_penalty", f"repetition_penalty must be > 0, got "
                     f"{req.repetition_penalty!r}")
  if len(req.logit_bias) > MAX_LOGIT_BIAS:
    raise BadRequest("logit_bias", f"logit_bias takes up to {MAX_LOGIT_BIAS} entries, got "
                     f"{len(req.logit_bias)}")
  bad = [t for t, _ in req.logit_bias if not 0 <= t < vocab_size]
  if bad:
    raise BadRequest("logit_bias", f"logit_bias: token id {bad[0]} is outside the vocabulary "
                     f"[0, {vocab_size})")
  if not 0 <= req.min_tokens <= req.max_tokens:
    raise BadRequest("min_tokens", f"min_tokens must be in [0, max_tokens={req.max_tokens}], "
                     f"got {req.min_tokens}")
  if error := logprobs_mode_error(req.logprobs_mode):
    raise BadRequest("logprobs_mode", error)
  if not 0.0 <= req.min_p <= 1.0:
    raise BadRequest("min_p", f"min_p must be in [0, 1], got {req.min_p!r}")
  if req.top_k is not None and not 1 <= req.top_k < 2 ** 31:
    raise BadRequest("top_k", f"top_k must be in [1, 2^31), got {req.top_k}")
  if req.constraint is not None and req.min_tokens:
    raise BadRequest("min_tokens", "min_tokens cannot be combined with a grammar (it would "
                     "ban the EOS a complete grammar needs)")
  if req.constraint is not None and req.constraint.done:
    raise BadRequest("constraint", "the output's grammar allows nothing but an empty answer")
  if len(req.prompt) + req.max_tokens > max_model_len:
    raise BadRequest("max_tokens", f"the prompt ({len(req.prompt)} tokens) plus max_tokens "
                     f"({req.max_tokens}) exceeds this model's context of "
                     f"{max_model_len} tokens")
