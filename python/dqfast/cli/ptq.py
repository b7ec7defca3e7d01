"""``dqfast ptq``: ModelOpt post-training quantization, then (optionally) dqfast build and verify.

Registered by :mod:`dqfast.cli`; usable standalone too.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import click

from dqfast.cli._format import OneLineCommand
from dqfast.cli._types import AT_LEAST_ONE, COUNT
from dqfast.targets import DEFAULT_TARGET, TARGET_NAMES

#: Options that are `CalibConfig` fields, and `run_ptq` keywords, of the same name.
_CALIB = ("prompts_file", "calib_size", "n_steps", "batch_size", "seed", "height", "width", "num_frames", "text_len")
_PASSED = ("algo", "model_type", "seed", "quantize_mha", "build", "verify", "overwrite", "device", "verify_steps", "target", "fit_target")


@click.command("ptq", cls=OneLineCommand)
@click.option(
    "--model-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Diffusers pipeline dir (model_index.json; every transformer* component) or one component dir.",
)
@click.option(
    "--output-dir",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output root: ckpt/<component>.pt, hf/<component>/, dqfast/<component>/, report.json.",
)
@click.option("--algo", type=click.Choice(["fp8", "nvfp4"]), default="fp8", show_default=True)
@click.option("--model-type", default="auto", show_default=True, help="Preset: auto, flux1, flux2, hunyuan-video, qwen-image, wan, none.")
@click.option("--component", "components", multiple=True, help="Transformer component(s) to quantize (repeatable).")
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Calibration prompts, one per line (default: dqfast's built-in set).",
)
@click.option("--calib-size", type=AT_LEAST_ONE, default=128, show_default=True, help="Prompts used for calibration.")
@click.option("--n-steps", type=AT_LEAST_ONE, default=30, show_default=True, help="Denoising steps per calibration batch.")
@click.option("--batch-size", type=AT_LEAST_ONE, default=2, show_default=True)
@click.option("--seed", type=COUNT, default=0, show_default=True)
@click.option("--height", type=AT_LEAST_ONE, default=None, help="Calibration image height in pixels (default: ModelOpt's per model).")
@click.option("--width", type=AT_LEAST_ONE, default=None, help="Calibration image width in pixels.")
@click.option("--num-frames", type=AT_LEAST_ONE, default=None, help="Calibration video frames (Wan).")
@click.option("--text-len", type=AT_LEAST_ONE, default=512, show_default=True, help="Text tokens of the pseudo-embeddings.")
@click.option("--quantize-mha", is_flag=True, help="Also quantize attention Q/K/V BMMs (FP8), as ModelOpt's --quantize-mha.")
@click.option("--build", is_flag=True, help="Run dqfast build fp8|nvfp4 into <out>/dqfast/<component>.")
@click.option("--verify", is_flag=True, help="Layer and trajectory verification into <out>/report.json (implies --build).")
@click.option(
    "--target",
    type=click.Choice(TARGET_NAMES),
    default=DEFAULT_TARGET,
    show_default=True,
    help="--build: serving engine the output must load in, as for `dqfast build` (none = no engine check).",
)
@click.option("--fit-target", is_flag=True, help="--build: keep in BF16 the layers the --target engine cannot load quantized.")
@click.option("--verify-steps", type=AT_LEAST_ONE, default=None, help="Trajectory steps (default: min(n-steps, 8)).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success (no progress, no summary); errors still go to stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Also print each component's per-layer cosine and SNR.")
def ptq(**kw: Any) -> None:
    """ModelOpt PTQ of a diffusers transformer with ModelOpt's diffusion presets.

    Conditioning comes from deterministic pseudo-embeddings (SHA-256-seeded noise per prompt):
    no text encoder is run. See docs/ptq.md.
    """
    from dqfast.extras import require_extra

    require_extra("ptq")
    from dqfast.ptq import CalibConfig, run_ptq

    # -q: ModelOpt's own prints (quantizer counts, export paths) are held back and shown only when
    # the run fails; warnings are not shown.
    held = io.StringIO()
    try:
        calib = CalibConfig(**{k: kw[k] for k in _CALIB})
        with contextlib.ExitStack() as quiet:
            if kw["quiet"]:
                quiet.enter_context(contextlib.redirect_stdout(held))
                quiet.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")  # ModelOpt's and torch's UserWarnings
            result = run_ptq(
                kw["model_dir"],
                kw["out_dir"],
                calib=calib,
                components=list(kw["components"]) or None,
                progress=not (kw["no_progress"] or kw["quiet"]),
                **{k: kw[k] for k in _PASSED},
            )
    except BaseException:
        # The held prints, then the error (one `error:` line, exit 2, from OneLineCommand.main).
        click.echo(held.getvalue(), err=True, nl=False)
        raise
    if kw["quiet"]:
        return
    for c in result.components:
        click.echo(f"{c.name}: {c.backbone}  {c.hf_dir}" + (f"  {c.dqfast_dir}" if c.dqfast_dir else ""))
        if c.trajectory:
            t = c.trajectory
            click.echo(
                f"  layers {c.layers['layers'] if c.layers else 0}, min weight cosine "
                f"{(c.layers or {}).get('min_cosine', float('nan')):.5f}; trajectory final cosine {t['final_cosine']:.6f}, "
                f"PSNR {t['final_psnr_db']:.2f} dB"
            )
        if kw["verbose"]:
            for row in (c.layers or {}).get("rows", []):
                click.echo(f"    {row['module']}: cosine {row['cosine']:.6f}  SNR {row['snr_db']:.1f} dB")
    click.echo(f"report: {result.report_path}")


__all__ = ["ptq"]
