"""Server-sent events over ASGI, stopped when the client goes (`fdjax serve`'s streams)."""
from __future__ import annotations

import asyncio


async def disconnected(receive):
  """Returns when the client has gone."""
  while True:
    if (await receive())["type"] == "http.disconnect":
      return


class EventStream:
  """A text/event-stream response that stops, and calls on_close, when the client goes."""

  def __init__(self, chunks, on_close):
    self.chunks, self.on_close = chunks, on_close

  async def __call__(self, scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache")]})

    async def pump():
      async for data in self.chunks:
        await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
      await send({"type": "http.response.body", "body": b"", "more_body": False})

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected(receive))]
    try:
      await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for t in tasks:
        t.cancel()
        if t.done() and not t.cancelled():
          t.exception()  # a send to a client that has gone: nothing more to do
      self.on_close()
