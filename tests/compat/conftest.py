"""The compat suite: SGLang's and vLLM-Omni's own code as the oracle (docs/compat.md).

Runs in ``.venv-compat`` (``make test-compat``). In any other environment the engines are missing and
the suite is skipped, unless ``DQFAST_COMPAT=1`` (set by ``make test-compat``), where a missing engine
is an error: CI must not pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_ENGINES = ("sglang", "vllm", "vllm_omni")
_missing = [m for m in _ENGINES if importlib.util.find_spec(m) is None]
if _missing:
    if os.environ.get("DQFAST_COMPAT") == "1":
        raise RuntimeError(f"compat suite: engines not installed: {_missing} (run `make compat-venv`)")
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.compat)


@pytest.fixture(scope="session")
def flux(modelopt_fixture):
    """Real ModelOpt 0.47 exports: tiny FLUX.1 FP8 and NVFP4, tiny Wan2.2 FP8, tiny Qwen-Image NVFP4 (as the main suite builds them)."""
    return {
        "fp8": modelopt_fixture("flux", "fp8"),
        "nvfp4": modelopt_fixture("flux", "nvfp4"),
        "wan-fp8": modelopt_fixture("wan", "fp8"),
        "qwen-image-nvfp4": modelopt_fixture("qwen-image", "nvfp4"),
    }


@pytest.fixture(scope="session")
def outputs(flux, tmp_path_factory):
    """``outputs(kind)`` -> transformer dir of that output kind (builds.KINDS), built once."""
    from builds import build_kind

    root = tmp_path_factory.mktemp("compat-outputs")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_kind(kind, flux, root)
        return cache[kind]

    return get
