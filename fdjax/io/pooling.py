"""How a checkpoint says its embeddings are made, as sentence-transformers writes it (and vLLM
reads it): `modules.json` lists the modules after the transformer, a Pooling module's
`config.json` names its mode (`pooling_mode_lasttoken`, `_mean_tokens`, `_cls_token`) and a
Normalize module makes unit vectors; config.json's `matryoshka_dimensions` (or
`is_matryoshka`) says the first entries of an embedding are an embedding too (OpenAI's
`dimensions`). A checkpoint with none of it: the last token's state, normalized (vLLM's
default for a causal LM)."""
from __future__ import annotations

import dataclasses
import json
import os

_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_cls_token": "cls"}
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclasses.dataclass(frozen=True)
class Pooling:
  pooling: str = "last"          # fdjax.engine.embed.POOLINGS
  normalize: bool = True
  matryoshka: tuple | bool = ()  # the dimensions an embedding may be cut to (True: any)

  def dimensions_error(self, dimensions: int, hidden: int) -> str | None:
    """What is wrong with asking for `dimensions`, or None."""
    if not self.matryoshka:
      return ("this model's embeddings cannot be shortened (its config.json names no "
              "matryoshka_dimensions); leave dimensions out")
    if self.matryoshka is True:
      return None if 1 <= dimensions <= hidden else (
          f"dimensions must be in [1, {hidden}], got {dimensions}")
    return None if dimensions in self.matryoshka else (
        f"dimensions must be one of {list(self.matryoshka)}, got {dimensions}")


def _json(path: str):
  try:
    with open(path) as fh:
      return json.load(fh)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read(path: str | os.PathLike | None, hidden: int | None = None) -> Pooling:
  """The checkpoint directory's pooling (Pooling() where it says nothing); ValueError naming
  the file for a mode or module fdjax does not implement, or Matryoshka sizes past the
  model's `hidden` size."""
  if path is None:
    return Pooling()
  path = os.fspath(path)
  pooling, normalize, matryoshka = "last", True, ()
  config = os.path.join(path, "config.json")
  if os.path.exists(config):
    cfg = _json(config)
    dims = cfg.get("matryoshka_dimensions") if isinstance(cfg, dict) else None
    if dims is not None:
      if not isinstance(dims, list) or not all(
          isinstance(d, int) and 0 < d <= (hidden or d) for d in dims):
        raise ValueError(f"{config}: matryoshka_dimensions must be a list of positive "
                         f"integers" + (f" up to hidden_size {hidden}" if hidden else "")
                         + f", got {dims!r}")
      matryoshka = tuple(dims)
    elif isinstance(cfg, dict) and cfg.get("is_matryoshka") is True:
      matryoshka = True
  modules_file = os.path.join(path, "modules.json")
  if not os.path.exists(modules_file):
    return Pooling(pooling, normalize, matryoshka)
  modules = _json(modules_file)
  if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
    raise ValueError(f"{modules_file} must hold a list of module objects")
  normalize = False
  for m in modules:
    kind = str(m.get("type", "")).rsplit(".", 1)[-1]
    if kind not in _KNOWN_MODULES:
      raise ValueError(f"{modules_file}: module {m.get('type')!r} is not implemented here "
                       f"(fdjax pools with {', '.join(_KNOWN_MODULES)} modules only)")
    if kind == "Normalize":
      normalize = True
    elif kind == "Pooling":
      file = os.path.join(path, str(m.get("path", "")), "config.json")
      if not os.path.exists(file):
        raise ValueError(f"{modules_file} lists a Pooling module whose {file} is missing")
      cfg = _json(file)
      on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
      bad = [k for k in on if k not in _MODES]
      if bad or len(on) != 1:
        raise ValueError(f"{file}: fdjax pools with exactly one of "
                         f"{', '.join(_MODES)}; this one sets {on or 'none'}")
      pooling = _MODES[on[0]]
  return Pooling(pooling, normalize, matryoshka)
