"""Let the benches import dqfast where the Rust extension (dqfast._core) is not built, e.g. on
the device machine: dqfast/__init__ imports it eagerly, the runtime never uses it.

Importing this module does it (the GPU scripts import it before dqfast; Python puts the
script's own folder, benches/gpu, on sys.path). STUBBED says whether the stub was needed."""

from __future__ import annotations

import sys
import types


def ensure_dqfast_importable() -> bool:
    """Import dqfast; if only dqfast._core is missing, install a stub. Returns True if stubbed."""
    try:
        import dqfast  # noqa: F401

        return False
    except ImportError as exc:
        if "_core" not in str(exc):
            raise
    for name in [n for n in sys.modules if n == "dqfast" or n.startswith("dqfast.")]:
        del sys.modules[name]
    stub = types.ModuleType("dqfast._core")
    stub.__version__ = "0+no-core"

    def _missing(name: str):
        # Dunders and constants (E4M3_MAX, ...: the runtime's format constants come from the Rust
        # core) are not faked: carry the real extension (an abi3 build for x86-64 loads on the
        # device's Python 3.12) when the runtime is used.
        if name.startswith("__") or name.isupper():
            raise AttributeError(name)

        def fail(*_a, **_k):
            raise RuntimeError(f"dqfast._core.{name}: Rust extension not built")

        return fail

    # The exception types are real classes, so `except dqfast.PlanError` keeps working.
    base = type("DqfastError", (Exception,), {})
    stub.DqfastError = base
    for exc in ("CheckpointError", "PlanError", "OutputExistsError", "DqfastIOError", "InternalError"):
        setattr(stub, exc, type(exc, (base,), {}))
    stub.__getattr__ = _missing  # type: ignore[attr-defined]
    sys.modules["dqfast._core"] = stub
    import dqfast  # noqa: F401

    return True


STUBBED = ensure_dqfast_importable()
