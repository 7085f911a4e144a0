"""The layout of the code: layers point one way, any import order works, and one module
holds (and explains) every kernel choice."""
import ast
import itertools
import os
import subprocess
import sys

import pytest

from fdjax import dispatch, selection
from models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower layers never import higher ones: kernels <- ops <- models <- engine.
OPS = {"fdjax.dispatch", "fdjax.reference", "fdjax.selection", "fdjax.checks", "fdjax.kv_cache",
       "fdjax.timing", "fdjax.tune", "fdjax.aot", "fdjax.quant"}


def layer_of(module: str) -> int:
  if module.split(".")[0] == "pallas_kernels":
    return 0
  if module in OPS:
    return 1
  if module.split(".")[0] == "models":
    return 2
  if module.split(".")[0] == "fdjax":
    return 3
  return -1  # third-party: anything may import it


def imported_modules(path: str, module: str):
  """The project modules a file imports (`from fdjax import dispatch` is fdjax.dispatch)."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative
        base = ".".join(module.split(".")[:-node.level] + [node.module])
      for a in node.names:
        sub = f"{base}.{a.name}"
        yield sub if os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") else base


def upward_imports(root=ROOT):
  bad = []
  for pkg in ("pallas_kernels", "fdjax", "models"):
    for dirpath, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
        for target in imported_modules(path, module):
          if layer_of(target) > layer_of(module):
            bad.append(f"{module} -> {target}")
  return bad


def test_no_import_points_up_a_layer():
  assert upward_imports() == []


def test_the_layer_check_catches_a_planted_upward_import(tmp_path):
  for pkg in ("pallas_kernels", "fdjax", "models"):
    (tmp_path / pkg).mkdir()
  (tmp_path / "models" / "config.py").write_text("x = 1\n")
  (tmp_path / "pallas_kernels" / "planted.py").write_text("from models import config\n")
  (tmp_path / "fdjax" / "reference.py").write_text("import fdjax.checkpoint\n")
  (tmp_path / "fdjax" / "checkpoint.py").write_text("from models import config\n")
  assert sorted(upward_imports(str(tmp_path))) == ["fdjax.reference -> fdjax.checkpoint",
                                                    "pallas_kernels.planted -> models.config"]


@pytest.mark.parametrize("order", list(itertools.permutations(["models", "pallas_kernels",
                                                                "fdjax"])))
def test_any_import_order_works_in_a_fresh_interpreter(order):
  code = "; ".join(f"import {m}" for m in order) + "; fdjax.load_pretrained; models.Transformer"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]


def _cfg(head_dim, pe="rope"):
  return ModelConfig(vocab_size=100, hidden_size=4 * head_dim, intermediate_size=64,
                     num_layers=1, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                     position_encoding=pe)


def test_describe_names_the_real_choice_and_why():
  odd = dispatch.describe(_cfg(80), platform="cuda")
  for op in ("prefill_attention", "decode_attention"):
    assert odd[op] == "xla (head_dim 80 is not a power of two >= 16)"
  good = dispatch.describe(_cfg(128), platform="cuda")
  assert good["decode_attention"].startswith("pallas (async-softmax")
  assert good["prefill_attention"].startswith("pallas (async-softmax")
  assert set(k for k in good if k.startswith("linear")) == {
      "linear[qkv]", "linear[o]", "linear[gate_up]", "linear[down]"}
  assert good["linear[qkv]"].startswith("gemv (M=1")  # the analytic table: GEMV below M1 = 3
  assert dispatch.describe(_cfg(128), platform="cuda", batch=8)["linear[o]"].startswith("flat")
  cope = dispatch.describe(_cfg(64, "cope"), platform="cuda")
  assert list(cope) == ["cope_attention", *[k for k in cope if k.startswith("linear")]]
  assert cope["cope_attention"] == ("pallas (fused CoPE kernel) [Pallas Triton: deprecated by "
                                    "JAX since 0.11, to be replaced by Mosaic GPU]")
  assert all("[Pallas Triton: deprecated" in v for v in good.values())  # every op a kernel here
  cpu = dispatch.describe(_cfg(128), platform="cpu")
  assert all(v.startswith("xla (cpu") for v in cpu.values())


def test_an_unsupported_dtype_is_explained():
  assert selection.attention("decode_attention", 128, "float16", "cuda") == selection.Choice(
      "xla", "dtype float16 is not float32 or bfloat16")
