"""``dqfast batch MANIFEST``: run a manifest of conversion jobs (see :mod:`dqfast.batch`).

Register with ``main.add_command(batch)`` in :mod:`dqfast.cli`. Exit status: 0 when every job is
done or skipped, 1 when a job failed, 2 when the manifest is invalid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import click

from dqfast.cli_format import human as _human  # the CLI's one formatter
from dqfast.cli_types import COUNT, SizeParam
from dqfast.errors import DqfastError


@click.command("batch")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: subprocesses on this machine; ray: tasks on a Ray cluster.",
)
@click.option(
    "--address", default=None, help="Ray cluster address (e.g. 'auto' or 'ray://head:10001'); without it a local Ray instance is started."
)
@click.option("--max-parallel", type=COUNT, default=0, help="At most this many jobs at once (local; 0 = no cap).")
@click.option("--cores", type=COUNT, default=0, help="Cores to share between jobs (local; 0 = all).")
@click.option(
    "--memory-limit", type=SizeParam(), default=None, help="Memory to share between jobs, e.g. 64GB (local; default 80% of available)."
)
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Per-job logs (default: <manifest>.logs/).")
@click.option(
    "--summary", "summary_path", type=click.Path(path_type=Path), default=None, help="JSON summary path (default: <manifest>.summary.json)."
)
@click.option("--overwrite", is_flag=True, help="Rebuild outputs that exist without a dqfast job record.")
@click.option("--verify", is_flag=True, help="Re-hash finished outputs before skipping them.")
@click.option("--check", is_flag=True, help="Validate the manifest and plan every job (reading headers, writing nothing); exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def batch(
    manifest: Path,
    executor: Literal["local", "ray"],
    address: str | None,
    max_parallel: int,
    cores: int,
    memory_limit: int | None,
    log_dir: Path | None,
    summary_path: Path | None,
    overwrite: bool,
    verify: bool,
    check: bool,
    as_json: bool,
) -> None:
    """Run the conversion jobs of MANIFEST (TOML or YAML): in parallel, resumable, idempotent."""
    from dqfast.batch import ManifestError, batch_paths, load_manifest, run_batch

    try:
        m = load_manifest(manifest)
    except ManifestError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if check:
        from dqfast.batch import check_plans

        errors = check_plans(m)
        for name, err in errors.items():
            click.echo(f"error: job '{name}': {err}", err=True)
        click.echo(f"{manifest}: {len(m.jobs)} job(s), {len(errors)} with errors")
        sys.exit(2 if errors else 0)
    mem = memory_limit or 0
    try:  # before the progress display starts: a refusal is one line
        batch_paths(m, log_dir, summary_path)
    except DqfastError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    colors = {"done": "green", "skipped": "cyan", "adopted": "cyan", "failed": "red"}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=as_json,
    ) as progress:
        overall = progress.add_task("[bold]jobs", total=len(m.jobs))
        per_job: dict[str, Any] = {}

        def on_event(kind: str, job: Any, res: Any) -> None:
            if kind == "start":
                per_job[job.name] = progress.add_task(f"  {job.name}", total=None)
                return
            tid = per_job.pop(job.name, None)
            if tid is not None:
                progress.remove_task(tid)
            progress.advance(overall)
            c = colors.get(res.status, "white")
            extra = f" {res.error_type}: {res.error}" if res.status == "failed" else f" {_human(res.bytes)}"
            progress.console.print(f"[{c}]{res.status:>7}[/{c}] {job.name} ({res.seconds:.1f}s){extra}")

        try:
            summary = run_batch(
                m,
                executor=executor,
                address=address,
                max_parallel=max_parallel,
                cores=cores,
                memory_limit=mem,
                log_dir=log_dir,
                summary_path=summary_path,
                overwrite=overwrite,
                verify=verify,
                on_event=on_event,
            )
        except DqfastError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
        console.print(f"{len(summary.jobs)} job(s) in {summary.seconds:.1f}s: {counts}")
    sys.exit(0 if summary.ok else 1)
