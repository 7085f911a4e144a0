"""API keys for `fdjax serve`: every /v1 route, /tokenize and /detokenize (and /metrics, if
asked) needs `Authorization: Bearer <key>` with one of the server's keys, compared in
constant time; a missing or wrong key is a 401 with an OpenAI error object. /health stays
open."""
from __future__ import annotations

import hmac
import json


def keys_from(flags, environ) -> tuple[str, ...]:
  """The keys of --api-key (repeatable) and $FDJAX_API_KEY."""
  keys = list(flags or [])
  if environ.get("FDJAX_API_KEY"):
    keys.append(environ["FDJAX_API_KEY"])
  if any(not k for k in keys):
    raise ValueError("an API key cannot be empty")
  return tuple(dict.fromkeys(keys))


def allowed(header: bytes | None, keys) -> bool:
  """Whether an Authorization header holds one of `keys` (every key compared, each in
  constant time)."""
  scheme, _, given = (header or b"").decode("latin-1").partition(" ")
  ok = False
  for key in keys:
    ok |= hmac.compare_digest(given.strip().encode(), key.encode())
  return ok and scheme.lower() == "bearer"


class RequireKey:
  """ASGI middleware: HTTP requests to a protected path without a good key get a 401
  (`on_reject()` is told of each)."""

  def __init__(self, app, keys, protect_metrics: bool = False, on_reject=lambda: None):
    self.app, self.keys = app, tuple(keys)
    self.protect_metrics, self.on_reject = protect_metrics, on_reject

  def protected(self, path: str) -> bool:
    return (path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize")
            or (self.protect_metrics and path == "/metrics"))

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or not self.protected(scope["path"]):
      return await self.app(scope, receive, send)
    header = dict(scope["headers"]).get(b"authorization")
    if allowed(header, self.keys):
      return await self.app(scope, receive, send)
    self.on_reject()
    message = ("no API key: send the header Authorization: Bearer <key>" if header is None
               else "the API key is not valid")
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
