"""GPU correctness: every fast path against the emulation path on DiT-like shapes.

Covers the Triton quantization kernels (first launch through Triton, later ones through the
runtime's low-overhead launcher, aligned and unaligned inputs), every FP8 GEMM back end
(`scaled_mm`, `triton`, FlashInfer cuBLASLt / cuDNN / CUTLASS), autotune (choice cached on disk,
reused), NVFP4 W4A16 and W4A8, the CUDA-graph runner, and what FlashInfer refuses on this GPU.
Writes check.json to --out; exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _stub_core
import torch
from dqfast.runtime import CudaGraphRunner
from dqfast.runtime import autotune as AT
from dqfast.runtime import quant as Q
from dqfast.runtime import triton_kernels as TK
from dqfast.runtime.linear import (
    _ACT_CACHE,
    FLASHINFER_FP8_BACKENDS,
    fp8_linear_from_float,
    fuse_fp8_linears,
    fuse_nvfp4_linears,
    nvfp4_linear_from_float,
)

SHAPES = [(1024, 3072, 3072), (4096, 3072, 12288), (333, 12288, 3072), (77, 5120, 13824), (4096, 15360, 3072)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Checker:
    def __init__(self) -> None:
        self.results: list[dict] = []
        self.failed = 0

    def record(self, name: str, ok: bool, **kw) -> None:
        self.failed += 0 if ok else 1
        row = {"check": name, "ok": bool(ok), **kw}
        self.results.append(row)
        print(("PASS " if ok else "FAIL ") + json.dumps(row), flush=True)

    def guarded(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # keep going: one broken path must not hide the others
            self.record(name, False, error=f"{type(exc).__name__}: {exc}"[:800], tb=traceback.format_exc()[-1500:])


def check_quant(c: Checker, x: torch.Tensor, tag: str) -> None:
    sr = Q.per_token_scale(x)
    qr = Q.quantize_fp8(x, sr)
    st = (x.float().abs().max() / 448 * 0.8).reshape(())
    for call in ("first", "fast"):  # the second call of a specialization goes through _Launcher
        q, s = TK.fp8_quant_per_token(x)
        diff = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
        # 1-ulp scale differences are torch's CUDA division, not the kernel (docs/runtime.md)
        c.record(f"fp8_quant_per_token {call} {tag}", diff <= x.numel() * 1e-3, differing_bytes=diff, scale_equal=bool(torch.equal(s, sr)))
        q2 = TK.fp8_quant_static(x, st)
        d2 = int((q2.view(torch.uint8) != Q.quantize_fp8(x, st).view(torch.uint8)).sum())
        c.record(f"fp8_quant_static {call} {tag}", d2 == 0, differing_bytes=d2)
    xu = x.reshape(-1)[1:].reshape(-1)[: x.numel() - x.shape[1]].reshape(x.shape[0] - 1, x.shape[1])  # 2-byte offset pointer
    q3 = TK.fp8_quant_static(xu, st)
    d3 = int((q3.view(torch.uint8) != Q.quantize_fp8(xu, st).view(torch.uint8)).sum())
    c.record(f"fp8_quant_static unaligned {tag}", d3 == 0, differing_bytes=d3)


def check_fp8(c: Checker, x: torch.Tensor, lin: torch.nn.Linear, tag: str, flashinfer: bool) -> None:
    in_scale = float(x.float().abs().max() / 448)
    for pc in (False, True):
        for static in (True, False):
            mod = fp8_linear_from_float(lin, per_channel=pc, input_scale=in_scale if static else None)
            ref = mod.forward_emulation(x)
            backends = ["scaled_mm", "triton"] + (["triton_fused"] if static else [])
            if flashinfer and static and not pc:
                from dqfast.runtime import flashinfer_gemm as FI

                sh = mod._plan(torch.bfloat16).shards[0]
                n_algos = FI.cublas_tactics(x.shape[0], sh.wt3, sh.sa, sh.sb, torch.bfloat16)
                c.record(f"flashinfer cuBLASLt algorithms {tag}", n_algos > 0, count=n_algos)
                backends += list(FLASHINFER_FP8_BACKENDS) + [f"flashinfer@{i}" for i in range(n_algos)]
            for be in backends:
                mod.backend_request = be
                try:
                    for _ in range(2):  # first and fast-launch call
                        _ACT_CACHE.clear()
                        y = mod(x)
                    e = rel(y, ref)
                    c.record(f"fp8 {be} pc={pc} static={static} {tag}", e < 1e-2 and bool(torch.isfinite(y).all()), rel_err=e)
                except Exception as exc:
                    c.record(f"fp8 {be} pc={pc} static={static} {tag}", False, error=f"{type(exc).__name__}: {exc}"[:600])


def check_fp4(c: Checker, x: torch.Tensor, lin: torch.nn.Linear, tag: str) -> None:
    mod = nvfp4_linear_from_float(lin, input_scale=float(x.float().abs().max() / 2688))
    ref = mod.forward_emulation(x, act_quant=False)
    for cfg in TK.W4A16_CONFIGS[:4]:
        y = TK.nvfp4_w4a16_matmul(x, mod.weight, mod.weight_scale, mod.weight_scale_2, mod.bias, cfg)
        e = rel(y, ref)
        c.record(f"nvfp4 triton cfg={cfg} {tag}", e < 1e-2 and bool(torch.isfinite(y).all()), rel_err=e)
    for be in ("triton", "triton_fused", "triton_dequant"):
        mod.backend_request = be
        y = mod(x)
        e = rel(y, ref)
        c.record(f"nvfp4 {be} module {tag}", e < 1e-2 and bool(torch.isfinite(y).all()), rel_err=e)
    # W4A8: the e4m3 weight bytes against the torch reference, the module against its emulation
    inv, _ = mod.w4a8_weight_scale()
    for call in ("first", "fast"):
        w8 = TK.nvfp4_to_e4m3(mod.weight, mod.weight_scale, inv)
        w8r = Q.nvfp4_to_e4m3(mod.weight, mod.weight_scale, inv)
        d = int((w8.view(torch.uint8) != w8r.view(torch.uint8)).sum())
        c.record(f"nvfp4_to_e4m3 {call} {tag}", d == 0, differing_bytes=d)
    qr, qsr = TK.fp8_quant_per_token(x)
    for call in ("first", "fast"):  # weight conversion + per-token quantization in one launch
        w8p, qp, qsp = TK.w4a8_prepare(mod.weight, mod.weight_scale, inv, x)
        d = int((w8p.view(torch.uint8) != w8r.view(torch.uint8)).sum()) + int((qp.view(torch.uint8) != qr.view(torch.uint8)).sum())
        c.record(f"w4a8_prepare {call} {tag} (== nvfp4_to_e4m3 + fp8_quant_per_token)", d == 0 and torch.equal(qsp, qsr), differing_bytes=d)
    mod.backend_request = "w4a8"
    _ACT_CACHE.clear()
    y = mod(x)
    e = rel(y, mod.forward_w4a8_emulation(x))
    c.record(f"nvfp4 w4a8 module vs w4a8 emulation {tag}", e < 1e-2 and bool(torch.isfinite(y).all()), rel_err=e)
    bf = torch.nn.functional.linear(x, lin.weight, lin.bias)
    c.record(
        f"nvfp4 accuracy vs bf16 {tag}",
        True,
        rel_w4a8=rel(y, bf),
        rel_w4a16=rel(ref, bf),
        rel_w4a4_emulation=rel(mod.forward_emulation(x), bf),
    )


def check_fused(c: Checker, dev: torch.device) -> None:
    k = 3072
    x = torch.randn(512, k, device=dev).to(torch.bfloat16)
    lins = [torch.nn.Linear(k, 1024, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    for lin, f in zip(lins, (1.0, 6.0, 0.2)):
        with torch.no_grad():
            lin.weight.mul_(f)
    s8 = [
        fp8_linear_from_float(lin, input_scale=float(x.float().abs().max() / 448) * f, backend="triton")
        for lin, f in zip(lins, (1.0, 1.3, 0.9))
    ]
    f8 = fuse_fp8_linears(s8)
    ref = torch.cat([m.forward_emulation(x) for m in s8], -1)
    e = rel(f8(x), ref)
    c.record("fused fp8 qkv (triton) vs per-shard emulation", e < 1e-2, rel_err=e)
    s4 = [nvfp4_linear_from_float(lin, input_scale=0.01, backend="triton") for lin in lins]
    f4 = fuse_nvfp4_linears(s4)
    ref4 = torch.cat([m.forward_emulation(x, act_quant=False) for m in s4], -1)
    for be in ("triton_fused", "triton_dequant"):
        f4.backend_request = be
        e4 = rel(f4(x), ref4)
        c.record(f"fused nvfp4 qkv ({be}, per-channel gs) vs per-shard emulation", e4 < 1e-2, rel_err=e4)
    f4.backend_request = "w4a8"
    e5 = rel(f4(x), f4.forward_w4a8_emulation(x))
    c.record("fused nvfp4 qkv (w4a8, per-channel gs) vs w4a8 emulation", e5 < 1e-2, rel_err=e5)


def check_small_m(c: Checker, dev: torch.device) -> None:
    """`triton` where TK.one_launch_wins: one launch (Fp8FusedCall), first call through Triton,
    later ones through the compiled kernel's C launcher with integer addresses; against the
    emulation and the two-launch path (quantize + _scaled_mm), 2-D, 3-D and unaligned inputs."""
    # The in-GEMM quantization's bytes: with an identity e4m3 weight (scale 1, no bias) each output
    # is e4m3(x / s) * s, exactly as bf16, so y equals the static quantization kernel's bytes
    # times s only if every quantized byte is the same.
    for m in (1, 16, 64):
        k = 512
        gen = torch.Generator(device=dev).manual_seed(1000 + m)
        eye = torch.eye(k, device=dev).to(torch.float8_e4m3fn)
        for s_val in (0.013, 1 / 448, 0.37):
            s = torch.tensor(s_val, device=dev)
            x = (torch.randn(m, k, device=dev, generator=gen) * 448 * s_val * 0.4).to(torch.bfloat16)
            x[0, :8] = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 448 * s_val, -448 * s_val, 1e4, -1e4], device=dev)
            y = TK.fp8_linear_static(x, eye, s, torch.ones((), device=dev), None, torch.bfloat16)
            # + 0.0: a GEMM's sum turns the -0 of e4m3(-0) and of tiny negatives into +0
            ref = (TK.fp8_quant_static(x, s).float() * s + 0.0).to(torch.bfloat16)
            d = int((y.view(torch.int16) != ref.view(torch.int16)).sum())
            c.record(f"fp8 one-launch in-GEMM quantization bytes M={m} s={s_val:.4g}", d == 0, differing=d, of=x.numel())
    for m, k, n in ((16, 3072, 3072), (1, 5120, 5120), (64, 3072, 12288), (64, 12288, 3072), (7, 3072, 9216)):
        gen = torch.Generator(device=dev).manual_seed(m * 7 + k + n)
        lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
        base = (torch.randn(m * k + 8, device=dev, generator=gen) * 2).to(torch.bfloat16)
        for pc in (False, True):
            xs = {"2d": base[: m * k].view(m, k), "3d": base[: m * k].view(1, m, k), "unaligned": base[1 : 1 + m * k].view(m, k)}
            mod = fp8_linear_from_float(lin, per_channel=pc, input_scale=float(base.float().abs().max() / 448), backend="triton_fused")
            for name, x in xs.items():
                ref = mod.forward_emulation(x)
                ys = [mod(x) for _ in range(3)]  # first through Triton, then the C launcher
                fc = mod.__dict__.get("_fused_call", (None,))[0]
                fast = fc is not None and fc.kernel is not None
                lim = TK.FUSED_MAX_M
                TK.FUSED_MAX_M = 0  # `triton` then takes the two-launch path, for comparison
                mod.backend_request = "triton"
                try:
                    mod.__dict__.pop("_fused_call", None)
                    y2 = mod(x)
                finally:
                    TK.FUSED_MAX_M = lim
                    mod.backend_request = "triton_fused"
                e, e2 = rel(ys[-1], ref), rel(ys[-1], y2)
                same = all(torch.equal(ys[0], y) for y in ys[1:])
                c.record(
                    f"fp8 triton one-launch M={m} K={k} N={n} pc={pc} {name}",
                    e < 1e-2 and e2 < 5e-3 and same and fast and bool(torch.isfinite(ys[-1]).all()),
                    rel_err=e,
                    rel_vs_two_launch=e2,
                    fast_launch=fast,
                    repeat_equal=same,
                )


def check_compiled_w4a8(c: Checker, dev: torch.device) -> None:
    """Nvfp4Linear W4A8 under torch.compile(fullgraph=True), the e4m3 conversion as a user-defined
    Triton kernel in the graph and as the custom op: against the eager path and the emulation."""
    import torch._dynamo as dynamo
    from dqfast.runtime import linear as L

    torch.manual_seed(5)
    for m, k, n in ((333, 3072, 3072), (64, 12288, 3072)):
        mod = nvfp4_linear_from_float(torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16), backend="w4a8")
        x = (torch.randn(m, k, device=dev) * 2).to(torch.bfloat16)
        _ACT_CACHE.clear()
        eager = mod(x)
        ref = mod.forward_w4a8_emulation(x)
        for in_graph in (True, False):
            L.W4A8_CONVERSION_IN_GRAPH = in_graph
            try:
                dynamo.reset()
                y = torch.compile(mod, fullgraph=True)(x)
            finally:
                L.W4A8_CONVERSION_IN_GRAPH = True
            e, e2 = rel(y, ref), rel(y, eager)
            c.record(
                f"nvfp4 w4a8 compiled (conversion in graph={in_graph}) M={m} K={k} N={n}",
                e < 1e-2 and e2 < 5e-3,
                rel_err=e,
                rel_vs_eager=e2,
            )


def check_autotune(c: Checker, dev: torch.device, out: Path) -> None:
    os.environ["DQFAST_AUTOTUNE_CACHE"] = tempfile.mkdtemp(prefix="dqfast-at-")
    AT._TUNERS.clear()
    x = torch.randn(1024, 3072, device=dev).to(torch.bfloat16)
    lin = torch.nn.Linear(3072, 3072, device=dev, dtype=torch.bfloat16)
    mod = fp8_linear_from_float(lin, input_scale=float(x.float().abs().max() / 448), backend="autotune")
    t0 = time.perf_counter()
    y = mod(x)
    tune_s = time.perf_counter() - t0
    e = rel(y, mod.forward_emulation(x))
    tuner = AT.tuner_for(dev)
    c.record(
        "autotune first call (measures, writes cache)",
        e < 1e-2 and tuner.measured == 1 and tuner.path.exists(),
        rel_err=e,
        tune_s=tune_s,
        entries=tuner.entries,
    )
    mod2 = fp8_linear_from_float(lin, input_scale=float(x.float().abs().max() / 448), backend="auto")
    AT._TUNERS.clear()  # a new process: the choice must come from the file
    y2 = mod2(x)
    t2 = AT.tuner_for(dev)
    c.record("auto reads the cached choice (no measuring)", t2.measured == 0 and rel(y2, y) < 1e-2, file=str(t2.path.name))
    (out / "autotune_cache_check.json").write_text(t2.path.read_text())
    os.environ.pop("DQFAST_AUTOTUNE_CACHE")
    AT._TUNERS.clear()


def check_graph(c: Checker, dev: torch.device) -> None:
    torch.manual_seed(0)
    k = 3072
    layers = torch.nn.ModuleList()
    for be in ("triton", "triton_fused"):
        lin = torch.nn.Linear(k, k, device=dev, dtype=torch.bfloat16)
        layers.append(fp8_linear_from_float(lin, input_scale=0.02, backend=be))
    fp4 = nvfp4_linear_from_float(torch.nn.Linear(k, k, device=dev, dtype=torch.bfloat16), backend="w4a8")

    def fwd(x):
        return fp4(layers[1](torch.nn.functional.gelu(layers[0](x))))

    run = CudaGraphRunner(fwd)
    for m in (1024, 256, 16):  # 16 rows: the one-launch path (Fp8FusedCall) under capture
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        with torch.inference_mode():
            eager = fwd(x).clone()
            g1 = run(x).clone()
            x2 = torch.randn(m, k, device=dev).to(torch.bfloat16)
            g2 = run(x2).clone()
            eager2 = fwd(x2)
        c.record(
            f"cuda graph runner M={m} (replay == eager)",
            torch.equal(g1, eager) and torch.equal(g2, eager2),
            max_abs=float((g2.float() - eager2.float()).abs().max()),
        )
    c.record("cuda graph runner keeps one graph per shape", len(run.graphs) == 3, graphs=len(run.graphs))


def check_flashinfer_refusals(c: Checker, dev: torch.device) -> None:
    """What FlashInfer says when asked for its CUTLASS FP8 GEMMs on this GPU (recorded, not failed)."""
    import flashinfer

    a = torch.randn(1, 256, 512, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(1, 1024, 512, device=dev).to(torch.float8_e4m3fn).transpose(1, 2)
    one = torch.ones((), device=dev)
    for name, call in (
        ("bmm_fp8 backend=cutlass", lambda: flashinfer.bmm_fp8(a, b, one, one, torch.bfloat16, backend="cutlass")),
        ("mm_fp8 backend=cutlass", lambda: flashinfer.mm_fp8(a[0], b[0].t().contiguous(), one, backend="cutlass")),
        ("bmm_fp8 backend=auto suitable", lambda: flashinfer.bmm_fp8.suitable_auto_backends),
    ):
        try:
            r = call()
            c.record(
                f"flashinfer {name} on {torch.cuda.get_device_name()}",
                True,
                result=str(r)[:200] if not isinstance(r, torch.Tensor) else "ran",
            )
        except Exception as exc:
            c.record(f"flashinfer {name} on {torch.cuda.get_device_name()}", True, refused=f"{type(exc).__name__}: {exc}"[:400])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    c = Checker()
    try:
        import flashinfer

        fi = True
        c.record("flashinfer import", True, version=flashinfer.__version__, dqfast_core_stubbed=_stub_core.STUBBED)
    except ImportError as exc:
        fi = False
        c.record("flashinfer import", True, skipped=f"not importable: {exc}")

    for m, k, n in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(m + k + n)
        x = (torch.randn(m, k, device=dev, generator=gen) * 2).to(torch.bfloat16)
        x[0, :7] = 0  # a partly-zero row
        lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
        tag = f"M{m}_K{k}_N{n}"
        c.guarded(f"fp8_quant {tag}", lambda x=x, tag=tag: check_quant(c, x, tag))
        c.guarded(f"fp8 {tag}", lambda x=x, lin=lin, tag=tag: check_fp8(c, x, lin, tag, fi))
        c.guarded(f"nvfp4 {tag}", lambda x=x, lin=lin, tag=tag: check_fp4(c, x, lin, tag))

    c.guarded("fused", lambda: check_fused(c, dev))
    c.guarded("small M one launch", lambda: check_small_m(c, dev))
    c.guarded("compiled w4a8", lambda: check_compiled_w4a8(c, dev))
    c.guarded("autotune", lambda: check_autotune(c, dev, out))
    c.guarded("cuda graph", lambda: check_graph(c, dev))
    if fi:
        c.guarded("flashinfer refusals", lambda: check_flashinfer_refusals(c, dev))
    c.record(
        "fast launcher used",
        TK._STATIC.fast_calls > 0 and TK._ROW.fast_calls > 0 and TK._W4A8_PREP.fast_calls > 0,
        static=TK._STATIC.fast_calls,
        row=TK._ROW.fast_calls,
        w4a8_prepare=TK._W4A8_PREP.fast_calls,
    )

    (out / "check.json").write_text(json.dumps(c.results, indent=1))
    print(f"checks: {len(c.results)} run, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
