"""The layout of the code: layers point one way, any import order works, and one module
holds (and explains) every kernel choice."""
import ast
import itertools
import os
import subprocess
import sys

import pytest

from fdjax.ops import dispatch, selection
from models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pallas_kernels", "fdjax", "models")
# Every project module sits in one layer, named by its path's longest prefix below; a module
# imports only from lower layers and its own folder. Folders on one level (the backends; the
# engine, tuning and training) are independent of each other.
LAYERS = {"pallas_kernels.common": 0, "pallas_kernels.triton": 1, "pallas_kernels.tpu": 1,
          "pallas_kernels.mosaic_gpu": 1,
          "pallas_kernels": 2, "fdjax.ops": 3, "models": 4, "fdjax.io": 5, "fdjax.engine": 6,
          "fdjax.tuning": 6, "fdjax.training": 6, "fdjax.serving": 7, "fdjax": 8}


def group_of(module: str) -> str | None:
  """The LAYERS key a module belongs to (its longest matching prefix); None: not ours."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in LAYERS:
      return ".".join(parts[:n])
  return None


def imported_modules(path: str, module: str, root: str):
  """The project modules a file imports anywhere in it, a function's body included
  (`from fdjax.ops import dispatch` is fdjax.ops.dispatch), and those it names to run on
  first use (`kernels.module("pallas_kernels.tpu.gemv")`, fdjax.ops.kernels' own `module(...)`).
  """
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and _lazy_import(node):
      yield node.args[0].value
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative
        base = ".".join(module.split(".")[:-node.level] + [node.module])
      for a in node.names:
        sub = f"{base}.{a.name}"
        here = os.path.join(root, *sub.split("."))
        yield sub if os.path.exists(here + ".py") or os.path.isdir(here) else base


def _lazy_import(call: ast.Call) -> bool:
  f = call.func
  named = ((isinstance(f, ast.Name) and f.id == "module")
           or (isinstance(f, ast.Attribute) and f.attr == "module"
               and isinstance(f.value, ast.Name) and f.value.id == "kernels"))
  return (named and bool(call.args) and isinstance(call.args[0], ast.Constant)
          and isinstance(call.args[0].value, str))


def import_graph(root=ROOT) -> dict[str, set]:
  """Project module -> the project modules it imports."""
  graph = {}
  for pkg in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
        graph[module] = {t for t in imported_modules(path, module, root)
                         if t.split(".")[0] in PACKAGES}
  return graph


def layer_violations(graph) -> list[str]:
  """Every import of a higher layer, of a sibling folder on the same level, and every module
  with no layer."""
  bad = []
  for module, targets in sorted(graph.items()):
    mine = group_of(module)
    if mine is None:
      bad.append(f"{module}: in no layer")
      continue
    for target in sorted(targets):
      theirs = group_of(target)
      if theirs is None or theirs == mine or module == theirs:
        continue  # a package's __init__ (fdjax) may name what its folders hold
      if LAYERS[theirs] >= LAYERS[mine]:
        bad.append(f"{module} -> {target}")
  return bad


def import_loops(graph) -> list[list[str]]:
  """The cycles of the import graph (Tarjan's strongly connected components of two or more
  modules, and modules importing themselves)."""
  index, low, stack, on_stack, loops = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph.get(v, ()):
        loops.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return loops


def test_no_import_points_up_a_layer_or_across_to_a_sibling():
  assert layer_violations(import_graph()) == []


def test_the_graph_holds_the_kernels_the_ops_layer_imports_lazily():
  graph = import_graph()
  assert "fdjax.ops.kernels" in graph["fdjax.ops.selection"] & graph["fdjax.ops.dispatch"]
  assert {"pallas_kernels.mosaic_gpu.flat_gemm", "pallas_kernels.tpu.decode_attention",
          "pallas_kernels.triton.shared"} <= graph["fdjax.ops.kernels"]


def test_no_import_loop():
  assert import_loops(import_graph()) == []


def _plant(tmp_path, files):
  for pkg in PACKAGES:
    (tmp_path / pkg).mkdir(exist_ok=True)
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return import_graph(str(tmp_path))


def test_the_layer_check_catches_a_planted_upward_import(tmp_path):
  graph = _plant(tmp_path, {
      "models/config.py": "x = 1\n",
      "models/llama.py": 'from fdjax.ops import kernels\nk = kernels.module("fdjax.io.mesh")\n',
      "pallas_kernels/common/tiling.py": "from models import config\n",
      "fdjax/ops/reference.py": "def f():\n  import fdjax.io.checkpoint\n",  # in a body
      "fdjax/io/checkpoint.py": "from models import config\n",
      "pallas_kernels/tpu/gemv.py": "from pallas_kernels.triton import gemv\n",  # a sibling
      "pallas_kernels/triton/gemv.py": "from pallas_kernels.common import tiling\n",
      "fdjax/stray/thing.py": "",  # fdjax.stray is in the fdjax layer: no new layer needed
      "fdjax/engine/core.py": "from fdjax.serving import api\n",
      "fdjax/serving/api.py": "from fdjax.engine import core\n"})
  assert layer_violations(graph) == ["fdjax.engine.core -> fdjax.serving.api",
                                     "fdjax.ops.reference -> fdjax.io.checkpoint",
                                     "models.llama -> fdjax.io.mesh",  # a lazy import
                                     "pallas_kernels.common.tiling -> models.config",
                                     "pallas_kernels.tpu.gemv -> pallas_kernels.triton.gemv"]


def test_the_loop_check_catches_a_planted_loop(tmp_path):
  graph = _plant(tmp_path, {  # the loop checkpoint <-> mesh once had, one import in a body
      "fdjax/io/checkpoint.py": "from fdjax.io import mesh\n",
      "fdjax/io/mesh.py": "def shard():\n  from fdjax.io import checkpoint\n",
      "fdjax/io/tokenizer.py": "from fdjax.io.checkpoint import read_meta\n"})
  assert layer_violations(graph) == []  # one folder: the layers alone do not see it
  assert import_loops(graph) == [["fdjax.io.checkpoint", "fdjax.io.mesh"]]


def test_no_class_is_a_module_of_its_own():
  """A class does one job: none in fdjax/ or models/ runs past ~150 lines (the serving
  engine is core + scheduler + runner + detokenize, not one class)."""
  long = []
  for pkg in ("fdjax", "models"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in (f for f in files if f.endswith(".py")):
        path = os.path.join(dirpath, f)
        for node in ast.walk(ast.parse(open(path).read())):
          if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 160:
            long.append(f"{os.path.relpath(path, ROOT)}:{node.name}")
  assert long == []


def test_every_public_name_imports():
  import types

  import fdjax
  for name in fdjax.__all__:  # every name a function or class, but the ops module
    value = getattr(fdjax, name)
    assert isinstance(value, types.ModuleType) if name == "dispatch" else callable(value), name
  assert fdjax.dispatch.decode_attention and fdjax.quantize.__module__ == "models.quantize"
  with pytest.raises(AttributeError, match="no attribute 'checkpoint'"):
    fdjax.checkpoint  # noqa: B018  (the modules live in the layer folders now)


@pytest.mark.parametrize("order", list(itertools.permutations(["models", "pallas_kernels",
                                                                "fdjax"])))
def test_any_import_order_works_in_a_fresh_interpreter(order):
  code = "; ".join(f"import {m}" for m in order) + "; fdjax.load_pretrained; models.Transformer"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]


def test_a_users_folder_named_models_does_not_hide_the_package(tmp_path):
  """A working directory holding models/llama/ (a checkpoint) and pallas_kernels/: fdjax still
  imports its own packages (an editable install finds them after the working directory's
  folders, which Python would take as namespace packages) and loads the checkpoint there."""
  import shutil
  shutil.copytree(os.path.join(ROOT, "fdjax", "default_model"), tmp_path / "models" / "llama")
  (tmp_path / "pallas_kernels" / "triton").mkdir(parents=True)
  code = ("import fdjax, fdjax.io.mesh, models.llama, pallas_kernels.triton.flat_gemm as f; "
          "print(models.llama.__file__, f.__file__); "
          "print(fdjax.load_pretrained('models/llama').config.num_layers)")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env={**env, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  files, layers = r.stdout.splitlines()
  assert files == (f"{os.path.join(ROOT, 'models', 'llama.py')} "
                   f"{os.path.join(ROOT, 'pallas_kernels', 'triton', 'flat_gemm.py')}")
  assert int(layers) > 0


def _cfg(head_dim, pe="rope"):
  return ModelConfig(vocab_size=100, hidden_size=4 * head_dim, intermediate_size=64,
                     num_layers=1, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                     position_encoding=pe)


def test_describe_names_the_real_choice_and_why():
  odd = dispatch.describe(_cfg(80), platform="cuda")
  for op in ("prefill_attention", "decode_attention"):
    assert odd[op].startswith("xla (Mosaic GPU: ") and odd[op].endswith(
        "; Triton: head_dim 80 is not a power of two >= 16)")
  assert "head_dim 80 is not 64, 128 or 256" in odd["decode_attention"]
  good = dispatch.describe(_cfg(128), platform="cuda")  # a described H100: Hopper
  assert good["decode_attention"].startswith("pallas_mosaic (Mosaic GPU async-softmax")
  assert good["decode_attention"].endswith("[Pallas Mosaic GPU, sm_90a]")
  assert good["prefill_attention"].startswith("pallas (async-softmax kernel")
  assert "not Mosaic GPU: no Mosaic GPU kernel for prefill_attention yet" in (
      good["prefill_attention"])
  assert set(k for k in good if k.startswith("linear")) == {
      "linear[qkv]", "linear[o]", "linear[gate_up]", "linear[down]"}
  assert good["linear[qkv]"].startswith("gemv (M=1")  # the analytic table: GEMV below M1 = 3
  assert good["linear[qkv]"].endswith("[Pallas Triton: deprecated by JAX since 0.11, to be "
                                      "replaced by Mosaic GPU]")
  eight = dispatch.describe(_cfg(128), platform="cuda", batch=8)["linear[o]"]
  assert eight.startswith("flat_mosaic (M=8") and eight.endswith("[Pallas Mosaic GPU, sm_90a]")
  f32 = dispatch.describe(_cfg(128), platform="cuda", batch=8, dtype="float32")
  assert f32["linear[o]"].startswith("flat (M=8")  # WGMMA transposes 16-bit operands only
  assert f32["decode_attention"].startswith("pallas (async-softmax kernel")
  cope = dispatch.describe(_cfg(64, "cope"), platform="cuda")
  assert list(cope) == ["cope_attention", *[k for k in cope if k.startswith("linear")]]
  assert cope["cope_attention"] == (
      "pallas (fused CoPE kernel; not Mosaic GPU: no Mosaic GPU kernel for cope_attention yet) "
      "[Pallas Triton: deprecated by JAX since 0.11, to be replaced by Mosaic GPU]")
  cpu = dispatch.describe(_cfg(128), platform="cpu")
  assert all(v.startswith("xla (cpu") for v in cpu.values())


def test_an_unsupported_dtype_is_explained():
  assert selection.attention("prefill_attention", 128, "float16", "cuda") == selection.Choice(
      "xla", "Mosaic GPU: no Mosaic GPU kernel for prefill_attention yet; Triton: dtype float16 "
      "is not float32 or bfloat16")
