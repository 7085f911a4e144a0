"""Tokenizers: a Hugging Face `tokenizer.json`, or fdjax's byte-level one (ids 0-255 are
the UTF-8 bytes) for models that declare `"tokenizer": "bytes"` in fdjax.json."""
from __future__ import annotations

import json
import os

from fdjax.checkpoint import read_meta


class ByteTokenizer:
  vocab_size = 256
  eos_token_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:

  def __init__(self, tok, eos_token_id):
    self._tok = tok
    self.eos_token_id = eos_token_id
    self.vocab_size = tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer of a model directory: tokenizer.json, or bytes if fdjax.json says so."""
  path = os.fspath(path)
  if read_meta(path).get("tokenizer") == "bytes":
    return ByteTokenizer()
  file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(file):
    raise ValueError(f"{path}: no tokenizer.json (and no byte-level tokenizer declared)")
  from tokenizers import Tokenizer
  eos = None
  cfg_file = os.path.join(path, "config.json")
  if os.path.exists(cfg_file):
    with open(cfg_file) as fh:
      eos = json.load(fh).get("eos_token_id")
  return HFTokenizer(Tokenizer.from_file(file), eos)
