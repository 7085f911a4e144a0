"""Speculative decoding's settings: which proposer drafts tokens (n-gram prompt lookup or a
draft model), how many per step, and the checks that refuse what cannot work.

`generate(..., speculative=...)` and `fdjax serve --speculative` take the same forms: a
`Speculation`, a dict (`{"method": "ngram", "k": 4, "n": 3}`,
`{"method": "draft", "model": draft_model, "k": 4}`) or a string (`"ngram:k=4,n=3"`,
`"draft:k=4"` with the draft model given apart). The decoding itself is
fdjax.engine.spec_steps.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

MAX_K = 16  # the most tokens drafted per step (verification runs k + 1 positions a row)
MAX_NGRAM = 8  # the longest n-gram matched
METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class Speculation:
  """method "ngram": the last n tokens of a sequence are looked up in its own earlier tokens,
  prompt and output, and the k that followed their latest occurrence are proposed; with
  min_n < n, shorter matches (n - 1, ... min_n tokens) are tried when there is none (default
  min_n = n: short matches propose mostly noise, and a round with no draft anywhere costs a
  plain step, not a verification). method "draft": `model`, a smaller model with the same
  vocabulary, decodes k tokens ahead on its own paged cache."""
  method: str
  k: int = 4
  n: int = 3
  min_n: int | None = None
  model: Any = None

  @property
  def low(self) -> int:
    """The shortest n-gram matched."""
    return self.n if self.min_n is None else self.min_n

  @property
  def label(self) -> str:
    if self.method == "draft":
      return f"draft:k={self.k}"
    return f"ngram:k={self.k},n={self.n}" + ("" if self.low == self.n else f",min_n={self.low}")


def parse(value, draft_model=None) -> Speculation | None:
  """A Speculation from a Speculation, dict or string (None: no speculation); `draft_model`
  supplies a string's or dict's draft model. Raises ValueError naming what is wrong."""
  if value is None or value is False:
    return None
  if isinstance(value, Speculation):
    spec = value
  elif isinstance(value, dict):
    unknown = set(value) - {"method", "k", "n", "min_n", "model"}
    if unknown:
      raise ValueError(f"speculative: unknown field(s) {sorted(unknown)}; takes method, k, n, "
                       f"min_n, model")
    if "method" not in value:
      raise ValueError("speculative: 'method' is required (ngram or draft)")
    spec = Speculation(**value)
  elif isinstance(value, str):
    method, _, rest = value.partition(":")
    fields: dict[str, Any] = {"method": method.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
      name, eq, number = item.partition("=")
      if not eq or name not in ("k", "n", "min_n"):
        raise ValueError(f"speculative: cannot read {item!r} in {value!r}; expected k=K, n=N "
                         f"or min_n=M (e.g. ngram:k=4,n=3)")
      try:
        fields[name] = int(number)
      except ValueError:
        raise ValueError(f"speculative: {name} must be an integer, got {number!r}") from None
    spec = Speculation(**fields)
  else:
    raise ValueError(f"speculative: expected a dict, a string or a Speculation, got "
                     f"{type(value).__name__}")
  if spec.model is None and draft_model is not None:
    spec = dataclasses.replace(spec, model=draft_model)
  return check(spec)


def check(spec: Speculation) -> Speculation:
  if spec.method not in METHODS:
    raise ValueError(f"speculative: method must be one of {METHODS}, got {spec.method!r}")
  for name, value, bound in (("k", spec.k, MAX_K), ("n", spec.n, MAX_NGRAM),
                             ("min_n", spec.low, spec.n)):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
      raise ValueError(f"speculative: {name} must be an integer from 1 to {bound}, got {value!r}")
  if spec.method == "draft" and spec.model is None:
    raise ValueError("speculative: method 'draft' needs a draft model (model=, --draft-model)")
  if isinstance(spec.model, (str, os.PathLike)):
    raise ValueError(f"speculative: model must be a loaded model, got the path "
                     f"{os.fspath(spec.model)!r}: pass fdjax.load_pretrained(path)")
  if spec.method == "ngram" and spec.model is not None:
    raise ValueError("speculative: method 'ngram' takes no draft model")
  return spec


def check_draft(spec: Speculation | None, target, target_tokenizer=None, draft_tokenizer=None):
  """Refuses a draft model that cannot propose for `target`: another vocabulary size, another
  tokenizer (when both are given: their vocabularies must map every token to the same id), a
  draft larger than the target (one as large is taken: the target itself accepts every
  draft, which the tests use), or on another mesh than the target's (`on_mesh` puts a
  one-device draft on it)."""
  if spec is None or spec.method != "draft":
    return
  where = [getattr(m, "mesh", None) for m in (spec.model, target)]
  if where[0] is not None and where[0] != where[1]:
    raise ValueError("speculative: the draft model is on another mesh than the target; load "
                     "it on the target's (load_pretrained(..., mesh=)) or on one device")
  draft = spec.model
  dv, tv = draft.config.vocab_size, target.config.vocab_size
  if dv != tv:
    raise ValueError(f"speculative: the draft model's vocabulary has {dv} tokens, the "
                     f"target's {tv}; a draft must share the target's tokenizer")
  if target_tokenizer is not None and draft_tokenizer is not None:
    a, b = _vocab(target_tokenizer), _vocab(draft_tokenizer)
    if a is not None and b is not None and a != b:
      differ = sorted(set(a.items()) ^ set(b.items()))[:3]
      raise ValueError(f"speculative: the draft's tokenizer differs from the target's (e.g. "
                       f"{differ}); a draft must share the target's tokenizer")
  dn, tn = param_count(draft), param_count(target)
  if dn > tn:
    raise ValueError(f"speculative: the draft model ({dn:,} parameters) is larger than the "
                     f"target ({tn:,}); drafting would cost more than it saves")


def on_mesh(spec: Speculation | None, target) -> Speculation | None:
  """`spec` with its draft model on the target's mesh (a target on a mesh: tensor parallel
  like it, the draft's KV heads and pages split as the target's), as checked by check_draft;
  a draft that cannot be split as many ways is refused (ValueError naming the numbers)."""
  mesh = getattr(target, "mesh", None)
  if (spec is None or spec.method != "draft" or mesh is None
      or getattr(spec.model, "mesh", None) is not None):
    return spec
  from fdjax.io import mesh as meshes
  try:
    draft = meshes.shard(spec.model, mesh)
  except ValueError as e:
    raise ValueError(f"speculative: the draft model cannot be put on the target's mesh: "
                     f"{e}") from None
  return dataclasses.replace(spec, model=draft)


def from_flags(value, draft_dir, k, target, target_tokenizer, *, dtype=None, quantize=None):
  """The Speculation the command line asks for: `--speculative SPEC`, `--draft-model DIR`
  (loaded here, with the target's dtype and quantization, and put on the target's mesh if it
  has one; alone it means draft:k=4) and
  `--num-speculative-tokens K` (k); None when none of them is given."""
  if draft_dir is not None and value is None:
    value = "draft"
  if value is None:
    if k is not None:
      raise ValueError("--num-speculative-tokens needs --speculative or --draft-model")
    return None
  draft = draft_tokenizer = None
  if draft_dir is not None:
    from fdjax.io import loading
    loaded = loading.load(draft_dir, dtype=dtype, quantize=quantize)
    draft, draft_tokenizer = loaded.model, loaded.tokenizer
  spec = parse(value, draft_model=draft)
  if k is not None:
    spec = dataclasses.replace(spec, k=k)
  return prepare(spec, target, target_tokenizer, draft_tokenizer)  # checks k (parse)


def prepare(value, target, target_tokenizer=None, draft_tokenizer=None) -> Speculation | None:
  """The Speculation `value` asks for (as `parse` reads it) to run with `target`: its draft
  model checked against the target (check_draft) and put on the target's mesh (on_mesh)."""
  spec = parse(value)
  check_draft(spec, target, target_tokenizer, draft_tokenizer)
  return on_mesh(spec, target)


def _vocab(tokenizer):
  get = getattr(tokenizer, "get_vocab", None)
  return None if get is None else dict(get())


def param_count(model) -> int:
  """Parameter count (a quantized weight counts its logical [K, N] elements)."""
  import math

  from flax import nnx
  return sum(math.prod(v[...].shape) for _, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Param))
