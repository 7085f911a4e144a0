"""The serving engine: one scheduler owns the model, the paged KV cache and the device, and
batches requests as they come (continuous batching).

Each iteration (`Engine.step`) it
  1. retires cancelled requests (their pages go back to the pool, full pages of what they
     wrote into the prefix cache),
  2. admits waiting requests while a batch row and the pages for prompt + max_tokens are free
     (the prefix cache serves what it holds of a prompt),
  3. prefills one chunk of up to `prefill_rows` admitted prompts (a long prompt takes several
     iterations, decode steps of the others run in between),
  4. runs decode steps for every request past its prompt: one step per call while requests
     wait to be admitted or are being prefilled (so they join quickly), `steps_per_call`
     steps per host round trip when nothing waits,
  5. hands each request its new text (stop strings cut it, EOS and max_tokens end it).

The device work is decode_loop's (`prefill_step`, `first_token`, `decode_steps`, the ones
`generate` runs) with per-row sampling settings. Every shape is bucketed: batch rows and
prefill rows to powers of two, prefill chunks to powers of two from 16 to `prefill_chunk`,
page-table widths to powers of two up to the context; `shapes()` lists them all and
`warmup()` compiles them, after which no load recompiles anything.

Requests talk to their owner through `on_event(Event)`, called on the engine's thread.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.engine import decode_loop, paging
from fdjax.ops import dispatch
from fdjax.ops import kv_cache as kvc
from fdjax.engine.decode_loop import pow2
from fdjax.engine.sampling import RowSampling

MIN_CHUNK = 16
# The decode loop's starting state for tokens already chosen (a row's latest), compiled.
_start = jax.jit(decode_loop.start, static_argnames=("out_len",))


class QueueFull(RuntimeError):
  """The waiting queue holds max_queue requests already."""


class BadRequest(ValueError):
  """A request the engine cannot serve; `param` names the request field at fault."""

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass
class Event:
  """What a request got in one iteration: new text and tokens, and at its end the reason."""
  text: str
  tokens: int                    # new tokens (a stop string's cut may drop some of their text)
  finish_reason: str | None      # None, "stop", "length", "cancelled" or "error"
  prompt_tokens: int
  completion_tokens: int         # so far
  time: float                    # time.perf_counter() when produced
  gap: float = 0.0               # seconds since this request's previous tokens (or its submit)
  error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0
  stop: tuple[str, ...] = ()
  on_event: Callable[[Event], None] = lambda event: None
  # Owned by the engine.
  state: str = "new"             # new, waiting, prefill, decode, done
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0              # prompt tokens whose K/V are in the cache
  tokens: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  sent: int = 0                  # characters of text handed out
  searched: int = 0              # characters of text searched for stop strings
  finish_reason: str | None = None
  cancelled: bool = False
  t_submit: float = 0.0
  t_first: float | None = None
  t_last: float | None = None    # when its latest tokens came

  @property
  def cached_len(self) -> int:
    """Tokens whose K/V are in the cache: the prompt, then every token but the newest."""
    if self.state == "decode" or (self.state == "done" and self.tokens):
      return len(self.prompt) + len(self.tokens) - 1
    return self.computed


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every shape the engine runs (a compiled program each)."""
  decode: tuple        # (rows, page-table width)
  prefill: tuple       # (rows, chunk, page-table width)
  first: tuple         # rows

  def count(self) -> int:
    return len(self.decode) + len(self.prefill) + len(self.first)


