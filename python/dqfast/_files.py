"""Opening the user's input files: regular files only, sizes bounded, errors typed.

Every file the Python side reads (config.json, index json, amax sidecars, backbone.pt, policy
files, manifests, batch input hashing) goes through :func:`open_regular`: a FIFO, socket or
device given as an input would otherwise block ``open()`` forever or stream without end. The
check runs on the opened descriptor (``O_NONBLOCK`` so a FIFO without writer cannot block the
``open`` itself), so a file swapped between check and open is caught too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from dqfast.errors import DqfastError, DqfastIOError

__all__ = ["open_regular", "read_regular", "check_regular", "typed_error"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def typed_error(cls: type[DqfastError], msg: str, path: str | os.PathLike[str] | None = None, tensor: str | None = None) -> DqfastError:
    """``cls(msg)`` with the ``path``/``tensor`` attributes the Rust-raised errors carry."""
    e = cls(msg)
    e.path = None if path is None else str(path)
    e.tensor = tensor
    return e


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, mode: int, what: str, error: type[DqfastError]) -> DqfastError:
    return typed_error(error, f"{path}: {what} is {_kind(mode)}, not a regular file", path)


def check_regular(path: str | os.PathLike[str], what: str = "input", error: type[DqfastError] = DqfastIOError) -> Path:
    """``path`` if it names a regular file (symlinks followed), else a typed error."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise typed_error(error, f"{p}: {what}: {e.strerror or e}", p) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, st.st_mode, what, error)
    return p


def open_regular(path: str | os.PathLike[str], what: str = "input", error: type[DqfastError] = DqfastIOError) -> IO[bytes]:
    """Open a regular file for binary reading; anything else is refused without blocking."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise typed_error(error, f"{p}: {what}: {e.strerror or e}", p) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, st.st_mode, what, error)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike[str], what: str = "input", error: type[DqfastError] = DqfastIOError, limit: int | None = None
) -> bytes:
    """The bytes of a regular file; more than ``limit`` bytes is refused before reading."""
    p = Path(path)
    with open_regular(p, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise typed_error(error, f"{p}: {what} is {size} bytes; more than the {limit} a {what} may have", p)
        try:
            return f.read() if limit is None else f.read(limit + 1)[:limit]
        except OSError as e:
            raise typed_error(error, f"{p}: {what}: {e.strerror or e}", p) from None
