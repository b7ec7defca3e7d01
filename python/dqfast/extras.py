"""Optional dependencies, grouped as the package's extras (``pip install 'dqfast[verify]'``).

The core (build, inspect, demo, batch with the local executor, ``dqfast.ops``/``dqfast.stream``)
needs only numpy, click and rich. Commands that need more call :func:`require_extra` first, so a
missing package is one line naming the extra to install, not a ModuleNotFoundError traceback.
Keep this table in step with ``[project.optional-dependencies]`` in pyproject.toml
(``tests/test_wheel.py`` checks that they agree).
"""

from __future__ import annotations

import importlib.util

from dqfast.errors import MissingExtraError

__all__ = ["EXTRAS", "MissingExtraError", "missing_extra", "require_extra"]

#: extra -> the importable modules its commands need (import names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "verify": ("torch", "safetensors", "diffusers"),
    "ptq": ("torch", "safetensors", "diffusers", "modelopt"),
    "runtime": ("torch", "safetensors", "diffusers"),
    "batch": ("yaml",),
    "ray": ("ray", "yaml"),
    "hub": ("huggingface_hub",),
}


def missing_extra(extra: str, module: str) -> MissingExtraError:
    """The one-line error for ``module`` of ``extra`` not being importable."""
    return MissingExtraError(f"this command needs the '{extra}' extra ({module} is not installed): pip install 'dqfast[{extra}]'")


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'dqfast[extra]'`` unless every module
    of ``extra`` (or just ``modules``, when given) is importable."""
    for m in modules or EXTRAS[extra]:
        if importlib.util.find_spec(m) is None:
            raise missing_extra(extra, m)
