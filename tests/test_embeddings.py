"""Embeddings (fdjax.engine.embed, /v1/embeddings): a decoder's final states pooled as
transformers computes them (last token, mean, first token; normalized; Matryoshka cuts) on
small random models, ragged and chunked; the pooling a sentence-transformers checkpoint names
(fdjax.io.pooling); and the endpoint through the official client and LangChain's
OpenAIEmbeddings, with bad requests refused naming the field."""
import base64
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fdjax  # noqa: E402
from fdjax.engine import embed, steps  # noqa: E402
from fdjax.io import pooling  # noqa: E402

VOCAB = 211


def _checkpoint(tmp_path_factory, family):
  cfg_cls, model_cls, extra = {
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
      "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                         dict(num_key_value_heads=1, sliding_window=24)),
  }[family]
  torch.manual_seed(0)
  hf = model_cls(cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                         attn_implementation="eager", **extra)).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.15)
  path = tmp_path_factory.mktemp(family)
  hf.save_pretrained(path)
  return hf, fdjax.load_pretrained(str(path)), path


@pytest.fixture(scope="module", params=["qwen3", "mistral-window"])
def pair(request, tmp_path_factory):
  return _checkpoint(tmp_path_factory, request.param)


def _want(hf, prompt, how, normalize=True, dims=None):
  with torch.no_grad():
    h = hf.model(torch.tensor([prompt])).last_hidden_state[0].numpy()
  v = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[how][:dims]
  return v / np.linalg.norm(v) if normalize else v


@pytest.mark.parametrize("how", embed.POOLINGS)
def test_pooled_states_are_transformers(pair, how, monkeypatch):
  """Ragged prompts (one past a prefill chunk and past the window), in batches of two rows
  (the order given back), pooled as transformers' final states are; normalized or not."""
  hf, model, _ = pair
  monkeypatch.setattr(embed, "MAX_ROWS", 2)
  monkeypatch.setattr(embed, "CHUNK", 32)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, VOCAB, n).tolist() for n in (5, 1, 70, 37, 17)]
  got = embed.embed(model, prompts, pooling=how)
  assert np.all(np.isfinite(got))
  want = np.stack([_want(hf, p, how) for p in prompts])
  assert np.max(np.abs(got - want)) < 1e-5
  raw = embed.embed(model, prompts[:2], pooling=how, normalize=False)
  assert np.max(np.abs(raw - np.stack([_want(hf, p, how, False) for p in prompts[:2]]))) < 1e-4


def test_dimensions_cut_then_normalize_and_similar_batches_reuse_the_program(pair):
  hf, model, _ = pair
  prompts = [[3, 4, 5, 6], [7, 8, 9]]
  got = embed.embed(model, prompts, dimensions=16)
  assert got.shape == (2, 16)
  assert np.max(np.abs(got - np.stack([_want(hf, p, "last", dims=16) for p in prompts]))) < 1e-5
  before = steps.TRACE_COUNT["embed"]
  embed.embed(model, [[9, 8, 7, 6, 5], [1, 2]], dimensions=16)  # same buckets
  assert steps.TRACE_COUNT["embed"] == before


def test_batches_bound_the_padded_tokens_and_the_cache():
  """Prompts sorted by length into batches of at most MAX_ROWS rows (a power of two, padded)
  and MAX_BATCH_TOKENS padded tokens: one chunk's bucket, or the cache's pages for a longer
  prompt (16 rows of 4000 tokens would hold a 64K-token cache)."""
  assert list(embed._batches([5, 300, 7])) == [[0, 2, 1]]
  assert list(embed._batches([4000] * 6)) == [[0, 1, 2, 3], [4, 5]]
  assert list(embed._batches([20] * 40)) == [list(range(16)), list(range(16, 32)),
                                            list(range(32, 40))]
  assert list(embed._batches([3, 3, 3], dp=2)) == [[0, 1, 2]]
  assert embed._length_bucket(138) == 160 and embed._length_bucket(17) == 32


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 2.5]]), "prompt 0 must be a flat list of integer token ids"),
    (dict(prompts=[[1, VOCAB]]), f"token id {VOCAB} outside the vocabulary"),
    (dict(prompts=[[1] * 1025]), "1025 tokens, more than the model's context of 1024"),
    (dict(prompts=[[1]], pooling="max"), "pooling must be one of last, mean, cls"),
    (dict(prompts=[[1]], dimensions=65), "dimensions must be in \\[1, 64\\]"),
])
def test_bad_embed_input_is_a_clear_value_error(pair, kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    embed.embed(pair[1], **kwargs)


def _sentence_transformers(path, mode, normalize=True, extra=()):
  modules = [{"idx": 0, "name": "0", "path": "",
              "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  modules += list(extra)
  (path / "modules.json").write_text(json.dumps(modules))
  (path / "1_Pooling").mkdir(exist_ok=True)
  modes = {k: k == mode for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                  "pooling_mode_max_tokens", "pooling_mode_lasttoken")}
  (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                               **modes}))


