"""One MIXED_PRECISION matcher: the builders' ``QuantConfig.algo_for`` and the runtime loader's
``QuantSpec.algo_for`` answer the same for every module (they used to disagree on modules
covered by a parent's ``quantized_layers`` entry: prefix match vs exact names only)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from dqfast.quant_config import QuantConfig, quantized_layer_entry  # noqa: E402
from dqfast.runtime.loader import QuantSpec  # noqa: E402

LAYERS = {
    "blocks.0.attn.to_q": {"quant_algo": "FP8"},
    "blocks.0.ff": {"quant_algo": "NVFP4", "group_size": 16},  # a parent entry: covers its Linears
    "blocks.1": {"quant_algo": "FP8"},
    "blocks.1.ff.net.2": {"quant_algo": "NVFP4", "group_size": 16},  # a child overrides its parent
}
MODULES = [
    "blocks.0.attn.to_q",
    "blocks.0.attn.to_k",  # not listed: stays high precision
    "blocks.0.ff.net.0.proj",
    "blocks.0.ff.net.2",
    "blocks.0.ffx",  # a name prefix, not a parent module
    "blocks.1.attn.to_out.0",
    "blocks.1.ff.net.2",
    "blocks.10.attn.to_q",  # 'blocks.1' is not a parent of 'blocks.10'
    "proj_out",  # ignored
]


def test_builders_and_runtime_agree() -> None:
    qc = QuantConfig("MIXED_PRECISION", ignore=["proj_out"], quantized_layers=LAYERS)
    spec = QuantSpec("MIXED_PRECISION", ignore=["proj_out"], quantized_layers=LAYERS)
    got = {m: (qc.algo_for(m), spec.algo_for(m)) for m in MODULES}
    assert {m: a for m, (a, b) in got.items() if a != b} == {}, got
    assert {m: a for m, (a, _) in got.items()} == {
        "blocks.0.attn.to_q": "FP8",
        "blocks.0.attn.to_k": None,
        "blocks.0.ff.net.0.proj": "NVFP4",
        "blocks.0.ff.net.2": "NVFP4",
        "blocks.0.ffx": None,
        "blocks.1.attn.to_out.0": "FP8",
        "blocks.1.ff.net.2": "NVFP4",
        "blocks.10.attn.to_q": None,
        "proj_out": None,
    }


def test_nearest_listed_ancestor_wins() -> None:
    assert quantized_layer_entry(LAYERS, "blocks.1.ff.net.2") is LAYERS["blocks.1.ff.net.2"]
    assert quantized_layer_entry(LAYERS, "blocks.1.ff.net.0.proj") is LAYERS["blocks.1"]
    assert quantized_layer_entry(LAYERS, "blocks") is None
