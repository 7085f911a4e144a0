"""The command line, end to end, in a subprocess."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "fdjax", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


def test_generate_prints_text_and_stats():
  r = _run("generate", "def f(x):", "--max-new-tokens", "5", "--preset", "random-tiny")
  assert r.returncode == 0, r.stderr
  out = r.stdout.strip().splitlines()
  assert out[0].startswith("def f(x):")
  stats = out[-1]
  for field in ("prompt_tokens=9", "new_tokens=5", "prefill_ms=", "decode_tok_s=",
                "decode_attention=xla", "linear=xla"):
    assert field in stats, stats


def test_bad_argument_is_a_clear_error():
  r = _run("generate", "hi", "--max-new-tokens", "0", "--preset", "random-tiny")
  assert r.returncode == 2
  assert "max_new_tokens must be a positive integer" in r.stderr
