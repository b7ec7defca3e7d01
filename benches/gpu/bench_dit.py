"""Whole-model benchmark: diffusers FluxTransformer2DModel (FLUX.1-dev config, random BF16 weights)
on one GPU, BF16 vs dqfast FP8 / NVFP4 runtime Linears, eager and torch.compile'd.

Per variant: median forward latency (CUDA events), weight bytes, peak memory, cosine of the output
against the BF16 eager output, and a kernel-time breakdown (GEMM / attention / activation quant /
NVFP4 dequant / other) from one profiled forward. Results go to --out as dit.json and dit.md;
dit.json is rewritten after every variant so a run cut short still leaves data.

Weights are quantized on the GPU with the runtime's own helpers (fp8_linear_from_float,
nvfp4_linear_from_float); static FP8 input scales come from one calibration forward (amax / 448
of each Linear's input on the benchmark input itself, so the accuracy figure is optimistic).

Memory: every variant keeps the BF16 Linears alive (parked) so the next variant can be built, so
`peak_GiB` = bytes of the tensors the model currently holds + the forward's transient peak
(max_memory_allocated - memory_allocated before the forward); `raw_max_allocated_GiB` is the
allocator figure including parked tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import _stub_core
import torch
import torch.nn.functional as F
from dqfast.presets import get_preset
from dqfast.runtime import CudaGraphRunner
from dqfast.runtime.linear import (
    _ACT_CACHE,
    fp8_linear_from_float,
    nvfp4_linear_from_float,
)
from torch import nn

GiB = 2.0**30
FLUX1_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# CPU smoke-test config (plumbing only): same block types, tiny widths.
TINY = dict(FLUX1_DEV, num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=64)


# -- model and inputs ---------------------------------------------------------------------------


def build_model(cfg: dict, device: torch.device) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build straight in BF16: no float32 copy of 12B weights
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: dict, img_tokens: int, txt_tokens: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    side = int(round(img_tokens**0.5))
    assert side * side == img_tokens, "image tokens must be a square grid"
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    return dict(
        hidden_states=rnd(1, img_tokens, cfg["in_channels"]),
        encoder_hidden_states=rnd(1, txt_tokens, cfg["joint_attention_dim"]),
        pooled_projections=rnd(1, cfg["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_ids=ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(txt_tokens, 3, device=device),
        guidance=torch.tensor([3.5], device=device, dtype=torch.bfloat16),
        return_dict=False,
    )


def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)[0]
    _ACT_CACHE.clear()  # the runtime's shared-quant cache holds the last activation; drop it between calls
    return out


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def model_tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type != "cuda":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.float().flatten(), b.float().flatten()
    cos = F.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).norm() / b.norm()).item()
    return cos, rel


# -- timing, memory, profile ---------------------------------------------------------------------


def time_forward(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> dict:
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0  # includes Triton JIT / torch.compile on first use
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "iters": iters, "first_call_s": first_s}


def measure_memory(model: nn.Module, fn: Callable[[], torch.Tensor]) -> dict:
    if not torch.cuda.is_available():
        return {"weights_GiB": model_tensor_bytes(model) / GiB}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    weights = model_tensor_bytes(model)
    return {
        "weights_GiB": weights / GiB,
        "transient_GiB": (peak - before) / GiB,
        "peak_GiB": (weights + peak - before) / GiB,
        "raw_max_allocated_GiB": peak / GiB,
    }


KERNEL_CLASSES = [
    ("fp8_act_quant", re.compile(r"_fp8_quant")),
    ("nvfp4_dequant", re.compile(r"_nvfp4_dequant|_nvfp4_to_e4m3")),
    # attention first: cuDNN's SDPA kernels also carry "wgmma"/"gemm"-like words in their names
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|_nvfp4_w4a16|triton_tem|splitk", re.I)),
]


def profile_breakdown(fn: Callable[[], torch.Tensor], wall_ms: float) -> dict:
    """Kernel time by class from one profiled forward (chrome trace 'kernel' events)."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    by_class: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        name, dur = e.get("name", ""), float(e.get("dur", 0.0)) / 1e3
        cls = next((c for c, pat in KERNEL_CLASSES if pat.search(name)), "other")
        by_class[cls] = by_class.get(cls, 0.0) + dur
        by_name.setdefault(name, [0.0, 0])
        by_name[name][0] += dur
        by_name[name][1] += 1
    total = sum(by_class.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "kernels": len(kernels),
        "kernel_ms": total,
        "wall_ms": wall_ms,
        "class_ms": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "class_share": {k: round(v / total, 4) for k, v in by_class.items()} if total else {},
        "top_kernels": [{"name": n[:140], "ms": round(v[0], 3), "count": v[1]} for n, v in top],
    }


