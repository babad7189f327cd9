"""Smoke test run in a fresh venv holding the ds-model wheel and the leaf wheels it declares.

Builds a tiny V3-shaped model, saves it, loads it back memory-mapped, generates greedily
(single and left-padded batch), runs the paged serving step against the plain forward,
and prints ``ds-model info``.
"""

import importlib.metadata
import tempfile

import ds_model
import torch
from ds_model.cli import main

assert "site-packages" in ds_model.__file__, ds_model.__file__
assert ds_model.__version__ == importlib.metadata.version("ds-model")

with tempfile.TemporaryDirectory() as tmp:
    model = ds_model.from_config("tiny", seed=0)
    model.save_pretrained(tmp)
    loaded = ds_model.AutoModel.from_pretrained(tmp)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    alone = loaded.generate([5, 6, 7], 8)
    assert len(alone) == 8
    assert loaded.generate([[1, 2, 3, 4, 9], [5, 6, 7]], 8)[1] == alone

    runner = ds_model.ModelRunner(loaded, num_blocks=8, block_size=4)
    assert isinstance(runner, ds_model.ModelRunnerProtocol)
    logits = runner.step([[5, 6, 7]], [0], [[3]])
    with torch.no_grad():
        expected = loaded(torch.tensor([[5, 6, 7]])).logits[0, -1]
    assert torch.allclose(logits[0], expected, atol=1e-5)
    assert main(["info", tmp]) == 0

print("ds-model smoke: ok")