class Engine:

  def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
               page_size: int = 16, num_pages: int | None = None,
               max_model_len: int | None = None, prefill_chunk: int = 128,
               prefill_rows: int = 4, steps_per_call: int = 8, eos_token_ids=None):
    cfg = model.config
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                        ("page_size", page_size), ("prefill_chunk", prefill_chunk),
                        ("prefill_rows", prefill_rows), ("steps_per_call", steps_per_call)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"engine: {name} must be a positive integer, got {value!r}")
    if getattr(model, "dp", 1) > 1:  # a request's pages would have to stay in one replica
      raise ValueError(f"engine: a mesh with dp={model.dp} data replicas is not implemented "
                       f"for serving; serve with --tp only (run one server per replica)")
    # Sliding windows are the attention's business: a request may run past its window (the
    # engine keeps all its pages, where generate gives back those out of every window).
    context = cfg.max_position_embeddings
    self.max_model_len = min(max_model_len or context, context)
    if self.max_model_len < 2:
      raise ValueError(f"engine: max_model_len must be >= 2, got {self.max_model_len}")
    self.max_pages = -(-self.max_model_len // page_size)
    num_pages = num_pages or max_batch * self.max_pages
    if num_pages < self.max_pages:
      raise ValueError(f"engine: num_pages={num_pages} cannot hold one request of "
                       f"max_model_len={self.max_model_len} tokens ({self.max_pages} pages of "
                       f"{page_size})")
    self.model, self.tokenizer = model, tokenizer
    self.max_batch, self.max_queue = max_batch, max_queue
    self.prefill_chunk = pow2(prefill_chunk, MIN_CHUNK)
    self.prefill_rows = min(pow2(prefill_rows), pow2(max_batch))
    self.steps_per_call = steps_per_call
    self.eos = tuple(sorted(set(_ids(eos_token_ids if eos_token_ids is not None
                                     else getattr(tokenizer, "eos_token_id", None)))))
    self.kv = paging.KVStore.for_model(model, num_pages, page_size)
    self._graphdef, self._state = nnx.split(model)
    self._impl = dispatch.current()
    self._eos_ids = jnp.asarray(self.eos or (-1,), jnp.int32)
    self._key = jax.random.key(0)   # unused by per-row sampling, which keys on each row's seed
    self._cv = threading.Condition()
    self._inbox: collections.deque[Request] = collections.deque()
    self.waiting: collections.deque[Request] = collections.deque()
    self.active: list[Request] = []
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.iterations = 0

  # ------------------------------------------------------------------ public API

  @property
  def page_size(self) -> int:
    return self.kv.page_size

  @property
  def queue_length(self) -> int:
    return len(self._inbox) + len(self.waiting)

  @property
  def running(self) -> int:
    return len(self.active)

  def check(self, req: Request):
    """Raises BadRequest for a request that can never be served."""
    vocab = self.model.config.vocab_size
    if not req.prompt:
      raise BadRequest("prompt", "the prompt is empty (it encodes to no tokens)")
    bad = [t for t in req.prompt if not 0 <= t < vocab]
    if bad:
      raise BadRequest("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(req.prompt) >= self.max_model_len:
      raise BadRequest("prompt", f"the prompt has {len(req.prompt)} tokens; this model's "
                       f"context is {self.max_model_len} tokens, and at least one must be left "
                       "to generate")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
      raise BadRequest("max_tokens", f"max_tokens must be >= 1, got {req.max_tokens!r}")
    if len(req.prompt) + req.max_tokens > self.max_model_len:
      raise BadRequest("max_tokens", f"the prompt ({len(req.prompt)} tokens) plus max_tokens "
                       f"({req.max_tokens}) exceeds this model's context of "
                       f"{self.max_model_len} tokens")

  def submit(self, req: Request):
    """Queues a request (any thread). Raises BadRequest, or QueueFull when max_queue requests
    are waiting already; once it returns, the request will get a final event."""
    self.check(req)
    with self._cv:
      if self._stopping:
        raise RuntimeError("the engine has stopped")
      if self.queue_length >= self.max_queue:
        raise QueueFull(f"the queue is full ({self.queue_length} requests waiting, "
                        f"max_queue={self.max_queue}); retry later")
      req.state, req.t_submit = "waiting", time.perf_counter()
      self._inbox.append(req)
      self._cv.notify()

  def cancel(self, req: Request):
    """Cancels a request (any thread): its pages are freed at the next iteration."""
    with self._cv:
      req.cancelled = True
      self._cv.notify()

  def start(self) -> "Engine":
    """Runs the scheduler on its own thread (once; later calls do nothing)."""
    if self._thread is not None:
      return self
    self._thread = threading.Thread(target=self._loop, name="fdjax-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0):
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)
    self._fail_all("the server is shutting down")

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def idle(self) -> bool:
    return not self._inbox and not self.waiting and not self.active

  # --------------------------------------------------------------------- shapes

  def _width(self, tokens: int) -> int:
    """The page-table width (pages) for rows reaching `tokens` tokens."""
    return pow2(-(-tokens // self.page_size))

  def shapes(self) -> Shapes:
    widths = sorted({self._width(t) for t in range(1, self.max_model_len + 1)})
    decode_widths = sorted({self._width(t) for t in
                            range(1, self.max_model_len + self.steps_per_call + 1)})
    rows = [1 << i for i in range(pow2(self.max_batch).bit_length())]
    chunks = [c for c in (1 << i for i in range(self.prefill_chunk.bit_length()))
              if MIN_CHUNK <= c <= self.prefill_chunk]
    pre_rows = [r for r in rows if r <= self.prefill_rows]
    return Shapes(decode=tuple(itertools.product(rows, decode_widths)),
                  prefill=tuple((r, c, w) for r, c, w in itertools.product(pre_rows, chunks, widths)
                                if w >= self._width(c)),
                  first=tuple(pre_rows))

  def warmup(self):
    """Compiles every shape of shapes() (writes go nowhere: every table entry is NO_PAGE)."""
    shapes = self.shapes()
    for rows, width in shapes.decode:
      self._decode_call(np.zeros(rows, np.int32), self._table([], rows, width),
                        np.zeros(rows, np.int32), np.ones(rows, np.int32), _sampling([], rows))
    for rows, chunk, width in shapes.prefill:
      self._prefill_call(np.zeros((rows, chunk), np.int32), np.zeros(rows, np.int32),
                         self._table([], rows, width), np.zeros(rows, np.int32))
    for rows in shapes.first:
      self._first_call(jnp.zeros((rows, self.model.config.vocab_size), jnp.float32),
                       _sampling([], rows), np.zeros(rows, np.int32))

  # ------------------------------------------------------------------ device calls

  def _table(self, reqs, rows, width):
    return paging.page_table([r.pages for r in reqs], rows, width)

  def _decode_call(self, first, table, lengths, max_new, sampling):
    cache = kvc.KVCache(self.kv.k, self.kv.v, jnp.asarray(table), jnp.asarray(lengths))
    max_new = np.asarray(max_new, np.int32)
    carry = _start(jnp.asarray(first), self._key, self._eos_ids, jnp.asarray(max_new > 0),
                   jnp.asarray(max_new), out_len=self.steps_per_call + 1)
    carry, cache = decode_loop.decode_steps(
        self._graphdef, self._state, carry, cache, self._eos_ids, jnp.asarray(max_new),
        jnp.int32(max_new.max()), _device(sampling), impl=self._impl)
    self.kv.k, self.kv.v = cache.k, cache.v
    return decode_loop.to_host(carry[1])

  def _prefill_call(self, ids, n, table, lengths):
    cache = kvc.KVCache(self.kv.k, self.kv.v, jnp.asarray(table), jnp.asarray(lengths))
    last = jnp.zeros((ids.shape[0], self.model.config.vocab_size), jnp.float32)
    cache, last = decode_loop.prefill_step(self._graphdef, self._state, jnp.asarray(ids),
                                           jnp.asarray(n), cache, last, impl=self._impl)
    self.kv.k, self.kv.v = cache.k, cache.v
    return last

  def _first_call(self, last, sampling, positions):
    rows = last.shape[0]
    carry = decode_loop.first_token(last, self._key, self._eos_ids, jnp.ones((rows,), bool),
                                    jnp.int32(2), _device(sampling),
                                    jnp.asarray(positions, jnp.int32), out_len=1)
    return decode_loop.to_host(carry[3])

  # -------------------------------------------------------------------- the loop

  def _loop(self):
    while True:
      with self._cv:
        while not self._stopping and self.idle():
          self._cv.wait()
        if self._stopping:
          return
      try:
        if not self.step():
          with self._cv:  # nothing could run (pages are all taken): wait for a change
            self._cv.wait(0.05)
      except Exception as e:  # noqa: BLE001 - every request gets told, the engine goes on
        self._fail_all(f"engine error: {type(e).__name__}: {e}")
        self.kv = paging.KVStore.for_model(self.model, self.kv.pool.num_pages, self.page_size)

  def step(self) -> bool:
    """One scheduler iteration; False when there was nothing it could run."""
    self.iterations += 1
    with self._cv:
      self.waiting.extend(self._inbox)
      self._inbox.clear()
    for req in [r for r in self.waiting if r.cancelled]:
      self.waiting.remove(req)
      self._finish(req, "cancelled")
    for req in [r for r in self.active if r.cancelled]:
      self._finish(req, "cancelled")
    self._admit()
    prefilling = [r for r in self.active if r.state == "prefill"]
    if prefilling:
      self._prefill(prefilling[:self.prefill_rows])
    decoding = [r for r in self.active if r.state == "decode"]
    if decoding:
      hurry = (any(r.state == "prefill" for r in self.active)
               or (self.waiting and len(self.active) < self.max_batch))
      self._decode(decoding, 1 if hurry else self.steps_per_call)
    return bool(prefilling or decoding)

  def _admit(self):
    pool = self.kv.pool
    while self.waiting and len(self.active) < self.max_batch:
      req = self.waiting[0]
      try:
        req.pages, req.computed = pool.allocate(req.prompt, len(req.prompt) + req.max_tokens)
      except paging.PoolExhausted:
        return  # it waits for pages (check() made sure it fits an empty pool)
      self.waiting.popleft()
      req.state = "prefill"
      self.active.append(req)

  def _prefill(self, reqs):
    rows = pow2(len(reqs))
    pieces = [r.prompt[r.computed:r.computed + self.prefill_chunk] for r in reqs]
    chunk = min(self.prefill_chunk, pow2(max(len(p) for p in pieces), MIN_CHUNK))
    lengths = np.zeros(rows, np.int32)
    lengths[:len(reqs)] = [r.computed for r in reqs]
    ids, n = decode_loop.pack(pieces, rows, chunk)
    width = self._width(max([chunk] + [r.computed + len(p) for r, p in zip(reqs, pieces)]))
    last = self._prefill_call(ids, n, self._table(reqs, rows, width), lengths)
    for r, p in zip(reqs, pieces):
      r.computed += len(p)
    if any(r.computed == len(r.prompt) for r in reqs):
      first = self._first_call(last, _sampling(reqs, rows), lengths + n)
      for i, r in enumerate(reqs):
        if r.computed == len(r.prompt):
          r.state = "decode"
          self._accept(r, [int(first[i])])

  def _decode(self, reqs, steps):
    rows = pow2(len(reqs))
    first = np.zeros(rows, np.int32)
    lengths = np.zeros(rows, np.int32)
    max_new = np.zeros(rows, np.int32)
    for i, r in enumerate(reqs):
      first[i], lengths[i] = r.tokens[-1], r.cached_len
      max_new[i] = min(steps, r.max_tokens - len(r.tokens)) + 1
    # Rows that end early keep stepping (their writes past their pages are dropped), so the
    # table covers every row's length after `steps` steps.
    reach = max(r.cached_len for r in reqs) + steps
    out = self._decode_call(first, self._table(reqs, rows, self._width(reach)), lengths,
                            max_new, _sampling(reqs, rows))
    for i, r in enumerate(reqs):
      self._accept(r, [int(t) for t in out[i, 1:] if t >= 0])

  # --------------------------------------------------------------- text and ends

  def _accept(self, req: Request, new: list[int]):
    """Appends new tokens to a request, ends it on EOS, a stop string or max_tokens, and
    tells it the text that is now certain."""
    now = time.perf_counter()
    gap = now - (req.t_last or req.t_submit)
    req.t_first = req.t_first or now
    req.t_last = now
    count, reason, cut = 0, None, None
    for tok in new:
      req.tokens.append(tok)
      count += 1
      if tok in self.eos:
        reason = "stop"
        break
      if req.stop:
        cut = self._find_stop(req)
        if cut is not None:
          reason = "stop"
          break
      if len(req.tokens) >= req.max_tokens:
        reason = "length"
        break
    if cut is None:
      text_tokens = req.tokens[:-1] if req.tokens and req.tokens[-1] in self.eos else req.tokens
      req.text = self.tokenizer.decode(text_tokens)
    else:
      req.text = req.text[:cut]
    ready = len(req.text) if reason else _settled(req.text, req.stop)
    delta = req.text[req.sent:ready] if ready > req.sent else ""
    req.sent = max(req.sent, ready)
    if reason:
      self._finish(req, reason, delta, count, now, gap=gap)
    else:
      self._emit(req, Event(delta, count, None, len(req.prompt), len(req.tokens), now, gap))

  def _find_stop(self, req: Request) -> int | None:
    req.text = self.tokenizer.decode(req.tokens)
    longest = max(len(s) for s in req.stop)
    start = max(0, req.searched - longest + 1)
    hits = [i for i in (req.text.find(s, start) for s in req.stop) if i >= 0]
    req.searched = len(req.text)
    return min(hits) if hits else None

  def _finish(self, req, reason, delta="", count=0, now=None, gap=0.0):
    if req.state == "done":
      return
    if req in self.active:
      self.active.remove(req)
      self.kv.pool.finish(req.pages, (req.prompt + req.tokens)[:req.cached_len])
    req.state, req.finish_reason = "done", reason
    self._emit(req, Event(delta, count, reason, len(req.prompt), len(req.tokens),
                          now or time.perf_counter(), gap))

  def _emit(self, req, event):
    try:
      req.on_event(event)
    except Exception:  # noqa: BLE001 - a listener that is gone (closed loop) stops nothing
      pass

  def _fail_all(self, message: str):
    with self._cv:
      self.waiting.extend(self._inbox)
      self._inbox.clear()
    for req in list(self.waiting) + list(self.active):
      if req in self.active:
        self.active.remove(req)
        self.kv.pool.release(req.pages)
      req.state, req.finish_reason = "done", "error"
      self._emit(req, Event("", 0, "error", len(req.prompt), len(req.tokens),
                            time.perf_counter(), error=message))
    self.waiting.clear()


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def _settled(text: str, stop) -> int:
  """How much of a request's text can be handed out: not a trailing incomplete character
  (U+FFFD from a partial UTF-8 sequence) nor a tail that may begin a stop string."""
  end = len(text.rstrip("\ufffd"))
  hold = 0
  for s in stop:
    hold = max([hold] + [k for k in range(1, min(len(s) - 1, end) + 1)
                         if text[end - k:end] == s[:k]])
  return end - hold


def _sampling(reqs, rows) -> RowSampling:
  settings = [(r.temperature, r.top_k, r.top_p, r.seed) for r in reqs]
  return RowSampling.of(settings + [(0.0, None, None, 0)] * (rows - len(reqs)))


def _device(sampling: RowSampling) -> RowSampling:
  return RowSampling(*(jnp.asarray(a) for a in sampling))
