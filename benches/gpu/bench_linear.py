"""Linear-layer benchmarks on one GPU: every FP8 back end (_scaled_mm behind eager or Triton
activation quantization, FlashInfer cuBLASLt / cuDNN / CUTLASS, autotuned) and NVFP4 (W4A16 Triton,
W4A8 via e4m3 weights) against BF16 F.linear on FLUX.1 / Wan2.2 shapes; host time per eager call;
CUDA-graph and torch.compile speed-ups of a FLUX.1 single-block Linear stack at M = 1024 and 4096;
and a FLUX.1-dev-shaped stack of all transformer Linears.

Writes bench.json and bench.md to --out. Times are medians of triton.testing.do_bench unless said.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import _stub_core
import torch
import torch.nn.functional as F
from dqfast.runtime import CudaGraphRunner
from dqfast.runtime import autotune as AT
from dqfast.runtime import quant as Q
from dqfast.runtime import triton_kernels as TK
from dqfast.runtime.linear import _ACT_CACHE, FLASHINFER_FP8_BACKENDS, Fp8Linear, Nvfp4Linear
from triton.testing import do_bench

# (model, layer, K, N)
SHAPES = [
    ("flux", "attn q/k/v", 3072, 3072),
    ("flux", "fused qkv", 3072, 9216),
    ("flux", "ff up", 3072, 12288),
    ("flux", "ff down", 12288, 3072),
    ("flux", "single proj_out", 15360, 3072),
    ("wan", "attn q/k/v/o", 5120, 5120),
    ("wan", "ffn up", 5120, 13824),
    ("wan", "ffn down", 13824, 5120),
]
MS = [1024, 4096, 16384]
FP8_COLUMNS = ["scaled_mm", "triton", "triton_fused", *FLASHINFER_FP8_BACKENDS, "autotune"]


def bench(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_fp8(w: torch.Tensor, in_scale: float | None, backend: str, bias: torch.Tensor | None = None) -> Fp8Linear:
    n, k = w.shape
    m = Fp8Linear(k, n, bias=bias is not None, static_input_scale=in_scale is not None, device=w.device, backend=backend)
    q, s = Q.fp8_quantize_weight(w)
    m.weight.copy_(q)
    m.weight_scale.copy_(s)
    if in_scale is not None:
        m.input_scale.fill_(in_scale)
    if bias is not None:
        m.bias.data.copy_(bias)
    return m


def make_fp4(w: torch.Tensor, backend: str = "triton", bias: torch.Tensor | None = None) -> Nvfp4Linear:
    n, k = w.shape
    m = Nvfp4Linear(k, n, bias=bias is not None, device=w.device, backend=backend)
    p, s, gs = Q.nvfp4_quantize(w)
    m.weight.copy_(p)
    m.weight_scale.copy_(s)
    m.weight_scale_2.copy_(gs)
    if bias is not None:
        m.bias.data.copy_(bias)
    return m


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def no_share(fn: Callable[[], object]) -> Callable[[], object]:
    """Time the activation quantization on every call (siblings would otherwise share it)."""

    def run() -> object:
        os.environ["DQFAST_SHARE_ACT_QUANT"] = "0"
        try:
            return fn()
        finally:
            os.environ["DQFAST_SHARE_ACT_QUANT"] = "1"

    return run


def shape_benchmarks(rows: list[dict], sweep: bool) -> None:
    dev = torch.device("cuda")
    for model, layer, k, n in SHAPES:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        f8 = {be: make_fp8(w, 0.01, be, bias) for be in FP8_COLUMNS}
        f8d = make_fp8(w, None, "triton", bias)
        f4 = make_fp4(w, "triton", bias)
        f4w8 = make_fp4(w, "w4a8", bias)
        mem = {"bf16_bytes": nbytes(w), "fp8_bytes": nbytes(f8["triton"].weight), "nvfp4_bytes": nbytes(f4.weight, f4.weight_scale)}
        for m in MS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            row: dict = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "bias": True, **mem}
            s1 = torch.tensor(0.01, device=dev)
            xq = Q.quantize_fp8(x, s1)
            measures: dict[str, Callable[[], object]] = {
                "bf16_ms": functools.partial(F.linear, x, w, bias),
                "fp8_gemm_only_ms": functools.partial(
                    torch._scaled_mm,
                    xq,
                    f8["triton"].weight.t(),
                    scale_a=s1,
                    scale_b=f8["triton"].weight_scale,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=True,
                ),
                **{f"fp8_{be}_static_ms": no_share(functools.partial(f8[be], x)) for be in FP8_COLUMNS},
                "fp8_triton_dynamic_ms": no_share(functools.partial(f8d, x)),
                "quant_static_ms": functools.partial(TK.fp8_quant_static, x, s1),
                "quant_per_token_ms": functools.partial(TK.fp8_quant_per_token, x),
                "nvfp4_w4a16_ms": functools.partial(TK.nvfp4_w4a16_matmul, x, f4.weight, f4.weight_scale, f4.weight_scale_2, f4.bias),
                "nvfp4_dequant_gemm_ms": functools.partial(
                    TK.nvfp4_dequant_matmul, x, f4.weight, f4.weight_scale, f4.weight_scale_2, f4.bias
                ),
                "nvfp4_triton_module_ms": functools.partial(f4, x),
                "nvfp4_w4a8_module_ms": no_share(functools.partial(f4w8, x)),
                "nvfp4_to_e4m3_only_ms": functools.partial(TK.nvfp4_to_e4m3, f4.weight, f4.weight_scale, f4w8.w4a8_weight_scale()[0]),
            }
            for key, fn in measures.items():
                try:
                    row[key] = bench(fn)
                except Exception as exc:
                    row.setdefault("errors", {})[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["autotune_choice"] = f8["autotune"].__dict__.get("_tuned", {})
            row["autotune_choice"] = {str(kk): v for kk, v in row["autotune_choice"].items()}
            if sweep:
                best = None
                for cfg in TK.W4A16_CONFIGS:
                    try:
                        t = bench(functools.partial(TK.nvfp4_w4a16_matmul, x, f4.weight, f4.weight_scale, f4.weight_scale_2, None, cfg))
                    except Exception as exc:  # e.g. out of shared memory for a config
                        row.setdefault("sweep_errors", []).append(f"{cfg}: {type(exc).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    row["nvfp4_w4a16_best_ms"], row["nvfp4_w4a16_best_cfg"] = best[0], list(best[1])
            if "bf16_ms" in row:
                for key in list(row):
                    if key.endswith("_ms") and key != "bf16_ms" and not key.startswith(("quant_", "nvfp4_to_e4m3_only")):
                        row["speedup_" + key[:-3]] = row["bf16_ms"] / row[key]
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
        del w, f8, f8d, f4, f4w8
        torch.cuda.empty_cache()


def host_overhead() -> dict:
    """Host time per eager call: calls issued back to back on a small problem (M = 16, GPU work
    of a few us), so issuing, not the GPU, is the bottleneck; us per call = wall time / calls."""
    dev = torch.device("cuda")
    k = n = 3072
    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
    bias = torch.zeros(n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(16, k, device=dev).to(torch.bfloat16)
    x3 = x.reshape(1, 16, k)
    s1 = torch.tensor(0.01, device=dev)
    xq = Q.quantize_fp8(x, s1)
    f8 = {be: make_fp8(w, 0.01, be, bias) for be in FP8_COLUMNS}
    f8d = make_fp8(w, None, "triton", bias)
    f4 = make_fp4(w, "w4a8", bias)
    cases: dict[str, Callable[[], object]] = {
        "F.linear": functools.partial(F.linear, x, w, bias),
        "torch._scaled_mm alone": functools.partial(
            torch._scaled_mm, xq, f8["triton"].weight.t(), scale_a=s1, scale_b=s1, out_dtype=torch.bfloat16
        ),
        "Triton static quant alone (fast launch)": functools.partial(TK.fp8_quant_static, x, s1),
        **{f"Fp8Linear {be} static": no_share(functools.partial(f8[be], x)) for be in FP8_COLUMNS},
        "Fp8Linear triton static, 3-D input": no_share(functools.partial(f8["triton"], x3)),
        "Fp8Linear triton static, shared quant hit": functools.partial(f8["triton"], x),
        "Fp8Linear triton per-token": no_share(functools.partial(f8d, x)),
        "Fp8Linear auto (default, untuned shape)": no_share(functools.partial(make_fp8(w, 0.01, None, bias), x)),
        "Nvfp4Linear w4a8": no_share(functools.partial(f4, x)),
    }

    def measure(fn: Callable[[], object], calls: int = 400) -> float:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        vals = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            vals.append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
        return statistics.median(vals)

    res: dict = {"shape": [16, k, n], "us_per_call": {}}
    for name, fn in cases.items():
        try:
            res["us_per_call"][name] = measure(fn)
        except Exception as exc:
            res["us_per_call"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    # The two-launch path (quantize + _scaled_mm) that `triton` took at this M before the
    # one-launch Fp8FusedCall (and still takes above TK.FUSED_MAX_M rows)
    lim = TK.FUSED_MAX_M
    TK.FUSED_MAX_M = 0
    try:
        two = make_fp8(w, 0.01, "triton", bias)
        res["us_per_call"]["Fp8Linear triton static, two launches (quantize + _scaled_mm)"] = measure(no_share(functools.partial(two, x)))
    finally:
        TK.FUSED_MAX_M = lim
    # Relative to F.linear measured in this same run (host speed differs from machine to machine)
    base = res["us_per_call"]["F.linear"]
    res["ratio_to_F.linear"] = {k2: round(v / base, 2) for k2, v in res["us_per_call"].items() if isinstance(v, float)}
    # The same with Triton's own launch path (the runtime's fast launcher off)
    launchers = (TK._STATIC, TK._ROW, TK._TO_E4M3, TK._W4A8_PREP)
    for la in launchers:
        la.enabled = False
    TK.FUSED_MAX_M = 0
    try:
        res["us_per_call"]["Triton static quant alone (Triton launch)"] = measure(functools.partial(TK.fp8_quant_static, x, s1))
        res["us_per_call"]["Fp8Linear triton static, two launches (Triton launch)"] = measure(no_share(functools.partial(two, x)))
        res["us_per_call"]["Nvfp4Linear w4a8 (Triton launch)"] = measure(no_share(functools.partial(f4, x)))
    finally:
        TK.FUSED_MAX_M = lim
        for la in launchers:
            la.enabled = True
    print("host us/call", json.dumps({k2: round(v, 1) if isinstance(v, float) else v for k2, v in res["us_per_call"].items()}), flush=True)
    return res


def fused_crossover() -> dict:
    """`triton` one launch (Fp8FusedCall) vs two launches (Triton quantize + _scaled_mm) vs BF16
    F.linear by rows: GPU time (do_bench median, ms) and eager time per call issued back to back
    (us, wall / calls: the larger of host and GPU time), plus GPU time of fused tile configs: the
    data behind TK.one_launch_wins and fp8_linear_static_config. do_bench's ms of a host-bound call is
    its host time."""
    dev = torch.device("cuda")
    cfgs = [
        (16, 32, 128, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (64, 128, 128, 4, 3),
        (128, 128, 128, 8, 3),
    ]
    out: list[dict] = []

    def wall_us(fn: Callable[[], object], calls: int = 200) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        vals = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            vals.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(vals)

    lim = TK.FUSED_MAX_M
    for k, n in ((3072, 3072), (3072, 12288), (12288, 3072)):
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        for m in (16, 64, 128, 256, 512, 1024):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            row: dict = {"M": m, "K": k, "N": n}
            row["bf16_ms"] = bench(functools.partial(F.linear, x, w, bias))
            row["bf16_eager_us"] = wall_us(functools.partial(F.linear, x, w, bias))
            TK.FUSED_MAX_M = 1 << 30
            one = make_fp8(w, 0.01, "triton", bias)
            row["one_launch_ms"] = bench(functools.partial(one, x))
            row["one_launch_eager_us"] = wall_us(functools.partial(one, x))
            TK.FUSED_MAX_M = 0
            two = make_fp8(w, 0.01, "triton", bias)
            row["two_launch_ms"] = bench(no_share(functools.partial(two, x)))
            row["two_launch_eager_us"] = wall_us(no_share(functools.partial(two, x)))
            TK.FUSED_MAX_M = lim
            for cfg in cfgs:
                try:
                    row[f"cfg{','.join(map(str, cfg))}_ms"] = bench(
                        functools.partial(
                            TK.fp8_linear_static, x, one.weight, one.input_scale, one.weight_scale, one.bias, torch.bfloat16, cfg
                        )
                    )
                except Exception as exc:
                    row[f"cfg{','.join(map(str, cfg))}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            out.append(row)
            print("crossover", json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
        del w
    TK.FUSED_MAX_M = lim
    rule = {"always_m": TK.ONE_LAUNCH_ALWAYS_M, "max_k": TK.ONE_LAUNCH_MAX_K, "max_mn": TK.ONE_LAUNCH_MAX_MN, "env_max_m": lim}
    return {
        "rows": out,
        "one_launch_rule": rule,
        "configs": {f"{m}x{n}": list(TK.fp8_linear_static_config(m, n)) for m in (16, 128, 1024) for n in (3072, 12288)},
    }


def profile_top(fn: Callable[[], object], top: int = 12) -> list[dict]:
    """One profiled call: the ops with the most host (self CPU) time, with their device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        dev_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        rows.append(
            {"op": ev.key[:80], "calls": ev.count, "self_cpu_us": round(ev.self_cpu_time_total, 1), "self_device_us": round(dev_us, 1)}
        )
    return rows


