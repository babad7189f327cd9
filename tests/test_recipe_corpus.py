"""The ds-tiny-coder corpus pipeline (models/ds-tiny-coder/recipe) on tiny corpora the
tests build: license filter, quality filters, secrets filter, evaluation-problem filter,
exact and near deduplication, the held-out split and the manifest."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ds_model
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

RECIPE = Path(__file__).resolve().parents[1] / "models" / "ds-tiny-coder" / "recipe"
sys.path.insert(0, str(RECIPE))

import dedup  # noqa: E402
import eval_problems  # noqa: E402
import evaluate_model  # noqa: E402
import functions  # noqa: E402
import prepare  # noqa: E402
import privacy  # noqa: E402
import quality  # noqa: E402
import sources  # noqa: E402


def program(seed: int, functions: int = 12) -> str:
    """Ordinary, distinct Python: `functions` small functions named after `seed`."""
    parts = []
    for i in range(functions):
        parts.append(
            f"def handler_{seed}_{i}(request, limit={i + seed}):\n"
            f'    """Handle request number {i} of batch {seed}."""\n'
            f"    values = [item * {i + 1} for item in request.items if item > {seed}]\n"
            f"    if len(values) > limit:\n"
            f"        values = values[:limit]\n"
            f"    return sum(values) + {i * seed}\n"
        )
    return "\n\n".join(parts)


def src(path: str, text: str, package: str = "pkg") -> sources.Source:
    return sources.Source(package, "1.0", "MIT", path, text)


def kept_paths(items) -> list[str]:
    kept, _, _ = prepare.clean(items, log=lambda *_: None)
    return [s.path for s in kept]


# -- deduplication ------------------------------------------------------------------------


def test_dedup_removes_exact_and_near_copies_and_keeps_the_first():
    original = program(1)
    exact = original.replace("\n", "   \n")  # trailing whitespace only
    lines = original.splitlines()
    lines[3] = "        values = values[: limit - 1]"  # one line changed out of ~80
    near = "\n".join(lines)
    items = [src("a/orig.py", original), src("b/exact.py", exact), src("c/near.py", near),
             src("d/other.py", program(2))]  # fmt: skip
    assert dedup.jaccard(original, near) > 0.9
    assert dedup.jaccard(original, program(2)) < 0.5
    kept, removed, _ = prepare.clean(items, log=lambda *_: None)
    assert [s.path for s in kept] == ["a/orig.py", "d/other.py"]
    assert {r["path"]: r["filter"] for r in removed} == {
        "b/exact.py": "exact duplicate",
        "c/near.py": "near duplicate",
    }


@settings(max_examples=20, deadline=None)
@given(seed_a=st.integers(0, 10_000), seed_b=st.integers(0, 10_000))
def test_minhash_estimate_tracks_true_jaccard(seed_a, seed_b):
    a, b = program(seed_a, 6), program(seed_a, 6) + "\n\n" + program(seed_b, 6)
    hasher = dedup.MinHasher()
    estimate = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(estimate - dedup.jaccard(a, b)) < 0.2


# -- secrets and personal data --------------------------------------------------------------

PLANTED = {
    "aws access key": 'AWS_KEY = "AKIAQWERTYUIOPASDFGH"\n',
    "github token": 'token = "ghp_' + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + '"\n',
    "slack token": 'SLACK = "xoxb-' + "1234567890-abcdefghij" + '"\n',
    "private key": "KEY = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n'''\n",
    "high-entropy assigned secret": 'api_key = "Zx9Qw3Lm8Rt2Vb7Nc4Kd1Hf6"\n',
}


def test_secret_filter_removes_planted_keys_and_reports_their_kind_not_value(tmp_path):
    items = [src(f"p/{i}.py", program(i) + "\n" + line) for i, line in enumerate(PLANTED.values())]
    items.append(src("p/clean.py", program(99) + '\npassword = "changeme"\nkey = "abc"\n'))
    items += [src(f"q/{i}.py", program(100 + i)) for i in range(8)]
    kept, removed, _ = prepare.clean(items, log=lambda *_: None)
    assert [s.path for s in kept] == ["p/clean.py", *(f"q/{i}.py" for i in range(8))]
    assert sorted(r["reason"] for r in removed) == sorted(PLANTED)
    manifest = prepare.build(items, tmp_path, vocab_size=400, heldout_every=2)
    assert manifest["secrets_removed_by_kind"] == dict.fromkeys(PLANTED, 1)
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.suffix in (".json", ".jsonl"))
    assert "AKIAQWERTYUIOPASDFGH" not in written and "Zx9Qw3Lm8Rt2Vb7Nc4Kd1Hf6" not in written


def test_email_addresses_are_redacted_except_reserved_example_domains():
    text = (
        "# Author: Jane Roe <jane.roe@university.edu>\n"
        "# Contact: ops@company.co.uk, or see user@example.com\n"
        "y = x@self.weight\n"
    )
    redacted, count = privacy.redact_emails(text)
    assert count == 2
    assert "jane.roe" not in redacted and "ops@company" not in redacted
    assert "user@example.com" in redacted and "x@self.weight" in redacted


# -- licenses -----------------------------------------------------------------------------


def fake_distribution(site: Path, name: str, license_lines: list[str]) -> None:
    package = site / name.lower()
    package.mkdir()
    (package / "__init__.py").write_text(program(len(name)))
    info = site / f"{name.lower()}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "\n".join(["Metadata-Version: 2.4", f"Name: {name}", "Version: 1.0", *license_lines]) + "\n"
    )
    (info / "RECORD").write_text(f"{name.lower()}/__init__.py,,\n")


def test_license_filter_keeps_only_permissive_packages(tmp_path):
    permissive = {
        "SpdxMit": ["License-Expression: MIT"],
        "SpdxMixed": ["License-Expression: BSD-3-Clause AND (Apache-2.0 OR GPL-2.0-only)"],
        "Classified": ["Classifier: License :: OSI Approved :: Apache Software License"],
        "FreeText": ["License: BSD"],
        "Isc": ["License-Expression: ISC"],
    }
    other = {
        "Copyleft": ["License-Expression: GPL-3.0-or-later"],
        "WeakCopyleft": ["License-Expression: MPL-2.0 AND MIT"],
        "NoLicense": [],
        "Proprietary": ["License: LicenseRef-Proprietary"],
    }
    for name, lines in {**permissive, **other}.items():
        fake_distribution(tmp_path, name, lines)
    distributions = sources.installed_distributions(paths=[str(tmp_path)])
    assert {d.name for d in distributions} == {*permissive, *other}
    packages = {s.package for s in sources.package_sources(distributions)}
    assert packages == set(permissive)


# -- quality and evaluation problems --------------------------------------------------------


def test_generated_vendored_long_line_and_data_files_are_removed():
    table = "TABLE = [\n" + "".join(f"    {i}, {i * 7}, 0x{i:04x},\n" for i in range(300)) + "]\n"
    items = [
        src("pkg/_vendor/six.py", program(1)),
        src("pkg/third_party/lib.py", program(2)),
        src("pkg/pb2.py", "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + program(3)),
        src("pkg/blob.py", program(4) + "\nDATA = '" + "x" * 5000 + "'\n"),
        src("pkg/table.py", table),
        src("pkg/ok.py", program(5)),
    ]  # fmt: skip
    kept, removed, _ = prepare.clean(items, log=lambda *_: None)
    assert [s.path for s in kept] == ["pkg/ok.py"]
    assert [r["filter"] for r in removed] == [
        "vendored", "vendored", "generated", "long lines", "mostly data"
    ]  # fmt: skip


def test_files_containing_an_evaluation_problem_are_kept_out_of_the_corpus():
    assert len(eval_problems.PROBLEMS) >= 20
    names = [p["name"] for p in eval_problems.PROBLEMS]
    assert len(set(names)) == len(names)
    problem = eval_problems.PROBLEMS[0]
    leaked = program(7) + "\n\n" + problem["prompt"] + "    return a + b\n"
    assert quality.rejection("pkg/leak.py", leaked) is None
    assert kept_paths([src("pkg/leak.py", leaked), src("pkg/ok.py", program(8))]) == ["pkg/ok.py"]


REFERENCE_SOLUTIONS = {
    "add": "return a + b",
    "square": "return x * x",
    "first_item": "return items[0]",
    "reverse_string": "return s[::-1]",
    "last_item": "return items[-1]",
    "is_even": "return n % 2 == 0",
    "subtract": "return a - b",
    "multiply": "return a * b",
    "cube": "return x ** 3",
    "list_length": "return len(items)",
    "largest": "return max(numbers)",
    "smallest": "return min(numbers)",
    "total": "return sum(numbers)",
    "average": "return sum(numbers) / len(numbers)",
    "to_upper": "return text.upper()",
    "absolute": "return abs(x)",
    "maximum_of_two": "return a if a > b else b",
    "is_empty": "return len(items) == 0",
    "count_char": "return text.count(char)",
    "factorial": "return 1 if n == 0 else n * factorial(n - 1)",
    "double_all": "return [2 * n for n in numbers]",
    "is_palindrome": "return s == s[::-1]",
    "join_words": "return ' '.join(words)",
    "celsius_to_fahrenheit": "return c * 9 / 5 + 32",
    "get_value": "return mapping.get(key, default)",
}


def candidate(problem: dict, body: str) -> str:
    return problem["prompt"] + "    " + body + "\n\n" + problem["tests"] + "\n"


def test_evaluation_problems_have_passing_reference_solutions_and_failing_wrong_ones():
    """Each problem's asserts, run by the card's scorer (a separate isolated process), tell
    a right completion from a wrong one, and a completion that never ends fails."""
    assert sorted(REFERENCE_SOLUTIONS) == sorted(p["name"] for p in eval_problems.PROBLEMS)
    for problem in eval_problems.PROBLEMS:
        right = candidate(problem, REFERENCE_SOLUTIONS[problem["name"]])
        assert evaluate_model.passes(right), problem["name"]
        assert not evaluate_model.passes(candidate(problem, "return None")), problem["name"]
    evaluate_model.RUN_TIMEOUT_S, limit = 1, evaluate_model.RUN_TIMEOUT_S
    try:
        assert not evaluate_model.passes(candidate(eval_problems.PROBLEMS[0], "while True: pass"))
    finally:
        evaluate_model.RUN_TIMEOUT_S = limit


# -- second-stage functions ----------------------------------------------------------------

SHORT = 'def area(w, h):\n    """Return the area of a w by h rectangle."""\n    return w * h\n'
LONG_BODY = 'def long(x):\n    """Return x, slowly."""\n' + "    x = x\n" * 4 + "    return x\n"
UNDOCUMENTED = "def bare(x):\n    return x + 1\n"
DECORATED = '@cache\ndef cached(x):\n    """Return x."""\n    return x\n'
METHOD = (
    "class Box:\n    def size(self):\n"
    '        """Return how many items the box holds."""\n        return len(self.items)\n'
)


def test_second_stage_takes_short_documented_functions_from_training_files_only(tmp_path):
    """Short documented functions (methods dedented) come out on their own, once each;
    long, undocumented, decorated and evaluation-problem functions, and anything in the
    held-out split, do not; whole training files make up about the asked share."""
    leaked = eval_problems.PROBLEMS[0]["prompt"] + "    return a + b\n"
    heldout_only = 'def secret(x):\n    """Return x held out."""\n    return x\n'
    train = [SHORT + LONG_BODY, UNDOCUMENTED + DECORATED + METHOD + SHORT, leaked, "x = (\n"]
    train += [program(i) for i in range(20)]
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (data / "heldout.jsonl").write_text(json.dumps({"text": heldout_only}) + "\n")
    (data / "tokenizer.model").write_bytes(b"model")
    counts = functions.build(data, out, file_share=0.5)
    records = [json.loads(line)["text"] for line in (out / "train.jsonl").open()]
    picked = [r for r in records if r not in train]
    # the 20 programs' 12 handlers each are five-line bodies: too long
    assert sorted(picked) == sorted(
        [
            SHORT,
            'def size(self):\n    """Return how many items the box holds."""\n'
            "    return len(self.items)\n",
        ]
    )
    assert counts == {"functions": 2, "files": len(records) - 2, "records": len(records)}
    whole = [r for r in records if r in train]
    assert whole and sum(map(len, whole)) >= sum(map(len, picked))
    assert not any(heldout_only in r for r in records)
    assert (out / "heldout.jsonl").read_text() == (data / "heldout.jsonl").read_text()
    assert (out / "tokenizer.model").read_bytes() == b"model"
    again = tmp_path / "again"
    functions.build(data, again, file_share=0.5)
    assert (again / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    none = tmp_path / "none"
    assert functions.build(data, none, file_share=0.0)["files"] == 0


# -- split and manifest -------------------------------------------------------------------


def test_heldout_split_shares_no_file_with_training_and_manifest_counts_them(tmp_path):
    items = [src(f"pkg/m{i}.py", program(i), package=f"pkg{i % 3}") for i in range(40)]
    manifest = prepare.build(items, tmp_path, vocab_size=400, heldout_every=4)
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert train and heldout
    assert not {r["path"] for r in train} & {r["path"] for r in heldout}
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert len(train) + len(heldout) == 40
    assert (tmp_path / "tokenizer.model").is_file()
    packages = {p["package"]: p for p in manifest["packages"]}
    assert set(packages) == {"pkg0", "pkg1", "pkg2"}
    for entry in packages.values():
        assert {"version", "license", "files", "bytes", "tokens"} <= set(entry)
        assert entry["tokens"] > 0
    assert sum(p["files"]["heldout"] for p in packages.values()) == len(heldout)
    totals = manifest["totals"]
    assert totals["train"]["bytes"] == sum(len(r["text"].encode()) for r in train)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


# -- initial checkpoint and training launcher --------------------------------------------------

TINY_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 400,
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "max_position_embeddings": 128,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip


def test_recipe_trains_from_the_prepared_corpus_and_resumes_from_its_output(tmp_path):
    import init_model
    import train

    transformers = pytest.importorskip("transformers")

    data, init, run = tmp_path / "data", tmp_path / "init", tmp_path / "run"
    prepare.build([src(f"pkg/m{i}.py", program(i)) for i in range(30)], data, 400, 4)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_DEEPSEEK_V3))
    init_model.main(["--out", str(init), "--config", str(config),
                     "--tokenizer", str(data / "tokenizer.model")])  # fmt: skip
    hyper = {"max_steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 0.001,
             "warmup_steps": 0, "weight_decay": 0.1, "save_minutes": 15, "eval_steps": 2,
             "logging_steps": 1, "seed": 0}  # fmt: skip
    hyper_file = tmp_path / "train.json"
    hyper_file.write_text(json.dumps(hyper))
    common = ["--data", str(data), "--init", str(init), "--output", str(run),
              "--hyperparameters", str(hyper_file)]  # fmt: skip
    assert train.main(common) == 0
    assert (run / "checkpoint-2" / "tokenizer.json").is_file()
    hyper_file.write_text(json.dumps({**hyper, "max_steps": 3}))
    assert train.main([*common, "--resume"]) == 0
    assert (run / "checkpoint-3").is_dir()
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 3
    os.environ["HF_HUB_OFFLINE"] = "1"
    text = program(3)
    theirs = transformers.AutoTokenizer.from_pretrained(str(run / "checkpoint-3"))
    assert theirs(text)["input_ids"] == ds_model.load_tokenizer(run / "checkpoint-3").encode(text)
