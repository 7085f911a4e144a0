"""The two endpoints that generate, /v1/completions and /v1/chat/completions: a request body
(validated by fdjax.serving.api) becomes engine requests, n choices of each prompt (a Call),
and their events become the OpenAI response, whole or streamed (the server's delivery). The
Responses API (fdjax.serving.responses) makes its prompt and Call with the same pieces
(parse_body, chat_prompt, token_limits)."""
from __future__ import annotations

import asyncio
import secrets

import numpy as np

from fdjax.engine import grammar, request
from fdjax.io import chat
from fdjax.serving import api, limits, reasoning, tools


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


def choice_seed(seed: int, index: int) -> int:
  """The 32-bit seed of a request's choice `index`: the first takes the request's seed (as
  generate does, modulo 2**32), the others one drawn from (seed, index), so that seed s's
  second choice is not seed s + 1's first."""
  if index == 0:
    return seed % 2 ** 32
  return int(np.random.SeedSequence([seed % 2 ** 64, index]).generate_state(1)[0])


class Call:
  """One HTTP request's engine requests, n choices of each prompt (choice index: prompt * n +
  j; the n share their prompt's pages), and their events, delivered to the event loop."""

  def __init__(self, server, prompts, body: api._Sampling, max_tokens, echo=False,
               constraint=None, skip_special_tokens=True):
    self.server, self.prompts, self.n = server, prompts, body.n
    constrained = _grammar(server, body, constraint)
    loop = asyncio.get_running_loop()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    self.queue: asyncio.Queue = asyncio.Queue()
    self.reqs = []
    want_logprobs = body.top_logprobs_count is not None
    sampled = body.sampling(server.defaults)
    for ids, limit in zip(prompts, max_tokens):
      lead = None
      for j in range(body.n):
        def on_event(event, i=len(self.reqs)):
          server.metrics.record(event)
          loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        req = request.Request(
            ids, limit, **sampled, seed=choice_seed(seed, len(self.reqs)),
            stop=body.stop_strings(), on_event=on_event, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=body.bias_pairs(),
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, logprobs=want_logprobs,
            logprobs_mode=server.logprobs_mode,
            prompt_logprobs=echo and want_logprobs and j == 0, after=lead,
            constraint=None if constrained is None else grammar.Constraint(*constrained),
            skip_special_tokens=skip_special_tokens)
        lead = lead or req
        self.reqs.append(req)

  @property
  def prompt_tokens(self) -> int:
    return sum(len(p) for p in self.prompts)

  @property
  def cached_tokens(self) -> int:
    """Of prompt_tokens, those the prefix cache held when each prompt's first choice was
    admitted (its other choices share its pages)."""
    return sum(self.reqs[k * self.n].cached_prompt for k in range(len(self.prompts)))

  def usage(self, completion_tokens: int) -> dict:
    return api.usage(self.prompt_tokens, completion_tokens, self.cached_tokens)

  def submit(self):
    engine = self.server.engine
    if len(self.reqs) > engine.max_queue:  # a 429 would be retried, and never succeed
      raise api.ApiError(400, f"this request asks for {len(self.reqs)} completions "
                         f"({len(self.prompts)} prompt(s) x n={self.n}); this server queues at "
                         f"most {engine.max_queue} at once (--max-queue)", "n", reason="limit")
    try:
      engine.submit(*self.reqs)  # all or none
    except request.BadRequest as e:
      raise api.ApiError(400, str(e), e.param) from None
    except request.QueueFull as e:
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



async def parse_body(server, request, kind):
  """The request's validated body (read_body), then every limit."""
  body = await read_body(server, request, kind)
  prompt = getattr(body, "prompt", "")
  batch = not isinstance(prompt, str) and prompt and not isinstance(prompt[0], int)
  limits.check(body, server.limits, len(prompt) if batch else 1)
  return body


async def read_body(server, request, kind):
  """The request's body as `kind` (api.parse): a JSON content type (415 otherwise), a size
  within the limit (413), the model's name (404; /tokenize's may be left out)."""
  content_type = request.headers.get("content-type", "")
  if content_type.split(";")[0].strip().lower() != "application/json":
    raise api.ApiError(415, f"the Content-Type must be application/json, got "
                       f"{content_type or 'none'!r}")
  declared = request.headers.get("content-length", "")
  if declared.isdigit():
    limits.check_body_size(int(declared), server.limits)
  raw = b""
  async for piece in request.stream():  # not more than the limit is ever held
    raw += piece
    limits.check_body_size(len(raw), server.limits)
  body = api.parse(kind, raw, server.strict_fields)
  if body.model not in (None, server.model_name):
    raise api.ApiError(404, f"unknown model {body.model!r}; this server serves "
                       f"{server.model_name!r}", "model", code="model_not_found")
  return body


