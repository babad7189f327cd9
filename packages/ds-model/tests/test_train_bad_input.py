"""Bad training input is reported early and plainly: data errors name the file, line
and byte before any model loads; a sequence length past the model's context is refused
when the Trainer is built; the command line prints one line and exits with status 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ds_model.training import BadRecordError, ByteTokenizer, Trainer, cli

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

OPTS = dict(progress_bar=False, plot=False, max_steps=1, per_device_train_batch_size=2)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    S.real_lm().save_pretrained(tmp_path / "base")  # max_position_embeddings=128
    return tmp_path / "base"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the Trainer gets as far as loading the model."""

    def refuse(self):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(Trainer, "_materialize_model", refuse)


@pytest.mark.parametrize(
    ("content", "where", "reason"),
    [
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2", r"not UTF-8 text .*byte offset 28"),
        (
            b'[{"text": "a"}, {"text": "b"}]\n]garbage',
            ":2",
            "trailing content after the JSON array",
        ),
        (b"[]  {}", ":1", "trailing content after the JSON array"),
        (b'{"text": "a"}\n{"text": \n', ":2", r"invalid JSON"),
        (b'{"text": "a"}\n{"txt": "b"}\n', ":2", r"record has keys \['txt'\]"),
    ],
)
def test_bad_data_is_named_before_the_model_loads(
    tmp_path, model_dir, no_model_load, content, where, reason
):
    data = tmp_path / "data.json"
    data.write_bytes(content)
    trainer = Trainer(
        model_path=str(model_dir), tokenizer=ByteTokenizer(), output_dir=str(tmp_path / "o"), **OPTS
    )
    with pytest.raises(BadRecordError, match=rf"{data}{where}: {reason}"):
        trainer.train(str(data))


def test_bad_eval_data_is_named_before_the_model_loads(tmp_path, model_dir, no_model_load):
    good = S.write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}])
    bad = tmp_path / "eval.jsonl"
    bad.write_bytes(b"\xff\n")
    trainer = Trainer(model_path=str(model_dir), output_dir=str(tmp_path / "o"), **OPTS)
    with pytest.raises(BadRecordError, match=rf"{bad}:1: not UTF-8"):
        trainer.train(str(good), eval_data=str(bad))


def test_default_sequence_length_follows_a_small_model(tmp_path, model_dir):
    """A LoRA run with no length given on a 128-token model trains (the default used to
    be 512 and failed at the first step)."""
    from ds_model import LoraConfig

    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(8)])
    trainer = Trainer(
        model_path=str(model_dir),
        config=LoraConfig(r=2, target_modules="all-linear"),
        tokenizer=ByteTokenizer(),
        output_dir=str(tmp_path / "o"),
        **OPTS,
    )
    assert trainer.args.max_seq_len == 128
    result = trainer.train(str(data), epochs=1)
    assert result.global_step == 1
    assert Trainer(model=S.real_lm(max_position_embeddings=4096)).args.max_seq_len == 512
    assert Trainer(model=S.tiny_lm()).args.max_seq_len == 512  # a module without a config


@pytest.mark.parametrize("source", ["dir", "module", "preset"])
def test_sequence_length_past_the_context_is_refused_at_construction(model_dir, source):
    model = {"dir": str(model_dir), "module": S.real_lm(), "preset": "tiny"}[source]
    context = 512 if source == "preset" else 128
    with pytest.raises(
        ValueError,
        match=rf"max_seq_len={context + 1} exceeds the model's "
        rf"context \(max_position_embeddings={context}\)",
    ):
        Trainer(model, max_seq_len=context + 1)
    assert Trainer(model, max_seq_len=context).args.max_seq_len == context


def test_cli_prints_one_line_and_exits_2_on_bad_data(tmp_path, model_dir, capsys):
    data = tmp_path / "d.json"
    data.write_bytes(b'[{"text": "a"}] trailing')
    argv = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--tokenizer",
        "bytes",
        "--output",
        str(tmp_path / "o"),
        "--no_progress",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepseek-train: error: {data}:1: trailing content after the JSON array"]
    with pytest.raises(BadRecordError):
        cli.main([*argv, "--debug"])


def test_cli_bad_config_is_one_line(tmp_path, model_dir, capsys):
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": "1e-6"'))
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}])
    assert cli.main(["--model", str(model_dir), "--data", str(data)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"deepseek-train: error: {config}: rms_norm_eps='1e-6': expected a finite number"
