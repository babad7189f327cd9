"""Command-line parsing of ds-serve."""

from __future__ import annotations

import argparse
import os

import pytest
from ds_serve.cli import main, parse_args, parse_bytes


def test_defaults_bind_to_localhost():
    args = parse_args([])
    assert args.model_path is None
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.api_key is None and args.lora == []


def test_all_options():
    args = parse_args(
        [
            "m",
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--api-key",
            "k",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "256",
            "--kv-cache-memory",
            "64MiB",
            "--quantization",
            "int8",
            "--lora",
            "a=/x",
            "--lora",
            "b=/y",
        ]
    )
    assert args.model_path == "m" and args.port == 9000 and args.api_key == "k"
    assert args.max_num_seqs == 8 and args.max_num_batched_tokens == 256
    assert args.kv_cache_memory == 64 << 20 and args.quantization == "int8"
    assert args.lora == [("a", "/x"), ("b", "/y")]


@pytest.mark.parametrize(("text", "value"), [("1000", 1000), ("2G", 2 << 30), ("1.5kb", 1500)])
def test_sizes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-1M", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="kv-cache-memory"):
        parse_bytes(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora", "nopath"],
        ["--max-num-seqs", "0"],
        ["--quantization", "fp3"],
        ["--stream-interval", "0"],
        ["--http", "h2"],
        ["--loop", "trio"],
    ],
)
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_stream_interval_defaults_to_one_token_per_event():
    assert parse_args([]).stream_interval == 1
    assert parse_args(["--stream-interval", "4"]).stream_interval == 4


def test_the_engine_runs_in_its_own_process_unless_told_otherwise():
    # Its pipes are inherited file descriptors: POSIX only.
    assert parse_args([]).engine_process is (os.name == "posix")
    assert parse_args(["--no-engine-process"]).engine_process is False


def test_repeated_lora_names_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--lora", "a=/x", "--lora", "a=/y"])
    assert info.value.code == 2
    assert "repeated: ['a']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "steps"), [([], None), (["--compile"], "compile"), (["--cuda-graph"], "cuda_graph")]
)
def test_decode_step_flags(argv, steps):
    assert parse_args(argv).decode_steps == steps


def test_compile_and_cuda_graph_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--compile", "--cuda-graph"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["int8", "int4", "w8a8", "fp8"])
def test_every_quantization_ds_model_names_is_accepted(name):
    assert parse_args(["--quantization", name]).quantization == name


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_SERVE_DEFAULT_MODEL", raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "models/ds-tiny-coder" in err and str(tmp_path) in err


def test_default_model_override_is_ds_serve_s_own_variable(tmp_path, monkeypatch):
    from ds_serve.default_model import find_default_model

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("DS_SERVE_DEFAULT_MODEL", str(tmp_path))
    assert find_default_model("/") == tmp_path
    monkeypatch.setenv("DS_SERVE_DEFAULT_MODEL", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"DS_SERVE_DEFAULT_MODEL='.*nope'"):
        find_default_model("/")


def test_default_kv_pool_holds_what_the_scheduler_can_use(checkpoint):
    import ds_model
    from ds_serve.server import build_engine

    engine = build_engine(checkpoint, dtype="float32", max_num_seqs=4, max_model_len=64)
    # 4 sequences x 64 tokens / 16 per block, twice (the rest keeps prefixes cached),
    # not 25% of the machine's free memory.
    assert engine.runner.num_blocks == 2 * 4 * 4
    per_block = ds_model.PagedKVCache.bytes_per_block(
        engine.runner.config, 16, engine.runner.model.dtype
    )
    sized = build_engine(
        checkpoint,
        dtype="float32",
        max_num_seqs=4,
        max_model_len=64,
        kv_cache_memory=100 * per_block,
    )
    assert sized.runner.num_blocks == 100  # an explicit budget is taken as given


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_num_seqs", 0), ("block_size", 0), ("kv_cache_memory", 0), ("num_blocks", -1)],
)
def test_pool_sizes_are_checked_by_their_own_names(checkpoint, option, value):
    from ds_serve.server import build_engine

    with pytest.raises(ValueError, match=f"{option} must be an int >= 1, got {value}"):
        build_engine(checkpoint, dtype="float32", **{option: value})


def test_auto_dtype_serves_a_bf16_checkpoint_in_float32_on_cpu(checkpoint, tmp_path):
    # bf16 on a CPU compiles a oneDNN kernel per new matmul shape (memory grows with
    # every new prompt length), so "auto" means float32 there; asked for, bf16 is kept.
    import shutil

    import ds_model
    import torch
    from ds_serve.server import build_engine

    bf16 = tmp_path / "bf16"
    shutil.copytree(checkpoint, bf16)
    ds_model.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(bf16)
    assert ds_model.from_pretrained(bf16).dtype == torch.bfloat16  # the checkpoint's own
    small = {"max_num_seqs": 2, "max_model_len": 32, "device": "cpu"}
    assert build_engine(bf16, **small).runner.model.dtype == torch.float32
    kept = build_engine(bf16, dtype="bfloat16", **small)
    assert kept.runner.model.dtype == torch.bfloat16


def test_ctrl_c_after_the_graceful_shutdown_exits_130_without_a_traceback(monkeypatch):
    import ds_serve.server

    class Interrupted:
        def run(self, **options):
            raise KeyboardInterrupt

    monkeypatch.setattr(ds_serve.server, "create_app", lambda *a, **k: Interrupted())
    assert main([]) == 130