class SingleBlockStack(torch.nn.Module):
    """The Linears of FLUX.1's single blocks (q, k, v, proj_mlp on the block input, proj_out on
    [attn, mlp]) with a GELU between, attention left out: a launch-heavy chain of GEMMs."""

    def __init__(self, layers: list[list[torch.nn.Module]]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleList(b) for b in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for q, k, v, mlp, out in self.blocks:
            a = q(x) + k(x) + v(x)
            h = torch.cat([a, F.gelu(mlp(x), approximate="tanh")], dim=-1)
            x = x + out(h)
        return x


def graph_speedups(blocks: int, budget_s: float) -> dict:
    dev = torch.device("cuda")
    h, f = 3072, 12288
    torch.manual_seed(0)
    ws = [
        [(torch.randn(n, k, device=dev) * 0.01).to(torch.bfloat16) for n, k in ((h, h), (h, h), (h, h), (f, h), (h, h + f))]
        for _ in range(blocks)
    ]

    def lin(w: torch.Tensor) -> torch.nn.Linear:
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=torch.bfloat16)
        m.weight.data.copy_(w)
        return m

    variants = {
        "fp8_triton_static": lambda: SingleBlockStack([[make_fp8(w, 0.02, "triton") for w in b] for b in ws]),
        "nvfp4_w4a8": lambda: SingleBlockStack([[make_fp4(w, "w4a8") for w in b] for b in ws]),
        "bf16": lambda: SingleBlockStack([[lin(w) for w in b] for b in ws]),
        "fp8_triton_fused": lambda: SingleBlockStack([[make_fp8(w, 0.02, "triton_fused") for w in b] for b in ws]),
        "nvfp4_w4a16": lambda: SingleBlockStack([[make_fp4(w, "triton") for w in b] for b in ws]),
    }
    res: dict = {"blocks": blocks, "linears": 5 * blocks, "ms": {}}
    t_start = time.time()
    for name, build in variants.items():
        model = build().eval()
        for m in (1024, 4096):
            x = torch.randn(m, h, device=dev).to(torch.bfloat16)
            r = res["ms"].setdefault(f"{name} M={m}", {})
            with torch.inference_mode():
                try:
                    r["eager"] = bench(functools.partial(model, x))
                    _ACT_CACHE.clear()
                    runner = CudaGraphRunner(model)
                    y_graph = runner(x).float()
                    r["cuda_graph_runner"] = bench(functools.partial(runner, x))
                    r["graph_vs_eager_max_abs"] = float((y_graph - model(x).float()).abs().max())
                    del runner
                except Exception as exc:
                    r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                if m == 1024 and name in ("fp8_triton_static", "nvfp4_w4a8"):
                    r["eager_profile_top_host"] = profile_top(functools.partial(model, x))
                if time.time() - t_start < budget_s and name in ("bf16", "fp8_triton_static", "nvfp4_w4a8"):
                    try:
                        torch._dynamo.reset()
                        t0 = time.time()
                        comp = torch.compile(model, mode="reduce-overhead", dynamic=False)
                        for _ in range(3):
                            comp(x)
                        r["compile_s"] = time.time() - t0
                        r["compiled_reduce_overhead"] = bench(functools.partial(comp, x))
                        del comp
                    except Exception as exc:
                        r["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for key in ("cuda_graph_runner", "compiled_reduce_overhead"):
                if key in r and "eager" in r:
                    r[f"speedup_{key}_vs_eager"] = r["eager"] / r[key]
            print("graphs", name, m, json.dumps({k2: round(v, 4) if isinstance(v, float) else v for k2, v in r.items()}), flush=True)
        del model
        torch.cuda.empty_cache()
    return res


def flux_stack(img_tokens: int = 4096, txt_tokens: int = 512) -> dict:
    """All Linears of FLUX.1-dev's 19 double + 38 single blocks (hidden 3072, MLP 12288),
    fed separate activations per input site; attention, norms and elementwise work omitted."""
    dev = torch.device("cuda")
    h, f = 3072, 12288
    m_img, m_txt, m_all = img_tokens, txt_tokens, img_tokens + txt_tokens
    # (site, M, K, [N...]) : Linears sharing one input site read the same activation tensor
    double = [
        ("img_in", m_img, h, [h, h, h]),
        ("txt_in", m_txt, h, [h, h, h]),
        ("img_attn", m_img, h, [h]),
        ("txt_attn", m_txt, h, [h]),
        ("img_ff", m_img, h, [f]),
        ("img_ff2", m_img, f, [h]),
        ("txt_ff", m_txt, h, [f]),
        ("txt_ff2", m_txt, f, [h]),
    ]
    single = [("in", m_all, h, [h, h, h, f]), ("out", m_all, h + f, [h])]
    layers = []  # (site_key, M, K, N)
    for b in range(19):
        for site, m, k, ns in double:
            layers += [(f"d{b}.{site}", m, k, n) for n in ns]
    for b in range(38):
        for site, m, k, ns in single:
            layers += [(f"s{b}.{site}", m, k, n) for n in ns]
    acts = {}
    for key, m, k, _ in layers:
        if key not in acts:
            acts[key] = torch.randn(m, k, device=dev).to(torch.bfloat16)
    torch.manual_seed(0)
    bf16, fp8, fp4, fp4w8 = [], [], [], []
    for _key, _m, k, n in layers:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        bf16.append(w)
        fp8.append(make_fp8(w, 0.01, "triton"))
        m4 = make_fp4(w, "triton")
        fp4.append(m4)
        m48 = make_fp4(w, "w4a8")
        m48.weight, m48.weight_scale, m48.weight_scale_2 = m4.weight, m4.weight_scale, m4.weight_scale_2  # share the bytes
        fp4w8.append(m48)
    res = {
        "layers": len(layers),
        "img_tokens": img_tokens,
        "txt_tokens": txt_tokens,
        "bf16_weight_GiB": sum(nbytes(w) for w in bf16) / 2**30,
        "fp8_weight_GiB": sum(nbytes(m.weight) for m in fp8) / 2**30,
        "nvfp4_weight_GiB": sum(nbytes(m.weight, m.weight_scale) for m in fp4) / 2**30,
    }

    def run_bf16() -> None:
        for (key, *_), w in zip(layers, bf16):
            F.linear(acts[key], w)

    def run_mods(mods: list[torch.nn.Module]) -> None:
        for (key, *_), mod in zip(layers, mods):
            mod(acts[key])
        _ACT_CACHE.clear()

    for name, fn in [
        ("bf16", run_bf16),
        ("fp8_triton_all", functools.partial(run_mods, fp8)),
        ("nvfp4_w4a16_auto_all", functools.partial(run_mods, fp4)),
        ("nvfp4_w4a8_all", functools.partial(run_mods, fp4w8)),
    ]:
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        res[name + "_ms"] = sorted(ts)[len(ts) // 2]
        print(name, round(res[name + "_ms"], 2), "ms", flush=True)
    for key in list(res):
        if key.endswith("_ms") and key != "bf16_ms":
            res["speedup_" + key[:-3]] = res["bf16_ms"] / res[key]
    return res


def write_md(path: Path, data: dict) -> None:
    rows, device = data["rows"], data["device"]
    cols = [f"fp8_{be}_static_ms" for be in FP8_COLUMNS] + ["fp8_triton_dynamic_ms", "nvfp4_triton_module_ms", "nvfp4_w4a8_module_ms"]
    lines = [
        f"# Linear benchmarks on {device}",
        "",
        "Median ms (triton.testing.do_bench), bias on. (speedup = BF16 F.linear time / path time). fp8_* static = activation "
        "quantization (Triton, or eager torch for scaled_mm) + the named GEMM; autotune = the measured choice.",
        "",
        "| model | layer | M | K | N | bf16 ms | fp8 GEMM only | " + " | ".join(c[:-3] for c in cols) + " | autotune picked |",
        "|" + "---|" * (8 + len(cols)),
    ]

    def cell(r: dict, key: str) -> str:
        if key not in r:
            return "err" if key in r.get("errors", {}) else "-"
        return f"{r[key]:.3f} ({r['bf16_ms'] / r[key]:.2f}x)"

    for r in rows:
        if "bf16_ms" not in r:
            lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | error |")
            continue
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['bf16_ms']:.3f} | {cell(r, 'fp8_gemm_only_ms')} | "
            + " | ".join(cell(r, c) for c in cols)
            + f" | {','.join(sorted(set(r.get('autotune_choice', {}).values())))} |"
        )
    for title, key in (
        ("Host time per eager call", "host"),
        ("One vs two launches by rows", "crossover"),
        ("CUDA graphs / torch.compile", "graphs"),
        ("FLUX.1-dev Linear stack", "flux_stack"),
    ):
        if data.get(key):
            lines += ["", f"## {title}", "", "```", json.dumps(data[key], indent=1), "```"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sweep", action="store_true", help="also sweep the W4A16 tile configs")
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--no-stack", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--crossover", action="store_true", help="one- vs two-launch FP8 by rows, fused tile configs")
    ap.add_argument("--graph-blocks", type=int, default=38)
    ap.add_argument("--compile-budget-s", type=float, default=240.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DQFAST_AUTOTUNE_CACHE", tempfile.mkdtemp(prefix="dqfast-at-"))
    data: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dqfast_core_stubbed": _stub_core.STUBBED, "rows": []}

    def save() -> None:
        (out / "bench.json").write_text(json.dumps(data, indent=1, default=str))
        write_md(out / "bench.md", data)

    t0 = time.time()
    for key, enabled, fn in (
        ("host", True, host_overhead),
        ("crossover", args.crossover, fused_crossover),
        ("rows", not args.no_shapes, lambda: shape_benchmarks(data["rows"], sweep=args.sweep)),
        ("graphs", not args.no_graphs, lambda: graph_speedups(args.graph_blocks, args.compile_budget_s)),
        ("flux_stack", not args.no_stack, flux_stack),
    ):
        if not enabled:
            continue
        try:
            r = fn()
            if r is not None:
                data[key] = r
        except Exception as exc:
            data[key + "_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(f"{key}: done at {time.time() - t0:.0f} s", flush=True)
        save()
    tuner = AT.tuner_for(torch.device("cuda"))
    data["autotune_cache"] = {"file": tuner.path.name, "entries": tuner.entries}
    save()
    print((out / "bench.md").read_text())


if __name__ == "__main__":
    main()
