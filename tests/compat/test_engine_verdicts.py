"""Every output kind fed to SGLang's and vLLM-Omni's own config parsers and loaders (engines.py);
the verdict must equal verdicts.EXPECTED (rendered in docs/compat.md and the README)."""

from __future__ import annotations

import pytest
from builds import KINDS
from engines import sglang_verdict, vllm_omni_verdict
from verdicts import EXPECTED

ENGINES = {"sglang": sglang_verdict, "vllm-omni": vllm_omni_verdict}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_verdict(kind, engine, outputs):
    v = ENGINES[engine](outputs(kind))
    status, bf16, errors = EXPECTED[(kind, engine)]
    assert v.status == status, v.errors
    assert v.bf16 == set(bf16)
    if isinstance(errors, str):
        assert set(v.errors) == {"<config>"} and errors in v.errors["<config>"]
    else:
        assert set(v.errors) == set(errors), v.errors


def test_vllm_omni_loads_fp8_weights_as_fp8(outputs):
    """Where vLLM-Omni's FLUX.1 quantizes (single-stream q/k/v and proj_mlp), dqfast's FP8 export
    loads into float8_e4m3fn parameters — the quantized path is exercised, not only BF16."""
    v = vllm_omni_verdict(outputs("fp8-export"))
    assert {
        f"single_transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    } <= v.quantized


def test_sglang_builds_flux_and_loads_fp8_weights_as_fp8(outputs):
    """SGLang's own FLUX.1 module tree (tp_size 1) holds float8_e4m3fn parameters for the attention
    projections and the single blocks' MLP, and the loader put the checkpoint's bytes in them; its
    FeedForwards are BF16 (diffusers FeedForward without a quant config)."""
    from engines import sglang_load

    v = sglang_verdict(outputs("fp8-export"))
    attn = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out")
    assert {f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in attn} <= v.quantized
    assert {f"single_transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("proj_mlp", "proj_out")} <= v.quantized
    load = sglang_load(outputs("fp8-export"))
    assert load.model is not None and str(load.meta["transformer_blocks.0.ff.net.2.weight"][0]) == "torch.bfloat16"


def test_nvfp4_export_fails_is_the_verdict_table():
    """`Target.nvfp4_export_fails` (what `ptq --build --algo nvfp4` refuses before calibrating) is
    the set of families whose ModelOpt NVFP4 export row does not load in that engine here."""
    from dqfast.targets import TARGETS

    rows = {"flux1": "nvfp4-export", "qwen-image": "qwen-image-nvfp4-export"}
    for engine, t in TARGETS.items():
        assert t.nvfp4_export_fails == {f for f, kind in rows.items() if EXPECTED[(kind, engine)][0] == "fails"}, engine
