"""transformers' spellings: ``generate(max_length=, do_sample=, repetition_penalty=,
eos_token_id=, pad_token_id=)``, defaults from ``generation_config.json``, and
``from_pretrained(torch_dtype=, device_map=)``."""

from __future__ import annotations

import json

import ds_model
import pytest
import torch

PROMPT = [5, 17, 42, 7]


@pytest.fixture(scope="module")
def model():
    return ds_model.from_config("tiny", seed=0)


def greedy_reference(model, prompt: list[int], steps: int, penalty: float = 1.0) -> list[int]:
    """Full forward per step, transformers' repetition penalty over prompt + output."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            seen = torch.tensor(sorted(set(ids)))
            chosen = logits[seen]
            logits[seen] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_max_length_counts_the_prompt(model):
    assert model.generate(PROMPT, max_length=9) == model.generate(PROMPT, max_new_tokens=5)
    # max_new_tokens wins when both are given, as in transformers.
    assert len(model.generate(PROMPT, max_new_tokens=2, max_length=50)) <= 2
    with pytest.raises(ValueError, match="max_length=4 counts the prompt"):
        model.generate(PROMPT, max_length=4)


def test_do_sample(model):
    greedy = model.generate(PROMPT, max_new_tokens=6)
    assert model.generate(PROMPT, max_new_tokens=6, do_sample=False, temperature=0.9) == greedy
    sampled = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3)
    assert sampled == model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=3)
    with pytest.raises(ValueError, match="temperature > 0"):
        model.generate(PROMPT, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="do_sample"):
        model.generate(PROMPT, do_sample="yes")


def test_repetition_penalty_matches_transformers_rule(model):
    out = model.generate(PROMPT, max_new_tokens=6, repetition_penalty=3.0)
    assert out == greedy_reference(model, PROMPT, 6, penalty=3.0)
    assert model.generate(PROMPT, max_new_tokens=6) == greedy_reference(model, PROMPT, 6)


def test_eos_and_pad_token_ids(model):
    greedy = model.generate(PROMPT, max_new_tokens=6)
    stop_at = greedy.index(greedy[2])
    assert model.generate(PROMPT, max_new_tokens=6, eos_token_id=greedy[2]) == greedy[:stop_at]
    assert (
        model.generate(PROMPT, max_new_tokens=6, eos_token_id=[511, greedy[2]])
        == (greedy[:stop_at])
    )
    assert model.generate(PROMPT, max_new_tokens=6, pad_token_id=0) == greedy
    with pytest.raises(ValueError, match="eos_token_id=999"):
        model.generate(PROMPT, eos_token_id=999)
    with pytest.raises(ValueError, match="pad_token_id=100000"):
        model.generate(PROMPT, pad_token_id=100_000)
    with pytest.raises(TypeError, match="no_such_keyword"):
        model.generate(PROMPT, no_such_keyword=1)


def test_generation_config_json_gives_the_defaults(model, tmp_path):
    model.generation_config = {"max_new_tokens": 3, "do_sample": False, "temperature": 0.7}
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config = {}
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 3
    loaded = ds_model.from_pretrained(tmp_path)
    assert loaded.generation_config == saved
    greedy = model.generate(PROMPT, max_new_tokens=3)
    assert loaded.generate(PROMPT) == greedy  # 3 tokens, greedy despite the temperature
    assert len(loaded.generate(PROMPT, max_new_tokens=5)) <= 5  # a keyword wins
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ds_model.ConfigError, match=r"generation_config\.json"):
        ds_model.from_pretrained(tmp_path)


def test_from_pretrained_takes_torch_dtype_and_device_map(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = ds_model.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    auto = ds_model.from_pretrained(tmp_path, device_map="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.device.type == expected
    assert ds_model.from_pretrained(tmp_path, device_map="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="device_map as a dict"):
        ds_model.from_pretrained(tmp_path, device_map={"": 0})
    with pytest.raises(ValueError, match="same setting"):
        ds_model.from_pretrained(tmp_path, dtype="float32", torch_dtype="bfloat16")
    with pytest.raises(ValueError, match="device_map="):
        ds_model.from_pretrained(tmp_path, device_map=1.5)
