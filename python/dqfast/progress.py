"""Live progress of a build for the CLI: the engine's ``progress`` callback (see
:data:`dqfast.plan.ProgressFn`) shown as a ``rich`` bar on a terminal, or as plain periodic lines
on stderr otherwise (logs, CI). ``-q`` shows nothing.

Bytes are the output bytes the engine has written (headers included); rate and ETA come from
them. A ``build components`` run calls the same reporter for each component in turn: a new total
starts a new bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["BatchProgress", "CliProgress", "make_progress"]

#: Seconds between two plain lines (the last one, at 100%, is always printed).
PLAIN_EVERY = 5.0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class CliProgress:
    """A ``progress`` callable; :meth:`close` ends a live display (safe to call twice)."""

    def __init__(self, *, rich: bool, stream: TextIO | None = None, every: float = PLAIN_EVERY, unit: str = "bytes") -> None:
        # unit "bytes": a build (bytes written, GB/s); "items": a count of steps (verify's layers
        # and denoising steps), called as progress(done, total, done, total, current).
        self.unit = unit
        self.rich = rich
        self.stream = stream or sys.stderr
        self.every = every
        self._bar: Any = None
        self._task: Any = None
        self._total = -1
        self._t0 = 0.0
        self._last_line = 0.0

    def __call__(self, bytes_done: int, bytes_total: int, tensors_done: int, tensors_total: int, current: str) -> None:
        now = time.monotonic()
        if bytes_total != self._total:  # a new build (next component)
            self.close()
            self._total, self._t0, self._last_line = bytes_total, now, now
            if self.rich:
                self._start_bar(bytes_total)
        done = bytes_done >= bytes_total
        if self.rich:
            self._bar.update(self._task, completed=bytes_done, tensor=f"{tensors_done}/{tensors_total} {current}")
            self._bar.refresh()
            if done:
                self.close()
            return
        if done or now - self._last_line >= self.every:
            self._last_line = now
            rate = bytes_done / max(now - self._t0, 1e-9)
            eta = (bytes_total - bytes_done) / rate if rate > 0 else float("inf")
            pct = 100.0 * bytes_done / bytes_total if bytes_total else 100.0
            if self.unit == "items":
                print(f"dqfast: {bytes_done}/{bytes_total} ({pct:.0f}%), ETA {eta:.0f}s, {current}", file=self.stream, flush=True)
                return
            print(
                f"dqfast: {_gb(bytes_done)} / {_gb(bytes_total)} ({pct:.0f}%), {tensors_done}/{tensors_total} tensors, "
                f"{rate / 1e9:.2f} GB/s, ETA {eta:.0f}s, {current}",
                file=self.stream,
                flush=True,
            )

    def _start_bar(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        amount = [MofNCompleteColumn()] if self.unit == "items" else [DownloadColumn(), TransferSpeedColumn()]
        self._bar = Progress(
            TextColumn("[bold]dqfast"),
            BarColumn(),
            *amount,
            TimeRemainingColumn(),
            TextColumn("{task.fields[tensor]}"),
            console=Console(file=self.stream),
            transient=True,
            # Refreshed from the callback only: no display thread left behind if the build fails.
            auto_refresh=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("build", total=total, tensor="")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def make_progress(*, quiet: bool, stream: TextIO | None = None, unit: str = "bytes") -> CliProgress | None:
    """The CLI's reporter: none when quiet, a rich bar when ``stream`` (stderr) is a terminal,
    plain periodic lines otherwise."""
    if quiet:
        return None
    s = stream or sys.stderr
    return CliProgress(rich=s.isatty(), stream=s, unit=unit)


class BatchProgress:
    """``dqfast batch``'s display: a bar per running job and a total bar, both in bytes written
    with rate and ETA (rich, on a terminal), or a plain line per finished job and a total line at
    most every ``every`` seconds (logs, CI). Fed by :func:`dqfast.batch.run_batch`'s events.

    A job's byte total is known once its builder starts writing; the total bar counts jobs not
    started yet at the mean size of the known ones (so its ETA firms up as jobs start)."""

    def __init__(self, njobs: int, *, rich: bool, stream: TextIO | None = None, every: float = PLAIN_EVERY) -> None:
        self.njobs, self.rich, self.every = njobs, rich, every
        self.stream = stream or sys.stderr
        self.jobs: dict[str, tuple[int, int]] = {}  # name -> (bytes done, bytes total)
        self.finished = 0
        self._t0 = self._last_line = time.monotonic()
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        if rich:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._bar.start()
            self._total_task = self._bar.add_task(self._total_label(), total=None)

    def _total_label(self) -> str:
        return f"[bold]total {self.finished}/{self.njobs} jobs"

    def totals(self) -> tuple[int, int | None]:
        """(bytes done, estimated bytes total; None while no job's size is known)."""
        known = [t for _, t in self.jobs.values() if t > 0]
        done = sum(d for d, _ in self.jobs.values())
        if not known:
            return done, None
        unknown = self.njobs - len(known)
        return done, sum(known) + unknown * (sum(known) // len(known))

    def event(self, kind: str, name: str, data: Any) -> None:
        if kind == "start":
            self.jobs.setdefault(name, (0, 0))
            if self._bar is not None:
                self._tasks[name] = self._bar.add_task(f"  {name}", total=None)
        elif kind == "progress":
            done, total = data
            self.jobs[name] = (done, total)
            if self._bar is not None and name in self._tasks:
                self._bar.update(self._tasks[name], completed=done, total=total)
        elif kind == "end":
            self.finished += 1
            size = int(getattr(data, "bytes", 0) or 0) or self.jobs.get(name, (0, 0))[1]
            self.jobs[name] = (size, size)
            if self._bar is not None and name in self._tasks:
                self._bar.remove_task(self._tasks.pop(name))
        self._refresh(kind == "end")

    def _refresh(self, force: bool) -> None:
        done, total = self.totals()
        if self._bar is not None:
            self._bar.update(self._total_task, completed=done, total=total, description=self._total_label())
            return
        now = time.monotonic()
        if not force and now - self._last_line < self.every:
            return
        self._last_line = now
        rate = done / max(now - self._t0, 1e-9)
        if total is None:
            size, eta = "?", "?"
        else:
            size = f"{_gb(total)} ({100.0 * done / total if total else 100.0:.0f}%)"
            eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        print(
            f"dqfast batch: {self.finished}/{self.njobs} jobs, {_gb(done)} / {size}, {rate / 1e9:.2f} GB/s, ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def print(self, line: str) -> None:
        """A line above the live display (or plain)."""
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            from rich.text import Text

            print(Text.from_markup(line).plain, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
