"""One-row linears inside compiled CPU steps (``ds_model.matvec``): 16-bit float
weights as multiply-and-sum, float32 weights on ds-quant's ``fp32_gemv`` op; equal to
``F.linear`` within the output's rounding, only where they apply, and traced whole."""

import ds_model.matvec
import pytest
import torch
import torch.nn.functional as F
from ds_model.layout import input_major_weights
from ds_model.matvec import MatVecLinears, matvec_linear
from ds_quant.kernels import cpu_gemv
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def within_output_rounding(got: torch.Tensor, x, weight, bias) -> None:
    want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    bound = x.float().abs() @ weight.float().abs().t() * 1e-5 + want.abs() * 2**-7 + 1e-6
    assert got.dtype == x.dtype and got.shape == want.shape
    assert ((got.float() - want).abs() <= bound).all()


@settings(max_examples=30, deadline=None)
@given(
    lead=st.sampled_from([(1,), (1, 1), (1, 1, 1)]),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 40),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matvec_linear_equals_linear(lead, in_features, out_features, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_features, generator=g).to(dtype)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    within_output_rounding(matvec_linear(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize(
    "rows,dtype,row_major,rewritten",
    [
        (1, torch.bfloat16, True, True),
        (1, torch.float16, True, True),
        (3, torch.bfloat16, True, False),  # more rows keep it
        (1, torch.bfloat16, False, False),  # an input-major weight keeps it
    ],
)
def test_mode_rewrites_only_one_row_of_row_major_16_bit_weights(
    rows, dtype, row_major, rewritten, monkeypatch
):
    torch.manual_seed(0)
    layer = nn.Linear(32, 24).to(dtype)
    if not row_major:
        layer.weight.data = layer.weight.data.t().contiguous().t()
    x = torch.randn(rows, 32).to(dtype)
    calls = []

    def spy(*args):
        calls.append(args)
        return matvec_linear(*args)

    monkeypatch.setattr(ds_model.matvec, "matvec_linear", spy)
    with torch.no_grad(), MatVecLinears():
        got = layer(x)
    assert bool(calls) == rewritten
    with torch.no_grad():
        if rewritten:
            within_output_rounding(got, x, layer.weight, layer.bias)
        else:
            assert torch.equal(got, layer(x))


@pytest.mark.skipif(not cpu_gemv.available(), reason="ds-quant's CPU kernel is not built")
@pytest.mark.parametrize(
    "rows,row_major,on_kernel",
    [(1, True, True), (4, True, True), (5, True, False), (1, False, True), (3, False, True)],
)
def test_mode_runs_a_few_float32_rows_on_fp32_gemv(rows, row_major, on_kernel):
    """Up to ``fp32_rows()`` float32 rows take ds-quant's ``fp32_gemv`` op (bias added
    after it) by a row-major weight and by an input-major one (the layout compiled
    steps of more rows give), read in place; more rows keep the matmul."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    if not row_major:
        layer.weight.data = layer.weight.data.t().contiguous().t()
    x = torch.randn(rows, 32)
    with torch.no_grad(), MatVecLinears(few_rows=True):
        got = layer(x)
    with torch.no_grad():
        if on_kernel:
            assert torch.equal(got, cpu_gemv.fp32_gemv(x, layer.weight) + layer.bias)
            assert layer.weight.stride() == ((32, 1) if row_major else (1, 24))  # as laid
            torch.testing.assert_close(got, layer(x))
        else:
            assert torch.equal(got, layer(x))


def test_compiled_step_traces_whole_with_the_mode_and_keeps_dynamic_batches():
    """Inside torch.compile (fullgraph: a graph break is an error) at one row, and at a
    dynamic batch size, where rows keep the matmul (bit-equal to eager) and one graph
    serves every batch size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.SiLU(), nn.Linear(64, 16)).bfloat16()

    def step(x):
        with MatVecLinears():
            return model(x)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        one = torch.randn(1, 1, 48).bfloat16()
        torch.testing.assert_close(compiled(one), model(one), rtol=2e-2, atol=2e-2)
        dynamic = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
        x = torch.randn(2, 1, 48).bfloat16()
        assert torch.equal(dynamic(x), model(x))
        # A guard on the exact row count would recompile for another batch size.
        with torch.compiler.set_stance("fail_on_recompile"):
            x = torch.randn(5, 1, 48).bfloat16()
            assert torch.equal(dynamic(x), model(x))


@pytest.mark.skipif(not cpu_gemv.available(), reason="ds-quant's CPU kernel is not built")
@pytest.mark.parametrize(("rows", "input_major"), [(1, False), (1, True), (3, True)])
def test_compiled_float32_rows_call_the_fp32_gemv_op(rows, input_major):
    """Traced whole (fullgraph) with the op in the graph, equal to the eager kernel, for
    row-major and input-major weights and up to ``fp32_rows()`` static rows (a step of
    static sizes); a dynamic row count keeps the matmul."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.SiLU(), nn.Linear(64, 16))
    if input_major:
        input_major_weights(model)
        assert model[0].weight.stride() == (1, 64)
    ops = set()

    def recording(graph, example_inputs):
        ops.update(str(node.target) for node in graph.graph.nodes)
        return graph.forward

    def step(x, few_rows=True):
        with MatVecLinears(few_rows=few_rows):
            return model(x)

    compiled = torch.compile(step, backend=recording, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        x = torch.randn(rows, 1, 48)
        got = compiled(x)
        with MatVecLinears(few_rows=True):
            assert torch.equal(got, model(x))
    assert "ds_quant.fp32_gemv_cpu.default" in ops, ops
    # A dynamic batch (few_rows=False, as the serving runner's graph of larger buckets
    # enters it) keeps the matmul for more than one row, with no guard on the count.
    ops.clear()
    dynamic = torch.compile(step, backend=recording, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        x = torch.randn(2, 1, 48)
        torch.testing.assert_close(dynamic(x, False), model(x))
        with torch.compiler.set_stance("fail_on_recompile"):
            x = torch.randn(7, 1, 48)
            torch.testing.assert_close(dynamic(x, False), model(x))
    assert ops and "ds_quant.fp32_gemv_cpu.default" not in ops, ops
