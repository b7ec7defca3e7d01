"""dqfast's exception types.

Every error carries ``path`` and ``tensor`` attributes (``None`` when not applicable) and a
one-line message that names the file, the tensor or option and the problem.

The classes are defined here, in Python, and the Rust extension raises these very classes (it
looks them up by name in this module): an exception whose class is importable by its module name
pickles, so an error raised in a ``ProcessPoolExecutor`` worker or a Ray task reaches the parent
as itself, with its attributes, instead of as a ``PicklingError``. This module imports nothing from
dqfast, so any module (the extension included) can import it without a cycle.

Every exception dqfast raises to its users is one of these classes (``tests/test_errors.py``
checks that no other module defines one): the CLI maps them all to one ``error:`` line and exit
status 2 in one place (``dqfast.cli._format.OneLineErrors``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "DqfastError",
    "CheckpointError",
    "PlanError",
    "UnsafeOutputError",
    "TargetError",
    "OutputExistsError",
    "DqfastIOError",
    "InternalError",
    "BackboneError",
    "HubCacheError",
    "CheckpointMismatch",
    "ManifestError",
    "MissingExtraError",
]


def _rebuild(cls: type[DqfastError], args: tuple[Any, ...], state: dict[str, Any]) -> DqfastError:
    # Not cls(*args): subclasses may take other constructor arguments (ManifestError takes a
    # list of problems); the message and every attribute come back as they were.
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


class DqfastError(Exception):
    """Base class of every dqfast error."""

    path: str | None
    tensor: str | None

    def __init__(self, *args: Any, path: str | None = None, tensor: str | None = None) -> None:
        super().__init__(*args)
        self.path = None if path is None else str(path)
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class CheckpointError(DqfastError):
    """A checkpoint file, header, index or tensor is malformed or missing."""


class PlanError(DqfastError):
    """A build plan or its inputs are inconsistent (bad amax, shapes, options)."""


class UnsafeOutputError(PlanError):
    """The output is, contains or lies inside an input (however spelled: symlinks, ``..``, hard
    links): writing it could destroy that input, so nothing was written. ``path`` is the output,
    ``input`` the input it overlaps. A :class:`PlanError`, so ``except PlanError`` still catches it;
    a class of its own so callers can tell "choose another output" from a bad plan."""

    input: str | None = None


class TargetError(PlanError):
    """The serving-engine target (``--target``; default ``any``) cannot load what the options ask
    for; the message names the flag or layer, the engine rule and its upstream file, and the way
    out (another ``--target``, or ``--fit-target``). A :class:`PlanError`: nothing was written."""


class OutputExistsError(DqfastError):
    """The output exists and overwriting was not requested."""


class DqfastIOError(DqfastError):
    """An operating-system error while reading or writing."""


class InternalError(DqfastError):
    """A bug in dqfast (a caught panic)."""


class BackboneError(CheckpointError, ValueError):
    """A ``backbone.pt`` that cannot be read as a ModelOpt checkpoint (``dqfast.backbone``; a
    ``ValueError`` too, as it always was). ``path`` may be given positionally."""

    def __init__(self, msg: str, path: str | os.PathLike[str] | None = None, tensor: str | None = None) -> None:
        super().__init__(msg, path=None if path is None else str(path), tensor=tensor)


class HubCacheError(CheckpointError):
    """A hub id whose repo, revision or subfolder is not in the local cache (``dqfast.hub``)."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint does not fit the model (``dqfast.runtime.load_quantized``; names the tensor
    and the file); a ``ValueError`` too, as it always was."""


class ManifestError(DqfastError):
    """The ``dqfast batch`` manifest is invalid; ``problems`` lists every problem found (not just
    the first)."""

    def __init__(self, problems: list[str], path: str | os.PathLike[str] | None = None) -> None:
        self.problems = problems
        # One line (the CLI's error format); ``problems`` keeps them apart. Pickling is
        # DqfastError's (it restores ``problems`` with the other attributes).
        super().__init__(
            f"{str(path) + ': ' if path else ''}invalid manifest: " + "; ".join(problems), path=None if path is None else str(path)
        )


class MissingExtraError(DqfastError):
    """An optional dependency of the requested feature is not installed (``dqfast.extras``)."""