def _grammar(server, body, spec=None):
  """(the vocabulary, the compiled grammar) of the request's output constraint (`spec`, else
  the body's), or None; ApiError naming the field for a grammar llguidance refuses."""
  spec = spec or body.constraint()
  if spec is None:
    return None
  kind, value, field = spec
  if not grammar.available():
    raise api.ApiError(400, f"{field} needs llguidance on the server: pip install "
                       "'fdjax[serve]' (or pip install llguidance)", field)
  if server.vocabulary is None:  # built once (about a second for a large vocabulary)
    engine = server.engine
    server.vocabulary = grammar.Vocabulary(server.tokenizer, engine.model.config.vocab_size,
                                           engine.eos)
  try:
    compiled = server.vocabulary.compile(kind, value)
  except grammar.GrammarError as e:
    raise api.ApiError(400, f"{field}: {e}", field) from None
  if grammar.Constraint(server.vocabulary, compiled).done:
    raise api.ApiError(400, f"{field}: the grammar allows nothing but an empty answer", field)
  if body.min_tokens:
    raise api.ApiError(400, "min_tokens cannot be combined with a grammar (it would ban the "
                       "EOS a complete grammar needs)", "min_tokens")
  return server.vocabulary, compiled


def token_limits(server, prompts, asked):
  """max_tokens per prompt: as asked, else what is left of the context (at most the model's
  generation_config.json max_new_tokens, where it has one)."""
  default = server.defaults.get("max_tokens")
  return [asked if asked is not None else max(1, min(
      server.engine.max_model_len - len(p), default or server.engine.max_model_len))
          for p in prompts]

def token_lists(server, prompt, param: str = "prompt",
                add_special_tokens: bool = True) -> list[list[int]]:
  """A completion's prompt (an embeddings request's input: param) (a string, strings, token
  ids, lists of token ids) as token lists, text encoded with the tokenizer's special tokens
  unless add_special_tokens is false; ApiError naming the element at fault."""
  encode = lambda text: server.tokenizer.encode(text, add_special_tokens=add_special_tokens)
  if isinstance(prompt, str):
    ids = encode(prompt)
    if not ids:
      raise api.ApiError(400, f"{param} is empty (it encodes to no tokens)", param)
    return [ids]
  if not prompt:
    raise api.ApiError(400, f"{param} is an empty list", param)
  if all(isinstance(p, str) for p in prompt):
    lists = [encode(p) for p in prompt]
    empty = next((i for i, ids in enumerate(lists) if not ids), None)
    if empty is not None:
      raise api.ApiError(400, f"{param}[{empty}] is empty (it encodes to no tokens)", param)
    return lists
  one = isinstance(prompt[0], int)
  lists = [list(prompt)] if one else [list(p) for p in prompt]
  vocab = server.engine.model.config.vocab_size
  for i, ids in enumerate(lists):
    where = param if one else f"{param}[{i}]"
    if not ids:
      raise api.ApiError(400, f"{where} is an empty list of token ids", param)
    bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
    if bad is not None:
      raise api.ApiError(400, f"{where}[{bad}]: token id {ids[bad]} is outside the "
                         f"vocabulary [0, {vocab})", param)
  return lists

