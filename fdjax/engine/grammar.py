"""Structured outputs: a request's grammar (a JSON schema, any JSON object, a regular
expression, a choice of strings, a Lark or GBNF grammar) compiled by llguidance against the
tokenizer's vocabulary. Before each step the host asks it which tokens may come next, as a
bitmask (one bit per token id, 32 to an int32 word) that the device applies to the row's
logits; the tokens the row then takes are fed back.

llguidance (no dependencies; Microsoft's, what vLLM's "guidance" backend runs) is used rather
than xgrammar, which needs torch and transformers at run time.
"""
from __future__ import annotations

import json

import numpy as np

KINDS = ("json_schema", "regex", "choice", "grammar", "lark")


class GrammarError(ValueError):
  """A grammar llguidance refuses (the message says why)."""


def available() -> bool:
  import importlib.util
  return importlib.util.find_spec("llguidance") is not None


class Vocabulary:
  """A tokenizer's vocabulary as llguidance reads it, for a model of `vocab_size` logits.
  fdjax's byte tokenizer (ids 0-255 are the bytes) and a tokenizer without an EOS get a
  virtual EOS id past the logits: a grammar that is complete then stops the request."""

  def __init__(self, tokenizer, vocab_size: int, eos: tuple[int, ...]):
    import llguidance as llg
    self.vocab_size = vocab_size
    inner = getattr(tokenizer, "_tok", None)  # fdjax.io.tokenizer.HFTokenizer's
    if inner is not None and eos:
      self.llt = llg.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=list(eos))
    elif inner is not None:
      self.llt = llg.LLTokenizer(inner.to_str(), n_vocab=vocab_size + 1,
                                 eos_token=vocab_size)
    else:
      self.llt = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes(tokenizer, vocab_size)),
                                 n_vocab=vocab_size + 1)
    self.words = -(-self.llt.vocab_size // 32)

  def compile(self, kind: str, spec) -> str:
    """The llguidance grammar of a request's constraint, or GrammarError. JSON schemas are
    written compactly (no free whitespace, which a small model can emit forever) unless the
    schema's own "x-guidance" says otherwise."""
    import llguidance as llg
    if kind == "json_schema":
      schema = dict(spec)
      schema.setdefault("x-guidance", {"whitespace_flexible": False})
      grammar = llg.grammar_from("json_schema", json.dumps(schema))
    elif kind == "regex":
      grammar = llg.grammar_from("regex", spec)
    elif kind == "choice":
      grammar = llg.grammar_from("choice", json.dumps(list(spec)))
    elif kind == "lark":  # llguidance's own Lark (with %json), as fdjax writes it
      grammar = llg.grammar_from("lark", spec)
    elif kind == "grammar":
      try:
        grammar = llg.grammar_from("grammar", spec)
      except ValueError as e:
        raise GrammarError(str(e)) from None
    else:
      raise GrammarError(f"unknown constraint kind {kind!r}; one of {KINDS}")
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llt)
    if is_error:
      raise GrammarError("; ".join(messages))
    return grammar


class _Bytes:
  """fdjax's byte tokenizer as llguidance's TokenizerWrapper expects it."""

  def __init__(self, tokenizer, vocab_size):
    self.eos_token_id = vocab_size
    self.bos_token_id = None
    self.tokens = [bytes([i]) for i in range(min(vocab_size, 256))] + [b""] * max(
        0, vocab_size - 256) + [b"<eos>"]
    self.special_token_ids = [vocab_size]

  def __call__(self, data: bytes):
    return list(data)


class Constraint:
  """One request's grammar as it generates: `mask` is the bitmask of the tokens that may come
  next ([words] int32), `advance` feeds it the tokens the request took."""

  def __init__(self, vocabulary: Vocabulary, grammar: str):
    import llguidance as llg
    self.vocabulary = vocabulary
    self.matcher = llg.LLMatcher(vocabulary.llt, grammar)
    self.mask = np.zeros((1, vocabulary.words), np.int32)
    self._refresh()

  def _refresh(self):
    import llguidance.numpy as lln
    lln.fill_next_token_bitmask(self.matcher, self.mask, 0)

  @property
  def done(self) -> bool:
    """Whether the grammar takes no more tokens of the model (complete: only EOS is left),
    or no token of the model fits it."""
    if self.matcher.is_stopped():
      return True
    v = self.vocabulary.vocab_size
    bits = np.unpackbits(self.mask[0].view(np.uint8), bitorder="little")[:v]
    return not bits.any()

  def advance(self, tokens: list[int]) -> tuple[list[int], bool]:
    """Feeds the tokens a request took; (the tokens taken, whether the grammar is done)."""
    for i, token in enumerate(tokens):
      if token >= self.vocabulary.vocab_size or not self.matcher.consume_token(int(token)):
        raise RuntimeError(f"structured output: token {token} is outside the grammar "
                           f"({self.matcher.get_error()})")
      self._refresh()
      if self.done:
        return tokens[:i + 1], True
    return tokens, False


def masks(constraints, rows: int, vocab_size: int) -> np.ndarray:
  """The rows' bitmasks [rows, ceil(vocab_size / 32)] int32 (every bit set for a row with no
  constraint), or [rows, 1] when no row has one (one compiled program each way)."""
  if not any(c is not None for c in constraints):
    return np.full((rows, 1), -1, np.int32)
  words = -(-vocab_size // 32)
  out = np.full((rows, words), -1, np.int32)
  for i, c in enumerate(constraints):
    if c is not None:
      out[i] = c.mask[0, :words]
  return out
