"""vLLM's /tokenize and /detokenize on `fdjax serve`: a prompt (or chat messages through the
chat template, as /v1/chat/completions renders them) to the token ids the model would read,
and token ids back to text. Clients count tokens with them before they send a request."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fdjax.serving import api, generation


class _Request(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
  ENDPOINT: ClassVar[str] = "tokenize"  # no unsupported fields
  RENAMED: ClassVar[dict] = {}
  model: str | None = None  # optional, as in vLLM; another model's name is a 404

  def check(self):
    pass


class TokenizeRequest(_Request):
  """A prompt (add_special_tokens: the tokenizer's BOS, as completions encode it) or chat
  messages (with add_generation_prompt, continue_final_message, chat_template_kwargs and
  tools as chat takes them; no special tokens added: the template writes its own)."""
  prompt: str | None = None
  messages: list[api.Message] | None = Field(None, min_length=1)
  add_special_tokens: bool | None = None
  add_generation_prompt: bool = True
  continue_final_message: bool = False
  chat_template_kwargs: dict | None = None
  tools: list[api.Tool] | None = None
  return_token_strs: bool = False

  def check(self):
    if (self.prompt is None) == (self.messages is None):
      raise api.ApiError(400, "give one of prompt and messages", "prompt")
    for i, message in enumerate(self.messages or []):
      message.check(i)
    if self.add_generation_prompt and self.continue_final_message:
      raise api.ApiError(400, "continue_final_message continues the last message; it takes "
                         "add_generation_prompt: false", "continue_final_message")
    reserved = sorted(set(self.chat_template_kwargs or ()) & api.TEMPLATE_VARIABLES)
    if reserved:
      raise api.ApiError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}: the "
                         "server sets them from the request", "chat_template_kwargs")


class DetokenizeRequest(_Request):
  tokens: list[int]


async def _body(server, request, kind):
  body = await generation.read_body(server, request, kind)
  if body.model is not None and body.model != server.model_name:
    raise api.ApiError(404, f"unknown model {body.model!r}; this server serves "
                       f"{server.model_name!r}", "model", code="model_not_found")
  return body


async def tokenize(server, request):
  body = await _body(server, request, TokenizeRequest)
  if body.messages is None:
    ids = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens
                                  is not False)
  else:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    ids = generation.chat_prompt(server, [m.for_template() for m in body.messages], tools,
                                 add_special_tokens=bool(body.add_special_tokens),
                                 add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 **(body.chat_template_kwargs or {}))
  strs = ([api.token_text(api.token_bytes(server.tokenizer, t)) for t in ids]
          if body.return_token_strs else None)
  return server.json_response({"count": len(ids), "max_model_len": server.engine.max_model_len,
                               "tokens": ids, "token_strs": strs})


async def detokenize(server, request):
  body = await _body(server, request, DetokenizeRequest)
  vocab = server.engine.model.config.vocab_size
  bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
  if bad is not None:
    raise api.ApiError(400, f"tokens[{bad}]: token id {body.tokens[bad]} is outside the "
                       f"vocabulary [0, {vocab})", "tokens")
  return server.json_response({"prompt": server.tokenizer.decode(body.tokens)})
