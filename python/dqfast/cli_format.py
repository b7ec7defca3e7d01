"""What the command-line modules (``cli``, ``batch_cli``, ``ptq_cli``) share — the one place
errors become an ``error:`` line and an exit status, and a byte formatter — kept apart so that
they need not import one another."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from dqfast.errors import DqfastError

__all__ = ["USER_ERRORS", "OneLineErrors", "OneLineCommand", "OneLineGroup", "fail", "human"]

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
