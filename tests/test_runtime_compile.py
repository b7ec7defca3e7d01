"""The traceable FP8 path: same numbers as the emulation reference, and no graph breaks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dqfast.runtime.linear import Fp8Linear  # noqa: E402


def _layer(static: bool, per_channel: bool, shards=None) -> Fp8Linear:
    g = torch.Generator().manual_seed(0)
    n, k = 48, 64
    m = Fp8Linear(k, n, per_channel=per_channel, static_input_scale=static, backend="compile", shard_sizes=shards)
    w = torch.randn(n, k, generator=g) * 0.05
    ws = (w.abs().amax(dim=1) / 448) if per_channel else (w.abs().amax() / 448)
    m.weight.copy_((w / (ws[:, None] if per_channel else ws)).to(torch.float8_e4m3fn))
    m.weight_scale.copy_(ws)
    if static:
        m.input_scale.fill_(3.0 / 448) if m.input_scale.dim() == 0 else m.input_scale.copy_(torch.tensor([3.0, 2.0]) / 448)
    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m


@pytest.mark.parametrize(
    "static, per_channel, shards", [(True, False, None), (False, False, None), (False, True, None), (True, False, [16, 32])]
)
def test_traceable_path_matches_emulation(static, per_channel, shards):
    m = _layer(static, per_channel, shards)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = m.forward_emulation(x).float()
    got = m.forward_traceable(x).float()
    assert got.shape == ref.shape
    # Same quantized operands; only the GEMM's accumulation order and the bf16 output differ.
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_traceable_path_compiles_without_graph_breaks():
    m = _layer(True, False)
    x = torch.randn(8, 64).to(torch.bfloat16)
    compiled = torch.compile(m.forward_traceable, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), m.forward_traceable(x))


def test_activation_cache_works_on_inference_tensors():
    """Regression: the q/k/v quantize-once cache must not read `_version` of inference tensors."""
    from dqfast.runtime.linear import _ActQuantCache

    cache = _ActQuantCache()
    with torch.inference_mode():
        x = torch.randn(4, 8)
        y = torch.randn(4, 8)
        cache.put(x, ("static", 1.0), ("q", "s"))
        assert cache.get(x, ("static", 1.0)) == ("q", "s")
        assert cache.get(x, ("static", 2.0)) is None  # another scale
        assert cache.get(y, ("static", 1.0)) is None  # another tensor
    z = torch.randn(4, 8)
    cache.put(z, ("tok",), ("a", "b"))
    z.add_(1.0)  # outside inference mode an in-place edit is seen
    assert cache.get(z, ("tok",)) is None
