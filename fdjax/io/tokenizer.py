"""Tokenizers: a Hugging Face `tokenizer.json`, or fdjax's byte-level one (ids 0-255 are
the UTF-8 bytes) for models that declare `"tokenizer": "bytes"` in fdjax.json."""
from __future__ import annotations

import functools
import json
import os
import re

from fdjax.io.checkpoint import read_meta


class ByteTokenizer:
  vocab_size = 256
  eos_token_id = None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(text.encode("utf-8"))  # no special tokens to add

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def token_bytes(self, token: int) -> bytes:
    """A token's own bytes (a lone byte of a multi-byte character decodes to U+FFFD)."""
    return bytes([int(token)])


@functools.cache
def _byte_level_chars() -> dict[str, int]:
  """Byte-level BPE's printable stand-ins for bytes (GPT-2's map, which Llama 3 and Qwen
  tokenizers use): the printable Latin-1 bytes stand for themselves, every other byte for
  the character 256 + its rank among them."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
  others = [b for b in range(256) if b not in keep]
  return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(others)}}


class HFTokenizer:

  def __init__(self, tok, eos_token_id):
    self._tok = tok
    self.eos_token_id = eos_token_id
    self.vocab_size = tok.get_vocab_size()
    self._bytes: dict[int, bytes] = {}

  @functools.cached_property
  def _pieces(self) -> tuple[bool, bool, set]:
    """(byte-level BPE, byte fallback, the special tokens' texts), read from the tokenizer's
    own description on first use (a large vocabulary's JSON takes a moment to read)."""
    decoder = json.loads(self._tok.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    return ("ByteLevel" in kinds, "ByteFallback" in kinds,
            {t.content for t in self._tok.get_added_tokens_decoder().values()})

  def token_bytes(self, token: int) -> bytes:
    """A token's own bytes, as its piece of the decoded text holds them: a byte-level
    token's characters mapped back to bytes, a byte-fallback token <0xNN> the byte NN (a
    lone byte of a multi-byte character, which decoding alone turns into U+FFFD), a
    SentencePiece word mark a space."""
    token = int(token)
    if token not in self._bytes:
      byte_level, byte_fallback, special = self._pieces
      piece = self._tok.id_to_token(token)
      chars = _byte_level_chars() if byte_level else {}
      if piece is None:
        raw = self.decode([token]).encode()
      elif piece in special:
        raw = piece.encode()
      elif byte_level and all(c in chars for c in piece):
        raw = bytes(chars[c] for c in piece)
      elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        raw = bytes([int(piece[3:5], 16)])
      elif byte_fallback:
        raw = piece.replace("\u2581", " ").encode()
      else:
        raw = self.decode([token]).encode()
      self._bytes[token] = raw
    return self._bytes[token]

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids; add_special_tokens=False for text that writes its own (a chat template's)."""
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer of a model directory: tokenizer.json, or bytes if fdjax.json says so."""
  path = os.fspath(path)
  if read_meta(path).get("tokenizer") == "bytes":
    return ByteTokenizer()
  file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(file):
    raise ValueError(f"{path}: no tokenizer.json (and no byte-level tokenizer declared)")
  from tokenizers import Tokenizer
  eos = []  # config.json's eos_token_id and generation_config.json's (an id or a list each)
  for name in ("config.json", "generation_config.json"):
    cfg_file = os.path.join(path, name)
    if os.path.exists(cfg_file):
      with open(cfg_file) as fh:
        ids = json.load(fh).get("eos_token_id")
      eos += [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
  eos = list(dict.fromkeys(eos))
  return HFTokenizer(Tokenizer.from_file(file), eos[0] if len(eos) == 1 else eos or None)
