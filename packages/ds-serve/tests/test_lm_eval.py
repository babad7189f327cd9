"""lm-evaluation-harness's ``local-completions`` model against a live server: a
loglikelihood task and a generate_until task the test writes itself (local JSON data,
the server's own tokenizer through ``/tokenizer_info`` and ``/tokenize``: nothing from
the hub). Its loglikelihoods equal ds-model's.

lm-eval comes with the workspace's interop dev group; where it is not installed (the
isolated wheel run) the test is skipped."""

from __future__ import annotations

import json

import pytest
import torch
from ds_serve import create_app
from serve_live import LiveServer

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "def f(x):\n", "choices": ["    return x\n", "class Stack:"], "gold": 0},
    {"context": "import os\n", "choices": ["import sys\n", "The quick brown"], "gold": 0},
    {"context": "The quick brown", "choices": [" fox", " dog", "def"], "gold": 0},
]

CHOICE_TASK = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATE_TASK = """
task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_loglikelihood_and_generate_until(
    checkpoint, reference_model, tmp_path
):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tmp_path / "tiny_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    app = create_app(checkpoint, num_blocks=64, dtype="float32", served_model_name="tiny-coder")
    with LiveServer(app) as live:
        results = simple_evaluate(
            model="local-completions",
            model_args=(
                f"base_url={live.url}/v1/completions,model=tiny-coder,"
                "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,max_retries=1"
            ),
            tasks=["tiny_choice", "tiny_generate"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True,
            apply_chat_template=False,
        )
    tok = reference_model.tokenizer
    samples = results["samples"]["tiny_choice"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["filtered_resps"]):
            # lm-eval's split: trailing whitespace of the context moves to the
            # continuation, and the continuation's tokens are the whole text's past
            # the context's.
            text = doc["context"].rstrip()
            whole = tok.encode(doc["context"] + choice, add_special_tokens=False)
            context = tok.encode(text, add_special_tokens=False)
            ids = context + whole[len(context) :]
            with torch.no_grad():
                logits = reference_model(torch.tensor([ids])).logits[0].float()
            lsm = logits.log_softmax(-1)
            expected = sum(float(lsm[p - 1, ids[p]]) for p in range(len(context), len(ids)))
            assert response[0] == pytest.approx(expected, abs=1e-3)
    generated = results["samples"]["tiny_generate"]
    assert len(generated) == len(DOCS)
    assert all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "acc,none" in results["results"]["tiny_choice"]
