"""Tokenizers: a Hugging Face `tokenizer.json`, or fdjax's byte-level one (ids 0-255 are
the UTF-8 bytes) for models that declare `"tokenizer": "bytes"` in fdjax.json."""
from __future__ import annotations

import json
import os

from fdjax.io.checkpoint import read_meta


class ByteTokenizer:
  vocab_size = 256
  eos_token_id = None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(text.encode("utf-8"))  # no special tokens to add

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def token_bytes(self, token: int) -> bytes:
    """A token's own bytes (a lone byte of a multi-byte character decodes to U+FFFD)."""
    return bytes([int(token)])


class HFTokenizer:

  def __init__(self, tok, eos_token_id):
    self._tok = tok
    self.eos_token_id = eos_token_id
    self.vocab_size = tok.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids; add_special_tokens=False for text that writes its own (a chat template's)."""
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

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
  eos = []  # config.json's eos_token_id and generation_config.json's (an id or a list each)
  for name in ("config.json", "generation_config.json"):
    cfg_file = os.path.join(path, name)
    if os.path.exists(cfg_file):
      with open(cfg_file) as fh:
        ids = json.load(fh).get("eos_token_id")
      eos += [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
  eos = list(dict.fromkeys(eos))
  return HFTokenizer(Tokenizer.from_file(file), eos[0] if len(eos) == 1 else eos or None)
