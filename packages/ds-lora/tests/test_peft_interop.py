"""Interop with the real PEFT and transformers on a tiny random Llama (built here, nothing
downloaded): same trainable parameters, adapter files that load both ways with the same
logits, and mixed-adapter batches through a transformers model."""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import ds_lora  # noqa: E402
from ds_lora import LoraConfig  # noqa: E402

CASES = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_dora": dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True),
    "regex_rslora": dict(
        r=3, lora_alpha=6, target_modules=r".*\.mlp\.(up|down)_proj", use_rslora=True
    ),
    "bias_all": dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], bias="all"),
    "bias_lora_only": dict(
        r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], bias="lora_only"
    ),
    "modules_to_save": dict(
        r=2, lora_alpha=2, target_modules=["k_proj", "o_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.fixture(scope="module")
def base_state():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return config, model.state_dict()


def _fresh(base_state):
    config, state = base_state
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()


def _peft_config(kwargs):
    return peft.LoraConfig(lora_dropout=0.0, **kwargs)


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])


@pytest.mark.parametrize("case", list(CASES))
def test_same_trainable_parameters_as_peft(base_state, case):
    ours = ds_lora.get_peft_model(_fresh(base_state), LoraConfig(lora_dropout=0.0, **CASES[case]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_fresh(base_state), _peft_config(CASES[case]))
    ours_names = {n: p.shape for n, p in ours.model.named_parameters() if p.requires_grad}
    theirs_names = {
        n: p.shape for n, p in theirs.base_model.model.named_parameters() if p.requires_grad
    }
    assert ours_names == theirs_names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # Un-trained, both are the base model.
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_here_loads_in_peft(base_state, case, tmp_path):
    ours = ds_lora.get_peft_model(_fresh(base_state), LoraConfig(lora_dropout=0.0, **CASES[case]))
    _randomize(ours, seed=1)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_fresh(base_state), tmp_path)
    with torch.no_grad():
        want = ours(IDS).logits
        got = theirs(IDS).logits
        base = _fresh(base_state)(IDS).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_by_peft_loads_here(base_state, case, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_fresh(base_state), _peft_config(CASES[case]))
        _randomize(theirs, seed=2)
        theirs.save_pretrained(tmp_path)
    ours = ds_lora.LoraModel.from_pretrained(_fresh(base_state), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged) is transformers.LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)


def test_mixed_adapter_batch_through_a_transformers_model(base_state):
    model = _fresh(base_state)
    lora = ds_lora.get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        "a",
    )
    lora.add_adapter(
        "b",
        LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, use_dora=True, target_modules="all-linear"),
    )
    _randomize(lora, seed=3)
    lora.set_adapter("b")
    _randomize(lora, seed=4)
    ids = torch.tensor([[1, 5, 9, 3], [4, 4, 8, 1], [2, 7, 7, 5]])
    rows = ["b", None, "a"]
    with torch.no_grad():
        with lora.adapter_batch(rows):
            mixed = lora(ids).logits
        for i, name in enumerate(rows):
            if name is None:
                with lora.disable_adapter():
                    alone = lora(ids[i : i + 1]).logits
            else:
                lora.set_adapter(name)
                alone = lora(ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
