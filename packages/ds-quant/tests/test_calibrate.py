"""Activation-aware INT4 calibration beats round-to-nearest on held-out data."""

import copy

import pytest
import torch
from ds_quant import (
    Int4WeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8WeightOnlyConfig,
    calibrate,
    quantize_,
)
from torch import nn


class TinyLM(nn.Module):
    """Embedding with a few large-magnitude channels (as trained LLM activations have),
    an MLP block and an LM head: (batch, seq) token ids -> (batch, seq, vocab) logits."""

    def __init__(self, vocab=256, dim=128, hidden=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.embed.weight[:, :6] *= 20
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


def output_error(model, reference, ids):
    with torch.no_grad():
        return float((model(ids) - reference(ids)).pow(2).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_int4_beats_rtn_on_held_out_tokens(seed):
    torch.manual_seed(seed)
    model = TinyLM()
    calibration = [torch.randint(0, 256, (4, 32)) for _ in range(4)]
    held_out = torch.randint(0, 256, (8, 32))
    config = Int4WeightOnlyConfig(group_size=32)
    rtn = quantize_(copy.deepcopy(model), config)
    awq = calibrate(copy.deepcopy(model), config, calibration, n_grid=10)
    assert all(isinstance(m, Int4WeightOnlyLinear) for m in (awq.up, awq.down, awq.head))
    assert any(m.input_scale is not None for m in (awq.up, awq.down, awq.head))
    assert output_error(awq, model, held_out) < 0.9 * output_error(rtn, model, held_out)


def test_calibrated_layer_dequantize_matches_its_forward():
    torch.manual_seed(0)
    model = calibrate(
        TinyLM(), Int4WeightOnlyConfig(group_size=32), [torch.randint(0, 256, (2, 16))]
    )
    x = torch.randn(3, 128) * 5
    with torch.no_grad():
        want = x @ model.up.dequantize().T + model.up.bias
        # The packed CPU kernel takes bfloat16 activations (test_cpu_kernels bounds it).
        assert float((model.up(x) - want).abs().mean() / want.abs().mean()) < 5e-3
        model.up.backend = "reference"
        torch.testing.assert_close(model.up(x), want)


def test_forward_fn_and_filter_fn():
    torch.manual_seed(0)
    model = TinyLM()
    calls = []

    def forward_fn(m, batch):
        calls.append(batch["ids"].shape)
        return m(batch["ids"])

    calibrate(
        model,
        Int4WeightOnlyConfig(group_size=32),
        [{"ids": torch.randint(0, 256, (1, 8))}],
        lambda m, n: isinstance(m, nn.Linear) and n != "head",
        forward_fn=forward_fn,
        n_grid=2,
    )
    assert calls == [(1, 8)]
    assert isinstance(model.up, Int4WeightOnlyLinear) and isinstance(model.head, nn.Linear)


def test_bad_calibration_input():
    with pytest.raises(TypeError, match=r"Int4WeightOnlyConfig"):
        calibrate(TinyLM(), Int8WeightOnlyConfig(), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"calibration_batches is empty"):
        calibrate(TinyLM(), Int4WeightOnlyConfig(group_size=32), [])
    with pytest.raises(ValueError, match=r"n_grid must be a positive int"):
        calibrate(TinyLM(), Int4WeightOnlyConfig(), [torch.zeros(1, 4, dtype=torch.long)], n_grid=0)
    with pytest.raises(TypeError, match=r"only nn.Linear"):
        calibrate(TinyLM(), Int4WeightOnlyConfig(), [], lambda m, n: n == "embed")
