"""``dqfast batch MANIFEST``: run a manifest of conversion jobs (see :mod:`dqfast.batch`).

Registered by :mod:`dqfast.cli`. Exit status: 0 when every job is
done or skipped, 1 when a job failed, 2 when the manifest is invalid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dqfast.cli._format import OneLineCommand, human
from dqfast.cli._types import COUNT, SizeParam

#: Options that are `run_batch` keywords of the same name.
_PASSED = ("executor", "address", "max_parallel", "cores", "log_dir", "summary_path", "overwrite", "verify")


@click.command("batch", cls=OneLineCommand)
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
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success (no progress, no per-job lines); failed jobs on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Also print each job's output and log path.")
def batch(manifest: Path, check: bool, as_json: bool, quiet: bool, verbose: bool, **kw: Any) -> None:
    """Run the conversion jobs of MANIFEST (TOML or YAML): in parallel, resumable, idempotent."""
    from dqfast.batch import batch_paths, load_manifest, run_batch

    # dqfast's errors (an invalid manifest, a refused path) end the command as one `error:` line
    # with exit status 2: OneLineCommand.main, the CLI's one mapping.
    m = load_manifest(manifest)
    if check:
        from dqfast.batch import check_plans

        errors = check_plans(m)
        for name, err in errors.items():
            click.echo(f"error: job '{name}': {err}", err=True)
        click.echo(f"{manifest}: {len(m.jobs)} job(s), {len(errors)} with errors")
        sys.exit(2 if errors else 0)
    batch_paths(m, kw["log_dir"], kw["summary_path"])  # before the progress display starts: a refusal is one line

    from dqfast.progress import BatchProgress

    colors = {"done": "green", "skipped": "cyan", "adopted": "cyan", "failed": "red"}
    # -q and --json: no live display and no per-job lines (a failed job is still named on stderr).
    show = not (quiet or as_json)
    display = BatchProgress(len(m.jobs), rich=sys.stderr.isatty()) if show else None

    def on_event(kind: str, job: Any, data: Any) -> None:
        if display is not None:
            display.event(kind, job.name, data)
        if kind != "end":
            return
        res = data
        if display is None:
            if res.status == "failed" and not as_json:
                click.echo(f"failed: {job.name}: {res.error_type}: {res.error} (log: {res.log})", err=True)
            return
        from rich.markup import escape  # error texts and notes hold "[...]" (regexes, lists): not markup

        c = colors.get(res.status, "white")
        extra = f" {res.error_type}: {escape(res.error)}" if res.status == "failed" else f" {human(res.bytes)}"
        line = f"[{c}]{res.status:>7}[/{c}] {job.name} ({res.seconds:.1f}s){extra}"
        if verbose or res.status == "failed":
            line += f"\n         output {res.output}, log {res.log}"
        # What a single build prints on stderr (forced target choices, warnings) belongs to its job here.
        line += "".join(f"\n         {escape(n)}" for n in res.notes)
        display.print(line)

    try:
        summary = run_batch(m, memory_limit=kw["memory_limit"] or 0, on_event=on_event, **{k: kw[k] for k in _PASSED})
    finally:
        if display is not None:
            display.close()
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    elif not quiet:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
        click.echo(f"{len(summary.jobs)} job(s) in {summary.seconds:.1f}s: {counts}", err=True)
    sys.exit(0 if summary.ok else 1)
