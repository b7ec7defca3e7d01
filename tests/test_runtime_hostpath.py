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
    # tensors as addresses (no launch hooks set), constexprs appended in order
    assert grid == (8, 2, 1) and stream == 1234 and args == (x.data_ptr(), 48, 128, True)
    la((4,), x[1:], 63, BLOCK=128, FLAG=True, num_warps=4)  # unaligned pointer, odd n: another kernel
    la((4,), x, 64, BLOCK=64, FLAG=True, num_warps=4)  # another constexpr: another kernel
    assert len(jit.slow_calls) == 3 and la.fast_calls == 1


def test_launcher_passes_tensors_while_a_launch_hook_is_set(monkeypatch) -> None:
    """Profilers' launch hooks get the launch metadata, built from the real arguments."""
    jit = _FakeJit()
    la = TK._Launcher(jit)
    if not la.enabled:
        pytest.skip("this Triton has no knobs/driver internals: plain launches only")
    la._driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 1))
    hook = types.SimpleNamespace(calls=[print])
    monkeypatch.setattr(TK, "_RUNTIME_KNOBS", types.SimpleNamespace(launch_enter_hook=hook, launch_exit_hook=None))
    la._knobs = types.SimpleNamespace(runtime=TK._RUNTIME_KNOBS)
    x = torch.zeros(64)
    la((4,), x, 64, BLOCK=128, FLAG=True, num_warps=4)
    la((4,), x, 64, BLOCK=128, FLAG=True, num_warps=4)
    assert not TK._hooks_idle() and jit.kernels[0].launches[0][2] == (x, 64, 128, True)
    monkeypatch.setattr(
        TK, "_RUNTIME_KNOBS", types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]), launch_exit_hook=None)
    )
    assert TK._hooks_idle()


def test_nvfp4_backend_follows_the_env(monkeypatch) -> None:
    torch.manual_seed(0)
    mod = L.nvfp4_linear_from_float(torch.nn.Linear(64, 32))
    x = torch.randn(4, 64)
    monkeypatch.setenv("DQFAST_FP4_GEMM_BACKEND", "emulation")
    assert torch.equal(mod(x), mod.forward_emulation(x))
    monkeypatch.setenv("DQFAST_FP4_GEMM_BACKEND", "emulation_w4a16")
    assert torch.equal(mod(x), mod.forward_emulation(x, act_quant=False))


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


def _count_fused_calls(monkeypatch) -> list:
    """Fp8FusedCall on CPU: inputs accepted off-GPU, the launch replaced by the torch reference of
    the fused kernel (static quantization, float matmul, scales, bias); returns the call log."""
    calls: list = []
    monkeypatch.setattr(TK, "_INTERPRET", True)  # `applicable` then accepts CPU tensors

    def run(self, x):
        w, s, ws, b = self.tensors
        calls.append(self)
        y = Q.fp8_fake_quant(x.float(), s) @ (w.float() * (ws.reshape(-1, 1) if ws.dim() else ws)).t()
        return (y + b.float() if b is not None else y).to(self.out_dtype)

    monkeypatch.setattr(TK.Fp8FusedCall, "__call__", run)
    return calls


def test_triton_backend_takes_one_launch_at_small_m(monkeypatch) -> None:
    calls = _count_fused_calls(monkeypatch)
    mod = _fp8()
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    for _ in range(3):
        y = mod(x)
    assert len(calls) == 3 and len({id(c) for c in calls}) == 1  # built once, reused
    assert y.shape == (2, 3, 32) and torch.allclose(y.float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(TK.ONE_LAUNCH_MAX_MN // 32 + 1, 64).to(torch.bfloat16),  # more rows than the rule allows
        lambda: torch.randn(64, 8).to(torch.bfloat16).t(),  # not contiguous
        lambda: torch.randn(4, 64),  # float32 input
    ],
)
def test_one_launch_path_not_taken_outside_its_inputs(monkeypatch, cpu_triton_path, make) -> None:
    calls = _count_fused_calls(monkeypatch)
    mod = _fp8()
    x = make()
    y = mod(x)
    assert calls == [] and "_fused_call" not in mod.__dict__
    assert torch.allclose(y.float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)


def test_one_launch_rule() -> None:
    """Few rows always; more rows only with a short K and a small M x N (run 8's crossover)."""
    assert TK.FUSED_MAX_M is None  # no DQFAST_FP8_FUSED_MAX_M in the test environment
    assert TK.one_launch_wins(16, 12288, 3072) and TK.one_launch_wins(1, 15360, 3072)
    assert not TK.one_launch_wins(64, 12288, 3072)  # long K: the sequential K loop loses
    assert TK.one_launch_wins(512, 3072, 3072) and TK.one_launch_wins(128, 3072, 12288)
    assert not TK.one_launch_wins(1024, 3072, 3072) and not TK.one_launch_wins(256, 3072, 12288)


