"""Start-up options that ds-serve reaches through ds-model: quantization and LoRA adapters.

Served with the real ``openai`` client on a live server on 127.0.0.1 and compared with
``ds_model.generate`` on the same model (fp32; quantized or with the adapter active), so
neither option may change what a request gets beyond what the option itself means.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import ds_lora
import ds_model
import openai
import pytest
import torch
from ds_serve import create_app
from serve_live import LiveServer

from conftest import greedy_reference

# Linear layers of the tiny MLA + MoE model (kv_b_proj: see test_an_all_linear_adapter...).
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj"]
TARGETS += ["down_proj", "lm_head"]
PROMPTS = ["def add(a, b):\n    return", "class Stack:\n    def push(self, x):"]
MAX_TOKENS = 10
QUANT_METHODS = {"int8": "int8_weight_only", "int4": "int4_weight_only", "fp8": "fp8_block"}


def write_adapter(checkpoint, directory, seed: int, targets=TARGETS, **config):
    """A PEFT-format adapter written by ds-lora, with non-zero B (a fresh LoRA is a no-op).

    Both A and B come from ``seed``: A's default init draws from the global RNG, whose state
    depends on which tests ran before, and an unseeded adapter can put two tokens within
    float noise of each other, so that the served and the reference greedy outputs differ
    in one run in many (seen in CI)."""
    model = ds_model.from_pretrained(checkpoint, dtype="float32")
    lora = ds_lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **config)
    ds_lora.inject(model, lora, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    scale = {"lora_A": 0.1, "lora_B": 0.3}
    with torch.no_grad():
        for name, param in model.named_parameters():
            for kind, std in scale.items():
                if kind in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
    return ds_lora.save_adapter(model, directory, adapter_name="default")


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_adapter(checkpoint, root / name, seed)
        for seed, name in enumerate(["sql", "poet"])
    }


@pytest.fixture(scope="module")
def expected(checkpoint, adapters, reference_model):
    """Greedy (text, finish_reason) per (model name, prompt) from ds-model alone, each
    adapter loaded active on its own copy of the checkpoint."""
    models = {"base": reference_model}
    for name, path in adapters.items():
        models[name] = ds_model.from_pretrained(checkpoint, dtype="float32", adapter=path)
    return {
        (name, prompt): greedy_reference(model, prompt, MAX_TOKENS)
        for name, model in models.items()
        for prompt in PROMPTS
    }


def complete(client, model: str, prompt: str) -> tuple[str, str]:
    choice = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    ).choices[0]
    return choice.text, choice.finish_reason


def record_steps(engine, wait_for: int = 0) -> list:
    """Wrap the runner's step to record each step's ``adapters``; the first step waits until
    ``wait_for`` requests are in flight, so the requests of a test share later batches."""
    step, seen = engine.runner.step, []

    def recording_step(*args, **kwargs):
        if not seen:
            deadline = time.monotonic() + 30
            while engine.num_in_flight() < wait_for and time.monotonic() < deadline:
                time.sleep(0.005)
        seen.append(kwargs.get("adapters"))
        return step(*args, **kwargs)

    engine.runner.step = recording_step
    return seen


# ---- quantization --------------------------------------------------------------------


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"quantization must be one of .*'int3'"):
        create_app(checkpoint, num_blocks=16, quantization="int3")


@pytest.mark.parametrize("name", ["int8", "int4", "w8a8", "fp8"])
def test_quantized_model_serves_and_matches_ds_model(checkpoint, name):
    app = create_app(
        checkpoint, num_blocks=64, dtype="float32", quantization=name, served_model_name="q"
    )
    served = app.engine.runner.model
    quantized = [n for n, m in served.named_modules() if hasattr(m, "dequantize")]
    assert any(n.endswith("mlp.gate_proj") for n in quantized), quantized
    # Weight-only recipes quantize the head too (INT8), W8A8 and FP8 keep it float.
    assert any(n.endswith("lm_head") for n in quantized) == (name in ("int8", "int4"))
    reference = ds_model.from_pretrained(checkpoint, dtype="float32", quantization=name)
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        for prompt in PROMPTS:
            assert complete(client, "q", prompt) == greedy_reference(reference, prompt, MAX_TOKENS)


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_a_quantized_save_serves_as_saved(checkpoint, tmp_path, name):
    """`ds-serve DIR` on a model saved quantized (ds-quant's format): served as saved,
    with the greedy output of the model that was saved; another --quantization is refused."""
    quantized = ds_model.from_pretrained(checkpoint, dtype="float32", quantization=name)
    saved = tmp_path / "quantized"
    quantized.save_pretrained(saved)
    app = create_app(saved, num_blocks=64, dtype="float32")
    served = app.engine.runner.model
    assert served.config.extra["quantization_config"]["method"] == (QUANT_METHODS[name])
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        got = [complete(client, "quantized", prompt) for prompt in PROMPTS]
    assert got == [greedy_reference(quantized, prompt, MAX_TOKENS) for prompt in PROMPTS]
    other = "w8a8"
    with pytest.raises(ValueError, match=rf"quantization='{other}' conflicts with .*{saved}"):
        create_app(saved, num_blocks=16, quantization=other)


# ---- LoRA adapters ---------------------------------------------------------------------


def test_adapters_are_listed_selected_by_model_and_equal_ds_model(checkpoint, adapters, expected):
    app = create_app(
        checkpoint,
        num_blocks=64,
        block_size=4,
        dtype="float32",
        lora=adapters,
        served_model_name="base",
    )
    seen = record_steps(app.engine)
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        cards = client.models.list().data
        assert [m.id for m in cards] == ["base", "sql", "poet"]
        assert [getattr(m, "parent", None) for m in cards] == [None, "base", "base"]
        alone = {
            (name, prompt): complete(client, name, prompt)
            for name in ("base", "sql", "poet")
            for prompt in PROMPTS
        }
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model="sql", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        )
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="nope", prompt="x", max_tokens=1)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
    assert alone == expected
    # The adapters are real: each changes the greedy output of both prompts, differently.
    for prompt in PROMPTS:
        outputs = [alone[(name, prompt)][0] for name in ("base", "sql", "poet")]
        assert len(set(outputs)) == 3, outputs
    assert streamed == alone[("sql", PROMPTS[0])][0]
    assert missing.value.code == "model_not_found"
    assert "['base', 'sql', 'poet']" in missing.value.message
    # Base requests run with an explicit None row: ds-lora would otherwise apply the
    # last loaded adapter to them.
    assert all(a is not None for a in seen)


def test_a_batch_mixing_base_and_adapters_gives_each_its_output_alone(
    checkpoint, adapters, expected
):
    # block_size 4: the identical prompts of different models fill prefix-cache blocks, which
    # the scheduler must key by adapter (an adapter changes the KV of the same tokens).
    app = create_app(
        checkpoint,
        num_blocks=64,
        block_size=4,
        dtype="float32",
        lora=adapters,
        served_model_name="base",
    )
    jobs = [(name, prompt) for prompt in PROMPTS for name in ("base", "sql", "poet")] * 2
    seen = record_steps(app.engine, wait_for=len(jobs))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: complete(client, *job), jobs))
    assert got == [expected[job] for job in jobs]
    mixed = [a for a in seen if None in a and {"sql", "poet"} <= set(a)]
    assert mixed, f"no step mixed the base and both adapters: {seen}"


def test_adapters_on_a_quantized_model_match_ds_model(checkpoint, adapters):
    app = create_app(
        checkpoint,
        num_blocks=64,
        dtype="float32",
        quantization="int8",
        lora={"sql": adapters["sql"]},
        served_model_name="base",
    )
    reference = ds_model.from_pretrained(
        checkpoint, dtype="float32", quantization="int8", adapter=adapters["sql"]
    )
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        got = complete(client, "sql", PROMPTS[0])
    assert got == greedy_reference(reference, PROMPTS[0], MAX_TOKENS)


def test_an_all_linear_adapter_is_served_exactly(checkpoint, tmp_path):
    """PEFT's usual ``all-linear`` also wraps MLA's kv_b_proj, which ds-model's runner applies
    to every cached context token, not to the step's new tokens: served all the same, with
    the adapter's own greedy output, next to requests for the base model."""
    path = write_adapter(checkpoint, tmp_path / "all", seed=7, targets="all-linear")
    app = create_app(
        checkpoint, num_blocks=64, dtype="float32", lora={"all": path}, served_model_name="base"
    )
    jobs = [("all", PROMPTS[0]), ("base", PROMPTS[1]), ("all", PROMPTS[1])]
    seen = record_steps(app.engine, wait_for=len(jobs))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: complete(client, *job), jobs))
    tuned = ds_model.from_pretrained(checkpoint, dtype="float32", adapter=path)
    base = ds_model.from_pretrained(checkpoint, dtype="float32")
    models = {"all": tuned, "base": base}
    assert got == [greedy_reference(models[name], prompt, MAX_TOKENS) for name, prompt in jobs]
    assert [a for a in seen if None in a and "all" in a], f"no step mixed them: {seen}"