def test_the_pooling_a_sentence_transformers_checkpoint_names(tmp_path):
  assert pooling.read(None) == pooling.read(tmp_path) == pooling.Pooling("last", True, ())
  _sentence_transformers(tmp_path, "pooling_mode_mean_tokens", normalize=False)
  assert pooling.read(tmp_path) == pooling.Pooling("mean", False, ())
  _sentence_transformers(tmp_path, "pooling_mode_lasttoken")
  (tmp_path / "config.json").write_text(json.dumps({"matryoshka_dimensions": [16, 32, 64]}))
  got = pooling.read(tmp_path)
  assert got == pooling.Pooling("last", True, (16, 32, 64))
  assert got.dimensions_error(32, 64) is None
  with pytest.raises(ValueError, match="matryoshka_dimensions must be a list of positive "
                     "integers up to hidden_size 32"):
    pooling.read(tmp_path, hidden=32)
  assert "one of [16, 32, 64], got 20" in got.dimensions_error(20, 64)
  assert "cannot be shortened" in pooling.Pooling().dimensions_error(8, 64)
  (tmp_path / "config.json").write_text(json.dumps({"is_matryoshka": True}))
  assert pooling.read(tmp_path).dimensions_error(20, 64) is None
  assert "in [1, 64], got 65" in pooling.read(tmp_path).dimensions_error(65, 64)
  _sentence_transformers(tmp_path, "pooling_mode_max_tokens")
  with pytest.raises(ValueError, match="1_Pooling/config.json: fdjax pools with exactly one"):
    pooling.read(tmp_path)
  _sentence_transformers(tmp_path, "pooling_mode_lasttoken", extra=[
      {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
  with pytest.raises(ValueError, match="Dense' is not implemented here"):
    pooling.read(tmp_path)


def test_a_sentence_transformers_backbone_checkpoint_embeds_as_transformers_does(tmp_path):
  """What sentence-transformers saves of a decoder embedding model (Qwen3-Embedding's
  layout): the backbone's own tensor names (no "model." prefix, no LM head: the embedding is
  tied), modules.json with last-token pooling and Normalize. It loads as it is and embeds as
  transformers' backbone computes it; untied, its missing head is named."""
  torch.manual_seed(1)
  cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                 tie_word_embeddings=True, attn_implementation="eager")
  backbone = transformers.Qwen3Model(cfg).eval()
  with torch.no_grad():
    for p in backbone.parameters():
      p.normal_(0.0, 0.15)
  backbone.save_pretrained(tmp_path)
  _sentence_transformers(tmp_path, "pooling_mode_lasttoken")
  from safetensors import safe_open
  with safe_open(str(tmp_path / "model.safetensors"), "np") as fh:
    assert "embed_tokens.weight" in fh.keys() and "lm_head.weight" not in fh.keys()
  model = fdjax.load_pretrained(str(tmp_path))
  how = pooling.read(tmp_path)
  assert how == pooling.Pooling("last", True, ())
  prompts = [[5, 6, 7, 8, 9], [10, 11], [12] * 40]
  got = embed.embed(model, prompts, pooling=how.pooling, normalize=how.normalize)
  with torch.no_grad():
    want = np.stack([backbone(torch.tensor([p])).last_hidden_state[0, -1].numpy()
                     for p in prompts])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  assert np.max(np.abs(got - want)) < 1e-5
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
  with pytest.raises(fdjax.CheckpointError, match=r"missing tensor\(s\) \['lm_head.weight'\] "
                     r"\(a backbone without its LM head"):
    fdjax.load_pretrained(str(tmp_path))


# ------------------------------------------------------------------------ the endpoint

@pytest.fixture(scope="module")
def served(tmp_path_factory):
  pytest.importorskip("openai")
  pytest.importorskip("starlette")
  from fdjax.io import loading
  from tests.test_server import _start, _stop
  loaded = loading.load(None, chat_template=True)
  s = _start(*loaded[:4])
  s.server.pooling = pooling.Pooling("mean", True, (32, 64))
  yield s
  _stop(s)


@pytest.mark.integration
def test_the_official_client_gets_the_engines_embeddings(served):
  s = served
  texts = ["def f(x):", "hello world", "a"]
  ids = [s.tok.encode(t) for t in texts]
  want = embed.embed(s.model, ids, pooling="mean")
  r = s.client.embeddings.create(model=s.name, input=texts)  # base64, as the client asks
  assert [d.index for d in r.data] == [0, 1, 2]
  assert np.max(np.abs(np.array([d.embedding for d in r.data]) - want)) < 1e-6
  assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)
  floats = s.client.embeddings.create(model=s.name, input=ids[1], encoding_format="float")
  assert np.max(np.abs(np.array(floats.data[0].embedding) - want[1])) < 1e-6
  short = s.client.embeddings.create(model=s.name, input=texts[0], dimensions=32,
                                     encoding_format="float").data[0].embedding
  cut = embed.embed(s.model, ids[:1], pooling="mean", dimensions=32)[0]
  assert len(short) == 32 and np.max(np.abs(np.array(short) - cut)) < 1e-6
  # vLLM's truncate_prompt_tokens keeps the last k tokens
  last = s.client.embeddings.create(model=s.name, input=texts[1], encoding_format="float",
                                    extra_body={"truncate_prompt_tokens": 4})
  assert np.max(np.abs(np.array(last.data[0].embedding) - embed.embed(
      s.model, [ids[1][-4:]], pooling="mean")[0])) < 1e-6
  import httpx2
  raw = httpx2.post(s.url + "/v1/embeddings", json={"model": s.name, "input": "a",
                                                    "encoding_format": "base64"}).json()
  vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
  assert vector.shape == (s.model.config.hidden_size,)


@pytest.mark.integration
@pytest.mark.parametrize("body,param,words", [
    ({"input": []}, "input", "empty list"),
    ({"input": ""}, "input", "input is empty (it encodes to no tokens)"),
    ({"input": "", "add_special_tokens": False}, "input", "input is empty"),
    ({"input": [[1, 10 ** 6]]}, "input", "input[0][1]: token id 1000000 is outside"),
    ({"input": "x" * 5000}, "input", "5000 tokens; this model's context is"),
    ({"input": "x", "dimensions": 20}, "dimensions", "one of [32, 64], got 20"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"prompt": "x", "input": "x"}, "prompt", "takes input instead"),
    ({"input": ["x"] * 2049}, "input", "--max-embedding-inputs"),
])
def test_bad_embeddings_requests_are_refused_naming_the_field(served, body, param, words):
  import httpx2
  r = httpx2.post(served.url + "/v1/embeddings", json={"model": served.name, **body})
  assert r.status_code == 400
  assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