async def completions(server, request):
  body = await parse_body(server, request, api.CompletionRequest)
  prompts = token_lists(server, body.prompt)
  call = Call(server, prompts, body, token_limits(server, prompts, body.max_tokens),
              echo=body.echo)
  call.submit()
  rid, k, n = api.new_id("cmpl"), body.logprobs, body.n
  echo = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]

  def logprobs(items, offsets):
    return None if k is None else api.completion_logprobs(server.tokenizer, items, k, offsets)

  if body.stream:
    offsets, prompt_logprobs = [api.TextOffsets() for _ in call.reqs], {}

    def chunk(i, event, first):
      text, items = event.text, event.logprobs
      if event.prompt_logprobs is not None:  # the first choice of its prompt has them
        prompt_logprobs[i // n] = event.prompt_logprobs
      if first and body.echo:
        text = echo[i // n] + text
        items = prompt_logprobs.get(i // n, []) + items
      lp = logprobs(items, offsets[i])
      out = []
      if text or items:
        out.append(api.completion_choice(i, text, None, lp))
      if event.finish_reason:
        out.append(api.completion_choice(i, "", event.finish_reason))
      return out

    return server.stream(call, rid, "text_completion", body, chunk)
  res = await server.wait(request, call)
  choices = []
  for i in range(len(call.reqs)):
    items = res.logprobs[i]
    if body.echo:
      items = (res.prompt_logprobs[i - i % n] or []) + items
    choices.append(api.completion_choice(i, echo[i // n] + res.texts[i], res.reasons[i],
                                         logprobs(items, api.TextOffsets())))
  return server.json_response(api.envelope(rid, "text_completion", server.model_name, choices,
                                 {"usage": call.usage(sum(res.completion_tokens))}))

def chat_prompt(server, messages: list[dict], offered: list[dict], param: str = "messages",
                add_special_tokens: bool = False, **template_kwargs) -> list[int]:
  """The token ids of `messages` (as the template takes them) and the `offered` tools through
  the checkpoint's chat template (the tokenizer's own special tokens added too with
  add_special_tokens; the template writes its own); ApiError naming `param` where there is
  no template or it refuses them."""
  if server.template is None:
    raise api.ApiError(400, f"model {server.model_name!r} has no chat template (no "
                       "chat_template in its tokenizer_config.json); use /v1/completions",
                       param)
  try:
    text = server.template.render(messages, **template_kwargs,
                                  **({"tools": offered} if offered else {}))
  except chat.TemplateError as e:
    raise api.ApiError(400, str(e), param) from None
  return server.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def chat_call(server, ids: list[int], body, offered: list[dict]) -> tuple[Call, str | None]:
  """(the Call of a chat turn's prompt `ids` (chat and the Responses API): a forced tool call
  enforced by a grammar in the template's format, special tokens kept in the text where the
  calls are parsed from them; that format)."""
  fmt = tools.detect(server.template.with_tools) if server.template else None
  forced = body.forced_tools()
  call = Call(server, [ids], body, token_limits(server, [ids], body.limit), constraint=None
              if not forced else ("lark", tools.grammar(fmt, forced), "tool_choice"),
              skip_special_tokens=not (offered and tools.keeps_special_tokens(fmt)))
  return call, fmt


def split_answer(server, fmt: str | None, names, text: str):
  """(reasoning, content, tool calls) of a chat turn's whole answer: the reasoning parser's
  thought split off, then calls of the offered tools (`names`) parsed out of the rest."""
  thought, text = reasoning.split(server.reasoning_parser, text)
  content, calls = tools.parse(fmt, text, names) if names and text else (text, [])
  return thought, content, calls


async def chat_completions(server, request):
  body = await parse_body(server, request, api.ChatRequest)
  offered = body.active_tools()
  ids = chat_prompt(server, [m.for_template() for m in body.messages], offered,
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                    **(body.chat_template_kwargs or {}))
  call, fmt = chat_call(server, ids, body, offered)
  call.submit()
  rid, k = api.new_id("chatcmpl"), body.top_logprobs_count
  names = {t["function"]["name"] for t in offered}

  def logprobs(items):
    return None if k is None else api.chat_logprobs(server.tokenizer, items, k)

  named = isinstance(body.tool_choice, api.NamedToolChoice)

  parser = server.reasoning_parser

  def answer(text, reason):
    """(the message's fields, the finish reason): split_answer's, the reason "tool_calls"
    where there are calls unless the request named the function (then the engine's, as
    OpenAI and vLLM answer a named tool_choice)."""
    thought, content, calls = split_answer(server, fmt, names, text)
    fields = {"content": content, **({} if parser is None else reasoning.fields(thought))}
    if calls:
      return {**fields, "tool_calls": calls}, reason if named else "tool_calls"
    return fields, reason

  if body.stream:
    # With tools on, a choice's text and its tokens' logprobs, until it ends.
    held = [""] * len(call.reqs)
    held_logprobs = [[] for _ in call.reqs]
    splits = [reasoning.Stream(parser) for _ in call.reqs] if parser else None

    def chunk(i, event, first):
      out = [api.chat_delta(i, {"role": "assistant", "content": ""})] if first else []
      if offered:
        held[i] += event.text
        held_logprobs[i] += event.logprobs
        if event.finish_reason:
          fields, reason = answer(held[i], event.finish_reason)
          if "tool_calls" in fields:
            fields["tool_calls"] = [{"index": j, **c} for j, c in
                                    enumerate(fields["tool_calls"])]
          out += [api.chat_delta(i, fields, None, logprobs(held_logprobs[i])),
                  api.chat_delta(i, {}, reason)]
        return out
      if splits is not None:  # the reasoning's text, then the content's
        thought, text = splits[i].feed(event.text, end=bool(event.finish_reason))
        fields = {**(reasoning.fields(thought) if thought else {}),
                  **({"content": text} if text or not thought else {})}
        if thought or text or event.logprobs:
          out.append(api.chat_delta(i, fields, None, logprobs(event.logprobs)))
      elif event.text or event.logprobs:
        out.append(api.chat_delta(i, {"content": event.text}, None, logprobs(event.logprobs)))
      if event.finish_reason:
        out.append(api.chat_delta(i, {}, event.finish_reason))
      return out

    return server.stream(call, rid, "chat.completion.chunk", body, chunk)
  res = await server.wait(request, call)
  choices = []
  for i in range(len(call.reqs)):
    fields, reason = answer(res.texts[i], res.reasons[i])
    choices.append({"index": i, "message": {"role": "assistant", **fields},
                    "finish_reason": reason, "logprobs": logprobs(res.logprobs[i])})
  return server.json_response(api.envelope(rid, "chat.completion", server.model_name, choices,
                                 {"usage": call.usage(sum(res.completion_tokens))}))
