"""`dqfast check` (rules in dqfast.targets) against the engines' own code: for every output kind,
the layers `check` says fail / are dequantized to BF16 are exactly those the engines' code fails on /
loads into BF16 parameters."""

from __future__ import annotations

import pytest
from builds import KINDS
from click.testing import CliRunner
from dqfast.check import check_checkpoint
from engines import sglang_verdict, vllm_omni_verdict

ENGINES = {"sglang": sglang_verdict, "vllm-omni": vllm_omni_verdict}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_check_agrees_with_engine(kind, engine, outputs):
    d = outputs(kind)
    real = ENGINES[engine](d)
    (rep,) = check_checkpoint(d, engine)
    assert rep.status == real.status
    if "<config>" in real.errors:
        assert rep.config_error
        return
    assert rep.modules("error") == set(real.errors)
    assert rep.modules("dequantized") == real.bf16
    assert rep.modules("quantized") == real.quantized


def test_check_vllm_omni_on_sglang_nvfp4_output(outputs):
    """Issue #13's acceptance: `dqfast check --target vllm-omni` on SGLang's own FLUX.1 NVFP4 output
    names exactly the layers vLLM-Omni's code cannot load."""
    from dqfast.cli import main

    d = outputs("sglang-nvfp4")
    real = vllm_omni_verdict(d)
    r = CliRunner().invoke(main, ["check", str(d), "--target", "vllm-omni", "--json"])
    assert r.exit_code == 1
    import json

    (rep,) = json.loads(r.output)
    failing = {v["module"] for v in rep["layers"] if v["outcome"] == "error"}
    assert failing == set(real.errors) and len(failing) == 18


def _variant(src, dst, edit):
    """A copy of output ``src`` with its tensors and config changed by ``edit(tensors, qcfg)``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    cfg = json.loads((dst / "config.json").read_text())
    edit(tensors, cfg["quantization_config"])
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _no_ignore(tensors, qcfg):
    qcfg["ignore"] = []


def _fp8_feedforward(tensors, qcfg):
    # One FLUX.1 FeedForward Linear in per-tensor FP8, as ModelOpt stores it.
    import torch

    m = "transformer_blocks.0.ff.net.2"
    w = tensors[f"{m}.weight"].float()
    scale = w.abs().max() / 448.0
    tensors[f"{m}.weight"] = (w / scale).to(torch.float8_e4m3fn)
    tensors[f"{m}.weight_scale"] = scale.reshape(())
    tensors[f"{m}.input_scale"] = torch.tensor(1.0)
    qcfg["ignore"] = [p for p in qcfg["ignore"] if not p.startswith("transformer_blocks.0.ff")]


@pytest.mark.parametrize(
    ("kind", "edit", "status"),
    [
        # SGLang replaces an NVFP4 config's `ignore` by the layers the safetensors hold in BF16
        # (transformer_load_utils.py): with `ignore` emptied, it still loads.
        ("nvfp4-export", _no_ignore, "loads"),
        # SGLang's FLUX.1 (tp_size 1) builds its FeedForwards unquantized; its loader dequantizes an
        # FP8 weight that meets one (fsdp_load.py).
        ("fp8-export", _fp8_feedforward, "loads-bf16"),
    ],
)
def test_check_agrees_with_sglang_on_edited_outputs(kind, edit, status, outputs, tmp_path):
    d = _variant(outputs(kind), tmp_path / kind, edit)
    real = sglang_verdict(d)
    (rep,) = check_checkpoint(d, "sglang")
    assert real.status == rep.status == status, real.errors
    assert rep.modules("error") == set(real.errors)
    assert rep.modules("dequantized") == real.bf16
    assert rep.modules("quantized") == real.quantized


@pytest.mark.parametrize("kind", ["fp8-export", "wan-fp8-export", "qwen-image-nvfp4-export"])
def test_sglang_module_tree_quantizes_what_targets_say(kind, outputs, tmp_path):
    """SGLang's own DiT built with an FP8 config that ignores nothing: the Linears it creates in FP8
    (mapped back to checkpoint names by its own name mapping; a fused q/k/v counts for its shards)
    are exactly those `dqfast.targets` says its model class quantizes."""
    import torch
    from dqfast.models import detect_preset
    from dqfast.targets import TARGETS
    from engines import module_of, sglang_load

    def fp8_no_ignore(tensors, qcfg):
        qcfg.clear()
        qcfg.update({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": []})

    d = _variant(outputs(kind), tmp_path / kind, fp8_no_ignore)
    load = sglang_load(d)
    assert load.meta, load.error
    linears = {module_of(n) for n, (tgt, _) in load.targets.items() if n.endswith(".weight") and len(load.meta[tgt][1]) == 2}
    real = {module_of(n) for n, (tgt, _) in load.targets.items() if n.endswith(".weight") and load.meta[tgt][0] == torch.float8_e4m3fn}
    import json

    family = detect_preset(json.loads((d / "config.json").read_text())).name
    t = TARGETS["sglang"]
    assert family in t.quantized_modules
    assert {m for m in linears if t.model_quantizes(family, m)} == real
