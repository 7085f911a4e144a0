"""The bundled default model: the README's first command uses it, and the README tells the
truth about it."""
import json
import os
import re
import subprocess
import sys

import fdjax
from fdjax.io.loading import DEFAULT_MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta():
  with open(os.path.join(DEFAULT_MODEL_DIR, "fdjax.json")) as fh:
    return json.load(fh)


def test_default_model_is_a_small_trained_cope_model():
  size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f))
             for f in os.listdir(DEFAULT_MODEL_DIR))
  assert size < 20 * 2**20
  model = fdjax.load_pretrained(DEFAULT_MODEL_DIR)
  assert model.config.position_encoding == "cope" and model.config.vocab_size == 256
  final = _meta()["training"]["final"]
  assert final["held_out_bits_per_byte"] < 3.0  # far from the 8 bits of an untrained model


def test_readme_states_the_held_out_bits_per_byte():
  readme = open(os.path.join(ROOT, "README.md")).read()
  stated = re.search(r"([0-9.]+) bits per byte", readme)
  assert stated, "README does not state the default model's bits per byte"
  bpb = _meta()["training"]["final"]["held_out_bits_per_byte"]
  assert abs(float(stated.group(1)) - bpb) < 0.01


def test_readme_first_command_generates_with_the_default_model():
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "generate", "def fibonacci(n):",
                      "--max-new-tokens", "48"], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  text, stats = r.stdout.rsplit("\n[model ", 1)
  assert text.startswith("def fibonacci(n):") and "default_model" in stats
  new = text[len("def fibonacci(n):"):]
  assert sum(c.isprintable() or c in "\n\t" for c in new) >= 0.95 * len(new)
