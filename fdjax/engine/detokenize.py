"""Tokens to text, incrementally, for a served request: its text so far, where a stop string
cuts it, and how much of it is certain enough to hand out (not a trailing incomplete UTF-8
character, nor a tail that may begin a stop string). A request's text is what its tokens add
after the end of its prompt (`continuation`), as vLLM's detokenizer and transformers'
decode(prompt + new) give it."""
from __future__ import annotations

from fdjax.engine.request import Request


def accept(req: Request, new: list[int], tokenizer, eos: tuple[int, ...], end: bool = False):
  """Appends `new` tokens to a request, stopping at EOS (unless it ignores EOS), a stop
  string (once it has min_tokens), max_tokens, or `end` (its grammar is complete: "stop"),
  and updates its text. Returns (tokens taken, the finish reason or None, the text to hand
  out now)."""
  count, reason, cut = 0, None, None
  eos = () if req.ignore_eos else eos
  for tok in new:
    req.tokens.append(tok)
    count += 1
    if tok in eos:
      reason = "stop"
      break
    if req.stop and len(req.tokens) < req.min_tokens:  # a stop string cannot end it yet
      req.text = _decode(req, tokenizer, req.tokens)
      req.searched = complete(req.text)
    elif req.stop:
      cut = find_stop(req, tokenizer)
      if cut is not None:
        reason = "stop"
        break
    if len(req.tokens) >= req.max_tokens:
      reason = "length"
      break
  if end and reason is None:
    reason = "stop"
  if cut is None:
    text_tokens = req.tokens[:-1] if req.tokens and req.tokens[-1] in eos else req.tokens
    req.text = _decode(req, tokenizer, text_tokens)
  else:
    req.text = req.text[:cut]
  ready = len(req.text) if reason else settled(req.text, req.stop)
  delta = req.text[req.sent:ready] if ready > req.sent else ""
  req.sent = max(req.sent, ready)
  return count, reason, delta


PREFIX_TOKENS = 4  # prompt tokens decoded before a request's own (vLLM's offset is 5)


def continuation(tokenizer, prefix, tokens, skip_special_tokens: bool = True) -> str:
  """The text `tokens` add after the token ids `prefix`: decode(prefix + tokens) less
  decode(prefix). SentencePiece decoders (Llama 2, Mistral, Phi-3) strip the leading space of
  what they decode, so `tokens` decoded alone lose the space between the prompt and the first
  word. Where prefix's text is not the start of the whole (it ends inside a character the
  tokens complete), `tokens` decoded alone."""
  decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
  if not len(prefix):
    return decode(tokens)
  base = decode(prefix)
  whole = decode(list(prefix) + list(tokens))
  return whole[len(base):] if whole.startswith(base) else decode(tokens)


def _decode(req: Request, tokenizer, tokens) -> str:
  """The request's text of `tokens` (its own), after the end of its prompt."""
  return continuation(tokenizer, req.prompt[-PREFIX_TOKENS:], tokens, req.skip_special_tokens)


def complete(text: str) -> int:
  """The length of a request's text without its trailing incomplete character (the U+FFFD
  that a partial UTF-8 sequence decodes to until its last byte comes)."""
  return len(text.rstrip("\ufffd"))


def find_stop(req: Request, tokenizer) -> int | None:
  """Where the first stop string starts in the request's text (searching only its complete
  characters, and only what new tokens can have completed), or None."""
  req.text = _decode(req, tokenizer, req.tokens)
  end = complete(req.text)
  # each stop string from where it would end past what was searched (a longer stop string's
  # start re-found a shorter one that had ended before min_tokens)
  hits = [i for i in (req.text.find(s, max(0, req.searched - len(s) + 1), end)
                      for s in req.stop) if i >= 0]
  req.searched = end  # a character completed later can shorten the text: search it again
  return min(hits) if hits else None


def settled(text: str, stop) -> int:
  """How much of a request's text can be handed out: not a trailing incomplete character
  (U+FFFD from a partial UTF-8 sequence) nor a tail that may begin a stop string."""
  end = complete(text)
  hold = 0
  for s in stop:
    hold = max([hold] + [k for k in range(1, min(len(s) - 1, end) + 1)
                         if text[end - k:end] == s[:k]])
  return end - hold
