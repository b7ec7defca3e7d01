"""dqfast's MXFP8 weight-only outputs against vLLM-Omni 0.30.0's own MXFP8 code (docs/compat.md).

vLLM-Omni parses the config (``TransformerConfig.from_dict`` -> ``DiffusionMXFP8Config``), builds
its FLUX.1 / Wan2.2 DiT with it and loads every checkpoint tensor through the model's own
``load_weights``. On this (non-NPU) machine the build raises as it does on CUDA: the NPU-only
caveat dqfast prints. Under ``shims.vllm_omni_npu.as_npu`` the tree is the one an Ascend NPU builds:
there a dqfast output built for ``--target vllm-omni`` must load with every MXFP8 layer receiving
its scales and every other layer its BF16 weight, and ``dqfast check`` must agree — and a FLUX.1
output built without the target (MXFP8 in layers vLLM-Omni's FLUX.1 keeps BF16) must fail in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dqfast.check import check_checkpoint
from dqfast.synth import make_transformer
from dqfast.weight_only import build_mxfp8_transformer
from engines import checkpoint_tensors, vllm_omni_model, vllm_omni_quant_config
from shims.vllm_omni_npu import as_npu


def _vllm_omni_npu_load(out: Path) -> tuple[str, str]:
    """vLLM-Omni's verdict on an NPU: ("loads" | "fails", why)."""
    from vllm.model_executor.layers.linear import LinearBase

    cfg = json.loads((out / "config.json").read_text())
    qc = vllm_omni_quant_config(cfg)
    with as_npu():
        model = vllm_omni_model(cfg, qc)
    tensors = checkpoint_tensors(out)
    try:
        loaded = set(model.load_weights(list(tensors.items())))
    except Exception as e:  # the engine's own refusal
        return "fails", f"load_weights: {type(e).__name__}: {str(e)[:200]}"
    mx = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase) and type(m.quant_method).__name__ == "NPUMxfp8LinearMethod"}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (LinearBase, torch.nn.Linear))}
    missing = [f"{n}.weight_scale" for n in mx if f"{n}.weight_scale" not in loaded]
    missing += [f"{n}.weight" for n in linears if f"{n}.weight" not in loaded]
    if missing:
        return "fails", f"not loaded: {missing[:3]}"
    # Every MXFP8 scale row of the checkpoint reached an MXFP8 layer (one that landed in a BF16
    # layer would have no parameter to go to).
    rows = sum(t.shape[0] for n, t in tensors.items() if n.endswith(".weight_scale"))
    got = sum(m.weight_scale.shape[0] for m in mx.values())
    if rows != got:
        return "fails", f"{rows} MXFP8 scale rows in the checkpoint, {got} in vLLM-Omni's MXFP8 layers"
    for n, t in tensors.items():
        if n.endswith(".weight") and t.dtype == torch.float8_e4m3fn and n[: -len(".weight")] + ".weight_scale" not in tensors:
            return "fails", f"{n}: e4m3 weight without scales"
    return "loads", ""


def _base(tmp_path: Path, family: str) -> Path:
    kw = {"single_blocks": 1} if family == "flux1" else {}
    return make_transformer(tmp_path / "in", family, blocks=1, heads=2, head_dim=64, seed=1, **kw).base


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_mxfp8_for_vllm_omni_loads_in_its_npu_tree_and_check_agrees(tmp_path: Path, family: str) -> None:
    out = tmp_path / "out"
    rep = build_mxfp8_transformer(out, base_transformer_dir=_base(tmp_path, family), target="vllm-omni", fit_target=family == "flux1")
    assert rep.counts["mxfp8"] > 0
    cfg = json.loads((out / "config.json").read_text())
    qc = vllm_omni_quant_config(cfg)
    assert type(qc).__name__ == "DiffusionMXFP8Config" and qc.is_checkpoint_mxfp8_serialized
    assert qc.ignored_layers == cfg["quantization_config"]["ignored_layers"]
    # Off an NPU (this CPU, like CUDA) vLLM-Omni 0.30.0 refuses to build it: the caveat.
    with pytest.raises(NotImplementedError, match="only supported on NPU"):
        vllm_omni_model(cfg, qc)
    assert any("Ascend NPU only" in w for w in rep.warnings)
    status, why = _vllm_omni_npu_load(out)
    assert status == "loads", why
    (verdict,) = check_checkpoint(out, "vllm-omni")
    assert verdict.status == "loads" and "Ascend NPU only" in verdict.summary(), verdict.summary()


def test_flux1_mxfp8_without_the_target_fails_in_both(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_mxfp8_transformer(out, base_transformer_dir=_base(tmp_path, "flux1"), target="none")
    status, why = _vllm_omni_npu_load(out)
    assert status == "fails", "vLLM-Omni's FLUX.1 loaded MXFP8 into layers it builds unquantized"
    (verdict,) = check_checkpoint(out, "vllm-omni")
    assert verdict.status == "fails", verdict.summary()
