"""What the command-line modules (``cli``, ``batch_cli``, ``ptq_cli``) share — the one-line error
exit and a byte formatter — kept apart so that they need not import one another."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from dqfast.errors import DqfastError

__all__ = ["fail", "human", "run_or_fail"]


def fail(msg: str) -> NoReturn:
    """``error: <msg>`` on one line, exit status 2."""
    click.echo(f"error: {' '.join(str(msg).splitlines())}", err=True)
    sys.exit(2)


def run_or_fail(fn: Callable[[], Any]) -> Any:
    """``fn()``; dqfast's errors and bad-input OS errors become :func:`fail`."""
    try:
        return fn()
    except DqfastError as e:
        fail(str(e))
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        fail(str(e))
    except ValueError as e:  # e.g. a malformed backbone.pt
        fail(str(e))


def human(n: float) -> str:
    """A byte count as B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
