"""``dqfast inspect`` and ``dqfast check``: what a checkpoint holds, and what each serving engine
will do with it (headers only; exit status 1 on a problem or a target that does not load it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dqfast.cli._format import human, run
from dqfast.errors import DqfastError

__all__ = ["inspect_cmd", "check_cmd"]


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--base",
    "base",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Reference BF16 transformer: also judge the NVFP4 nibble order against it.",
)
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(path: Path, base: Path | None, as_json: bool) -> None:
    """Dtypes, shapes, quantization summary and problems of a checkpoint."""
    from dqfast.inspect import inspect_checkpoint

    r = run(lambda: inspect_checkpoint(path))
    order = None
    if base is not None and r.modules.get("nvfp4"):
        from dqfast.nvfp4 import nibble_order_report

        order = run(lambda: nibble_order_report(r.path, base))
        if order["order"] == "high_first":
            r.problems.append("packed NVFP4 bytes are nibble-swapped relative to the reference: " + order["advice"])
    if as_json:
        d = r.to_dict()
        if order is not None:
            d["nibble_order"] = order
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(f"{r.path}: {r.tensors} tensors in {r.files} file(s), {human(r.total_bytes)}")
        click.echo(f"class: {r.class_name}   quant_algo: {r.quant_algo} ({r.quant_config_source})")
        click.echo("dtypes: " + ", ".join(f"{k}={v}" for k, v in sorted(r.dtypes.items())))
        click.echo("modules: " + ", ".join(f"{k}={v}" for k, v in sorted(r.modules.items())))
        if r.ignore:
            click.echo(f"ignore: {len(r.ignore)} pattern(s): " + ", ".join(r.ignore[:8]) + (" ..." if len(r.ignore) > 8 else ""))
        if order is not None:
            click.echo(
                f"nibble order: {order['order']} (relative error vs reference: low-first "
                f"{order.get('low_first_rel_err', float('nan')):.3f}, high-first {order.get('high_first_rel_err', float('nan')):.3f})"
            )
        click.echo(f"problems: {len(r.problems)}")
        for p in r.problems:
            click.echo(f"  - {p}")
        _echo_target_verdicts(path)
    if r.problems:
        sys.exit(1)


def _echo_target_verdicts(path: Path) -> None:
    """One line per serving engine: what `dqfast check` concludes (docs/compat.md)."""
    from dqfast.check import check_checkpoint

    try:
        reports = check_checkpoint(path, "any")
    except DqfastError as e:
        click.echo(f"targets: not checked: {e}")
        return
    for rep in reports:
        click.echo(f"target {rep.summary()}")


@click.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--target", default="any", show_default=True, type=click.Choice(["sglang", "vllm-omni", "any"]), help="Serving engine (any = both)."
)
@click.option("--all-layers", is_flag=True, help="List every layer, not only those an engine does not load as written.")
@click.option("--json", "as_json", is_flag=True)
def check_cmd(path: Path, target: str, all_layers: bool, as_json: bool) -> None:
    """What SGLang Diffusion / vLLM-Omni will do with each layer of a checkpoint (reads headers only).

    Exit status 1 when an engine of the target does not load it."""
    from dqfast.check import check_checkpoint

    reports = run(lambda: check_checkpoint(path, target))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for rep in reports:
            click.echo(f"{rep.summary()}  [{rep.engine_version}, family {rep.family}]")
            for v in rep.layers:
                if all_layers or v.outcome in ("error", "dequantized"):
                    click.echo(f"  {v.module}: {v.stored} -> {v.outcome}: {v.detail}")
    if any(r.status == "fails" for r in reports):
        sys.exit(1)
