"""The serving engine: one thread owns the model, the paged KV cache and the device, and
batches requests as they come (continuous batching).

The parts, each in its own module: requests and their events (request), which requests run
in each iteration and in which shapes (scheduler; which join it, on which data replica of a
mesh: admission), the device calls (runner, over the jitted steps `generate` runs too), and
tokens to text (detokenize). The engine holds the queue between the server's threads and its
own, and the thread.

Requests talk to their owner through `on_event(Event)`, called on the engine's thread.
"""
from __future__ import annotations

import collections
import threading
import time

from fdjax.engine import decoders, paging, request, steps, threads
from fdjax.engine import speculative as speculative_
from fdjax.engine.compiled import Shapes
from fdjax.engine.request import QueueFull, Request
from fdjax.engine.runner import Runner
from fdjax.engine.scheduler import Scheduler
from fdjax.engine.steps import pow2
from fdjax.ops import checks


def _check_servable(model) -> None:
  """ValueError where the model's mesh spans several processes: each would take its own
  requests into its own batches (one server and scheduler per process)."""
  mesh = getattr(model, "mesh", None)
  hosts = 1 if mesh is None else len({d.process_index for d in mesh.devices.flat})
  if hosts > 1:
    raise ValueError(f"engine: the model's mesh spans {hosts} processes; serving from a "
                     f"multi-host mesh is not implemented (each process would run its own "
                     f"server and scheduler): serve each host's devices on their own")


def _sizes(model, max_model_len, page_size, num_pages, max_batch):
  """(context per request, pages in the pool: on a mesh, in each data replica's, which
  runs its share of max_batch), or ValueError."""
  # Sliding windows are the attention's business: a request may run past its window (the
  # engine keeps all its pages, where generate gives back those out of every window).
  context = model.config.max_position_embeddings
  max_model_len = min(max_model_len or context, context)
  if max_model_len < 2:
    raise ValueError(f"engine: max_model_len must be >= 2, got {max_model_len}")
  max_pages = checks.cdiv(max_model_len, page_size)
  num_pages = num_pages or checks.cdiv(max_batch, getattr(model, "dp", 1)) * max_pages
  if num_pages < max_pages:
    raise ValueError(f"engine: num_pages={num_pages} cannot hold one request of "
                     f"max_model_len={max_model_len} tokens ({max_pages} pages of "
                     f"{page_size})")
  return max_model_len, num_pages