@pytest.mark.integration
def test_embeddings_requests_past_the_queue_bound_get_a_429(served):
  import httpx2
  s = served
  s.server.embedding_requests = s.engine.max_queue  # as if that many were waiting
  try:
    r = httpx2.post(s.url + "/v1/embeddings", json={"model": s.name, "input": "a"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
  finally:
    s.server.embedding_requests = 0
  assert httpx2.post(s.url + "/v1/embeddings", json={"model": s.name, "input": "a"}).is_success


@pytest.mark.integration
def test_a_checkpoint_whose_pooling_cannot_be_read_is_served_but_not_embedded(served):
  """fdjax serve keeps a checkpoint whose sentence-transformers files name a module fdjax
  lacks: it generates, and /v1/embeddings says why it does not embed."""
  import httpx2
  s, kept = served, served.server.pooling
  s.server.pooling = "modules.json: module 'Dense' is not implemented here"
  try:
    r = httpx2.post(s.url + "/v1/embeddings", json={"model": s.name, "input": "a"})
    assert r.status_code == 400 and "does not embed: modules.json" in r.json()["error"]["message"]
    assert s.client.completions.create(model=s.name, prompt="a", max_tokens=2).choices
  finally:
    s.server.pooling = kept


@pytest.mark.integration
def test_langchains_openai_embeddings_against_the_server(served):
  lc = pytest.importorskip("langchain_openai")
  s = served
  emb = lc.OpenAIEmbeddings(model=s.name, base_url=s.url + "/v1", api_key="unused",
                            check_embedding_ctx_length=False)  # (its tiktoken check: OpenAI's)
  docs = ["def add(a, b):\n    return a + b", "import os", "class A:\n    pass"]
  got = np.array(emb.embed_documents(docs))
  want = embed.embed(s.model, [s.tok.encode(d) for d in docs], pooling="mean")
  assert np.max(np.abs(got - want)) < 1e-6
  assert np.max(np.abs(np.array(emb.embed_query("import os")) - want[1])) < 1e-6
