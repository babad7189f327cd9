"""LoRA and QLoRA fine-tuning through the published call forms."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from ds_model import LoraConfig, Trainer
from ds_model.training import ByteTokenizer

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

OPTS = dict(
    progress_bar=False,
    plot=False,
    max_seq_len=32,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    tokenizer=ByteTokenizer(),
)


def test_lora_changes_only_adapter_weights(tmp_path: Path) -> None:
    model = S.real_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0
    )
    trainer = Trainer(
        model=model,
        train_dataset=S.make_texts(32),
        lora_config=lora,
        max_steps=40,
        output_dir=str(tmp_path),
        **{**OPTS, "learning_rate": 3e-2},
    )
    result = trainer.train()
    assert result.losses[-1] < result.losses[0] - 0.15  # a random tiny base learns slowly
    after = model.state_dict()
    adapter = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    base = {k.replace(".base_layer.", "."): v for k, v in after.items() if k not in adapter}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)  # the base never moved
    # every adapter matrix moved (B starts at zero, so a trained B is nonzero)
    assert all(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The checkpoint holds the adapter only, in PEFT's format, and ds-lora loads it.
    ckpt = Path(result.checkpoint)
    assert (ckpt / "adapter_model.safetensors").is_file() and not (
        ckpt / "model.safetensors"
    ).exists()
    from ds_lora import load_adapter

    fresh = load_adapter(S.real_lm(), ckpt)
    ids = torch.randint(0, 256, (2, 16))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_seed_positional_form_with_model_path_and_config(tmp_path: Path) -> None:
    # Trainer(model_path=..., config=lora_config).train(data_path=..., epochs=...)
    S.real_lm().save_pretrained(tmp_path / "base")
    data = S.write_jsonl(
        tmp_path / "custom_dataset.json",
        [{"prompt": "Q: " + t[:10], "completion": t[10:]} for t in S.make_texts(16)],
    )
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = Trainer(
        model_path=str(tmp_path / "base"),
        config=lora_config,
        output_dir=str(tmp_path / "out"),
        **OPTS,
    )
    result = trainer.train(data_path=str(data), epochs=2)
    assert result.global_step >= 2 and result.losses[-1] < result.losses[0]
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_qlora_trains_adapters_over_an_int4_base(tmp_path: Path) -> None:
    from ds_quant import Int4WeightOnlyLinear

    model = S.real_lm()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    trainer = Trainer(
        model=model,
        train_dataset=S.make_texts(32),
        lora_config=lora,
        quantization="int4",
        max_steps=30,
        output_dir=str(tmp_path),
        **{**OPTS, "learning_rate": 3e-2},
    )
    int4 = None
    result = trainer.train()
    int4 = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(int4) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not any(p.requires_grad for m in int4 for p in m.parameters())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.2


def test_lora_under_bf16_autocast(tmp_path: Path) -> None:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.make_texts(8),
        lora_config=lora,
        precision="bf16",
        max_steps=20,
        output_dir=str(tmp_path),
        **{**OPTS, "learning_rate": 3e-2},
    )
    losses = trainer.train().losses
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    # Adapters train in float32 under autocast; only the compute dtype is bf16.
    adapters = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
