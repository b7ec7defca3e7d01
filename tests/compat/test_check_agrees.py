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
