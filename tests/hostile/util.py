"""Helpers for hostile-input tests: prove that an input tree was not touched."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Everything under ``path`` (itself included), relative name -> what it is and its mode:
    ``sha256:<hex>`` of a regular file's bytes, ``link:<target>`` of a symlink (not followed),
    ``dir``, or the file type of anything else (a FIFO is never opened). Compare two digests with
    ``==``; a failing assert shows which entries differ. A missing path digests to
    ``{".": "missing"}``, so deleting an input is a difference too."""
    root = Path(path)
    out: dict[str, str] = {}

    def one(p: Path, rel: str) -> None:
        st = os.lstat(p)
        mode = f" mode={stat.S_IMODE(st.st_mode):o}"
        if stat.S_ISLNK(st.st_mode):
            out[rel] = f"link:{os.readlink(p)}"
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = "dir" + mode
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = f"sha256:{h.hexdigest()}" + mode
        else:
            out[rel] = f"type={stat.S_IFMT(st.st_mode):o}" + mode

    if not root.exists() and not root.is_symlink():
        return {".": "missing"}
    one(root, ".")
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                one(p, str(p.relative_to(root)))
    return out


def trees_digest(*paths: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """:func:`tree_digest` of several trees, keyed by path."""
    return {str(p): tree_digest(p) for p in paths}
