"""Shared fixtures: real ModelOpt exports of tiny random diffusers transformers (built once per
session, reused across tests), and helpers."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def modelopt_fixture(tmp_path_factory: pytest.TempPathFactory):
    """``modelopt_fixture(model, algo)`` -> FixturePaths built by real nvidia-modelopt on CPU."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("modelopt")
    from modelopt_fixtures import build_fixture

    root = tmp_path_factory.mktemp("modelopt")
    cache: dict[tuple[str, str], object] = {}

    def get(model: str, algo: str):
        key = (model, algo)
        if key not in cache:
            cache[key] = build_fixture(root / model, model, algo)
        return cache[key]

    return get
