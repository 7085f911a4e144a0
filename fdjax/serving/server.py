"""`fdjax serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) in front of the
engine (fdjax.engine.core), which batches the requests as they arrive.

  POST /v1/completions        prompt -> text (streamed with "stream": true)
  POST /v1/chat/completions   messages -> the checkpoint's chat template -> text
  GET  /v1/models             the served model
  GET  /health                200 while the engine runs
  GET  /metrics               Prometheus text (fdjax.serving.metrics)

  GET  /v1/models/{id}        the served model, or a 404

Streams are server-sent events, `data: {chunk}` lines then `data: [DONE]`, as the OpenAI
client reads them; the n choices of each prompt (a completion may have several prompts)
stream interleaved, each chunk naming its choice's index. A client that goes away
(mid-stream or while waiting for a whole answer) cancels its requests, whose pages the
engine frees at its next iteration. Bad input is a 400 with an OpenAI error object naming
the field (fdjax.serving.api has the field policy), a body that is not JSON a 415, an
unknown model or path a 404, a full queue a 429 at once; each is counted by reason in
fdjax_requests_rejected_total.
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


class _Results:
  """A call's whole answer: per choice its text, finish reason, tokens' logprobs and (echo)
  the prompt's."""

  def __init__(self, n):
    self.texts, self.reasons = [""] * n, [None] * n
    self.logprobs, self.prompt_logprobs = [[] for _ in range(n)], [None] * n
    self.completion_tokens = [0] * n

  def add(self, i, event):
    self.texts[i] += event.text
    self.logprobs[i] += event.logprobs
    if event.prompt_logprobs is not None:
      self.prompt_logprobs[i] = event.prompt_logprobs
    self.completion_tokens[i] = event.completion_tokens
    if event.finish_reason:
      self.reasons[i] = event.finish_reason


class _Call:
  """One HTTP request's engine requests, n choices of each prompt (choice index: prompt * n +
  j; the n share their prompt's pages), and their events, delivered to the event loop."""

  def __init__(self, server: "Server", prompts, body: api._Sampling, max_tokens, echo=False):
    self.server, self.prompts, self.n = server, prompts, body.n
    loop = asyncio.get_running_loop()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    self.queue: asyncio.Queue = asyncio.Queue()
    self.reqs = []
    want_logprobs = body.top_logprobs_count is not None
    for ids, limit in zip(prompts, max_tokens):
      lead = None
      for j in range(body.n):
        def on_event(event, i=len(self.reqs)):
          server.metrics.record(event)
          loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        req = request.Request(
            ids, limit, temperature=body.temperature, top_k=body.top_k,
            top_p=None if body.top_p >= 1.0 else body.top_p,
            seed=(seed + len(self.reqs)) % 2 ** 32, stop=body.stop_strings(),
            on_event=on_event, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=body.bias_pairs(),
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, logprobs=want_logprobs,
            prompt_logprobs=echo and want_logprobs and j == 0, after=lead)
        lead = lead or req
        self.reqs.append(req)

  @property
  def prompt_tokens(self) -> int:
    return sum(len(p) for p in self.prompts)

  def submit(self):
    engine, n = self.server.engine, 0
    try:
      for req in self.reqs:
        engine.check(req)
      for n, req in enumerate(self.reqs):
        engine.submit(req)
    except request.BadRequest as e:
      raise api.ApiError(400, str(e), e.param) from None
    except request.QueueFull as e:
      for req in self.reqs[:n]:
        engine.cancel(req)
      raise api.ApiError(429, str(e), None, "rate_limit_error", "queue_full") from None
    except RuntimeError as e:
      raise api.ApiError(503, str(e), None, "server_error") from None
    self.server.metrics.received.inc(len(self.reqs))

  def close(self):
    for req in self.reqs:
      if req.state != "done":
        self.server.engine.cancel(req)

  async def events(self):
    """(choice index, event) until every choice has ended."""
    left = len(self.reqs)
    while left:
      i, event = await self.queue.get()
      yield i, event
      left -= bool(event.finish_reason)

  async def results(self) -> _Results:
    out = _Results(len(self.reqs))
    async for i, event in self.events():
      if event.error:
        raise api.ApiError(500, event.error, None, "server_error")
      out.add(i, event)
    return out


