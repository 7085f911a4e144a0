"""`fdjax serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) in front of the
engine (fdjax.engine.core), which batches the requests as they arrive.

  POST /v1/completions        prompt -> text (streamed with "stream": true)
  POST /v1/chat/completions   messages -> the checkpoint's chat template -> text
  POST /v1/responses          OpenAI's Responses API (fdjax.serving.responses); GET and
                              DELETE /v1/responses/{id} for a stored one, its input_items,
                              POST /v1/responses/input_tokens
  POST /v1/embeddings         inputs -> pooled final hidden states (fdjax.serving.embeddings)
  POST /tokenize, /detokenize vLLM's: a prompt or chat messages to token ids, and back
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
import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time

from fdjax.engine import core as eng
from fdjax.engine import sampling
from fdjax.engine import speculative as speculative_
from fdjax.io import chat
from fdjax.io import generation_config as generation_config_
from fdjax.io import pooling as pooling_
from fdjax.serving import api, auth, embeddings, generation, reasoning, responses, tokens
from fdjax.serving.cors import Cors
from fdjax.serving.events import EventStream, disconnected
from fdjax.serving.limits import Limits

SERVE_PACKAGES = ("starlette", "uvicorn", "pydantic", "jinja2", "prometheus_client")


def check_dependencies():
  """ValueError naming the missing packages of `fdjax serve`."""
  import importlib.util
  missing = [p for p in SERVE_PACKAGES if importlib.util.find_spec(p) is None]
  if missing:
    raise ValueError(f"fdjax serve needs {', '.join(missing)}: pip install 'fdjax[serve]' "
                     f"(or pip install {' '.join(missing)})")


def _routes(server) -> list:
  """The server's endpoints."""
  from starlette.routing import Route
  return [Route("/v1/completions", server._guard(lambda r: generation.completions(server, r)),
                methods=["POST"]),
          Route("/v1/chat/completions",
                server._guard(lambda r: generation.chat_completions(server, r)),
                methods=["POST"]),
          Route("/v1/responses", server._guard(lambda r: responses.create(server, r)),
                methods=["POST"]),
          Route("/v1/responses/input_tokens",
                server._guard(lambda r: responses.count_input_tokens(server, r)),
                methods=["POST"]),
          Route("/v1/responses/{response_id}",
                server._guard(lambda r: responses.stored(server, r)), methods=["GET", "DELETE"]),
          Route("/v1/responses/{response_id}/input_items",
                server._guard(lambda r: responses.list_input_items(server, r)),
                methods=["GET"]),
          Route("/v1/responses/{response_id}/cancel",
                server._guard(lambda r: responses.cancel(server, r)), methods=["POST"]),
          Route("/v1/embeddings", server._guard(lambda r: embeddings.create(server, r)),
                methods=["POST"]),
          Route("/tokenize", server._guard(lambda r: tokens.tokenize(server, r)),
                methods=["POST"]),
          Route("/detokenize", server._guard(lambda r: tokens.detokenize(server, r)),
                methods=["POST"]),
          Route("/v1/models", server.models, methods=["GET"]),
          Route("/v1/models/{model_id:path}", server._guard(server.model), methods=["GET"]),
          Route("/health", server.health, methods=["GET"]),
          Route("/metrics", server.prometheus, methods=["GET"])]


@contextlib.asynccontextmanager
async def _lifespan(server):
  """The engine runs while the app does."""
  server.engine.start(warmup=server.warmup, progress=server.progress)
  try:
    yield
  finally:
    server.engine.stop()


