"""GPU correctness: every fast path against the emulation path on DiT-like shapes.

Writes check.json to --out; exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sys as _sys
import traceback
from pathlib import Path

_sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stub_core import ensure_dqfast_importable  # noqa: E402

ensure_dqfast_importable()

import torch
from dqfast.runtime import quant as Q
from dqfast.runtime import triton_kernels as TK
from dqfast.runtime.linear import (
    _ACT_CACHE,
    fp8_linear_from_float,
    fuse_fp8_linears,
    fuse_nvfp4_linears,
    nvfp4_linear_from_float,
)

SHAPES = [(1024, 3072, 3072), (4096, 3072, 12288), (333, 12288, 3072), (77, 5120, 13824), (4096, 15360, 3072)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    results: list[dict] = []
    failed = 0

    def record(name: str, ok: bool, **kw) -> None:
        nonlocal failed
        failed += 0 if ok else 1
        row = {"check": name, "ok": bool(ok), **kw}
        results.append(row)
        print(("PASS " if ok else "FAIL ") + json.dumps(row))

    def guarded(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # keep going: one broken path must not hide the others
            record(name, False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-1500:])

    for m, k, n in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(m + k + n)
        x = (torch.randn(m, k, device=dev, generator=gen) * 2).to(torch.bfloat16)
        x[0, :7] = 0  # a partly-zero row
        lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
        tag = f"M{m}_K{k}_N{n}"

        def quant_kernels() -> None:
            q, s = TK.fp8_quant_per_token(x)
            sr = Q.per_token_scale(x)
            qr = Q.quantize_fp8(x, sr)
            diff = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
            record(f"fp8_quant_per_token {tag}", diff == 0 and torch.equal(s, sr), differing_bytes=diff)
            st = (x.float().abs().max() / 448 * 0.8).reshape(())
            q2 = TK.fp8_quant_static(x, st)
            d2 = int((q2.view(torch.uint8) != Q.quantize_fp8(x, st).view(torch.uint8)).sum())
            record(f"fp8_quant_static {tag}", d2 == 0, differing_bytes=d2)

        guarded(f"fp8_quant {tag}", quant_kernels)

        def fp8_paths() -> None:
            in_scale = float(x.float().abs().max() / 448)
            for pc in (False, True):
                for static in (True, False):
                    mod = fp8_linear_from_float(lin, per_channel=pc, input_scale=in_scale if static else None)
                    ref = mod.forward_emulation(x)
                    for be in ("scaled_mm", "triton"):
                        mod.backend_request = be
                        _ACT_CACHE.clear()
                        y = mod(x)
                        e = rel(y, ref)
                        record(f"fp8 {be} pc={pc} static={static} {tag}", e < 1e-2 and torch.isfinite(y).all(), rel_err=e)

        guarded(f"fp8 {tag}", fp8_paths)

        def fp4_paths() -> None:
            mod = nvfp4_linear_from_float(lin, input_scale=float(x.float().abs().max() / 2688))
            ref = mod.forward_emulation(x, act_quant=False)
            for cfg in TK.W4A16_CONFIGS:
                y = TK.nvfp4_w4a16_matmul(x, mod.weight, mod.weight_scale, mod.weight_scale_2, mod.bias, cfg)
                e = rel(y, ref)
                record(f"nvfp4 triton cfg={cfg} {tag}", e < 1e-2 and torch.isfinite(y).all(), rel_err=e)
            for be in ("triton", "triton_fused", "triton_dequant"):
                mod.backend_request = be
                y = mod(x)
                e = rel(y, ref)
                record(f"nvfp4 {be} module {tag}", e < 1e-2 and torch.isfinite(y).all(), rel_err=e)
            w4a4 = mod.forward_emulation(x)
            record(f"nvfp4 w4a4-vs-w4a16 emulation gap {tag}", True, rel_err=rel(w4a4, ref))

        guarded(f"nvfp4 {tag}", fp4_paths)

    def fused() -> None:
        k = 3072
        x = torch.randn(512, k, device=dev).to(torch.bfloat16)
        lins = [torch.nn.Linear(k, 1024, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        for i, l in enumerate(lins):
            with torch.no_grad():
                l.weight.mul_([1.0, 6.0, 0.2][i])
        s8 = [
            fp8_linear_from_float(l, input_scale=float(x.float().abs().max() / 448) * f, backend="triton")
            for l, f in zip(lins, (1.0, 1.3, 0.9))
        ]
        f8 = fuse_fp8_linears(s8)
        ref = torch.cat([m.forward_emulation(x) for m in s8], -1)
        e = rel(f8(x), ref)
        record("fused fp8 qkv (triton) vs per-shard emulation", e < 1e-2, rel_err=e)
        s4 = [nvfp4_linear_from_float(l, input_scale=0.01, backend="triton") for l in lins]
        f4 = fuse_nvfp4_linears(s4)
        ref4 = torch.cat([m.forward_emulation(x, act_quant=False) for m in s4], -1)
        for be in ("triton_fused", "triton_dequant"):
            f4.backend_request = be
            e4 = rel(f4(x), ref4)
            record(f"fused nvfp4 qkv ({be}, per-channel gs) vs per-shard emulation", e4 < 1e-2, rel_err=e4)

    guarded("fused", fused)

    def flashinfer_paths() -> None:
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            record("flashinfer", True, skipped="not importable")
            return
        x = torch.randn(1024, 3072, device=dev).to(torch.bfloat16)
        lin = torch.nn.Linear(3072, 3072, device=dev, dtype=torch.bfloat16)
        mod = fp8_linear_from_float(lin, input_scale=float(x.float().abs().max() / 448), backend="flashinfer")
        e = rel(mod(x), mod.forward_emulation(x))
        record("fp8 flashinfer bmm_fp8", e < 1e-2, rel_err=e)
        if torch.cuda.get_device_capability() >= (10, 0):
            m4 = nvfp4_linear_from_float(lin, input_scale=float(x.float().abs().max() / 2688), backend="flashinfer")
            e = rel(m4(x), m4.forward_emulation(x))
            record("nvfp4 flashinfer mm_fp4", e < 3e-2, rel_err=e)

    guarded("flashinfer", flashinfer_paths)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "check.json").write_text(json.dumps(results, indent=1))
    print(f"checks: {len(results)} run, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
