"""Several named adapters on one model: add, set active, disable, delete, unload; and a
stateful test that the model always computes base + the active adapter."""

import ds_lora
import pytest
import torch
from ds_lora import LoraConfig, LoraLinear
from ds_lora_testing import TinyModel, randomize_adapters
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn


def _model():
    torch.manual_seed(0)
    return TinyModel(dim=16, hidden=12, layers=2)


def test_add_set_disable_delete():
    model = _model()
    x = torch.randn(2, 3, 16)
    base_out = model(x)
    lora = ds_lora.get_peft_model(model, LoraConfig(r=2, lora_dropout=0.0))
    lora.add_adapter("other", LoraConfig(r=3, lora_dropout=0.0, target_modules=["up_proj"]))
    assert lora.adapter_names == ["default", "other"]
    assert lora.active_adapter == "default"
    randomize_adapters(lora, seed=1)
    out_default = lora(x)
    lora.set_adapter("other")
    out_other = lora(x)
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_other, base_out)
    with lora.disable_adapter():
        torch.testing.assert_close(lora(x), base_out)
    torch.testing.assert_close(lora(x), out_other)
    lora.delete_adapter("other")
    assert lora.adapter_names == ["default"] and lora.active_adapter == "default"
    assert not any(isinstance(m, LoraLinear) for m in model.layers[0].up_proj.modules())
    torch.testing.assert_close(lora(x), out_default)
    with pytest.raises(ds_lora.AdapterNotFoundError, match=r"'other'.*\['default'\]"):
        lora.set_adapter("other")
    plain = lora.unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), base_out)


def test_second_adapter_is_added_frozen_until_activated():
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2), "a")
    ds_lora.inject(model, LoraConfig(r=2), "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    ds_lora.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)


def test_print_trainable_parameters(capsys):
    model = _model()
    total_base = sum(p.numel() for p in model.parameters())
    lora = ds_lora.get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.print_trainable_parameters()
    expected = 2 * (2 * 16 + 16 * 2)  # two layers, A (2, 16) + B (16, 2)
    text = capsys.readouterr().out
    assert f"trainable params: {expected:,d}" in text
    assert f"all params: {total_base + expected:,d}" in text


def test_modules_to_save_trains_a_copy_and_unloads_to_it():
    model = _model()
    x = torch.randn(2, 3, 16)
    lora = ds_lora.get_peft_model(
        model, LoraConfig(r=2, lora_dropout=0.0, modules_to_save=["lm_head"])
    )
    wrapper = model.lm_head
    assert isinstance(wrapper, ds_lora.ModulesToSaveWrapper)
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    out = lora(x)
    with lora.disable_adapter():
        assert not torch.allclose(lora(x), out)
    plain = lora.merge_and_unload()
    assert isinstance(plain.lm_head, nn.Linear)
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)


def test_disable_refused_while_merged():
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2))
    ds_lora.merge_adapter(model)
    with pytest.raises(ds_lora.AdapterStateError, match="unmerge"):
        with ds_lora.disable_adapters(model):
            pass


class AdapterMachine(RuleBasedStateMachine):
    """Random add / activate / delete / merge / unmerge sequences; the model must always
    equal its base plus the active adapter's delta, computed independently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyModel(dim=8, hidden=8, layers=1, vocab=5)
        self.x = torch.randn(2, 3, 8)
        self.base_weights = {
            n: m.weight.detach().clone()
            for n, m in self.model.named_modules()
            if isinstance(m, nn.Linear)
        }
        self.base_out = self.model(self.x).detach()
        self.names: list[str] = []
        self.counter = 0
        self.merged = False
        self.expected = TinyModel(dim=8, hidden=8, layers=1, vocab=5)

    @rule(
        r=st.integers(1, 4),
        pattern=st.sampled_from([["q_proj"], ["v_proj", "up_proj"], "all-linear"]),
        dora=st.booleans(),
    )
    def add(self, r, pattern, dora):
        name = f"n{self.counter}"
        self.counter += 1
        ds_lora.inject(
            self.model,
            LoraConfig(r=r, lora_dropout=0.0, target_modules=pattern, use_dora=dora),
            name,
        )
        randomize_adapters(self.model, seed=self.counter, only=name)
        self.names.append(name)

    @precondition(lambda self: self.names and not self.merged)
    @rule(data=st.data())
    def activate(self, data):
        ds_lora.set_adapter(self.model, data.draw(st.sampled_from(self.names)))

    @precondition(lambda self: self.names and not self.merged)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(self.names))
        ds_lora.delete_adapter(self.model, name)
        self.names.remove(name)

    @precondition(lambda self: self.names and not self.merged)
    @rule()
    def merge(self):
        ds_lora.merge_adapter(self.model)
        self.merged = True

    @precondition(lambda self: self.merged)
    @rule()
    def unmerge(self):
        ds_lora.unmerge_adapter(self.model)
        self.merged = False

    @invariant()
    def computes_base_plus_active(self):
        assert ds_lora.adapter_names(self.model) == self.names
        active = ds_lora.active_adapter(self.model)
        assert (active is None) == (not self.names)
        expected = self.expected
        expected.load_state_dict(self._effective_state(active))
        with torch.no_grad():
            torch.testing.assert_close(self.model(self.x), expected(self.x), atol=1e-5, rtol=1e-5)
        if not self.merged:
            for name, module in self.model.named_modules():
                if isinstance(module, LoraLinear):
                    torch.testing.assert_close(
                        module.base_layer.weight, self.base_weights[name], atol=1e-6, rtol=0
                    )

    def _effective_state(self, active):
        state = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLinear):
                w = self.base_weights[name]
                if active in module.lora_A:
                    a = module.lora_A[active].weight
                    b = module.lora_B[active].weight
                    w = w + module.scaling[active] * b @ a
                    if active in module.lora_magnitude_vector:
                        m = module.lora_magnitude_vector[active].weight
                        w = (m / w.norm(dim=1)).unsqueeze(1) * w
                state[f"{name}.weight"] = w.detach()
                if module.base_layer.bias is not None:
                    state[f"{name}.bias"] = module.base_layer.bias.detach()
        for key, value in self.model.state_dict().items():
            if "lora_" in key or "base_layer" in key:
                continue
            state.setdefault(key, value)
        return state


AdapterMachine.TestCase.settings = settings(max_examples=8, stateful_step_count=6)
test_adapter_state_machine = AdapterMachine.TestCase
