"""The low-host-overhead eager path, on CPU: Triton launcher caching (with a fake kernel), the
per-module plan rebuilt when weights/scales change, and CudaGraphRunner's input checks."""

from __future__ import annotations

import types

import pytest
import torch
from dqfast.runtime import CudaGraphRunner
from dqfast.runtime import linear as L
from dqfast.runtime import quant as Q

TK = pytest.importorskip("dqfast.runtime.triton_kernels")


def test_arg_spec_separates_what_triton_specializes_on() -> None:
    x = torch.zeros(64, dtype=torch.bfloat16)
    assert TK._arg_spec(x) == (torch.bfloat16, True)
    assert TK._arg_spec(x[1:]) == (torch.bfloat16, False)  # 2-byte offset: not 16-byte aligned
    assert TK._arg_spec(x.float()) != TK._arg_spec(x)
    assert TK._arg_spec(32) == (int, True, False, True)
    assert TK._arg_spec(1) == (int, False, True, True)
    assert TK._arg_spec(33) == (int, False, False, True)
    assert TK._arg_spec(2**31) == (int, True, False, False)
    assert TK._arg_spec(True) != TK._arg_spec(1)


class _FakeKernel:
    def __init__(self) -> None:
        self.function, self.packed_metadata, self.launches = "fn", "meta", []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *args):
        self.launches.append(((g0, g1, g2), stream, args))


class _FakeJit:
    """Mimics a @triton.jit function: params with is_constexpr flags; fn[grid](...) compiles,
    launches and returns the compiled kernel."""

    def __init__(self) -> None:
        names = [("x", False), ("n", False), ("BLOCK", True), ("FLAG", True)]
        self.params = [types.SimpleNamespace(name=n, is_constexpr=c) for n, c in names]
        self.slow_calls: list[tuple] = []
        self.kernels: list[_FakeKernel] = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.slow_calls.append((grid, args, meta))
            self.kernels.append(_FakeKernel())
            return self.kernels[-1]

        return launch


def test_launcher_reuses_the_compiled_kernel_for_the_same_specialization(monkeypatch) -> None:
    jit = _FakeJit()
    la = TK._Launcher(jit)
    if not la.enabled:
        pytest.skip("this Triton has no knobs/driver internals: plain launches only")
    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 1234)
    la._driver = types.SimpleNamespace(active=drv)
    x = torch.zeros(64)
    la((4,), x, 64, BLOCK=128, FLAG=True, num_warps=4)
    assert len(jit.slow_calls) == 1  # first call: through Triton
    la((8, 2), x, 48, BLOCK=128, FLAG=True, num_warps=4)  # same facts (aligned ptr, n % 16 == 0)
    assert len(jit.slow_calls) == 1 and la.fast_calls == 1
    grid, stream, args = jit.kernels[0].launches[0]
    assert grid == (8, 2, 1) and stream == 1234 and args == (x, 48, 128, True)  # constexprs appended in order
    la((4,), x[1:], 63, BLOCK=128, FLAG=True, num_warps=4)  # unaligned pointer, odd n: another kernel
    la((4,), x, 64, BLOCK=64, FLAG=True, num_warps=4)  # another constexpr: another kernel
    assert len(jit.slow_calls) == 3 and la.fast_calls == 1


def test_launcher_refuses_constexpr_between_runtime_args() -> None:
    jit = _FakeJit()
    jit.params = [types.SimpleNamespace(name="BLOCK", is_constexpr=True), types.SimpleNamespace(name="x", is_constexpr=False)]
    assert not TK._Launcher(jit).enabled


def test_launcher_env_switch(monkeypatch) -> None:
    monkeypatch.setenv("DQFAST_TRITON_FAST_LAUNCH", "0")
    assert not TK._Launcher(_FakeJit()).enabled


@pytest.fixture
def cpu_triton_path(monkeypatch):
    """Fp8Linear's `triton` back end on CPU: the quantization kernel replaced by its torch
    reference; torch._scaled_mm runs on CPU."""
    monkeypatch.setattr(TK, "fp8_quant_static", lambda x, s: Q.quantize_fp8(x, s))
    monkeypatch.setenv("DQFAST_SHARE_ACT_QUANT", "0")


def _fp8(seed: int = 0, per_channel: bool = False) -> L.Fp8Linear:
    torch.manual_seed(seed)
    return L.fp8_linear_from_float(torch.nn.Linear(64, 32), per_channel=per_channel, input_scale=0.02, backend="triton")


@pytest.mark.parametrize("per_channel", [False, True])
def test_plan_path_matches_emulation(cpu_triton_path, per_channel) -> None:
    mod = _fp8(per_channel=per_channel)
    x = torch.randn(3, 7, 64).to(torch.bfloat16)
    y = mod(x)
    assert y.shape == (3, 7, 32) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)


def test_plan_follows_in_place_and_replaced_tensors(cpu_triton_path) -> None:
    mod = _fp8()
    x = torch.randn(5, 64).to(torch.bfloat16)
    mod(x)  # builds the plan
    other = _fp8(seed=1)
    mod.load_state_dict(other.state_dict())  # in-place copies: versions change
    assert torch.allclose(mod(x).float(), other.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        mod.input_scale.fill_(0.05)
        mod.bias.add_(1.0)
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    mod.weight_scale = torch.tensor(float(mod.weight_scale) * 2)  # a new tensor object
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)


def test_modules_built_under_inference_mode_run(cpu_triton_path) -> None:
    """Regression: the plan key read `_version`, which raises on inference tensors (a model
    loaded inside torch.inference_mode())."""
    with torch.inference_mode():
        mod = _fp8()
        nv = L.nvfp4_linear_from_float(torch.nn.Linear(64, 32), backend="emulation")
        x = torch.randn(4, 64).to(torch.bfloat16)
        assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
        inv, ws = nv.w4a8_weight_scale()
        assert inv.shape == (32,) and ws.shape == (1, 32)


def test_backend_follows_a_device_move(cpu_triton_path) -> None:
    mod = _fp8()
    mod.backend_request = None
    x = torch.randn(4, 64).to(torch.bfloat16)
    mod(x)  # CPU: emulation, memoized for the CPU weight only
    key = mod.__dict__["_backend_cache"][0]
    assert key[-1] == torch.device("cpu") and mod.__dict__["_backend_cache"][1] == "emulation"


def test_graph_runner_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="warmup=0"):
        CudaGraphRunner(lambda x: x, warmup=0)
    run = CudaGraphRunner(lambda x, scale=1.0: x * scale)
    with pytest.raises(ValueError, match="input #0 is a cpu tensor"):
        run(torch.ones(2))
    assert run.graphs == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_runner_replays_like_eager() -> None:
    lin = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)
    run = CudaGraphRunner(lin)
    for _ in range(2):
        x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(run(x), lin(x))
    assert len(run.graphs) == 1
