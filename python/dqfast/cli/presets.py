"""``dqfast presets``: the model registry (:mod:`dqfast.models`) as a list."""

from __future__ import annotations

import click

__all__ = ["presets_cmd"]


@click.command("presets")
def presets_cmd() -> None:
    """List the model presets and where their lists come from."""
    from dqfast.models import PRESETS

    for p in PRESETS.values():
        click.echo(
            f"{p.name}: classes={list(p.class_names)} fp8_fallback={len(p.fp8_fallback)} "
            f"nvfp4_fallback={len(p.nvfp4_fallback)} ptq_disabled={len(p.ptq_disabled)}"
        )
        if p.source:
            click.echo(f"    source: {p.source}")
