"""LoraLinear and injection on float layers: no-op at init, exact merge, gradients,
mixed-adapter batches equal to one adapter per row."""

import copy

import ds_lora
import pytest
import torch
from ds_lora import LoraConfig, LoraLinear
from ds_lora.mixed import (
    choose_strategy,
    mixed_lora_delta,
    mixed_lora_delta_reference,
    mixed_lora_forward,
    plan_rows,
    stack_adapters,
)
from ds_lora_testing import TinyModel, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

TARGETS = st.sampled_from(
    [
        ["q_proj"],
        ["q_proj", "v_proj"],
        ["up_proj", "down_proj"],
        "all-linear",
        r"layers\.1\..*_proj",
        r".*\.(q|v)_proj",
    ]
)


def _lora_config(draw, use_dora=None):
    return LoraConfig(
        r=draw(st.integers(1, 6)),
        lora_alpha=draw(st.sampled_from([1, 4, 8.0, 16])),
        target_modules=draw(TARGETS),
        lora_dropout=0.0,
        use_rslora=draw(st.booleans()),
        use_dora=draw(st.booleans()) if use_dora is None else use_dora,
        init=draw(st.sampled_from(["default", "gaussian"])),
    )


@st.composite
def model_and_configs(draw, max_adapters=3):
    dim = draw(st.sampled_from([8, 16]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = TinyModel(
        dim=dim, hidden=draw(st.sampled_from([8, 12])), layers=2, bias=draw(st.booleans())
    )
    n = draw(st.integers(1, max_adapters))
    return model, [_lora_config(draw) for _ in range(n)]


def _inputs(model, batch=3, seq=4, seed=0):
    dim = model.layers[0].q_proj.in_features
    return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=15)
@given(model_and_configs())
def test_untrained_adapters_change_nothing(model_configs):
    model, configs = model_configs
    x = _inputs(model)
    expected = model(x)
    for i, config in enumerate(configs):
        ds_lora.inject(model, config, f"a{i}")
        ds_lora.set_adapter(model, f"a{i}")
        assert torch.equal(model(x), expected)


@settings(max_examples=15)
@given(model_and_configs(max_adapters=2))
def test_merge_unmerge_exact(model_configs):
    model, configs = model_configs
    x = _inputs(model)
    for i, config in enumerate(configs):
        ds_lora.inject(model, config, f"a{i}")
    randomize_adapters(model, seed=1)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for name in ds_lora.adapter_names(model):
        ds_lora.set_adapter(model, name)
        unmerged = model(x)
        ds_lora.merge_adapter(model)
        # 1e-5 absolute, plus float32 rounding relative to outputs that reach O(10) here.
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        ds_lora.unmerge_adapter(model)
        for n, p in model.named_parameters():
            if "base_layer" in n:
                torch.testing.assert_close(p, original[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_several_adapters_stacks_them():
    torch.manual_seed(0)
    model = TinyModel()
    x = _inputs(model)
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.0), "a")
    ds_lora.inject(model, LoraConfig(r=3, lora_dropout=0.0, target_modules=["q_proj"]), "b")
    randomize_adapters(model, seed=3)
    base = model.layers[0].q_proj.base_layer.weight.detach().clone()
    ds_lora.merge_adapter(model, ["a", "b"])
    layer = model.layers[0].q_proj
    expected = base + layer.delta_weight("a") + layer.delta_weight("b")
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)
    ds_lora.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, base, atol=1e-6, rtol=0)
    del x


