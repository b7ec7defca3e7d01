"""What the command modules of ``dqfast.cli`` share: the one place errors become an ``error:``
line and an exit status (:class:`OneLineErrors`, :func:`run`), and the formatting of sizes and
build reports."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from dqfast.errors import DqfastError

if TYPE_CHECKING:
    from dqfast.plan import BuildReport

__all__ = [
    "USER_ERRORS",
    "OneLineErrors",
    "OneLineCommand",
    "OneLineGroup",
    "fail",
    "human",
    "run",
    "track",
    "print_report",
    "print_warnings",
]

T = TypeVar("T")

#: What a command turns into ``error: <message>`` and exit status 2: every dqfast error (the whole
#: ``dqfast.errors`` hierarchy), and the OS refusing a path the user named. Anything else is a bug
#: in dqfast and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    DqfastError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def fail(msg: str, code: int = 2) -> NoReturn:
    """``error: <msg>`` on one line, exit status ``code`` (2: bad input)."""
    click.echo(f"error: {' '.join(str(msg).splitlines())}", err=True)
    sys.exit(code)


class OneLineErrors:
    """The one mapping from exceptions to ``error:`` lines and exit statuses, for the command a
    process starts in (``dqfast``, or ``batch`` / ``ptq`` invoked on their own): dqfast's errors
    (:data:`USER_ERRORS`) and usage errors (a bad flag value, a missing option: click's) exit 2;
    a missing optional dependency names its extra."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        run = super().main  # type: ignore[misc]
        if not standalone_mode:
            return run(*args, standalone_mode=False, **kwargs)
        try:
            rv = run(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `dqfast build`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            fail(e.format_message(), e.exit_code)
        except USER_ERRORS as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            if not e.name or e.name.split(".")[0] == "dqfast":
                raise  # dqfast's own module missing: a bug, keep the traceback
            from dqfast.extras import EXTRAS, missing_extra

            top = e.name.split(".")[0]
            extra = next((x for x, mods in EXTRAS.items() if top in mods), None)
            fail(str(missing_extra(extra, top)) if extra else f"this command needs '{top}', which is not installed")
        except click.exceptions.Abort as e:
            click.echo("Aborted!", err=True)
            # Ctrl-C / SIGTERM outside a build: the same exit status as a cancelled build.
            sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


class OneLineGroup(OneLineErrors, click.Group):
    """A click group with :class:`OneLineErrors` (``dqfast`` itself)."""


class OneLineCommand(OneLineErrors, click.Command):
    """A click command with :class:`OneLineErrors` (``batch``, ``ptq``: also run on their own)."""


def human(n: float) -> str:
    """A byte count as B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


#: Live progress displays started by a command (`track`), ended by `run` whatever happens.
_PROGRESS: list[Any] = []


def track(progress: T) -> T:
    """Have :func:`run` close this live progress display when the command ends."""
    if progress is not None:
        _PROGRESS.append(progress)
    return progress


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(fn: Callable[[], T]) -> T:
    """Run a command's work. SIGTERM takes the Ctrl-C path: the engine is cancelled, its staging
    directory removed and the previous output left as it was; exit status 130 either way."""
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return fn()  # dqfast's errors: one line, exit 2, in OneLineErrors.main
    except KeyboardInterrupt:
        for p in _PROGRESS:
            p.close()
        click.echo("interrupted: nothing was written at the output path", err=True)
        sys.exit(130)
    finally:
        for p in _PROGRESS:
            p.close()
        _PROGRESS.clear()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def print_report(report: BuildReport, as_json: bool, show_decisions: bool) -> None:
    """A build report: JSON, or a summary table (and the per-module plan with ``show_decisions``)."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        print_warnings(report)
        return
    from rich.console import Console
    from rich.table import Table

    # Full names matter more than a tidy table: never truncate, even when not on a terminal.
    console = Console(width=max(Console().width, 140))
    if show_decisions:
        t = Table(title="plan: what happens to each module")
        for col in ("module", "action", "why"):
            t.add_column(col, overflow="fold")
        for d in report.decisions:
            t.add_row(d.module, d.action, d.reason)
        console.print(t)
    s = Table(title=f"dqfast {report.quant_algo} build" + (" (dry run: nothing written)" if report.dry_run else ""))
    s.add_column("what")
    s.add_column("value", justify="right")
    for k, v in report.counts.items():
        s.add_row(k.replace("_", " "), str(v))
    if not report.dry_run:
        s.add_row("output", str(report.output_dir))
        s.add_row("shards", str(len(report.shards)))
        s.add_row("read", human(report.bytes_read))
        s.add_row("read with O_DIRECT", human(report.bytes_read_direct))
        s.add_row("writes", "O_DIRECT" if report.direct_writes else "page cache")
        s.add_row("written", human(report.bytes_written))
        s.add_row("seconds", f"{report.seconds:.2f}")
        s.add_row("throughput", f"{report.throughput_gbps:.2f} GB/s of input")
        s.add_row("peak RSS", human(report.peak_rss_bytes))
        s.add_row("threads", str(report.threads))
    console.print(s)
    print_warnings(report)


def print_warnings(report: BuildReport) -> None:
    # stderr, also with --json: a warning must reach the user whatever stdout is piped into.
    for f in report.target_forced:
        click.echo(f"target {report.target}: {f}", err=True)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
