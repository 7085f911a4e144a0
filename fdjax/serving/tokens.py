"""vLLM's /tokenize and /detokenize on `fdjax serve`: a prompt (or chat messages through the
chat template, as /v1/chat/completions renders them) to the token ids the model would read,
and token ids back to text. Clients count tokens with them before they send a request."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from fdjax.serving import api, generation


class _Request(api._Strict):
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
    if self.messages is not None:
      api.check_template_options(self.messages, self.add_generation_prompt,
                                 self.continue_final_message, self.chat_template_kwargs)


class DetokenizeRequest(_Request):
  tokens: list[int]


async def tokenize(server, request):
  body = await generation.read_body(server, request, TokenizeRequest)
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
  body = await generation.read_body(server, request, DetokenizeRequest)
  vocab = server.engine.model.config.vocab_size
  bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
  if bad is not None:
    raise api.ApiError(400, f"tokens[{bad}]: token id {body.tokens[bad]} is outside the "
                       f"vocabulary [0, {vocab})", "tokens")
  return server.json_response({"prompt": server.tokenizer.decode(body.tokens)})
