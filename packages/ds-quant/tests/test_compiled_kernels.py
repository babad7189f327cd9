"""The quantized layers inside ``torch.compile``: traced whole (no graph break) onto the
packed CPU kernels, equal to the eager layers, and the custom op traced code calls
(``ds_quant::int8pack_mm_cpu``) checked with ``torch.library.opcheck`` and against its
plain-torch reference. One-row INT8 products take a multiply-and-sum form in traced
code, checked against the dequantize-then-matmul reference, compiled by inductor."""

import pytest
import torch
from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from ds_quant.kernels.cpu import (
    HAS_INT4_CPU,
    HAS_INT8_CPU,
    int8_weight_matmul_cpu,
    int8_weight_matmul_traced,
    int8_weight_matvec_traced,
    int8pack_mm_cpu_reference,
)
from ds_quant.kernels.reference import int8_weight_matmul_reference
from ds_quant.primitives import quantize_int8_per_channel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytestmark = pytest.mark.skipif(not HAS_INT8_CPU, reason="torch has no packed INT8 CPU op")

BF16_ROUNDOFF = 2**-8


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values as ``t`` in a view ``offset`` elements into a larger storage."""
    storage = torch.zeros(t.numel() + offset, dtype=t.dtype)
    storage[offset:] = t.flatten()
    return storage[offset:].view(t.shape)


def op_inputs(rows, k, n, x_offset, q_offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = at_offset(torch.randn(rows, k, generator=g).bfloat16(), x_offset)
    q = at_offset(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), q_offset)
    unit = torch.ones(n, dtype=torch.bfloat16)
    return x, q, unit


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 200),
    n=st.integers(1, 40),
    x_offset=st.sampled_from([0, 1, 3]),
    q_offset=st.sampled_from([0, 5]),
    seed=st.integers(0, 2**16),
)
def test_int8pack_op_matches_its_reference_at_any_alignment(rows, k, n, x_offset, q_offset, seed):
    """Unaligned inputs (views at odd offsets, which compiled code may hand the op) and
    in_features off the op's multiple of 16 give the right product, never a crash."""
    x, q, unit = op_inputs(rows, k, n, x_offset, q_offset, seed)
    got = torch.ops.ds_quant.int8pack_mm_cpu(x, q, unit)
    want = int8pack_mm_cpu_reference(x, q, unit)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # Both round a float32 sum to bfloat16 once; the sums' order may differ.
    terms = x.float().abs() @ q.float().abs().t()
    bound = BF16_ROUNDOFF * (got.float().abs() + want.float().abs()) + 1e-5 * terms
    assert ((got.float() - want.float()).abs() <= bound).all()


@pytest.mark.parametrize(
    ("rows", "k", "n", "x_offset", "q_offset"),
    [(1, 64, 32, 0, 0), (3, 48, 16, 1, 0), (2, 40, 8, 0, 5)],
    ids=["aligned", "unaligned-input", "unaligned-weight"],
)
def test_int8pack_op_registration_passes_opcheck(rows, k, n, x_offset, q_offset):
    x, q, unit = op_inputs(rows, k, n, x_offset, q_offset, seed=0)
    torch.library.opcheck(torch.ops.ds_quant.int8pack_mm_cpu.default, (x, q, unit))


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(2, 5),
    k16=st.integers(1, 12),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_int8_traced_matmul_equals_the_eager_kernel(rows, k16, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8_per_channel(torch.randn(n, 16 * k16, generator=g))
    x = torch.randn(rows, 1, 16 * k16, generator=g).to(dtype)
    unit = torch.ones(n, dtype=torch.bfloat16)
    got = int8_weight_matmul_traced(x, q, scale, unit)
    assert torch.equal(got, int8_weight_matmul_cpu(x, q, scale, unit))


def assert_matches_int8_reference(got, x, q, scale):
    """Within float32 roundoff of the dequantize-then-matmul reference (activations are
    not rounded to bfloat16 as the packed op's are), plus the output's cast."""
    want = int8_weight_matmul_reference(x.float(), q, scale)
    bound = (x.float().abs() @ (q.float().abs() * scale[:, None]).t()) * 1e-5 + 1e-6
    cast = want.abs() * (2**-7 if x.dtype != torch.float32 else 0)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert ((got.float() - want).abs() <= bound + cast).all()


@settings(max_examples=25, deadline=None)
@given(
    lead=st.sampled_from([(1,), (1, 1)]),
    k=st.integers(1, 200),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_int8_one_row_traced_form_matches_the_reference(lead, k, n, dtype, seed):
    """Any in_features (no alignment or multiple of 16 needed) and leading shape."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8_per_channel(torch.randn(n, k, generator=g))
    x = torch.randn(*lead, k, generator=g).to(dtype)
    unit = torch.ones(n, dtype=torch.bfloat16)
    got = int8_weight_matmul_traced(x, q, scale, unit)
    assert_matches_int8_reference(got, x, q, scale)


@pytest.mark.parametrize("n,k", [(48, 64), (40, 200), (3, 7)])
def test_int8_one_row_form_compiled_by_inductor_matches_the_reference(n, k):
    """What a compiled batch-1 decode step runs: inductor's loop over the int8 weight."""
    torch.manual_seed(n + k)
    q, scale = quantize_int8_per_channel(torch.randn(n, k))
    x = torch.randn(1, 1, k)
    with torch.inference_mode():
        compiled = torch.compile(int8_weight_matvec_traced, dynamic=False, fullgraph=True)
        got = compiled(x, q, scale)
    assert_matches_int8_reference(got, x, q, scale)


@pytest.mark.parametrize(
    "config",
    [
        Int8WeightOnlyConfig(),
        pytest.param(
            Int4WeightOnlyConfig(group_size=32),
            marks=pytest.mark.skipif(not HAS_INT4_CPU, reason="no packed INT4 CPU op"),
        ),
    ],
    ids=["int8", "int4"],
)
@pytest.mark.parametrize("in_features", [64, 80])  # INT4: whole groups, a partial last one
def test_compiled_layer_traces_whole_and_equals_eager(config, in_features):
    """``fullgraph=True``: a graph break in the layer is an error. The graph calls the
    packed ops (no dequantized float weight), so it equals the eager layer exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 48), nn.SiLU(), nn.Linear(48, 32))
    quantize_(model, config)
    x = torch.randn(3, in_features)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)


def test_compiled_int8_layer_at_one_row_traces_whole():
    """A batch-1 step: the one-row form inside a whole graph, close to the eager layer
    (which rounds activations to bfloat16 for the packed op)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 32))
    quantize_(model, Int8WeightOnlyConfig())
    x = torch.randn(1, 64)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_compiled_int8_layer_compiles_once_per_shape():
    """The first compiled call leaves nothing behind that fails its own graph's guards:
    one graph for one row and one for four, and later calls reuse them (a serving step
    built before the server starts must not recompile on its first request)."""
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    quantize_(model, Int8WeightOnlyConfig())
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for rows, built in ((1, 1), (4, 2)):
            x = torch.randn(rows, 64)
            for _ in range(3):
                torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2)
            assert dynamo_utils.counters["stats"]["unique_graphs"] - graphs == built
