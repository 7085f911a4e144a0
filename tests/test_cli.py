"""The command line, end to end, in a subprocess."""
import os
import subprocess
import sys

import pytest

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
  assert "argument --max-new-tokens: must be at least 1, got 0" in r.stderr


@pytest.mark.integration  # the README command's 15 minutes: CI's second step
def test_bad_train_input_is_an_error_line_before_any_training(tmp_path):
  """Counts below 1, a missing data file and an --out under a file: each an `fdjax: error`
  (or argparse's) line and exit status 2, no traceback, before a model is built."""
  (tmp_path / "file").write_text("x")
  cases = [(["--data", "stdlib", "--out", str(tmp_path / "a"), "--steps", "0"],
            "argument --steps: must be at least 1, got 0"),
           (["--data", "stdlib", "--out", str(tmp_path / "a"), "--eval-every", "-3"],
            "argument --eval-every: must be at least 1, got -3"),
           (["--data", "files", "--files", str(tmp_path / "none.py"), "--out",
             str(tmp_path / "b")], "fdjax: error: [Errno 2] No such file"),
           (["--data", "stdlib", "--out", str(tmp_path / "file" / "sub")],
            "fdjax: error: [Errno 20] Not a directory")]
  for args, says in cases:
    r = _run("train", *args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.integration  # three `fdjax generate` processes (CI's integration step)
def test_generate_with_speculative_decoding_prints_the_same_greedy_text():
  args = ("generate", "ab ab ab ab", "--max-new-tokens", "12", "--preset", "random-tiny",
          "--temperature", "0")
  plain = _run(*args)
  spec = _run(*args, "--speculative", "ngram:k=3,n=2")
  assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
  assert spec.stdout.splitlines()[:-1] == plain.stdout.splitlines()[:-1]  # the text
  assert "speculative=ngram:k=3,n=2 drafted=" in spec.stdout
  bad = _run(*args, "--speculative", "ngram:k=99")
  assert bad.returncode == 2 and "k must be an integer from 1 to 16" in bad.stderr


@pytest.mark.integration  # three `fdjax generate` processes (CI's integration step)
def test_generate_keeps_its_programs_in_the_compile_cache_and_off_is_off(tmp_path):
  cache = tmp_path / "xla"
  args = ("generate", "def g(y):", "--max-new-tokens", "6", "--preset", "random-tiny",
          "--compile-cache", str(cache))
  first = _run(*args)
  assert first.returncode == 0, first.stderr
  kept = set(os.listdir(cache))
  assert kept  # the prefill, first-token and decode-loop programs at least
  again = _run(*args)  # the same programs: loaded, nothing new written
  assert again.returncode == 0 and set(os.listdir(cache)) == kept
  assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]
  # off is off, even with JAX's own variable naming a directory
  elsewhere = tmp_path / "jax_env"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(elsewhere),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  off = subprocess.run([sys.executable, "-m", "fdjax", *args[:-1], "off"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
  assert off.returncode == 0, off.stderr
  assert not elsewhere.exists() or not os.listdir(elsewhere)


def test_generate_samples_as_the_models_generation_config_recommends(tmp_path):
  """`fdjax generate`'s sampling: the flags, then the checkpoint's generation_config.json
  where it recommends any (what it leaves out: off, as transformers reads it), else 0.8 and
  top-k 40 (the bundled model has none)."""
  from fdjax import cli
  parse = cli.build_parser().parse_args
  plain = dict(temperature=0.8, top_k=40, top_p=None, min_p=0.0, repetition_penalty=1.0)
  assert cli._generate_sampling(parse(["generate", "x"]), None) == plain
  assert cli._generate_sampling(parse(["generate", "x"]), str(tmp_path)) == plain
  (tmp_path / "generation_config.json").write_text(
      '{"temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1}')
  assert cli._generate_sampling(parse(["generate", "x"]), str(tmp_path)) == dict(
      temperature=0.6, top_k=None, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
  given = parse(["generate", "x", "--temperature", "0", "--top-k", "5", "--min-p", "0",
                 "--repetition-penalty", "1.3"])
  assert cli._generate_sampling(given, str(tmp_path)) == dict(
      temperature=0.0, top_k=5, top_p=0.9, min_p=0.0, repetition_penalty=1.3)
  # a penalty alone is not a sampling recommendation: the CLI's sampling, with the penalty
  (tmp_path / "generation_config.json").write_text('{"repetition_penalty": 1.2}')
  assert cli._generate_sampling(parse(["generate", "x"]), str(tmp_path)) == {
      **plain, "repetition_penalty": 1.2}