@settings(max_examples=15)
@given(model_and_configs(max_adapters=2), st.sampled_from(["none", "all", "lora_only"]))
def test_gradient_flows_only_to_the_active_adapter(model_configs, bias):
    model, configs = model_configs
    for i, config in enumerate(configs):
        ds_lora.inject(model, LoraConfig(**{**config.__dict__, "bias": bias}), f"a{i}")
    randomize_adapters(model, seed=2)
    active = ds_lora.active_adapter(model)
    assert active == "a0"
    model(_inputs(model)).square().mean().backward()
    carriers = {
        n for n, m in model.named_modules() if isinstance(m, LoraLinear) and active in m.lora_A
    }
    for name, param in model.named_parameters():
        is_active_lora = "lora_" in name and f".{active}." in name
        wrapped_bias = (
            name.endswith("base_layer.bias")
            and bias != "none"
            and (bias == "all" or name.removesuffix(".base_layer.bias") in carriers)
        )
        base_bias = name.endswith(".bias") and bias == "all" and "lora_" not in name
        if is_active_lora or wrapped_bias or base_bias:
            assert param.requires_grad, name
            assert param.grad is not None, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name


def test_default_init_is_kaiming_uniform_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 32))
    layer.add_adapter("x", LoraConfig(r=8))
    a = layer.lora_A["x"].weight
    bound = 1 / 64**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B["x"].weight) == 0
    layer.add_adapter("g", LoraConfig(r=8, init="gaussian"))
    assert 0.08 < layer.lora_A["g"].weight.std() < 0.17  # std 1/r


def test_lora_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoraLinear(base)
    config = LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0)
    layer.add_adapter("x", config)
    layer.active_adapter = "x"
    randomize_adapters(layer, seed=5)
    x = torch.randn(5, 12)
    a, b = layer.lora_A["x"].weight, layer.lora_B["x"].weight
    expected = base(x) + (x @ a.T @ b.T) * 1.5
    torch.testing.assert_close(layer(x), expected)


def test_dora_forward_matches_weight_decomposition():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoraLinear(base)
    layer.add_adapter("x", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True))
    layer.active_adapter = "x"
    randomize_adapters(layer, seed=6)
    x = torch.randn(5, 12)
    updated = base.weight + 2.0 * layer.lora_B["x"].weight @ layer.lora_A["x"].weight
    m = layer.lora_magnitude_vector["x"].weight
    w = (m / updated.norm(dim=1)).unsqueeze(1) * updated
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, atol=1e-5, rtol=1e-5)


