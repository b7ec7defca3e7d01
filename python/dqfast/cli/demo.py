"""``dqfast demo``: a synthetic FLUX.1-shaped export converted end to end (:mod:`dqfast.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from dqfast.cli._format import print_report, run

__all__ = ["demo_cmd"]


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
def demo_cmd(workdir: Path) -> None:
    """Generate a small synthetic FLUX.1-shaped ModelOpt FP8 export and convert it."""
    from dqfast.demo import run_demo

    run(lambda: run_demo(workdir, show=print_report))