class Server:
  """The ASGI app around an engine (started with the app, stopped with it). strict_fields:
  the client extras api.IGNORED lists are refused too."""

  def __init__(self, engine: eng.Engine, tokenizer, template: chat.ChatTemplate | None,
               model_name: str, strict_fields: bool = False):
    check_dependencies()
    from starlette.applications import Starlette
    from starlette.routing import Route

    from fdjax.serving.metrics import Metrics
    self.engine, self.tokenizer, self.template = engine, tokenizer, template
    self.model_name, self.strict_fields = model_name, strict_fields
    self.metrics = Metrics(engine)
    self.created = int(time.time())
    routes = [Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
              Route("/v1/chat/completions", self._guard(self.chat_completions),
                    methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", self._guard(self.model), methods=["GET"]),
              Route("/health", self.health, methods=["GET"]),
              Route("/metrics", self.prometheus, methods=["GET"])]
    self.app = Starlette(routes=routes, lifespan=self._lifespan,
                         exception_handlers={404: self._http_error, 405: self._http_error})

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

  def _error(self, e: api.ApiError):
    """The error response, a 4xx counted with its reason."""
    if 400 <= e.status < 500 and e.status != 499:
      self.metrics.rejected.labels(e.reason).inc()
    headers = {"retry-after": "1"} if e.status == 429 else None
    return self._json(e.body(), e.status, headers)

  def _guard(self, handler):
    async def endpoint(request):
      try:
        return await handler(request)
      except api.ApiError as e:
        return self._error(e)
    return endpoint

  async def _http_error(self, request, exc):
    """Starlette's 404 (no such path) and 405 (wrong method) as OpenAI error objects."""
    if exc.status_code == 404:
      message = f"no route {request.method} {request.url.path}; see /v1/models"
    else:
      message = f"method {request.method} is not allowed on {request.url.path}"
    return self._error(api.ApiError(exc.status_code, message))

  async def _body(self, request, kind):
    """The request's validated body: a JSON content type (415 otherwise), then api.parse."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
      raise api.ApiError(415, f"the Content-Type must be application/json, got "
                         f"{content_type or 'none'!r}")
    body = api.parse(kind, await request.body(), self.strict_fields)
    if body.model != self.model_name:
      raise api.ApiError(404, f"unknown model {body.model!r}; this server serves "
                         f"{self.model_name!r}", "model", code="model_not_found")
    return body

  # ------------------------------------------------------------------- endpoints

  def _card(self) -> dict:
    return {"id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "fdjax", "max_model_len": self.engine.max_model_len}

  async def models(self, request):
    return self._json({"object": "list", "data": [self._card()]})

  async def model(self, request):
    model_id = request.path_params["model_id"]
    if model_id != self.model_name:
      raise api.ApiError(404, f"unknown model {model_id!r}; this server serves "
                         f"{self.model_name!r}", "model", code="model_not_found")
    return self._json(self._card())

  async def health(self, request):
    if self.engine.alive:
      return self._json({"status": "ok"})
    return self._json(api.error_body("the engine is not running", type="server_error"), 503)

  async def prometheus(self, request):
    from starlette.responses import Response
    body, content_type = self.metrics.text()
    return Response(body, media_type=content_type)

  def _limits(self, prompts, asked):
    """max_tokens per prompt: as asked, else what is left of the context."""
    return [asked if asked is not None else max(1, self.engine.max_model_len - len(p))
            for p in prompts]

  def _prompts(self, prompt) -> list[list[int]]:
    """A completion's prompt (a string, strings, token ids, lists of token ids) as token
    lists; ApiError naming the element at fault."""
    if isinstance(prompt, str):
      return [self.tokenizer.encode(prompt)]
    if not prompt:
      raise api.ApiError(400, "prompt is an empty list", "prompt")
    if all(isinstance(p, str) for p in prompt):
      return [self.tokenizer.encode(p) for p in prompt]
    one = isinstance(prompt[0], int)
    lists = [list(prompt)] if one else [list(p) for p in prompt]
    vocab = self.engine.model.config.vocab_size
    for i, ids in enumerate(lists):
      where = "prompt" if one else f"prompt[{i}]"
      if not ids:
        raise api.ApiError(400, f"{where} is an empty list of token ids", "prompt")
      bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
      if bad is not None:
        raise api.ApiError(400, f"{where}[{bad}]: token id {ids[bad]} is outside the "
                           f"vocabulary [0, {vocab})", "prompt")
    return lists

  async def completions(self, request):
    body = await self._body(request, api.CompletionRequest)
    prompts = self._prompts(body.prompt)
    call = _Call(self, prompts, body, self._limits(prompts, body.max_tokens), echo=body.echo)
    call.submit()
    rid, k, n = api.new_id("cmpl"), body.logprobs, body.n
    echo = [self.tokenizer.decode(p) if body.echo else "" for p in prompts]

    def logprobs(items, offset):
      return None if k is None else api.completion_logprobs(self.tokenizer, items, k, offset)

    if body.stream:
      offsets, prompt_logprobs = [0] * len(call.reqs), {}

      def chunk(i, event, first):
        text, items = event.text, event.logprobs
        if event.prompt_logprobs is not None:  # the first choice of its prompt has them
          prompt_logprobs[i // n] = event.prompt_logprobs
        if first and body.echo:
          text = echo[i // n] + text
          items = prompt_logprobs.get(i // n, []) + items
        lp = logprobs(items, offsets[i])
        if lp and lp["tokens"]:
          offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        out = []
        if text or items:
          out.append(api.completion_choice(i, text, None, lp))
        if event.finish_reason:
          out.append(api.completion_choice(i, "", event.finish_reason))
        return out

      return self._stream(call, rid, "text_completion", body, chunk)
    res = await self._wait(request, call)
    choices = []
    for i in range(len(call.reqs)):
      items = res.logprobs[i]
      if body.echo:
        items = (res.prompt_logprobs[i - i % n] or []) + items
      choices.append(api.completion_choice(i, echo[i // n] + res.texts[i], res.reasons[i],
                                           logprobs(items, 0)))
    return self._json(api.envelope(rid, "text_completion", self.model_name, choices,
                                   {"usage": api.usage(call.prompt_tokens,
                                                       sum(res.completion_tokens))}))

  async def chat_completions(self, request):
    body = await self._body(request, api.ChatRequest)
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
    rid, k = api.new_id("chatcmpl"), body.top_logprobs_count

    def logprobs(items):
      return None if k is None else api.chat_logprobs(self.tokenizer, items, k)

    if body.stream:
      def chunk(i, event, first):
        out = [api.chat_delta(i, {"role": "assistant", "content": ""})] if first else []
        if event.text or event.logprobs:
          out.append(api.chat_delta(i, {"content": event.text}, None, logprobs(event.logprobs)))
        if event.finish_reason:
          out.append(api.chat_delta(i, {}, event.finish_reason))
        return out

      return self._stream(call, rid, "chat.completion.chunk", body, chunk)
    res = await self._wait(request, call)
    choices = [api.chat_choice(i, res.texts[i], res.reasons[i], logprobs(res.logprobs[i]))
               for i in range(len(call.reqs))]
    return self._json(api.envelope(rid, "chat.completion", self.model_name, choices,
                                   {"usage": api.usage(call.prompt_tokens,
                                                       sum(res.completion_tokens))}))

  # -------------------------------------------------------------------- delivery

  async def _wait(self, request, call: _Call) -> _Results:
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

  def _stream(self, call: _Call, rid, obj, body, chunk):
    """The call's events as server-sent chunks: chunk(choice, event, first event of the
    choice) gives each event's choices; then the usage (stream_options) and [DONE]."""
    options = body.stream_options or api.StreamOptions()
    completion = [0] * len(call.reqs)

    def usage():
      return api.usage(call.prompt_tokens, sum(completion))

    async def chunks():
      seen = set()
      async for i, event in call.events():
        if event.error:
          yield api.sse(api.error_body(event.error, type="server_error"))
          break
        completion[i] = event.completion_tokens
        for choice in chunk(i, event, i not in seen):
          extra = {"usage": usage()} if options.continuous_usage_stats else None
          yield api.sse(api.envelope(rid, obj, self.model_name, [choice], extra))
        seen.add(i)
      else:
        if options.include_usage:
          yield api.sse(api.envelope(rid, obj, self.model_name, [], {"usage": usage()}))
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
          quantize=None, warmup=False, log_level="info", mesh=None, strict_fields=False,
          **engine_args):
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
  server = Server(engine, tok, template, served_model_name or name, strict_fields)
  print(f"fdjax serve: model {server.model_name!r} on http://{host}:{port}/v1 "
        f"(max_batch={engine.max_batch}, {engine.kv.pool.num_pages} pages of "
        f"{engine.page_size}, context {engine.max_model_len})", flush=True)
  uvicorn.run(server.app, host=host, port=port, log_level=log_level)