@st.composite
def mixed_case(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = TinyModel(dim=16, hidden=12, layers=2, bias=draw(st.booleans()))
    n = draw(st.integers(1, 4))
    configs = [_lora_config(draw) for _ in range(n)]
    names = [f"a{i}" for i in range(n)]
    rows = draw(st.lists(st.sampled_from([*names, None]), min_size=1, max_size=6))
    return model, configs, rows


@settings(max_examples=20)
@given(mixed_case())
def test_mixed_batch_equals_each_row_alone(case):
    model, configs, rows = case
    for i, config in enumerate(configs):
        ds_lora.inject(model, config, f"a{i}")
    randomize_adapters(model, seed=7)
    model.eval()
    x = _inputs(model, batch=len(rows), seq=3, seed=1)
    assert_mixed_equals_alone(model, x, rows, atol=2e-5, rtol=1e-5)
    # Leaving the block restores the single active adapter.
    ds_lora.set_adapter(model, "a0")
    with torch.no_grad():
        single = model(x)
    with ds_lora.adapter_batch(model, ["a0"] * len(rows)):
        torch.testing.assert_close(model(x), single, atol=2e-5, rtol=1e-5)


def test_mixed_delta_matches_row_loop_reference():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    for i, (r, dora) in enumerate([(2, False), (5, True), (3, False)]):
        layer.add_adapter(f"a{i}", LoraConfig(r=r, lora_dropout=0.0, use_dora=dora))
    randomize_adapters(layer, seed=8)
    names = ("a0", "a1", "a2", "absent")
    stacked = stack_adapters(layer, names)
    row_index = torch.tensor([0, 4, 1, 2, 3, 1, 0])
    x = torch.randn(7, 5, 16)
    base = layer.base_layer(x)
    got = mixed_lora_delta(x, base, stacked, row_index, layer.base_layer.bias)
    want = mixed_lora_delta_reference(x, base, stacked, row_index, layer.base_layer.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[4]) == 0


def test_mixed_batch_refuses_bad_use():
    model = TinyModel()
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.1), "a")
    x = _inputs(model, batch=2)
    with pytest.raises(ds_lora.AdapterStateError, match="training mode"):
        with ds_lora.adapter_batch(model, ["a", None]):
            pass
    model.eval()
    with pytest.raises(ds_lora.AdapterNotFoundError, match="'zz'"):
        with ds_lora.adapter_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="3 row adapters"):
        with ds_lora.adapter_batch(model, ["a", None, "a"]):
            model(x)
    ds_lora.merge_adapter(model)
    with pytest.raises(ds_lora.AdapterStateError, match="merged"):
        with ds_lora.adapter_batch(model, ["a", None]):
            model(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mixed_batch_and_merge(dtype):
    torch.manual_seed(0)
    model = TinyModel(dim=64, hidden=96, layers=2).to("cuda", dtype).eval()
    for i in range(4):
        ds_lora.inject(
            model,
            LoraConfig(r=4 + i, lora_dropout=0.0, use_dora=i == 3, target_modules="all-linear"),
            f"a{i}",
        )
    randomize_adapters(model, seed=9)
    x = torch.randn(6, 5, 64, device="cuda", dtype=dtype)
    rows = ["a0", "a1", None, "a2", "a3", "a0"]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    with torch.no_grad():
        if dtype == torch.float32:
            assert_mixed_equals_alone(model, x, rows, **tol)
        else:
            assert_mixed_as_accurate_as_alone(model, x, rows)
        ds_lora.set_adapter(model, "a1")
        unmerged = model(x)
        ds_lora.merge_adapter(model)
        torch.testing.assert_close(model(x), unmerged, **tol)


@settings(max_examples=15)
@given(
    tokens=st.integers(1, 12),
    n=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_mixed_batch_on_packed_tokens_picks_an_adapter_per_token(tokens, n, seed):
    """Packed (tokens, hidden) inputs, as a serving runner feeds them: one entry per token."""
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(16, 12))
    names = [f"a{i}" for i in range(n)]
    for i, name in enumerate(names):
        layer.add_adapter(name, LoraConfig(r=1 + i, lora_dropout=0.0, use_dora=i == 1))
    randomize_adapters(layer, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=gen)
    slots = torch.randint(0, n + 1, (tokens,), generator=gen)
    layer.set_row_adapters(tuple(names), slots)
    mixed = layer(x)
    layer.set_row_adapters((), None)
    for t in range(tokens):
        slot = int(slots[t])
        layer.active_adapter = names[slot] if slot < n else None
        torch.testing.assert_close(mixed[t : t + 1], layer(x[t : t + 1]), atol=1e-5, rtol=1e-5)


@settings(max_examples=25)
@given(
    rows=st.integers(1, 9),
    tokens=st.sampled_from([(), (1,), (3,), (2, 2)]),
    n=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_gathered_and_grouped_paths_equal_the_row_loop(rows, tokens, n, seed):
    """Both ways of computing a mixed batch (per-row gather, per-adapter groups) give the
    row-by-row reference, for any grouping of rows, with and without a base bias."""
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(16, 12, bias=seed % 2 == 0))
    names = (*(f"a{i}" for i in range(n)), "absent")
    for i in range(n):
        layer.add_adapter(f"a{i}", LoraConfig(r=1 + i, lora_dropout=0.0))
    randomize_adapters(layer, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *tokens, 16, generator=gen)
    row_index = torch.randint(0, len(names) + 1, (rows,), generator=gen)
    plan = plan_rows(row_index, len(names))
    assert sorted(torch.cat([m for _, m in plan.groups] or [torch.empty(0)]).tolist()) == [
        i for i in range(rows) if int(row_index[i]) != len(names)
    ]
    stacked = stack_adapters(layer, names)
    with torch.no_grad():
        base = layer.base_layer(x)
        want = base + mixed_lora_delta_reference(x, base, stacked, row_index, layer.base_layer.bias)
        for strategy in ("gathered", "grouped", None):
            got = mixed_lora_forward(x, base, stacked, plan, layer.base_layer.bias, strategy)
            assert got.shape == base.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_strategy_choice_and_bad_strategy():
    layer = LoraLinear(nn.Linear(64, 64))
    layer.add_adapter("a", LoraConfig(r=8, lora_dropout=0.0))
    layer.add_adapter("d", LoraConfig(r=8, lora_dropout=0.0, use_dora=True))
    lora_only = stack_adapters(layer, ("a",))
    with_dora = stack_adapters(layer, ("a", "d"))
    many = torch.zeros(4096, 64)  # packed tokens sharing one adapter: gathering copies A, B
    few = torch.zeros(4, 64)
    assert choose_strategy(many, lora_only, plan_rows(torch.zeros(4096).long(), 1)) == "grouped"
    assert choose_strategy(few, lora_only, plan_rows(torch.zeros(4).long(), 1)) == "gathered"
    assert choose_strategy(many, with_dora, plan_rows(torch.zeros(4096).long(), 2)) == "gathered"
    plan = plan_rows(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="strategy='loop'"):
        mixed_lora_forward(few[:2], few[:2], lora_only, plan, None, "loop")
    with pytest.raises(ValueError, match="DoRA"):
        mixed_lora_forward(few[:2], few[:2], with_dora, plan, None, "grouped")


def test_mixed_stack_is_rebuilt_after_an_optimizer_step():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("a", LoraConfig(r=2, lora_dropout=0.0))
    randomize_adapters(layer, seed=3)
    x = torch.randn(3, 8)
    layer.set_row_adapters(("a",), torch.tensor([0, 0, 1]))
    before = layer(x).detach()
    with torch.no_grad():
        layer.lora_B["a"].weight.add_(1.0)  # in place, as an optimizer step does
    after = layer(x).detach()
    layer.set_row_adapters((), None)
    layer.active_adapter = "a"
    torch.testing.assert_close(after[:2], layer(x[:2]).detach())
    assert not torch.allclose(before[:2], after[:2])
    torch.testing.assert_close(after[2], layer.base_layer(x[2]).detach())


def test_rows_in_consecutive_slots_slice_the_stacks_and_match_the_gather():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    names = tuple(f"a{i}" for i in range(4))
    for i, name in enumerate(names):
        layer.add_adapter(name, LoraConfig(r=1 + i, lora_dropout=0.0))
    randomize_adapters(layer, seed=5)
    stacked = stack_adapters(layer, names)
    x = torch.randn(3, 2, 16)
    base = layer.base_layer(x)
    row_index = torch.tensor([1, 2, 3])
    assert plan_rows(row_index, 4).slot_range == (1, 4)
    assert plan_rows(torch.tensor([1, 3, 2]), 4).slot_range is None
    with torch.no_grad():
        sliced = mixed_lora_delta(x, base, stacked, row_index, None, (1, 4))
        gathered = mixed_lora_delta(x, base, stacked, row_index, None)
        want = mixed_lora_delta_reference(x, base, stacked, row_index, None)
    torch.testing.assert_close(sliced, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, want, atol=1e-5, rtol=1e-5)


def assert_mixed_as_accurate_as_alone(model, x, rows):
    """In half precision the mixed and the one-adapter paths round at different points,
    so neither is the truth: each row's mixed output must be as close to a float32 copy
    of the model as the row run alone is (within 2x, plus a little)."""
    exact = copy.deepcopy(model).float()
    with ds_lora.adapter_batch(model, rows):
        mixed = model(x).float()
    for i, name in enumerate(rows):
        outputs = []
        for m, xi in ((model, x[i : i + 1]), (exact, x[i : i + 1].float())):
            if name is None:
                with ds_lora.disable_adapters(m):
                    outputs.append(m(xi).float())
            else:
                ds_lora.set_adapter(m, name)
                outputs.append(m(xi).float())
        alone, truth = outputs
        err_mixed = (mixed[i : i + 1] - truth).abs().max().item()
        err_alone = (alone - truth).abs().max().item()
        assert err_mixed <= 2 * err_alone + 1e-2, (i, name, err_mixed, err_alone)


def assert_mixed_equals_alone(model, x, rows, **tol):
    """A mixed-adapter batch gives each row what that row gives alone with its adapter."""
    with ds_lora.adapter_batch(model, rows):
        mixed = model(x)
    for i, name in enumerate(rows):
        if name is None:
            with ds_lora.disable_adapters(model):
                alone = model(x[i : i + 1])
        else:
            ds_lora.set_adapter(model, name)
            alone = model(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, **tol)


def test_adapter_batch_only_some_layers_and_nesting_restores_rows():
    model = TinyModel().eval()
    for i in range(2):
        ds_lora.inject(
            model, LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear"), f"a{i}"
        )
    randomize_adapters(model, seed=5)
    ds_lora.set_adapter(model, "a0")
    x = _inputs(model, batch=3, seq=2, seed=2)
    # Reference: the active adapter everywhere except v_proj, which runs without one.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "v_proj" in name and "lora_B.a0" in name:
                param.zero_()
        want = reference(x)
        single = model(x)
        with ds_lora.adapter_batch(model, [None, None, None], only=["v_proj"]):
            torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
        outer = ["a1", None, "a0"]
        with ds_lora.adapter_batch(model, outer):
            mixed = model(x)
            with ds_lora.adapter_batch(model, outer, only=["layers.0.v_proj", "lm_head"]):
                torch.testing.assert_close(model(x), mixed)
            with ds_lora.adapter_batch(model, ["a0", "a0", "a0"], only=["v_proj"]):
                assert not torch.allclose(model(x)[0], mixed[0])  # row 0 really changed
            torch.testing.assert_close(model(x), mixed)  # the outer rows are back
        torch.testing.assert_close(model(x), single)  # and then the active adapter alone
    with pytest.raises(TypeError, match="only must be a list of module names"):
        with ds_lora.adapter_batch(model, [None], only="v_proj"):
            pass
    with pytest.raises(ValueError, match=r"only=\['v_prj'\] matches no LoRA layer"):
        with ds_lora.adapter_batch(model, [None], only=["v_prj"]):
            pass


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 10), seed=st.integers(0, 1000))
def test_adapter_rows_gives_a_submodule_the_adapters_of_its_rows(tokens, seed):
    """A submodule run on some rows of a mixed batch (as a MoE expert is) computes what
    those rows alone compute under their own adapters, and gets its rows back after."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ds_lora.inject(model, LoraConfig(r=2, target_modules=["0", "1"]), adapter_name="a")
    ds_lora.inject(model, LoraConfig(r=3, target_modules=["0", "1"]), adapter_name="b")
    randomize_adapters(model, seed=seed)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 and all(isinstance(m, ds_lora.MixedAdapterLayer) for m in layers)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=gen)
    names = [("a", "b", None)[int(i)] for i in torch.randint(0, 3, (tokens,), generator=gen)]
    rows = torch.randperm(tokens, generator=gen)[: max(1, tokens // 2)]
    expert = model[1]
    with torch.no_grad(), ds_lora.adapter_batch(model, names):
        before = expert.row_adapters_state()[1].clone()
        with ds_lora.adapter_rows(expert, rows):
            got = expert(x[rows])
        assert torch.equal(expert.row_adapters_state()[1], before)
    with torch.no_grad(), ds_lora.adapter_batch(model, [names[int(r)] for r in rows]):
        want = expert(x[rows])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with ds_lora.adapter_rows(expert, rows):  # outside a mixed batch: nothing to narrow
        assert expert.row_adapters_state()[1] is None
