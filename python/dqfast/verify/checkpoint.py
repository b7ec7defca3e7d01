"""One call that judges a quantized checkpoint against its BF16 base: per-layer weight error and a
denoising trajectory (both models built from their directories; the quantized one through
``dqfast.runtime.load_quantized``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dqfast._files import typed_error
from dqfast.errors import CheckpointError
from dqfast.reader import open_checkpoint


def summarize_layers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst layer, SNR spread, outliers and NaN layers of a ``layer_errors`` table (rows kept)."""
    import math
    import statistics

    if not rows:
        return {"layers": 0}
    snrs = [r["snr_db"] for r in rows if math.isfinite(r["snr_db"])]
    worst = min(rows, key=lambda r: r["cosine"])
    return {
        "layers": len(rows),
        "min_cosine": worst["cosine"],
        "worst_layer": worst["module"],
        "median_snr_db": statistics.median(snrs) if snrs else None,
        "min_snr_db": min(snrs) if snrs else None,
        "outliers": [r["module"] for r in rows if r.get("outlier")],
        "nan_layers": [r["module"] for r in rows if r.get("nan")],
        "rows": rows,
    }


def verify_checkpoint(
    base_dir: str | Path,
    quant_dir: str | Path,
    *,
    steps: int = 8,
    seed: int = 0,
    device: str = "cpu",
    calib: Any = None,
    json_path: str | Path | None = None,
    png_path: str | Path | None = None,
    trajectory_check: bool = True,
    progress: Callable[[int, int, str], Any] | None = None,
) -> dict[str, Any]:
    """Layer errors (always) and, with ``trajectory_check``, a seeded denoising comparison.

    Conditioning comes from ``calib`` (a ``dqfast.ptq.CalibConfig``); by default deterministic
    pseudo prompt embeddings, since no text encoder is loaded — the comparison is between the two
    transformers on identical inputs, which is what quantization changes. ``progress(done, total,
    what)`` is called after each layer, then after each denoising step.
    """
    from dqfast import _core
    from dqfast.verify.layers import layer_errors

    # The reports are outputs: never written over (or into) the checkpoints being compared.
    for flag, out in (("--json", json_path), ("--png", png_path), ("--png", png_path and Path(png_path).with_suffix(".trajectory.json"))):
        if out is not None:
            _core.check_output_paths(out, [base_dir, quant_dir], flag)
    # Both checkpoints go through dqfast's validating reader first (every header, every offset
    # against the real file size): the safetensors library used below would otherwise meet a
    # truncated file with its own untyped exception.
    for d in (base_dir, quant_dir):
        open_checkpoint(d)
    try:
        rows = layer_errors(base_dir, quant_dir, progress)
    except CheckpointError:
        raise
    except (ValueError, OSError) as e:  # CheckpointMismatch and the safetensors library's errors
        raise typed_error(CheckpointError, f"{quant_dir}: {e}", quant_dir) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise typed_error(CheckpointError, f"{quant_dir}: {e}", quant_dir) from None
    report: dict[str, Any] = {"base": str(base_dir), "quantized": str(quant_dir), "layer_summary": summarize_layers(rows)}
    if trajectory_check:
        from dqfast.ptq.calibration import CalibConfig, model_family, timestep_scale, trajectory_inputs
        from dqfast.ptq.loading import load_transformer
        from dqfast.runtime.loader import load_quantized
        from dqfast.verify.trajectory import trajectory

        cc = calib or CalibConfig(calib_size=1, batch_size=1, n_steps=steps, seed=seed, progress=False)
        base = load_transformer(base_dir).to(device)
        quant = load_transformer(base_dir)
        load_report = load_quantized(quant, quant_dir)
        quant.to(device)
        family = model_family(base)
        inputs = trajectory_inputs(base, cc)
        shift = cc.shift if cc.shift is not None else (3.0 if family == "flux" else 5.0)
        traj = trajectory(
            base, quant, inputs, steps=steps, seed=seed, shift=shift, timestep_scale=timestep_scale(family), progress=progress
        )
        t = traj.to_dict()
        t.update(
            inputs_note=f"one prompt ({cc.conditioning_kind()}), latent shape {list(inputs['hidden_states'].shape)}",
            fp8_layers=len(load_report.fp8_layers),
            nvfp4_layers=len(load_report.nvfp4_layers),
            high_precision_layers=len(load_report.high_precision_layers),
        )
        report["trajectory"] = t
        if png_path is not None:
            report["plot"] = traj.write_report(Path(png_path).with_suffix(".trajectory.json"), png_path)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
