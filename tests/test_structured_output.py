"""Structured outputs: a grammar (llguidance) masks each row's logits on the device, so what a
request generates parses and validates, greedy or sampled, streamed or not, batched with
free requests; the OpenAI fields (response_format json_object / json_schema) and vLLM's
guided_* extensions against a live `fdjax serve` with the official client; bad grammars
get a 400 naming the field."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from fdjax.engine import core as eng  # noqa: E402
from fdjax.engine import grammar, request, sampling  # noqa: E402
from fdjax.engine.sampling import RowSampling, Settings  # noqa: E402
from fdjax.io import loading  # noqa: E402
from fdjax.io.tokenizer import ByteTokenizer  # noqa: E402
from tests.models_util import tiny_model  # noqa: E402
from tests.test_server import _start, _stop  # noqa: E402

# Minutes of a live server: apart from the README's command, in CI's second step.
pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["parser", "lexer", "vm"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                                          "maximum": 99},
                                                   "admin": {"type": "boolean"}},
                  "required": ["id", "admin"], "additionalProperties": False},
    },
    "required": ["name", "kind", "size", "flags", "owner"],
    "additionalProperties": False,
}


def test_the_mask_leaves_only_the_grammars_tokens():
  tok = ByteTokenizer()
  vocab = grammar.Vocabulary(tok, 256, ())
  c = grammar.Constraint(vocab, vocab.compile("regex", "(ab|cd)x"))
  masks = grammar.masks([c, None], 2, 256)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
  rows = RowSampling.of([Settings(), Settings()], [1, 1], masks)
  hist = sampling.history(np.full((2, 1), -1, np.int32), rows, 256)
  x = np.asarray(sampling.adjust(logits, rows, hist, jnp.asarray([1, 1]), jnp.asarray([-1])))
  assert np.isfinite(x[0]).nonzero()[0].tolist() == [ord("a"), ord("c")]
  assert np.isfinite(x[1]).all()  # a row with no grammar keeps every token
  assert grammar.masks([None, None], 2, 256).shape == (2, 1)
  assert c.advance([ord("c")]) == ([ord("c")], False)
  assert c.advance([ord("d"), ord("x"), ord("y")]) == ([ord("d"), ord("x")], True)
  with pytest.raises(grammar.GrammarError):
    vocab.compile("json_schema", {"type": "nonsense"})


def test_engine_requests_follow_their_grammars_batched_with_free_ones():
  model = tiny_model(seed=3, vocab_size=256)
  tok = ByteTokenizer()
  engine = eng.Engine(model, tok, max_batch=4, page_size=16, max_model_len=256,
                      prefill_chunk=16, steps_per_call=4)
  vocab = grammar.Vocabulary(tok, 256, ())
  schema = vocab.compile("json_schema", SCHEMA)
  reqs = []
  for i, temperature in enumerate((0.0, 1.0, 1.0)):
    reqs.append(request.Request([5, 6, 7 + i], 200, temperature=temperature, seed=i,
                                constraint=grammar.Constraint(vocab, schema)))
  free = request.Request([9, 9, 9], 30)
  reqs.append(free)
  for r in reqs:
    engine.submit(r)
  while not engine.idle():
    engine.step()
  for r in reqs[:3]:
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(tok.decode(r.tokens)), SCHEMA)
  assert free.finish_reason == "length" and len(free.tokens) == 30
  assert engine.kv.pool.pages_in_use == 0


@pytest.fixture(scope="module")
def s():
  srv = _start(*loading.load(None, chat_template=True)[:4], max_model_len=512)
  yield srv
  _stop(srv)


def test_json_schema_outputs_validate_10_of_10_sampled_streamed_or_not(s):
  fmt = {"type": "json_schema", "json_schema": {"name": "component", "schema": SCHEMA,
                                                "strict": True}}
  messages = [{"role": "user", "content": "describe a component as JSON"}]
  r = s.client.chat.completions.create(model=s.name, messages=messages, n=10, temperature=1.0,
                                       seed=3, max_tokens=300, response_format=fmt)
  assert len(r.choices) == 10
  outputs = [json.loads(c.message.content) for c in r.choices]
  for out, c in zip(outputs, r.choices):
    jsonschema.validate(out, SCHEMA)
    assert c.finish_reason == "stop"
  assert len({json.dumps(o) for o in outputs}) > 1
  chunks = list(s.client.chat.completions.create(
      model=s.name, messages=messages, temperature=0, max_tokens=300, response_format=fmt,
      stream=True))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  jsonschema.validate(json.loads(text), SCHEMA)
  greedy = s.client.chat.completions.create(model=s.name, messages=messages, temperature=0,
                                            max_tokens=300, response_format=fmt)
  assert greedy.choices[0].message.content == text


def test_json_object_regex_choice_and_grammar_on_completions(s):
  ask = dict(model=s.name, prompt="value = ", max_tokens=200, temperature=1.0, seed=5)
  obj = s.client.completions.create(**ask, extra_body={"response_format": {"type":
                                                                           "json_object"}})
  assert isinstance(json.loads(obj.choices[0].text), dict)
  rx = s.client.completions.create(**ask, extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
  import re
  assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", rx.choices[0].text)
  pick = s.client.completions.create(**ask, n=5, extra_body={"guided_choice": ["yes", "no"]})
  assert {c.text for c in pick.choices} <= {"yes", "no"}
  lark = 'start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/'
  g = s.client.completions.create(**ask, extra_body={"guided_grammar": lark})
  assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", g.choices[0].text)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_bad_constraints_get_a_400_naming_the_field(s, extra, param):
  for create, args in ((s.client.completions.create, dict(prompt="x")),
                       (s.client.chat.completions.create,
                        dict(messages=[{"role": "user", "content": "x"}]))):
    with pytest.raises(openai.BadRequestError) as e:
      create(model=s.name, max_tokens=4, extra_body=extra, **args)
    assert e.value.body["param"] == param
