"""``dqfast demo``: the main job on an embedded default.

Generates a small synthetic FLUX.1-shaped checkpoint (real diffusers tensor names, narrow widths,
fixed seed) together with a ModelOpt-FP8-export-like directory and its calibrated maxima, then
runs the FP8 build exactly as a user would on a real export, and checks the result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dqfast.errors import OutputExistsError
from dqfast.fp8 import build_fp8_transformer
from dqfast.inspect import inspect_checkpoint
from dqfast.reader import open_checkpoint, read_tensor

__all__ = ["run_demo"]

# Written into every demo workdir: only a directory holding it (or an empty one) is ever deleted,
# so `--workdir ~` or `--workdir .` cannot wipe a user's files.
MARKER = ".dqfast-demo"


def run_demo(workdir: str | Path = "demo-out", show: Callable[..., None] | None = None) -> dict[str, Any]:
    """``show(report, as_json, show_decisions)`` prints the build report (the CLI passes its
    ``print_report``; taking it as an argument keeps ``demo`` from importing ``cli``)."""
    from rich.console import Console

    from dqfast.synth import make_transformer

    console = Console()
    work = Path(workdir)
    if work.exists():
        if not (work.is_dir() and ((work / MARKER).is_file() or not any(work.iterdir()))):
            raise OutputExistsError(
                f"--workdir {work}: exists and was not made by dqfast demo (no {MARKER} in it): "
                "refusing to delete it; choose another --workdir",
                path=str(work),
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by dqfast demo; the next run deletes this directory\n")
    console.print(f"[bold]1/3[/bold] generating a synthetic FLUX.1-shaped ModelOpt FP8 export in {work}/ ...")
    paths = make_transformer(
        work / "inputs",
        "flux1",
        blocks=2,
        single_blocks=4,
        heads=4,
        head_dim=32,
        config_overrides={"joint_attention_dim": 256, "pooled_projection_dim": 128, "in_channels": 16, "axes_dims_rope": [8, 12, 12]},
        seed=0,
        modelopt_fp8_export=True,
        max_shard_bytes=2_000_000,
    )
    amax = paths.backbone or paths.amax
    console.print(f"    base: {paths.base}\n    export: {paths.export}\n    maxima: {amax}")
    console.print("[bold]2/3[/bold] dqfast build fp8 (SGLang build_modelopt_fp8_transformer semantics, flux1 preset)")
    out = work / "flux1-fp8" / "transformer"
    report = build_fp8_transformer(
        out,
        modelopt_hf_dir=paths.export_root,
        modelopt_backbone_ckpt=amax,
        base_transformer_dir=paths.base,
        model_type="auto",
        max_shard_size=2_000_000,
    )
    if show is not None:
        show(report, False, False)
    console.print("[bold]3/3[/bold] checking the output")
    info = inspect_checkpoint(out)
    worst = 0.0
    q = open_checkpoint(out)
    base = open_checkpoint(paths.base)
    for d in report.decisions:
        if d.action != "fp8":
            continue
        w = read_tensor(q.tensors[f"{d.module}.weight"].file, f"{d.module}.weight")
        s = read_tensor(q.tensors[f"{d.module}.weight_scale"].file, f"{d.module}.weight_scale")
        ref = read_tensor(base.tensors[f"{d.module}.weight"].file, f"{d.module}.weight")
        rel = float(np.linalg.norm(w * s - ref) / np.linalg.norm(ref))
        worst = max(worst, rel)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    console.print(f"    {info.tensors} tensors in {info.files} shard(s); dtypes {info.dtypes}")
    console.print(f"    quant_algo {qc['quant_algo']}, {len(qc['ignore'])} ignore entries; problems found: {len(info.problems)}")
    console.print(f"    worst relative weight error after FP8 round trip: {worst:.4f} (e4m3 bound ~0.0625)")
    ok = not info.problems and worst < 0.07
    console.print("[green]demo OK[/green]" if ok else "[red]demo found problems[/red]")
    if not ok:
        raise SystemExit(1)
    return {"output": str(out), "worst_rel_error": worst, "report": report.to_dict()}