def test_fused_env_row_limit_replaces_the_rule(monkeypatch) -> None:
    monkeypatch.setattr(TK, "FUSED_MAX_M", 8)
    assert TK.one_launch_wins(8, 12288, 3072) and not TK.one_launch_wins(9, 64, 64)


def test_triton_fused_takes_one_launch_at_any_m(monkeypatch) -> None:
    calls = _count_fused_calls(monkeypatch)
    mod = _fp8()
    mod.backend_request = "triton_fused"
    x = torch.randn(TK.ONE_LAUNCH_MAX_MN // 32 + 1, 64).to(torch.bfloat16)
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    assert len(calls) == 1


def test_one_launch_path_not_taken_for_dynamic_scales_or_shards(monkeypatch) -> None:
    calls = _count_fused_calls(monkeypatch)
    torch.manual_seed(0)
    dyn = L.fp8_linear_from_float(torch.nn.Linear(64, 32), input_scale=None, backend="triton")
    shards = [L.fp8_linear_from_float(torch.nn.Linear(64, 16), input_scale=s, backend="triton") for s in (0.01, 0.02)]
    fused = L.fuse_fp8_linears(shards)
    assert not dyn._fused_applies(torch.randn(4, 64).to(torch.bfloat16))
    assert fused.shard_sizes and not fused._fused_applies(torch.randn(4, 64).to(torch.bfloat16))
    assert calls == []


def test_one_launch_call_follows_module_and_input_changes(monkeypatch, cpu_triton_path) -> None:
    calls = _count_fused_calls(monkeypatch)
    mod = _fp8()
    x = torch.randn(5, 64).to(torch.bfloat16)
    mod(x)
    first = mod.__dict__["_fused_call"][0]
    with torch.no_grad():  # in-place edits: same addresses, read by the kernel on each call
        mod.input_scale.fill_(0.05)
        mod.bias.add_(1.0)
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    assert mod.__dict__["_fused_call"][0] is first
    mod.weight_scale = torch.tensor(float(mod.weight_scale) * 2)  # replaced: another address
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    second = mod.__dict__["_fused_call"][0]
    assert second is not first
    mod.bias.data = mod.bias.data.clone()  # new storage, same object: what Module.to() does to parameters
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    assert mod.__dict__["_fused_call"][0] is not second
    mod(torch.randn(7, 64).to(torch.bfloat16))  # another shape: another call object
    assert len({id(c) for c in calls}) == 4
    n = len(calls)
    mod.backend_request = "scaled_mm"  # another back end: the one-launch call is not used
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    assert len(calls) == n


def test_one_launch_call_follows_the_backend_env(monkeypatch, cpu_triton_path) -> None:
    calls = _count_fused_calls(monkeypatch)
    mod = _fp8()
    mod.backend_request = None
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "triton")
    x = torch.randn(5, 64).to(torch.bfloat16)
    mod(x)
    assert len(calls) == 1
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "emulation")
    assert torch.equal(mod(x), mod.forward_emulation(x))
    assert len(calls) == 1


def test_fused_kernel_matches_quantize_then_matmul_in_the_interpreter() -> None:
    """The one-launch kernel itself (div_rn quantization in the GEMM's prologue, scale and bias
    epilogue, 3-D output shape) under TRITON_INTERPRET=1 on CPU, against the interpreter's own
    static quantization kernel followed by a float matmul."""
    import subprocess
    import sys

    code = """
import torch
from dqfast.runtime import triton_kernels as TK, linear as L
torch.manual_seed(0)
lin = torch.nn.Linear(96, 80).to(torch.bfloat16)
for pc in (False, True):
    mod = L.fp8_linear_from_float(lin, per_channel=pc, input_scale=0.01, backend="triton")
    x = (torch.randn(2, 5, 96) * 2).to(torch.bfloat16)
    y = mod(x)
    assert "_fused_call" in mod.__dict__ and y.shape == (2, 5, 80)
    xq = TK.fp8_quant_static(x.reshape(-1, 96), mod.input_scale).float()
    ws = mod.weight_scale.reshape(-1, 1) if pc else mod.weight_scale
    ref = (xq @ (mod.weight.float() * ws).t() * mod.input_scale + mod.bias.float()).reshape(2, 5, 80)
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err < 4e-3, err
print("ok")
"""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
