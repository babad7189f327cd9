"""The public API of ds_attention is its __all__, and its version matches the installed metadata."""

import importlib.metadata

import ds_attention


def test_all_names_resolve():
    missing = [name for name in ds_attention.__all__ if not hasattr(ds_attention, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"


def test_version_matches_metadata():
    assert ds_attention.__version__ == importlib.metadata.version("ds-attention")


def test_backends_satisfy_the_protocol_and_agree():
    import pytest
    import torch
    from ds_attention import AttentionBackend, KVCache, MaskSpec, get_backend

    torch.manual_seed(0)
    # Triton needs CUDA tensors when CUDA exists (the interpreter runs only without it).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 6, 2, 8, device=device) for _ in range(3))
    names = ["sdpa", "reference"]
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    outs = []
    for name in names:
        backend = get_backend(name, q.device)
        assert isinstance(backend, AttentionBackend) and backend.name == name
        spec = MaskSpec(causal=True, window=(2, None))
        cache = KVCache(8)
        backend.forward(q[:, :4], k[:, :4], v[:, :4], mask_spec=spec, cache=cache)
        # The cache supplies the first 4 keys; the last 2 queries align to its end.
        outs.append(backend.forward(q[:, 4:], k[:, 4:], v[:, 4:], mask_spec=spec, cache=cache))
    full = get_backend("reference", q.device).forward(q, k, v, mask_spec=MaskSpec(window=(2, None)))
    for out in outs:
        torch.testing.assert_close(out, full[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("cuda", q.device)
    # A hand-built MaskSpec is checked like attention()'s arguments.
    with pytest.raises(ValueError, match="window left must be >= 0"):
        get_backend("sdpa", q.device).forward(q, k, v, mask_spec=MaskSpec(window=(-1, 0)))
    with pytest.raises(TypeError, match="mask_spec must be a MaskSpec"):
        get_backend("reference", q.device).forward(q, k, v, mask_spec={"causal": True})
