"""The sampling a checkpoint's `generation_config.json` recommends, as defaults: what
transformers' `generate` and vLLM's server (its `--generation-config auto`, the default) use
where a request leaves a setting out. Qwen3 ships temperature 0.6, top_p 0.95, top_k 20;
Llama 3.1 Instruct temperature 0.6, top_p 0.9.

Read: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens (as
max_tokens), each checked; null or absent is no default. `do_sample` is not read (vLLM reads
none of it either: a temperature it recommends is used)."""
from __future__ import annotations

import json
import math
import os

FILE = "generation_config.json"

# field: (lowest, highest, whether the lowest is allowed, integer)
_FIELDS = {"temperature": (0.0, 100.0, True, False), "top_p": (0.0, 1.0, False, False),
           "top_k": (0, 2 ** 31 - 1, True, True), "min_p": (0.0, 1.0, True, False),
           "repetition_penalty": (0.0, 10.0, False, False),
           "max_new_tokens": (1, 2 ** 31 - 1, True, True)}


def sampling_defaults(path: str | os.PathLike | None) -> dict:
  """{setting: value} from `path`/generation_config.json ({} when there is none), with
  max_new_tokens named max_tokens; ValueError naming the file and field for a value out of
  its range or of the wrong type."""
  file = os.path.join(os.fspath(path), FILE) if path is not None else None
  if file is None or not os.path.exists(file):
    return {}
  with open(file) as fh:
    try:
      cfg = json.load(fh)
    except ValueError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{file} must hold a JSON object")
  out = {}
  for name, (low, high, low_ok, integer) in _FIELDS.items():
    value = cfg.get(name)
    if value is None:
      continue
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not (
        low <= value <= high if low_ok else low < value <= high):
      kind = "an integer" if integer else "a number"
      raise ValueError(f"{file}: {name} must be {kind} in {'[' if low_ok else '('}{low}, "
                       f"{high}], got {value!r}")
    out["max_tokens" if name == "max_new_tokens" else name] = value
  return out


NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
           "repetition_penalty": 1.0}  # each setting when nothing asks for one (0: off)


def resolve(given: dict, defaults: dict, names=tuple(NEUTRAL)) -> dict:
  """The settings `names` as the engine takes them: as `given` (None: left out), else
  `defaults`, else NEUTRAL; top_k and top_p None when off (top_k 0 or -1, top_p 1; other
  values out of range stay, for the sampler to refuse)."""
  out = {}
  for name in names:
    value = given.get(name)
    out[name] = defaults.get(name, NEUTRAL[name]) if value is None else value
  if "top_k" in out:
    out["top_k"] = None if out["top_k"] in (0, -1) else out["top_k"]
  if "top_p" in out:
    out["top_p"] = None if out["top_p"] == 1.0 else out["top_p"]
  return out


def describe(defaults: dict) -> str:
  """The defaults in a line ("temperature 0.6, top_p 0.95")."""
  return ", ".join(f"{k} {v}" for k, v in defaults.items())
