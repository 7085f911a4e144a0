"""`fdjax serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) in front of the
engine (fdjax.engine.core), which batches the requests as they arrive.

  POST /v1/completions        prompt -> text (streamed with "stream": true)
  POST /v1/chat/completions   messages -> the checkpoint's chat template -> text
  GET  /v1/models             the served model
  GET  /health                200 while the engine runs
  GET  /metrics               Prometheus text (fdjax.serving.metrics)

Streams are server-sent events, `data: {chunk}` lines then `data: [DONE]`, as the OpenAI
client reads them. A client that goes away (mid-stream or while waiting for a whole answer)
cancels its request, whose pages the engine frees at its next iteration. Bad input is a 400
with an OpenAI error object naming the field; a full queue is a 429 at once.
"""
from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time

from fdjax.engine import core as eng
from fdjax.engine import request
from fdjax.io import chat
from fdjax.serving import api

SERVE_PACKAGES = ("starlette", "uvicorn", "pydantic", "jinja2", "prometheus_client")


def check_dependencies():
  """ValueError naming the missing packages of `fdjax serve`."""
  import importlib.util
  missing = [p for p in SERVE_PACKAGES if importlib.util.find_spec(p) is None]
  if missing:
    raise ValueError(f"fdjax serve needs {', '.join(missing)}: pip install 'fdjax[serve]' "
                     f"(or pip install {' '.join(missing)})")


async def _disconnected(receive):
  """Returns when the client has gone."""
  while True:
    if (await receive())["type"] == "http.disconnect":
      return


class _EventStream:
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

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))]
    try:
      await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for t in tasks:
        t.cancel()
        if t.done() and not t.cancelled():
          t.exception()  # a send to a client that has gone: nothing more to do
      self.on_close()


class _Call:
  """One HTTP request's engine requests and their events, delivered to the event loop."""

  def __init__(self, server: "Server", prompts, body: api._Sampling, max_tokens):
    self.server = server
    loop = asyncio.get_running_loop()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    self.queues = [asyncio.Queue() for _ in prompts]
    self.reqs = []
    for i, (ids, limit) in enumerate(zip(prompts, max_tokens)):
      def on_event(event, q=self.queues[i]):
        server.metrics.record(event)
        loop.call_soon_threadsafe(q.put_nowait, event)
      self.reqs.append(request.Request(
          ids, limit, temperature=body.temperature, top_k=body.top_k,
          top_p=None if body.top_p >= 1.0 else body.top_p, seed=(seed + i) % 2 ** 32,
          stop=body.stop_strings(), on_event=on_event))

  def submit(self):
    engine, n = self.server.engine, 0
    try:
      for req in self.reqs:
        engine.check(req)
      for n, req in enumerate(self.reqs):
        engine.submit(req)
    except request.BadRequest as e:
      self.server.metrics.rejected.labels("bad_request").inc()
      raise api.ApiError(400, str(e), e.param) from None
    except request.QueueFull as e:
      for req in self.reqs[:n]:
        engine.cancel(req)
      self.server.metrics.rejected.labels("queue_full").inc()
      raise api.ApiError(429, str(e), None, "rate_limit_error", "queue_full") from None
    except RuntimeError as e:
      raise api.ApiError(503, str(e), None, "server_error") from None
    self.server.metrics.received.inc(len(self.reqs))

  def close(self):
    for req in self.reqs:
      if req.state != "done":
        self.server.engine.cancel(req)

  async def events(self, i):
    while True:
      event = await self.queues[i].get()
      yield event
      if event.finish_reason:
        return

  async def results(self):
    """(texts, finish reasons, prompt tokens, completion tokens) once every request ends."""
    async def one(i):
      text, last = "", None
      async for event in self.events(i):
        if event.error:
          raise api.ApiError(500, event.error, None, "server_error")
        text, last = text + event.text, event
      return text, last
    done = await asyncio.gather(*(one(i) for i in range(len(self.reqs))))
    return ([t for t, _ in done], [e.finish_reason for _, e in done],
            sum(e.prompt_tokens for _, e in done), sum(e.completion_tokens for _, e in done))


