"""Linear-layer benchmarks on one GPU: FP8 (_scaled_mm, eager vs fused-Triton activation
quantization) and NVFP4 W4A16 (Triton) against BF16 F.linear, on FLUX.1 / Wan2.2 shapes,
plus a FLUX.1-dev-shaped stack of all transformer Linears (GEMM share of a forward).

Writes bench.json and bench.md to --out. Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys as _sys
import time
import traceback
from pathlib import Path

_sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stub_core import ensure_dqfast_importable  # noqa: E402

ensure_dqfast_importable()

import torch
import torch.nn.functional as F
from dqfast.runtime import quant as Q
from dqfast.runtime import triton_kernels as TK
from dqfast.runtime.linear import _ACT_CACHE, Fp8Linear, Nvfp4Linear
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


def bench(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_fp8(w: torch.Tensor, in_scale: float | None, backend: str) -> Fp8Linear:
    n, k = w.shape
    m = Fp8Linear(k, n, bias=False, static_input_scale=in_scale is not None, device=w.device, backend=backend)
    q, s = Q.fp8_quantize_weight(w)
    m.weight.copy_(q)
    m.weight_scale.copy_(s)
    if in_scale is not None:
        m.input_scale.fill_(in_scale)
    return m


def make_fp4(w: torch.Tensor) -> Nvfp4Linear:
    n, k = w.shape
    m = Nvfp4Linear(k, n, bias=False, device=w.device, backend="triton")
    p, s, gs = Q.nvfp4_quantize(w)
    m.weight.copy_(p)
    m.weight_scale.copy_(s)
    m.weight_scale_2.copy_(gs)
    return m


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def shape_benchmarks(rows: list[dict], sweep: bool) -> None:
    dev = torch.device("cuda")
    for model, layer, k, n in SHAPES:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        f8s = make_fp8(w, 0.01, "triton")
        f8d = make_fp8(w, None, "triton")
        f8e = make_fp8(w, 0.01, "scaled_mm")
        f4 = make_fp4(w)
        f4.backend_request = "triton"
        mem = {"bf16_bytes": nbytes(w), "fp8_bytes": nbytes(f8s.weight), "nvfp4_bytes": nbytes(f4.weight, f4.weight_scale)}
        for m in MS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            row = {"model": model, "layer": layer, "M": m, "K": k, "N": n, **mem}
            s1 = torch.tensor(0.01, device=dev)
            xq = Q.quantize_fp8(x, s1)
            env = os.environ

            def no_share(fn):
                def run():
                    env["DQFAST_SHARE_ACT_QUANT"] = "0"  # time quantization on every call
                    try:
                        return fn()
                    finally:
                        env["DQFAST_SHARE_ACT_QUANT"] = "1"

                return run

            measures = {
                "bf16_ms": lambda: F.linear(x, w),
                "fp8_gemm_only_ms": lambda: torch._scaled_mm(
                    xq, f8s.weight.t(), scale_a=s1, scale_b=f8s.weight_scale, out_dtype=torch.bfloat16, use_fast_accum=True
                ),
                "fp8_eager_static_ms": lambda: f8e(x),
                "fp8_triton_static_ms": no_share(lambda: f8s(x)),
                "fp8_triton_dynamic_ms": no_share(lambda: f8d(x)),
                "quant_static_ms": lambda: TK.fp8_quant_static(x, s1),
                "quant_per_token_ms": lambda: TK.fp8_quant_per_token(x),
                "nvfp4_w4a16_ms": lambda: TK.nvfp4_w4a16_matmul(x, f4.weight, f4.weight_scale, f4.weight_scale_2),
                "nvfp4_dequant_gemm_ms": lambda: TK.nvfp4_dequant_matmul(x, f4.weight, f4.weight_scale, f4.weight_scale_2),
                "nvfp4_dequant_only_ms": lambda: TK.nvfp4_dequantize(f4.weight, f4.weight_scale, f4.weight_scale_2),
                "nvfp4_module_ms": lambda: f4(x),
            }
            for key, fn in measures.items():
                try:
                    row[key] = bench(fn)
                except Exception as exc:
                    row.setdefault("errors", {})[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if sweep:
                best = None
                for cfg in TK.W4A16_CONFIGS:
                    try:
                        t = bench(lambda: TK.nvfp4_w4a16_matmul(x, f4.weight, f4.weight_scale, f4.weight_scale_2, None, cfg))
                    except Exception as exc:  # e.g. out of shared memory for a config
                        row.setdefault("sweep_errors", []).append(f"{cfg}: {type(exc).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    row["nvfp4_w4a16_best_ms"], row["nvfp4_w4a16_best_cfg"] = best[0], list(best[1])
            if "bf16_ms" in row:
                for key in list(row):
                    if key.endswith("_ms") and key != "bf16_ms" and not key.startswith(("quant_", "nvfp4_dequant_only")):
                        row["speedup_" + key[:-3]] = row["bf16_ms"] / row[key]
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}))
        del w, f8s, f8d, f8e, f4
        torch.cuda.empty_cache()


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
    # flux1 preset BF16 fallbacks (norm*.linear are M=1 modulation GEMVs, omitted): ff*, proj_mlp
    fallback_sites = {"img_ff", "img_ff2", "txt_ff", "txt_ff2"}
    layers = []  # (site_key, M, K, N, is_fallback)
    for b in range(19):
        for site, m, k, ns in double:
            for n in ns:
                layers.append((f"d{b}.{site}", m, k, n, site in fallback_sites))
    for b in range(38):
        for site, m, k, ns in single:
            for j, n in enumerate(ns):
                layers.append((f"s{b}.{site}", m, k, n, site == "in" and j == 3))
    acts = {}
    for key, m, k, _, _ in layers:
        if key not in acts:
            acts[key] = torch.randn(m, k, device=dev).to(torch.bfloat16)
    torch.manual_seed(0)
    bf16, fp8, fp8_pre, fp4 = [], [], [], []
    for key, m, k, n, fb in layers:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        bf16.append(w)
        mod8 = make_fp8(w, 0.01, "triton")
        fp8.append(mod8)
        fp8_pre.append(None if fb else mod8)
        m4 = make_fp4(w)
        m4.backend_request = "triton"
        fp4.append(m4)
    res = {
        "layers": len(layers),
        "img_tokens": img_tokens,
        "txt_tokens": txt_tokens,
        "bf16_weight_GiB": sum(nbytes(w) for w in bf16) / 2**30,
        "fp8_weight_GiB": sum(nbytes(m.weight) for m in fp8) / 2**30,
        "nvfp4_weight_GiB": sum(nbytes(m.weight, m.weight_scale) for m in fp4) / 2**30,
    }

    def run_bf16():
        for (key, *_), w in zip(layers, bf16):
            F.linear(acts[key], w)

    def run_fp8():
        for (key, *_), mod in zip(layers, fp8):
            mod(acts[key])
        _ACT_CACHE.clear()

    def run_fp8_preset():
        for (key, *_), mod, w in zip(layers, fp8_pre, bf16):
            mod(acts[key]) if mod is not None else F.linear(acts[key], w)
        _ACT_CACHE.clear()

    def run_fp4():
        for (key, *_), mod in zip(layers, fp4):
            mod(acts[key])

    for name, fn in [
        ("bf16", run_bf16),
        ("fp8_triton_all", run_fp8),
        ("fp8_triton_flux1_preset", run_fp8_preset),
        ("nvfp4_triton_auto_all", run_fp4),
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
    import os

    os.environ["DQFAST_SHARE_ACT_QUANT"] = "0"
    run_fp8()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        run_fp8()
    torch.cuda.synchronize()
    res["fp8_triton_all_no_shared_quant_ms"] = (time.perf_counter() - t0) * 1e3 / 3
    os.environ["DQFAST_SHARE_ACT_QUANT"] = "1"
    for key in list(res):
        if key.endswith("_ms") and key != "bf16_ms":
            res["speedup_" + key[:-3]] = res["bf16_ms"] / res[key]
    return res


def write_md(path: Path, rows: list[dict], stack: dict | None, device: str) -> None:
    lines = [
        f"# Linear benchmarks on {device}",
        "",
        "Median ms (triton.testing.do_bench). speedup = BF16 time / path time. fp8 static/dynamic = "
        "fused Triton activation quantization + torch._scaled_mm; eager = torch ops + _scaled_mm.",
        "",
        "| model | layer | M | K | N | bf16 ms | fp8 GEMM only | fp8 eager static | fp8 triton static | "
        "fp8 triton per-token | nvfp4 fused W4A16 (default cfg) | nvfp4 fused W4A16 best cfg | "
        "nvfp4 dequant+cuBLAS | nvfp4 module (auto) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str) -> str:
        if key not in r:
            return "-"
        return f"{r[key]:.3f} ({r['bf16_ms'] / r[key]:.2f}x)"

    for r in rows:
        if "bf16_ms" not in r:
            lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | error: {r.get('error')} |")
            continue
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['bf16_ms']:.3f} | "
            + " | ".join(
                cell(r, k)
                for k in (
                    "fp8_gemm_only_ms",
                    "fp8_eager_static_ms",
                    "fp8_triton_static_ms",
                    "fp8_triton_dynamic_ms",
                    "nvfp4_w4a16_ms",
                    "nvfp4_w4a16_best_ms",
                    "nvfp4_dequant_gemm_ms",
                    "nvfp4_module_ms",
                )
            )
            + " |"
        )
    if stack:
        lines += [
            "",
            "## FLUX.1-dev-shaped Linear stack (19 double + 38 single blocks, 4096 img + 512 txt tokens)",
            "",
            "```",
            json.dumps(stack, indent=1),
            "```",
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-stack", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    t0 = time.time()
    shape_benchmarks(rows, sweep=not args.no_sweep)
    print(f"shape benchmarks: {time.time() - t0:.0f} s", flush=True)
    stack = None
    if not args.no_stack:
        try:
            torch.cuda.empty_cache()
            stack = flux_stack()
        except Exception as exc:
            stack = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    (out / "bench.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows, "flux_stack": stack}, indent=1))
    write_md(out / "bench.md", rows, stack, device)
    print((out / "bench.md").read_text())


if __name__ == "__main__":
    main()
