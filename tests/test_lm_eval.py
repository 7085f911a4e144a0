"""lm-evaluation-harness against a live `fdjax serve`, as its users point it at a server:
`local-completions` with tokenized requests (token-id prompts), a multiple-choice task
(loglikelihoods: echo, max_tokens 1, logprobs 1) and a generate_until task, both local JSONL
tasks written here, on a Llama-3-style checkpoint (bench/tiny_llama3.py). The
loglikelihoods lm-eval reports equal the model's own, computed directly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("openai")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from fdjax.io import loading  # noqa: E402
from tests.test_server import _start, _stop  # noqa: E402

# Minutes of a live server: apart from the README's command, in CI's second step.
pytestmark = pytest.mark.integration

QUESTIONS = [
    ("def add(a, b):\n    return a", [" + b", " - b", " * b"], 0),
    ("import os\nimport", [" sys", " json", " re"], 1),
    ("for i in range(", ["10):", "n):", "len(x)):"], 2),
    ("class Parser(object):\n    def", [" __init__(self", " parse(self", " run(self"], 0),
]


def _tasks(tmp_path):
  """A multiple-choice and a generate_until task over JSONL files: the task directory."""
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  mc = tmp_path / "mc.jsonl"
  mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                        for q, c, a in QUESTIONS))
  (tasks / "fdjax_mc.yaml").write_text(f"""task: fdjax_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
  (tasks / "fdjax_gen.yaml").write_text(f"""task: fdjax_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
  return tasks


def test_lm_eval_runs_loglikelihood_and_generate_until_against_fdjax_serve(tmp_path,
                                                                            monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval.tasks import TaskManager

  from bench.tiny_llama3 import build
  path = build(str(tmp_path / "llama3"))
  s = _start(*loading.load(path, chat_template=True)[:4], max_batch=4)
  try:
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={s.url}/v1/completions,model={s.name},tokenizer={path},"
                    "tokenized_requests=True,num_concurrent=2,max_retries=1"),
        tasks=["fdjax_mc", "fdjax_gen"], task_manager=TaskManager(include_path=str(
            _tasks(tmp_path))), log_samples=True, bootstrap_iters=0)
  finally:
    _stop(s)
  assert 0.0 <= out["results"]["fdjax_mc"]["acc,none"] <= 1.0
  assert 0.0 <= out["results"]["fdjax_gen"]["exact_match,none"] <= 1.0
  gens = out["samples"]["fdjax_gen"]
  assert len(gens) == len(QUESTIONS) and all(isinstance(g["resps"][0][0], str) for g in gens)

  # Every choice's loglikelihood as the model computes it directly, the same token ids.
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(path)
  graph, state = nnx.split(s.model)
  forward = jax.jit(lambda st, ids: nnx.merge(graph, st)(ids))
  samples = out["samples"]["fdjax_mc"]
  assert len(samples) == len(QUESTIONS)
  checked = 0
  for sample in samples:
    for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
      ctx = tok(context, add_special_tokens=False).input_ids
      whole = tok(context + continuation, add_special_tokens=False).input_ids
      ids = np.zeros((1, 64), np.int32)
      ids[0, :len(whole)] = whole
      x = np.asarray(forward(state, jnp.asarray(ids))[0], np.float64)
      lp = x - x.max(-1, keepdims=True)
      lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
      want = sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))
      greedy = all(np.argmax(lp[i - 1]) == whole[i] for i in range(len(ctx), len(whole)))
      got, got_greedy = resp[0]
      assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (context, continuation)
      assert got_greedy == greedy
      checked += 1
  assert checked == sum(len(c) for _, c, _ in QUESTIONS)
