"""Start-up options that ds-serve reaches through ds-model: quantization and LoRA adapters.

Both need ds-model API that is named in docs/ds-serve.md (``from_pretrained(quantization=
"int8")``, ``load_adapter(model, path, adapter_name=)``, ``ModelRunner.step(adapters=)``).
Until the installed ds-model offers it, start-up must refuse with an error naming what
is missing, and the serving tests below skip with that message.
"""

from __future__ import annotations

import openai
import pytest
from ds_serve import create_app
from serve_live import LiveServer


def start_or_skip(checkpoint, **options):
    try:
        return create_app(checkpoint, num_blocks=64, dtype="float32", **options)
    except ValueError as exc:
        if "installed ds-model" in str(exc):
            pytest.skip(f"needs ds-model support: {exc}")
        raise


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ValueError, match="quantization must be one of"):
        create_app(checkpoint, num_blocks=16, quantization="int3")


def test_missing_adapter_directory_is_named(checkpoint, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=r"nope|installed ds-model"):
        create_app(checkpoint, num_blocks=16, lora={"a": str(tmp_path / "nope")})


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_model_serves_and_matches_ds_model(checkpoint, name):
    import ds_model

    app = start_or_skip(checkpoint, quantization=name, served_model_name="q")
    reference = ds_model.from_pretrained(checkpoint, dtype="float32", quantization=name)
    ids = reference.tokenizer.encode("def add(a, b):")
    expected = reference.tokenizer.decode(ds_model.generate(reference, ids, max_new_tokens=8))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        text = (
            client.completions.create(
                model="q", prompt="def add(a, b):", max_tokens=8, temperature=0
            )
            .choices[0]
            .text
        )
    assert text.strip() == expected.strip()


def test_adapter_selection_by_model_name(checkpoint, tmp_path):
    import ds_lora
    import ds_model

    base = ds_model.from_pretrained(checkpoint, dtype="float32")
    config = ds_lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init="gaussian")
    ds_lora.get_peft_model(base, config, adapter_name="default")
    ds_lora.save_adapter(base, tmp_path / "sql", adapter_name="default")
    app = start_or_skip(checkpoint, lora={"sql": str(tmp_path / "sql")}, served_model_name="base")
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "sql"]
        kwargs = dict(prompt="def add(a, b):", max_tokens=8, temperature=0)
        plain = client.completions.create(model="base", **kwargs).choices[0].text
        adapted = client.completions.create(model="sql", **kwargs).choices[0].text
    assert plain != adapted  # a gaussian-initialised adapter changes the output
