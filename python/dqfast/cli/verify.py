"""``dqfast verify layers|trajectory``: how far a quantized checkpoint is from its BF16 base
(exit status 1 when a layer has NaNs)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dqfast.cli._format import run, track
from dqfast.cli._types import AT_LEAST_ONE, COUNT

__all__ = ["verify"]

# docs/cli.md: `--json` alone (or `--json -`) prints JSON to stdout instead of the table, as on every
# command; verify also takes `--json PATH` to write the report to a file.
_JSON_OUT: dict[str, Any] = dict(
    type=click.Path(path_type=Path, allow_dash=True),
    default=None,
    is_flag=False,
    flag_value="-",
    help="Print the full report as JSON (--json or --json -), or write it to PATH (--json PATH).",
)


def _json_to_stdout(path: Path | None) -> bool:
    return path is not None and str(path) == "-"


@click.group()
def verify() -> None:
    """How far a quantized checkpoint is from its BF16 base."""
    from dqfast.extras import require_extra

    run(lambda: require_extra("verify"))


def _quiet_verbose(f: Callable[..., Any]) -> Callable[..., Any]:
    """-q/-v of the verify commands (the report itself is unchanged; exit status too)."""
    f = click.option("-v", "--verbose", is_flag=True, help="Also print every layer's cosine and SNR.")(f)
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing unless a check fails.")(f)


@verify.command("layers")
@click.argument("base_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("quant_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "json_path", **_JSON_OUT)
@_quiet_verbose
def verify_layers(base_dir: Path, quant_dir: Path, json_path: Path | None, quiet: bool = False, verbose: bool = False) -> None:
    """Per-layer error of the dequantized weights (max/mean abs, cosine, SNR), outliers and NaNs."""
    from dqfast.verify.checkpoint import verify_checkpoint

    to_stdout = _json_to_stdout(json_path)
    step = _verify_progress(quiet or to_stdout)
    r = run(
        lambda: verify_checkpoint(base_dir, quant_dir, trajectory_check=False, json_path=None if to_stdout else json_path, progress=step)
    )
    _print_verify(r, as_json=to_stdout, quiet=quiet, verbose=verbose)


def _verify_progress(quiet: bool) -> Callable[[int, int, str], None] | None:
    """Live progress of the verify commands (layers, then denoising steps) on stderr, as for builds;
    none with -q or JSON on stdout. Closed by `run`."""
    from dqfast.progress import make_progress

    p = track(make_progress(quiet=quiet, unit="items"))
    if p is None:
        return None
    return lambda done, total, what: p(done, total, done, total, what)


@verify.command("trajectory")
@click.argument("base_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("quant_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--steps", type=AT_LEAST_ONE, default=8, show_default=True)
@click.option("--seed", type=COUNT, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", **_JSON_OUT)
@click.option("--png", "png_path", type=click.Path(path_type=Path), default=None, help="Per-step plot (needs matplotlib).")
@_quiet_verbose
def verify_trajectory(
    base_dir: Path,
    quant_dir: Path,
    steps: int,
    seed: int,
    device: str,
    json_path: Path | None,
    png_path: Path | None,
    quiet: bool = False,
    verbose: bool = False,
) -> None:
    """Run BF16 and quantized transformers through the same seeded denoising loop and compare."""
    from dqfast.verify.checkpoint import verify_checkpoint

    to_stdout = _json_to_stdout(json_path)
    out = None if to_stdout else json_path
    step = _verify_progress(quiet or to_stdout)
    r = run(
        lambda: verify_checkpoint(
            base_dir, quant_dir, steps=steps, seed=seed, device=device, json_path=out, png_path=png_path, progress=step
        )
    )
    _print_verify(r, as_json=to_stdout, quiet=quiet, verbose=verbose)


def _print_verify(r: dict[str, Any], as_json: bool = False, quiet: bool = False, verbose: bool = False) -> None:
    s = r["layer_summary"]
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        if s.get("nan_layers"):
            sys.exit(1)
        return
    if quiet:
        if s.get("nan_layers"):
            click.echo(f"NaN layers: {', '.join(s['nan_layers'])}", err=True)
            sys.exit(1)
        return
    if verbose:
        for row in s.get("rows", []):
            click.echo(f"  {row['module']}: cosine {row['cosine']:.6f}  SNR {row['snr_db']:.1f} dB")
    click.echo(
        f"layers: {s['layers']}  min cosine {s.get('min_cosine', float('nan')):.6f} ({s.get('worst_layer')})  "
        f"median SNR {s.get('median_snr_db') or float('nan'):.1f} dB  min SNR {s.get('min_snr_db') or float('nan'):.1f} dB"
    )
    if s.get("outliers"):
        click.echo(f"outliers: {', '.join(s['outliers'])}")
    if s.get("nan_layers"):
        click.echo(f"NaN layers: {', '.join(s['nan_layers'])}")
    t = r.get("trajectory")
    if t:
        click.echo(
            f"trajectory: {t['num_steps']} steps, min cosine {t['min_cosine']:.6f}, final cosine "
            f"{t['final_cosine']:.6f}, final PSNR {t['final_psnr_db']:.2f} dB"
        )
    if s.get("nan_layers"):
        sys.exit(1)