class Server:
  """The ASGI app around an engine (started with the app, stopped with it). strict_fields:
  the client extras api.IGNORED lists are refused too. api_keys: /v1 (and /metrics with
  metrics_require_key) needs one (fdjax.serving.auth). limits: what one request may ask
  for (fdjax.serving.limits). logprobs_mode: what logprobs are of (sampling.LOGPROBS_MODES;
  vLLM's --logprobs-mode). cors: which browser origins may call it (fdjax.serving.cors;
  default any, as vLLM). defaults: the sampling settings a request leaves out takes
  (fdjax.io.generation_config.sampling_defaults). warmup: the engine compiles every
  shape first, on its own thread, while the port is open (/health answers 503 meanwhile;
  requests wait in the queue); progress(done, total) hears of each shape.
  max_stored_responses: how many Responses API answers are kept for previous_response_id.
  reasoning_parser: how a thinking model's reasoning is split off (fdjax.serving.reasoning).
  pooling: how /v1/embeddings pools (fdjax.io.pooling.Pooling; default: the last token's
  state, normalized), or why it cannot (a string: its requests are refused saying so)."""

  def __init__(self, engine: eng.Engine, tokenizer, template: chat.ChatTemplate | None,
               model_name: str, strict_fields: bool = False, warmup: bool = False,
               progress=None, api_keys=(), metrics_require_key: bool = False,
               limits: Limits | None = None, logprobs_mode: str = "raw_logprobs",
               cors: Cors | None = None, defaults: dict | None = None,
               max_stored_responses: int = 1000, reasoning_parser: str | None = None,
               pooling: pooling_.Pooling | str | None = None):
    check_dependencies()
    if error := sampling.logprobs_mode_error(logprobs_mode):
      raise ValueError(error)
    from starlette.applications import Starlette

    from fdjax.serving.metrics import Metrics
    self.engine, self.tokenizer, self.template = engine, tokenizer, template
    self.model_name, self.strict_fields = model_name, strict_fields
    self.warmup, self.progress = warmup, progress
    self.vocabulary = None  # grammar.Vocabulary, made at the first structured output
    self.limits, self.logprobs_mode = limits or Limits(), logprobs_mode
    self.defaults = dict(defaults or {})  # sampling a request leaves out (generation_config)
    self.responses = responses.Store(max_stored_responses)
    reasoning.check(reasoning_parser)
    self.reasoning_parser = reasoning_parser
    self.pooling = pooling or pooling_.Pooling()
    self.embedding_requests = 0  # /v1/embeddings requests running or waiting (max_queue)
    self.metrics = Metrics(engine)
    self.created = int(time.time())
    self.app = Starlette(routes=_routes(self), lifespan=lambda app: _lifespan(self),
                         exception_handlers={404: self._http_error, 405: self._http_error})
    if api_keys:
      self.app = auth.RequireKey(self.app, api_keys, metrics_require_key,
                                 lambda: self.metrics.rejected.labels("unauthorized").inc())
    self.app = (cors or Cors()).wrap(self.app)  # outside the key: preflights carry none

  @staticmethod
  def json_response(data, status=200, headers=None):
    from starlette.responses import JSONResponse
    return JSONResponse(data, status_code=status, headers=headers)

  def _error(self, e: api.ApiError):
    """The error response, a 4xx counted with its reason."""
    if 400 <= e.status < 500 and e.status != 499:
      self.metrics.rejected.labels(e.reason).inc()
    headers = {"retry-after": "1"} if e.status == 429 else None
    return self.json_response(e.body(), e.status, headers)

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

  # ------------------------------------------------------------------- endpoints

  def _card(self) -> dict:
    return {"id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "fdjax", "max_model_len": self.engine.max_model_len}

  async def models(self, request):
    return self.json_response({"object": "list", "data": [self._card()]})

  async def model(self, request):
    model_id = request.path_params["model_id"]
    if model_id != self.model_name:
      raise api.ApiError(404, f"unknown model {model_id!r}; this server serves "
                         f"{self.model_name!r}", "model", code="model_not_found")
    return self.json_response(self._card())

  async def health(self, request):
    warming = self.engine.warming
    if warming is not None and self.engine.alive:
      return self.json_response({"status": "warming up", "shapes_compiled": warming[0],
                         "shapes": warming[1]}, 503)
    if self.engine.alive:
      return self.json_response({"status": "ok"})
    return self.json_response(api.error_body("the engine is not running", type="server_error"), 503)

  async def prometheus(self, request):
    from starlette.responses import Response
    body, content_type = self.metrics.text()
    return Response(body, media_type=content_type)

  # -------------------------------------------------------------------- delivery

  async def wait(self, request, call):
    """The whole answer; the requests are cancelled if the client goes first."""
    results = asyncio.ensure_future(call.results())
    gone = asyncio.ensure_future(disconnected(request.receive))
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

  def stream(self, call, rid, obj, body, chunk):
    """The call's events as server-sent chunks: chunk(choice, event, first event of the
    choice) gives each event's choices; then the usage (stream_options) and [DONE]."""
    options = body.stream_options or api.StreamOptions()
    completion = [0] * len(call.reqs)

    def usage():
      return call.usage(sum(completion))

    async def chunks():
      seen = set()
      async for i, event in call.events():
        if event.error:
          yield api.sse(api.error_body(event.error, type="server_error"))
          break
        completion[i] = event.completion_tokens
        for choice in chunk(i, event, i not in seen):
          extra = ({"usage": usage()} if options.continuous_usage_stats else
                   {"usage": None} if options.include_usage else None)  # as OpenAI's chunks
          yield api.sse(api.envelope(rid, obj, self.model_name, [choice], extra))
        seen.add(i)
      else:
        if options.include_usage:
          yield api.sse(api.envelope(rid, obj, self.model_name, [], {"usage": usage()}))
      yield api.sse("[DONE]")

    return EventStream(chunks(), call.close)


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


def progress_bar(stream=None, width=30):
  """progress(done, total) for a warm-up: one bar redrawn in place on a terminal, a line per
  tenth (and the last) elsewhere."""
  import sys
  stream = stream or sys.stderr
  t0, shown = time.perf_counter(), [-1]

  def show(done, total):
    tenth = done * 10 // total
    tty = getattr(stream, "isatty", lambda: False)()
    if not tty and tenth == shown[0] and done != total:
      return
    shown[0] = tenth
    filled = width * done // total
    line = (f"fdjax serve: warming up [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"shapes, {time.perf_counter() - t0:.0f} s")
    print(("\r" + line) if tty else line, end="\n" if not tty or done == total else "",
          file=stream, flush=True)

  return show


def serve(model_dir=None, *, host="127.0.0.1", port=8000, served_model_name=None, dtype=None,
          quantize=None, warmup=False, log_level="info", mesh=None, strict_fields=False,
          api_keys=(), metrics_require_key=False, limits=None, speculative=None,
          draft_model=None, num_speculative_tokens=None, logprobs_mode="raw_logprobs",
          cors=None, generation_config="auto", max_stored_responses=1000,
          reasoning_parser=None, pooling=None, **engine_args):
  """`fdjax serve`: loads the model, builds the engine, runs uvicorn until interrupted. The
  port opens at once; with `warmup` the engine compiles every shape first (a progress bar on
  stderr, /health 503 until done). The CLI also turns on JAX's persistent compilation cache
  first (fdjax.runtime.use_compile_cache). speculative / draft_model (a directory) /
  num_speculative_tokens: speculative decoding (fdjax.engine.speculative.from_flags).
  generation_config: where the sampling defaults come from, as vLLM's --generation-config:
  "auto" the model's generation_config.json, "vllm" none (OpenAI's), or a directory's.
  pooling: /v1/embeddings' pooling ("last", "mean", "cls"); default: what the checkpoint's
  sentence-transformers files say (fdjax.io.pooling), else "last"."""
  check_dependencies()
  if error := sampling.logprobs_mode_error(logprobs_mode):  # before the model loads
    raise ValueError(error)
  if generation_config not in ("auto", "vllm") and not os.path.exists(
      os.path.join(generation_config, generation_config_.FILE)):
    raise ValueError(f"--generation-config is 'auto', 'vllm' or a directory holding "
                     f"{generation_config_.FILE}; {generation_config!r} has none")
  import uvicorn

  from fdjax.io import loading
  loaded = loading.load(model_dir, dtype=dtype, quantize=quantize, mesh=mesh,
                        chat_template=True)
  model, tok, template, name = loaded[:4]
  defaults = generation_config_.sampling_defaults(
      None if generation_config == "vllm" else loaded.path if generation_config == "auto"
      else generation_config)
  spec = speculative_.from_flags(speculative, draft_model, num_speculative_tokens, model, tok,
                                dtype=dtype, quantize=quantize)
  try:
    pools = pooling_.read(loaded.path, model.config.hidden_size)
  except ValueError as e:  # the model still generates; /v1/embeddings says why it cannot
    pools = pooling_.Pooling() if pooling is not None else str(e)
    print(f"fdjax serve: WARNING: {e}" + ("" if pooling is not None else
          "; /v1/embeddings is refused (--pooling last|mean|cls pools anyway)"),
          file=sys.stderr, flush=True)
  if pooling is not None:
    pools = dataclasses.replace(pools, pooling=pooling)
  engine = eng.Engine(model, tok, speculative=spec, **engine_args)
  if not api_keys and host not in ("127.0.0.1", "localhost", "::1"):
    print(f"fdjax serve: WARNING: serving on {host} with no API key: anyone who can reach "
          f"port {port} can use the model (--api-key KEY or $FDJAX_API_KEY)", file=sys.stderr,
          flush=True)
  server = Server(engine, tok, template, served_model_name or name, strict_fields,
                  warmup=warmup, progress=progress_bar(), api_keys=api_keys,
                  metrics_require_key=metrics_require_key, limits=limits,
                  logprobs_mode=logprobs_mode, cors=cors, defaults=defaults,
                  max_stored_responses=max_stored_responses,
                  reasoning_parser=reasoning_parser, pooling=pools)
  print(f"fdjax serve: model {server.model_name!r} on http://{host}:{port}/v1 "
        f"(max_batch={engine.max_batch}, {engine.kv.pool.num_pages} pages of "
        f"{engine.page_size}{_per_replica(engine.kv)}, context {engine.max_model_len}"
        + (f", speculative {spec.label}" if spec else "") + ")"
        + (f"; warming up {engine.shapes().count()} shapes first (/health: 503 until done)"
           if warmup else ""), flush=True)
  if defaults:
    print(f"fdjax serve: a request's default sampling is the model's generation_config.json "
          f"({generation_config_.describe(defaults)}); --generation-config vllm for OpenAI's",
          flush=True)
  uvicorn.run(server.app, host=host, port=port, log_level=log_level)


def _per_replica(kv) -> str:
  replicas = len(kv.pools)
  return "" if replicas == 1 else f" in each of {replicas} data replicas"
