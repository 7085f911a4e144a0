"""The one model loader: a checkpoint directory, a named random-weight shape, or the bundled
model, with its tokenizer and chat template, quantized and put on a mesh as asked. The
command line, the server and the benchmarks all load through `load`."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "default_model")
DEFAULT_MODEL_NAME = "fdjax-default"  # the name the server gives the bundled model


class Loaded(NamedTuple):
  model: Any            # models.Transformer, or models.sharded.ShardedTransformer on a mesh
  tokenizer: Any        # fdjax.io.tokenizer's
  chat_template: Any    # fdjax.io.chat.ChatTemplate, or None (none, or not asked for)
  name: str             # what clients call it: the directory's name, or the preset's
  label: str            # what the command line prints about it
  path: str | None = None  # the checkpoint's directory (None: a preset)


def load(model_dir: str | os.PathLike | None = None, *, preset: str | None = None, dtype=None,
         quantize: str | None = None, mesh=None, seed: int = 0, chat_template: bool = False
         ) -> Loaded:
  """`model_dir` (Hugging Face or fdjax checkpoint), or `preset` (a models.presets shape with
  random weights from `seed`: the output is noise), or neither: the bundled model (the
  random-tiny preset when the package was installed without it). `dtype` the parameters'
  (default: the checkpoint's), `quantize` "int8" / "int4" the linear weights at load, `mesh`
  (fdjax.make_mesh) the devices it is loaded onto, tensor parallel; `chat_template` whether
  to read (and compile, with jinja2: the serve extra) the checkpoint's chat template."""
  if model_dir is not None and preset is not None:
    raise ValueError("give a model directory or a preset, not both")
  if preset is not None:
    return _random(preset, dtype, quantize, mesh, seed)
  if model_dir is None:
    if not os.path.isdir(DEFAULT_MODEL_DIR):
      return _random("random-tiny", dtype, quantize, mesh, seed)
    path, name = DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
  else:
    path = os.fspath(model_dir)
    name = os.path.basename(os.path.normpath(path))
  from fdjax.io import chat, checkpoint, tokenizer
  model = checkpoint.load_pretrained(path, dtype=dtype, quantize=quantize, mesh=mesh)
  template = chat.load(path) if chat_template else None
  return Loaded(model, tokenizer.load_tokenizer(path), template, name, path, path)


def _random(preset, dtype, quantize, mesh, seed) -> Loaded:
  import jax.numpy as jnp
  from flax import nnx

  from fdjax.io import mesh as meshes
  from fdjax.io import tokenizer
  from models import presets
  from models import quantize as quantization
  from models.llama import Transformer
  model = Transformer(presets.get(preset), rngs=nnx.Rngs(seed), dtype=dtype or jnp.float32)
  if quantize:
    quantization.quantize(model, quantize)
  if mesh is not None:
    model = meshes.shard(model, mesh)
  return Loaded(model, tokenizer.ByteTokenizer(), None, preset,
                f"{preset} (randomly initialised: output is noise)")