# -- quantized module sets -----------------------------------------------------------------------


def calibrate(model: nn.Module, names: list[str], inputs: dict) -> dict[str, float]:
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def hook(_mod, args, name=name):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: max(float(v), 1e-6) for n, v in amax.items()}


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, mod in modules.items():
        set_module(model, name, mod)


# -- main ----------------------------------------------------------------------------------------


def write_results(out: Path, res: dict) -> None:
    (out / "dit.json").write_text(json.dumps(res, indent=1))
    lines = [
        f"# Whole FLUX.1-dev transformer on {res['env'].get('device')}",
        "",
        f"{res['env']}",
        "",
        f"Model: diffusers FluxTransformer2DModel, {res['config_note']}; {res['n_linears']} nn.Linear; "
        f"{res['img_tokens']} image + {res['txt_tokens']} text tokens, batch 1. Latency = median of "
        f"{res['iters']} forwards (CUDA events) after {res['warmup']} warm-ups. speedup = BF16 eager / variant. "
        "peak = model tensors + forward transient. cos/rel = output vs BF16 eager.",
        "",
        "| variant | ms | speedup | weights GiB | peak GiB | cos | rel err | GEMM share | attn share | "
        "quant/dequant share | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = res["variants"].get("bf16", {}).get("ms")
    for name, v in res["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'][:200]} |")
            continue
        sh = v.get("profile", {}).get("class_share", {})
        qd = sh.get("fp8_act_quant", 0.0) + sh.get("nvfp4_dequant", 0.0)
        lines.append(
            f"| {name} | {v['ms']:.1f} | {base / v['ms']:.2f}x | {v.get('weights_GiB', 0):.2f} | "
            f"{v.get('peak_GiB', 0):.2f} | {v.get('cos', float('nan')):.5f} | {v.get('rel', float('nan')):.4f} | "
            f"{sh.get('gemm', 0):.0%} | {sh.get('attention', 0):.0%} | {qd:.0%} | {v.get('first_call_s', 0):.1f} |"
        )
    lines += ["", "Kernel-time breakdown per variant (ms, from one profiled forward):", ""]
    for name, v in res["variants"].items():
        p = v.get("profile")
        if p:
            lines.append(
                f"- {name}: kernels {p['kernel_ms']:.1f} ms of {p['wall_ms']:.1f} ms wall, {p['kernels']} launches; {p['class_ms']}"
            )
    if res.get("skipped"):
        lines += ["", f"Skipped (time budget): {res['skipped']}"]
    (out / "dit.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dit-out")
    ap.add_argument("--tiny", action="store_true", help="CPU plumbing test with a 1+1-block model")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=520.0, help="skip later phases past this many seconds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--img-tokens", type=int, default=4096, help="image tokens (a square number); 512 text tokens")
    args = ap.parse_args()
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = TINY if args.tiny else FLUX1_DEV
    img_tokens, txt_tokens = (64, 16) if args.tiny else (args.img_tokens, 512)
    fp8_backend = "triton" if cuda else "emulation"
    fp4_backend = "triton" if cuda else "emulation_w4a16"

    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    env["dqfast_core_stubbed"] = _stub_core.STUBBED
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if cuda:
        env["cuda"] = torch.version.cuda
        env["sdpa_backends"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        }
    print(env, flush=True)

    model = build_model(cfg, dev)
    inputs = make_inputs(cfg, img_tokens, txt_tokens, dev)
    linear_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    originals = {n: model.get_submodule(n) for n in linear_names}
    res: dict = {
        "env": env,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "config_note": "FLUX.1-dev config (19 double + 38 single blocks, 24x128 heads)" if not args.tiny else "TINY smoke config",
        "n_linears": len(linear_names),
        "img_tokens": img_tokens,
        "txt_tokens": txt_tokens,
        "iters": args.iters,
        "warmup": args.warmup,
        "variants": {},
        "skipped": [],
    }
    print(
        f"built model in {time.time() - t_start:.1f} s; {len(linear_names)} Linears; {model_tensor_bytes(model) / GiB:.2f} GiB on GPU",
        flush=True,
    )

    ref: dict[str, torch.Tensor] = {}

    def run_variant(
        name: str, prepare: Callable[[], None] | None = None, profile: bool = True, est_s: float = 15.0, graph: bool = False
    ) -> None:
        elapsed = time.time() - t_start
        if args.only and name not in args.only.split(","):
            return
        if elapsed + est_s > args.budget_s:
            res["skipped"].append(name)
            print(f"skip {name}: {elapsed:.0f} s elapsed", flush=True)
            return
        t0 = time.time()
        try:
            if prepare:
                prepare()
            fn = lambda: forward(model, inputs)  # noqa: E731
            if graph:  # the whole forward captured once and replayed (dqfast.runtime.CudaGraphRunner)
                runner = CudaGraphRunner(lambda **kw: model(**kw)[0])

                def fn() -> torch.Tensor:
                    with torch.inference_mode():
                        return runner(**inputs)

            v = time_forward(fn, args.warmup, args.iters)
            y = fn()
            if "y" not in ref:
                ref["y"] = y.clone()
            v["cos"], v["rel"] = cosine(y, ref["y"])
            v.update(measure_memory(model, fn))
            if profile:
                v["profile"] = profile_breakdown(fn, v["ms"])
            v["phase_s"] = time.time() - t0
        except Exception as exc:  # record and go on: one broken variant must not lose the others
            traceback.print_exc()
            v = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        res["variants"][name] = v
        brief = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in v.items() if k != "profile"}
        print(name, json.dumps(brief), flush=True)
        if "profile" in v:
            print("   ", v["profile"].get("class_ms"), flush=True)
        write_results(out, res)

    # 1. BF16 eager (reference output)
    run_variant("bf16")

    # 2. FP8, all Linears, static per-tensor scales from one calibration pass
    amax = calibrate(model, linear_names, inputs)
    fp8 = {
        n: fp8_linear_from_float(originals[n], per_channel=False, input_scale=amax[n] / 448.0, backend=fp8_backend) for n in linear_names
    }
    run_variant("fp8_triton_static_all", lambda: swap(model, fp8))

    def set_fp8_backend(backend: str | None, dynamic: bool) -> None:
        for m in fp8.values():
            m.backend_request = backend
            if dynamic:
                m.__dict__.setdefault("_saved_input_scale", m.input_scale)
                m.input_scale = None
            elif "_saved_input_scale" in m.__dict__:
                m.input_scale = m.__dict__.pop("_saved_input_scale")

    run_variant("fp8_triton_per_token_all", lambda: set_fp8_backend(fp8_backend, True), profile=False)
    run_variant("fp8_eager_quant_static_all", lambda: set_fp8_backend("scaled_mm" if cuda else "emulation", False), profile=False)
    set_fp8_backend(fp8_backend, False)

    # 3. FP8 with SGLang's flux1 BF16-fallback list
    preset = get_preset("flux1")
    fp8_fb = [n for n in linear_names if preset.fp8_fallback_match(n)]
    res["fp8_flux1_fallbacks"] = len(fp8_fb)

    def fp8_preset() -> None:
        swap(model, fp8)
        swap(model, {n: originals[n] for n in fp8_fb})

    run_variant("fp8_triton_static_flux1_preset", fp8_preset)

    # 4. NVFP4 (Hopper: W4A16, dequant + cuBLAS at M >= 1024, fused Triton below)
    swap(model, originals)
    fp4 = {n: nvfp4_linear_from_float(originals[n], input_scale=amax[n] / (6.0 * 448.0), backend=fp4_backend) for n in linear_names}
    if cuda:
        torch.cuda.synchronize()
    run_variant("nvfp4_w4a16_all", lambda: swap(model, fp4))
    fp4_fb = [n for n in linear_names if preset.nvfp4_fallback_match(n)]
    res["nvfp4_flux1_fallbacks"] = len(fp4_fb)

    def fp4_preset() -> None:
        swap(model, fp4)
        swap(model, {n: originals[n] for n in fp4_fb})

    run_variant("nvfp4_w4a16_flux1_preset", fp4_preset, profile=False)

    # text-stream Linears (M = 512) through dequant + cuBLAS instead of the fused W4A16 kernel
    def fp4_min_m_256() -> None:
        swap(model, fp4)
        os.environ["DQFAST_W4A16_DEQUANT_MIN_M"] = "256"

    run_variant("nvfp4_w4a16_all_dequant_min_m_256", fp4_min_m_256)
    os.environ.pop("DQFAST_W4A16_DEQUANT_MIN_M", None)

    # NVFP4 weights as e4m3 inside an FP8 GEMM (W4A8, per-token FP8 activations): same bytes at rest
    def set_fp4_backend(backend: str) -> None:
        swap(model, fp4)
        for m in fp4.values():
            m.backend_request = backend

    run_variant("nvfp4_w4a8_all", lambda: set_fp4_backend("w4a8" if cuda else "emulation_w4a16"))
    set_fp4_backend(fp4_backend)
    swap(model, originals)
    run_variant("bf16_repeat", profile=False)  # run-to-run spread of the reference

    # 4b. the same models under CUDA graphs (no host work per layer)
    if cuda:
        run_variant("bf16_graph", profile=False, graph=True)
        run_variant(
            "fp8_triton_static_all_graph", lambda: (swap(model, fp8), set_fp8_backend(fp8_backend, False)), profile=False, graph=True
        )
        run_variant("nvfp4_w4a8_all_graph", lambda: set_fp4_backend("w4a8"), profile=False, graph=True)
        swap(model, originals)

    # 5. torch.compile, regional (each repeated block compiled once, diffusers' recipe)
    if cuda and not args.no_compile:
        import torch._dynamo as dynamo

        for attr in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, 64)
        blocks = [b for b in model.modules() if type(b).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock")]
        # Fp8Linear and Nvfp4Linear switch to their traceable paths while being compiled
        # (activation quantization and the NVFP4 weight conversion become Inductor kernels).

        def compiled(mods: dict[str, nn.Module] | None) -> Callable[[], None]:
            def prep() -> None:
                swap(model, originals)
                if mods:
                    swap(model, mods)
                dynamo.reset()
                for b in blocks:
                    b.compile(dynamic=False)

            return prep

        run_variant("bf16_compiled", compiled(None), est_s=120)
        run_variant("fp8_runtime_compiled_all", compiled(fp8), est_s=150)
        fp8_pre = {n: m for n, m in fp8.items() if n not in set(fp8_fb)}
        run_variant("fp8_runtime_compiled_flux1_preset", compiled(fp8_pre), est_s=120)
        for m in fp4.values():
            m.backend_request = "triton"  # traceable W4A16: dequantize + F.linear inside the graph
        run_variant("nvfp4_w4a16_all_compiled", compiled(fp4), est_s=150)
        for m in fp4.values():
            m.backend_request = "w4a8"
        run_variant("nvfp4_w4a8_all_compiled", compiled(fp4), est_s=150)
        # the same with the conversion as the opaque custom op (the runtime's previous default)
        from dqfast.runtime import linear as L

        L.W4A8_CONVERSION_IN_GRAPH = False
        run_variant("nvfp4_w4a8_all_compiled_custom_op", compiled(fp4), est_s=150)
        L.W4A8_CONVERSION_IN_GRAPH = True
    res["total_s"] = time.time() - t_start
    write_results(out, res)
    print((out / "dit.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