def test_an_adapter_with_modules_to_save_is_refused_at_start_up(checkpoint, tmp_path):
    # A fully trained module copy cannot be mixed per row (ds-lora refuses it in a batch).
    path = write_adapter(
        checkpoint, tmp_path / "full", seed=3, targets=["o_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(ValueError, match=r"--lora full: .*mixed batch"):
        create_app(checkpoint, num_blocks=16, dtype="float32", lora={"full": path})


def test_adapter_names_and_directories_are_checked(checkpoint, adapters, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        create_app(checkpoint, num_blocks=16, lora={"a": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="served model's own name"):
        create_app(
            checkpoint, num_blocks=16, lora={"base": adapters["sql"]}, served_model_name="base"
        )
    with pytest.raises(ValueError, match="adapter name 'a b'"):
        create_app(checkpoint, num_blocks=16, lora={"a b": adapters["sql"]})


def test_the_engine_refuses_an_adapter_it_has_not_loaded(checkpoint):
    import asyncio

    from ds_serve.sampling import SamplingParams

    app = create_app(checkpoint, num_blocks=16, dtype="float32")

    async def submit():
        app.engine.start()
        try:
            app.engine.submit([1, 2, 3], SamplingParams(max_tokens=1), adapter="sql")
        finally:
            app.engine.shutdown()

    with pytest.raises(ValueError, match=r"adapter='sql' is not loaded"):
        asyncio.run(submit())


# ---- train, then serve ---------------------------------------------------------------


def test_a_lora_fine_tune_output_serves_as_it_is(checkpoint, tmp_path):
    """`ds-serve OUTPUT_DIR` on a LoRA run's output directory: its newest checkpoint, an
    adapter folder naming its base, served as the base with the trained adapter."""
    from ds_model.training import Trainer

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(f'{{"text": "def f{i}(x):\\n    return x + {i}\\n"}}\n' for i in range(8))
    )
    out = tmp_path / "lora-run"
    lora = ds_lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    Trainer(
        model_path=str(checkpoint),
        config=lora,
        output_dir=str(out),
        max_steps=3,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        progress_bar=False,
        plot=False,
    ).train(data_path=str(data))
    final = out / "checkpoint-3"
    assert json.loads((final / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(checkpoint.resolve())
    reference = ds_model.from_pretrained(checkpoint, dtype="float32", adapter=final)
    base = ds_model.from_pretrained(checkpoint, dtype="float32")
    app = create_app(out, num_blocks=64, dtype="float32")
    assert app.engine.model_name == "lora-run"
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        served = [complete(client, "lora-run", prompt) for prompt in PROMPTS]
    assert served == [greedy_reference(reference, p, MAX_TOKENS) for p in PROMPTS]
    assert served != [greedy_reference(base, p, MAX_TOKENS) for p in PROMPTS]


def test_an_adapter_folder_without_its_base_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "nowhere"}')
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path='nowhere'"):
        create_app(tmp_path, num_blocks=16)
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ValueError, match="base_model_name_or_path=None"):
        create_app(tmp_path, num_blocks=16)


def test_a_full_fine_tune_output_serves_its_newest_checkpoint(checkpoint, tmp_path):
    from ds_model.training import Trainer

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "x = {i}\\n"}}\n' for i in range(8)))
    out = tmp_path / "full-run"
    Trainer(
        model_path=str(checkpoint),
        output_dir=str(out),
        max_steps=2,
        save_steps=1,
        save_total_limit=None,
        per_device_train_batch_size=4,
        progress_bar=False,
        plot=False,
    ).train(data_path=str(data))
    reference = ds_model.from_pretrained(out / "checkpoint-2", dtype="float32")
    app = create_app(out, num_blocks=64, dtype="float32")
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        served = [complete(client, "full-run", prompt) for prompt in PROMPTS]
    assert served == [greedy_reference(reference, p, MAX_TOKENS) for p in PROMPTS]