class Engine:
  """Serves `model` (one device or a mesh; with data replicas, `num_pages` is each one's)."""

  def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
               page_size: int = 16, num_pages: int | None = None,
               max_model_len: int | None = None, prefill_chunk: int = 128,
               prefill_rows: int = 4, steps_per_call: int = 8, eos_token_ids=None,
               speculative=None):
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                        ("page_size", page_size), ("prefill_chunk", prefill_chunk),
                        ("prefill_rows", prefill_rows), ("steps_per_call", steps_per_call)):
      checks.positive_int("engine", name, value)
    _check_servable(model)
    self.max_model_len, num_pages = _sizes(model, max_model_len, page_size, num_pages,
                                           max_batch)
    self.model, self.tokenizer = model, tokenizer
    self.max_batch, self.max_queue = max_batch, max_queue
    self.eos = steps.eos_ids(eos_token_ids if eos_token_ids is not None
                             else getattr(tokenizer, "eos_token_id", None))
    self.runner = Runner(model, paging.KVStore.for_model(model, num_pages, page_size), self.eos)
    self.spec = speculative_.prepare(speculative, model)
    decoder = decoders.speculative(self.runner, self.spec, steps_per_call,
                                   pow2(prefill_chunk, steps.MIN_CHUNK))
    self.scheduler = Scheduler(self.runner, tokenizer, self.eos, max_batch=max_batch,
                               max_model_len=self.max_model_len, prefill_chunk=prefill_chunk,
                               prefill_rows=prefill_rows, steps_per_call=steps_per_call,
                               decoder=decoder)
    self._cv = threading.Condition()
    self._inbox: collections.deque[Request] = collections.deque()
    self._thread: threads.Handle | None = None  # the engine's loop, on an engine thread
    self._stopping = False
    self.iterations = 0
    self.warming: tuple[int, int] | None = None  # (shapes compiled, shapes) while warming up

  @property
  def kv(self) -> paging.KVStore:
    return self.runner.kv

  @property
  def page_size(self) -> int:
    return self.kv.page_size

  @property
  def waiting(self):
    return self.scheduler.waiting

  @property
  def active(self):
    return self.scheduler.active

  @property
  def queue_length(self) -> int:
    return len(self._inbox) + len(self.waiting)

  @property
  def running(self) -> int:
    return len(self.active)

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def idle(self) -> bool:
    return not self._inbox and not self.waiting and not self.active

  def shapes(self) -> Shapes:
    return self.scheduler.shapes()

  def warmup(self, progress=None):
    """Compiles every shape (shapes()); progress(done, total) after each."""
    def tick(done, total):
      self.warming = (done, total)
      if progress is not None:
        progress(done, total)
    self.warming = (0, self.shapes().count())
    try:
      self.scheduler.warmup(tick)
    finally:
      self.warming = None

  def submit(self, *reqs: Request):
    """Queues requests (any thread), all or none: raises BadRequest (a request that can never
    be served), or QueueFull when they would take the queue past max_queue (nothing queued,
    no event); once it returns, each request will get a final event."""
    for req in reqs:
      request.check(req, self.model.config.vocab_size, self.max_model_len)
    with self._cv:
      if self._stopping:
        raise RuntimeError("the engine has stopped")
      if self.queue_length + len(reqs) > self.max_queue:
        raise QueueFull(f"the queue is full ({self.queue_length} requests waiting, "
                        f"{len(reqs)} more asked for, max_queue={self.max_queue}); retry later")
      for req in reqs:
        req.state, req.t_submit = "waiting", time.perf_counter()
        self._inbox.append(req)
      self._cv.notify()

  def cancel(self, req: Request):
    """Cancels a request (any thread): its pages are freed at the next iteration."""
    with self._cv:
      req.cancelled = True
      self._cv.notify()

  def start(self, warmup: bool = False, progress=None) -> "Engine":
    """Runs the scheduler on its own thread (once; later calls do nothing). With `warmup`
    the thread first compiles every shape (`warming` says how far; requests submitted
    meanwhile wait in the queue)."""
    if self._thread is not None:
      return self
    if warmup:
      self.warming = (0, self.shapes().count())
    self._thread = threads.run(self._loop, (warmup, progress))
    return self

  def stop(self, timeout: float = 30.0):
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)
    if self._thread is None or not self._thread.is_alive():  # else it ends them itself
      self._fail_all("the server is shutting down")

  def step(self) -> bool:
    """One scheduler iteration on what has been submitted; False when nothing could run."""
    self.iterations += 1
    with self._cv:
      self.waiting.extend(self._inbox)
      self._inbox.clear()
    return self.scheduler.step()

  def _loop(self, warmup=False, progress=None):
    if warmup:
      try:
        self.warmup(progress)
      except Exception as e:  # noqa: BLE001 - a failed warm-up fails what waits; serving goes on
        self._fail_all(f"warm-up failed: {type(e).__name__}: {e}")
    while True:
      with self._cv:
        while not self._stopping and self.idle():
          self._cv.wait()
        if self._stopping:
          break
      try:
        if not self.step():
          with self._cv:  # nothing could run (pages are all taken): wait for a change
            self._cv.wait(0.05)
      except Exception as e:  # noqa: BLE001 - every request gets told, the engine goes on
        self._fail_all(f"engine error: {type(e).__name__}: {e}")
        for runner in filter(None, (self.runner, self.scheduler.decoder.draft)):
          runner.kv = paging.KVStore.for_model(runner.model, runner.kv.pool.num_pages,
                                               self.page_size)
    self._fail_all("the server is shutting down")

  def _fail_all(self, message: str):
    with self._cv:
      self.waiting.extend(self._inbox)
      self._inbox.clear()
    self.scheduler.fail_all(message)
