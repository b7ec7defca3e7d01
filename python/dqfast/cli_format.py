"""Formatting shared by the command-line modules (``cli``, ``batch_cli``, ``demo``), kept apart
so that they need not import one another."""

from __future__ import annotations

__all__ = ["human"]


def human(n: float) -> str:
    """A byte count as B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
