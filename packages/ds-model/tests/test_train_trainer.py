"""The Trainer's loop: loss falls, accumulation is exact, schedule, precision, eval,
metrics and the loss-curve PNG, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from ds_model.training import ByteTokenizer, Trainer, TrainingConfig
from ds_model.training.schedule import lr_factor
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()

single_thread = S.single_thread  # autouse fixture

FAST = dict(
    optimizer="adamw", tokenizer=ByteTokenizer(), progress_bar=False, max_seq_len=32, plot=False
)


def _trainer(tmp_path: Path, data, **kw) -> Trainer:
    opts = {**FAST, "output_dir": str(tmp_path / "out"), "learning_rate": 3e-3, **kw}
    return Trainer(model=kw.pop("model", None) or S.tiny_lm(), train_dataset=data, **opts)


def test_loss_falls_over_a_few_hundred_steps(tmp_path: Path) -> None:
    texts = S.make_texts(64)
    result = _trainer(
        tmp_path,
        texts,
        per_device_train_batch_size=4,
        max_steps=200,
        warmup_steps=10,
        save_final=False,
        optimizer="grouped_adamw",
    ).train()
    assert result.global_step == 200 and len(result.losses) == 200
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-10:]) / 10
    assert first > 5.0  # about ln(259): an untrained byte model
    assert last < 0.35 * first, (first, last)


def test_gradient_accumulation_matches_the_big_batch(tmp_path: Path) -> None:
    texts = [t + "!" * (i % 7) for i, t in enumerate(S.make_texts(24))]
    big = _trainer(
        tmp_path / "a",
        texts,
        per_device_train_batch_size=8,
        max_steps=4,
        shuffle=False,
        save_final=False,
    ).train()
    acc = _trainer(
        tmp_path / "b",
        texts,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=4,
        shuffle=False,
        save_final=False,
    ).train()
    assert big.losses == pytest.approx(acc.losses, rel=1e-5, abs=1e-6)


@settings(max_examples=50)
@given(warmup=st.integers(0, 20), total=st.integers(1, 200), floor=st.floats(0.0, 1.0))
def test_warmup_then_cosine(warmup: int, total: int, floor: float) -> None:
    factors = [lr_factor(s, warmup, total, floor) for s in range(total + 5)]
    assert all(0.0 <= f <= 1.0 + 1e-9 for f in factors)
    assert all(f > 0.0 for f in factors[:total])  # every real step moves the weights
    ramp = factors[:warmup]
    assert ramp == sorted(ramp)
    after = factors[warmup:]
    assert all(f >= floor - 1e-9 for f in after)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(after))
    if total > warmup:
        assert factors[warmup] == pytest.approx(1.0)
        assert factors[total] == pytest.approx(floor)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path: Path, precision: str) -> None:
    trainer = _trainer(
        tmp_path,
        S.make_texts(16),
        per_device_train_batch_size=4,
        max_steps=25,
        precision=precision,
        save_final=False,
    )
    result = trainer.train()
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0] - 1.0
    # Master weights stay float32; autocast only changes the compute dtype.
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from ds_model.training.trainer import cpu_has_bf16

    def info(text: str) -> str:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return str(path)

    avx2 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
    assert cpu_has_bf16(info(avx2)) is False
    assert cpu_has_bf16(info(avx2.replace("fma", "fma avx512f avx512_bf16"))) is True
    assert cpu_has_bf16(info(avx2.replace("fma", "amx_bf16 amx_tile"))) is True
    assert cpu_has_bf16(info("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")) is True
    assert cpu_has_bf16(info("processor\t: 0\nFeatures\t: fp asimd\n")) is False
    assert cpu_has_bf16(info("no flags here\n")) is None
    assert cpu_has_bf16(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_it_warns(tmp_path: Path, monkeypatch, native: bool) -> None:
    import warnings

    from ds_model.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: native)
    trainer = _trainer(tmp_path, S.make_texts(4), max_steps=1, precision="bf16", save_final=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    slow = [w for w in caught if "without native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)


def test_bf16_trains_an_mla_moe_model_on_cpu(tmp_path: Path, monkeypatch) -> None:
    # V3's architecture under autocast: MLA's latent norm (float32 weight) must not
    # promote the keys past the queries' dtype (ds-attention refused the mix), and the
    # routed experts' hand-written backward runs its matmuls in bf16.
    import ds_model
    from ds_model import lean_backward

    mm_dtypes = []
    routed = lean_backward._RoutedExperts.forward

    def watched(ctx, x, weights, idx, mm_dtype, *flat):
        mm_dtypes.append(mm_dtype)
        return routed(ctx, x, weights, idx, mm_dtype, *flat)

    monkeypatch.setattr(lean_backward._RoutedExperts, "forward", staticmethod(watched))

    model = ds_model.from_config(
        {**ds_model.PRESETS["tiny"], "vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257},
        seed=0,
    )
    trainer = Trainer(
        model=model,
        train_dataset=S.make_texts(16),
        **{**FAST, "output_dir": str(tmp_path), "learning_rate": 3e-3},
        per_device_train_batch_size=4,
        max_steps=25,
        precision="bf16",
        save_final=False,
    )
    result = trainer.train()
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0] - 1.0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert mm_dtypes and set(mm_dtypes) == {torch.bfloat16}


def test_eval_metrics_jsonl_and_png(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path,
        S.make_texts(16),
        eval_dataset=S.make_texts(6, seed=9),
        per_device_train_batch_size=4,
        max_steps=6,
        eval_steps=3,
        plot=True,
        save_final=False,
    )
    result = trainer.train()
    assert [e["step"] for e in result.eval_history] == [3, 6]
    for e in result.eval_history:
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(result.eval_history[-1]["eval_loss"])
    lines = [json.loads(x) for x in Path(result.metrics_path).read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in train_lines] == result.losses
    assert all({"lr", "grad_norm", "tokens_per_s"} <= x.keys() for x in train_lines)
    width, height, pixels = _read_png(Path(result.plot_path))
    assert (width, height) == (640, 360)
    assert (31, 119, 180) in pixels and (214, 39, 40) in pixels  # loss line, eval dots


def _read_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        pos += 12 + n
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    rows = [raw[r * (1 + 3 * width) + 1 : (r + 1) * (1 + 3 * width)] for r in range(height)]
    pixels = {tuple(row[i : i + 3]) for row in rows for i in range(0, len(row), 3)}
    return width, height, pixels


def test_seed_keyword_call_form(tmp_path: Path) -> None:
    trainer = Trainer(
        model=S.tiny_lm(),
        train_dataset=S.make_texts(8),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        output_dir=str(tmp_path),
        **{**FAST, "max_seq_len": 512},
    )
    result = trainer.train()
    assert result.global_step == 3  # 8 short examples pack into one block: a step per epoch
    assert Path(result.checkpoint).name == "checkpoint-3"


def test_train_data_path_and_epochs_arguments(tmp_path: Path) -> None:
    path = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(8)])
    trainer = Trainer(
        model=S.tiny_lm(), output_dir=str(tmp_path / "o"), **{**FAST, "max_seq_len": 512}
    )
    assert trainer.train(data_path=str(path), epochs=2).global_step == 2


def test_bad_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"distributed_strategy='zero9'.*'ddp', 'fsdp'"):
        TrainingConfig(distributed_strategy="zero9")
    with pytest.raises(TypeError, match=r"unknown training option\(s\) \['epochz'\]"):
        Trainer(model=S.tiny_lm(), epochz=3)
    with pytest.raises(ValueError, match="precision='fp8'"):
        Trainer(model=S.tiny_lm(), precision="fp8")
    with pytest.raises(ValueError, match="no model"):
        Trainer(train_dataset=["x"])
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir=.*exists and is not a directory"):
        Trainer(model=S.tiny_lm(), train_dataset=["abc"], output_dir=str(afile), **FAST).train()
    with pytest.raises(ValueError, match="has no usable records"):
        Trainer(model=S.tiny_lm(), train_dataset=[], output_dir=str(tmp_path / "e"), **FAST).train()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "no end}\n')
    out = tmp_path / "b"
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        Trainer(model=S.tiny_lm(), output_dir=str(out), **FAST).train(data_path=str(broken))
    assert not out.exists() or not any(out.iterdir())  # nothing written, no checkpoint


@pytest.mark.gpu
def test_bf16_training_on_cuda(tmp_path: Path) -> None:
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.make_texts(32),
        device="cuda",
        precision="bf16",
        per_device_train_batch_size=4,
        max_steps=40,
        output_dir=str(tmp_path),
        learning_rate=3e-3,
        **FAST,
    )
    result = trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0


def test_torch_compile_trains_the_same_losses_and_saves_plain_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    texts = S.make_texts(16)
    runs = {}
    for compiled in (False, True):
        trainer = Trainer(
            model=S.real_lm(),
            train_dataset=texts,
            **FAST,
            output_dir=str(tmp_path / str(compiled)),
            learning_rate=3e-3,
            per_device_train_batch_size=4,
            max_steps=3,
            shuffle=False,
            torch_compile=compiled,
        )
        runs[compiled] = trainer.train().losses
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert runs[True][-1] != runs[True][0]  # it trained
    # The checkpoint is the plain model's: it loads without torch.compile's name prefix.
    saved = load_file(tmp_path / "True" / "checkpoint-3" / "model.safetensors")
    assert not any("_orig_mod" in k for k in saved)
    expected = dict(trainer.model.state_dict())
    torch.testing.assert_close(saved, {k: expected[k] for k in saved})
    assert set(saved) >= {k for k in expected if "embed" in k or "layers.0." in k}


def test_torch_compile_is_refused_with_sharded_strategies() -> None:
    with pytest.raises(ValueError, match=r"torch_compile=True with distributed_strategy='fsdp'"):
        TrainingConfig(torch_compile=True, distributed_strategy="fsdp")


def test_constructor_spellings_and_wrong_types_name_the_argument() -> None:
    from ds_model import LoraConfig

    lora = LoraConfig(r=2, target_modules="all-linear")
    config = TrainingConfig(max_steps=3)
    trainer = Trainer(S.tiny_lm(), args=config, lora_config=lora)
    assert (trainer.args.max_steps, trainer.lora_config) == (3, lora)
    published = Trainer(model_path="tiny", config=lora)  # DeepSeek's published form
    assert published.lora_config is lora and published.args.max_steps == -1
    assert Trainer(S.tiny_lm(), config=config, max_steps=5).args.max_steps == 5
    with pytest.raises(TypeError, match=r"config= got a dict: expected a LoraConfig"):
        Trainer(S.tiny_lm(), config={"r": 8})
    with pytest.raises(TypeError, match=r"args= got a dict: expected a TrainingConfig"):
        Trainer(S.tiny_lm(), args={"max_steps": 3})
    with pytest.raises(TypeError, match=r"lora_config must be a ds_model.LoraConfig"):
        Trainer(S.tiny_lm(), lora_config="r=8")
    with pytest.raises(ValueError, match=r"config= \(a LoRA config\) and lora_config="):
        Trainer(S.tiny_lm(), config=lora, lora_config=lora)
    with pytest.raises(ValueError, match=r"train_step\(\) runs inside train\(\)"):
        Trainer(S.tiny_lm()).train_step()
