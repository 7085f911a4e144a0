"""OpenAI's /v1/embeddings on `fdjax serve`, as the official client's `client.embeddings` and
vLLM serve it: each input (a string, strings, token ids, lists of token ids) through the model
to one vector (fdjax.engine.embed: pooled as the checkpoint's sentence-transformers files say,
else its last token's state, normalized), as a list of floats or, with encoding_format
"base64" (what the official client asks for), its little-endian float32 bytes in base64.
`dimensions` shortens a Matryoshka model's embeddings (fdjax.io.pooling). vLLM's
truncate_prompt_tokens keeps each input's last k tokens; add_special_tokens (default true)
adds the tokenizer's BOS to text, as completions encode it.

The model runs beside the engine's generation on a worker thread, one embeddings request at a
time, so the event loop goes on serving."""
from __future__ import annotations

import asyncio
import base64
import threading
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from fdjax.engine import embed
from fdjax.serving import api, generation, limits

_ONE_AT_A_TIME = threading.Lock()


class EmbeddingRequest(api._Strict):
  ENDPOINT: ClassVar[str] = "embeddings"
  RENAMED: ClassVar[dict] = {"prompt": "input", "messages": None}
  model: str
  input: str | list[str] | list[int] | list[list[int]]
  encoding_format: Literal["float", "base64"] = "float"
  dimensions: int | None = Field(None, ge=1)
  truncate_prompt_tokens: int | None = Field(None, ge=1)
  add_special_tokens: bool = True

  def check(self):
    if isinstance(self.input, list) and not self.input:
      raise api.ApiError(400, "input is an empty list", "input")


def _inputs(server, body: EmbeddingRequest) -> list[list[int]]:
  """The inputs as token lists (generation.token_lists' rules, naming `input`), each its last
  truncate_prompt_tokens; ApiError for one past the context."""
  lists = generation.token_lists(server, body.input, "input", body.add_special_tokens)
  if body.truncate_prompt_tokens is not None:
    lists = [ids[-body.truncate_prompt_tokens:] for ids in lists]
  context = server.engine.max_model_len
  long = next((i for i, ids in enumerate(lists) if len(ids) > context), None)
  if long is not None:
    raise api.ApiError(400, f"input[{long}] has {len(lists[long])} tokens; this model's "
                       f"context is {context} tokens (truncate_prompt_tokens cuts an input "
                       "to its last k)", "input")
  return lists


def _encode(vector: np.ndarray, fmt: str):
  if fmt == "base64":
    return base64.b64encode(vector.astype("<f4").tobytes()).decode()
  return vector.tolist()


async def create(server, request):
  body = await generation.read_body(server, request, EmbeddingRequest)
  count = 1 if isinstance(body.input, str) or isinstance(body.input[0], int) else len(body.input)
  if count > server.limits.embedding_inputs:
    limits.refuse("embedding_inputs", "the number of inputs", count,
                  server.limits.embedding_inputs, "input")
  model = server.engine.model
  pooling = server.pooling
  if isinstance(pooling, str):
    raise api.ApiError(400, f"this server does not embed: {pooling}", "model",
                       reason="unsupported_field")
  if body.dimensions is not None and (
      error := pooling.dimensions_error(body.dimensions, model.config.hidden_size)):
    raise api.ApiError(400, error, "dimensions")
  lists = _inputs(server, body)

  def run():
    with _ONE_AT_A_TIME:
      return embed.embed(model, lists, pooling=pooling.pooling, normalize=pooling.normalize,
                         dimensions=body.dimensions)

  waiting = server.embedding_requests
  if waiting >= server.engine.max_queue:  # as generation's full queue answers
    raise api.ApiError(429, f"{waiting} embeddings requests are running or waiting; this "
                       f"server takes at most {server.engine.max_queue} (--max-queue)", None,
                       "rate_limit_error", "queue_full")
  server.embedding_requests += 1  # (on the event loop's thread: no race)
  try:
    vectors = await asyncio.to_thread(run)
  except ValueError as e:  # what embed refuses is the request's
    raise api.ApiError(400, str(e), "input") from None
  finally:
    server.embedding_requests -= 1
  tokens = sum(len(ids) for ids in lists)
  server.metrics.embedded.inc(len(lists))
  server.metrics.embedded_tokens.inc(tokens)
  return server.json_response({
      "object": "list", "model": server.model_name,
      "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
               for i, v in enumerate(vectors)],
      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