class Server:
  """The ASGI app around an engine (started with the app, stopped with it)."""

  def __init__(self, engine: eng.Engine, tokenizer, template: chat.ChatTemplate | None,
               model_name: str):
    check_dependencies()
    from starlette.applications import Starlette
    from starlette.routing import Route

    from fdjax.serving.metrics import Metrics
    self.engine, self.tokenizer, self.template = engine, tokenizer, template
    self.model_name = model_name
    self.metrics = Metrics(engine)
    self.created = int(time.time())
    routes = [Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
              Route("/v1/chat/completions", self._guard(self.chat_completions),
                    methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/health", self.health, methods=["GET"]),
              Route("/metrics", self.prometheus, methods=["GET"])]
    self.app = Starlette(routes=routes, lifespan=self._lifespan)

  def _lifespan(self, app):
    import contextlib

    @contextlib.asynccontextmanager
    async def span():
      self.engine.start()
      try:
        yield
      finally:
        self.engine.stop()
    return span()

  @staticmethod
  def _json(data, status=200, headers=None):
    from starlette.responses import JSONResponse
    return JSONResponse(data, status_code=status, headers=headers)

  def _guard(self, handler):
    async def endpoint(request):
      try:
        return await handler(request)
      except api.ApiError as e:
        headers = {"retry-after": "1"} if e.status == 429 else None
        return self._json(e.body(), e.status, headers)
    return endpoint

  # ------------------------------------------------------------------- endpoints

  async def models(self, request):
    return self._json({"object": "list", "data": [
        {"id": self.model_name, "object": "model", "created": self.created,
         "owned_by": "fdjax", "max_model_len": self.engine.max_model_len}]})

  async def health(self, request):
    if self.engine.alive:
      return self._json({"status": "ok"})
    return self._json(api.error_body("the engine is not running", type="server_error"), 503)

  async def prometheus(self, request):
    from starlette.responses import Response
    body, content_type = self.metrics.text()
    return Response(body, media_type=content_type)

  def _check_model(self, body):
    if body.model != self.model_name:
      raise api.ApiError(400, f"unknown model {body.model!r}; this server serves "
                         f"{self.model_name!r}", "model", code="model_not_found")

  def _limits(self, prompts, asked):
    """max_tokens per prompt: as asked, else what is left of the context."""
    return [asked if asked is not None else max(1, self.engine.max_model_len - len(p))
            for p in prompts]

  async def completions(self, request):
    body = api.parse(api.CompletionRequest, await request.body())
    self._check_model(body)
    if isinstance(body.prompt, str):
      prompts = [self.tokenizer.encode(body.prompt)]
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
      prompts = [list(body.prompt)]
    elif body.prompt:
      prompts = [self.tokenizer.encode(p) for p in body.prompt]
    else:
      raise api.ApiError(400, "prompt is an empty list", "prompt")
    if body.stream and len(prompts) > 1:
      raise api.ApiError(400, "a streamed completion takes one prompt", "prompt")
    call = _Call(self, prompts, body, self._limits(prompts, body.max_tokens))
    call.submit()
    rid = api.new_id("cmpl")
    if body.stream:
      return self._stream(call, rid, "text_completion", body,
                          lambda text: api.completion_chunk(rid, self.model_name, text),
                          lambda reason: api.completion_chunk(rid, self.model_name, "", reason))
    texts, reasons, p, c = await self._wait(request, call)
    return self._json(api.completion(rid, self.model_name, texts, reasons, p, c))

  async def chat_completions(self, request):
    body = api.parse(api.ChatRequest, await request.body())
    self._check_model(body)
    if self.template is None:
      raise api.ApiError(400, f"model {self.model_name!r} has no chat template (no "
                         "chat_template in its tokenizer_config.json); use /v1/completions",
                         "messages")
    try:
      text = self.template.render([m.for_template() for m in body.messages])
    except chat.TemplateError as e:
      raise api.ApiError(400, str(e), "messages") from None
    prompts = [self.tokenizer.encode(text, add_special_tokens=False)]
    call = _Call(self, prompts, body, self._limits(prompts, body.limit))
    call.submit()
    rid = api.new_id("chatcmpl")
    if body.stream:
      first = [api.chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""})]
      return self._stream(call, rid, "chat.completion.chunk", body,
                          lambda t: api.chat_chunk(rid, self.model_name, {"content": t}),
                          lambda reason: api.chat_chunk(rid, self.model_name, {}, reason), first)
    texts, reasons, p, c = await self._wait(request, call)
    return self._json(api.chat_completion(rid, self.model_name, texts[0], reasons[0], p, c))

  # -------------------------------------------------------------------- delivery

  async def _wait(self, request, call: _Call):
    """The whole answer; the requests are cancelled if the client goes first."""
    results = asyncio.ensure_future(call.results())
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
      await asyncio.wait([results, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
      if not results.done():
        results.cancel()
        call.close()
    if not results.done() or results.cancelled():
      raise api.ApiError(499, "the client closed the connection")
    return results.result()

  def _stream(self, call: _Call, rid, obj, body, text_chunk, end_chunk, opening=()):
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def chunks():
      for chunk in opening:
        yield api.sse(chunk)
      async for event in call.events(0):
        if event.error:
          yield api.sse(api.error_body(event.error, type="server_error"))
          break
        if event.text:
          yield api.sse(text_chunk(event.text))
        if event.finish_reason:
          yield api.sse(end_chunk(event.finish_reason))
          if include_usage:
            yield api.sse(api.usage_chunk(rid, self.model_name, obj, event.prompt_tokens,
                                          event.completion_tokens))
      yield api.sse("[DONE]")

    return _EventStream(chunks(), call.close)


# ----------------------------------------------------------------------- running it

def bind(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: a free one; the port is sock.getsockname()[1])."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  return sock


def start_in_thread(server: Server, host: str = "127.0.0.1", port: int = 0, timeout=60.0):
  """Runs the app on uvicorn in a background thread; returns (uvicorn server, base URL).
  Stop it with `uv.should_exit = True`."""
  import uvicorn
  sock = bind(host, port)
  uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + timeout
  while not uv.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.02)
  return uv, f"http://{host}:{sock.getsockname()[1]}"


def serve(model_dir=None, *, host="127.0.0.1", port=8000, served_model_name=None, dtype=None,
          quantize=None, warmup=False, log_level="info", mesh=None, **engine_args):
  """`fdjax serve`: loads the model, builds the engine, runs uvicorn until interrupted."""
  check_dependencies()
  import uvicorn

  from fdjax.io import loading
  model, tok, template, name, _ = loading.load(model_dir, dtype=dtype, quantize=quantize,
                                               mesh=mesh, chat_template=True)
  engine = eng.Engine(model, tok, **engine_args)
  if warmup:
    t0 = time.perf_counter()
    engine.warmup()
    print(f"fdjax serve: compiled {engine.shapes().count()} shapes in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
  server = Server(engine, tok, template, served_model_name or name)
  print(f"fdjax serve: model {server.model_name!r} on http://{host}:{port}/v1 "
        f"(max_batch={engine.max_batch}, {engine.kv.pool.num_pages} pages of "
        f"{engine.page_size}, context {engine.max_model_len})", flush=True)
  uvicorn.run(server.app, host=host, port=port, log_level=log_level)
