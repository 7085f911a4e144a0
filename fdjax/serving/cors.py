"""Cross-origin requests (CORS) for `fdjax serve`, with vLLM's flags and defaults: a browser
page on any origin may call the API (`--allowed-origins '["*"]'`, any method and header,
no credentials), so the web UIs people point at a vLLM server work here too. The preflight
(OPTIONS) is answered before the API key is asked for, and every answer, a 401 included,
carries the headers. `--allowed-origins '[]'` turns it off."""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class Cors:
  allowed_origins: tuple[str, ...] = ("*",)
  allowed_methods: tuple[str, ...] = ("*",)
  allowed_headers: tuple[str, ...] = ("*",)
  allow_credentials: bool = False

  def wrap(self, app):
    """`app` behind Starlette's CORS middleware (`app` itself when no origin is allowed)."""
    if not self.allowed_origins:
      return app
    from starlette.middleware.cors import CORSMiddleware
    return CORSMiddleware(app, allow_origins=list(self.allowed_origins),
                          allow_methods=list(self.allowed_methods),
                          allow_headers=list(self.allowed_headers),
                          allow_credentials=self.allow_credentials)


def json_list(text: str) -> tuple[str, ...]:
  """A flag's value, a JSON list of strings as vLLM takes it (`'["http://a", "http://b"]'`);
  ValueError saying what it got otherwise."""
  try:
    value = json.loads(text)
  except ValueError:
    value = None
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise ValueError(f"expected a JSON list of strings, like '[\"*\"]', got {text!r}")
  return tuple(value)
