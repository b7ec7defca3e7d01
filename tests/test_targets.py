"""Serving-engine targets (dqfast.targets) and `dqfast check` (dqfast.check), without the engines.

What the engines' own code does with the same checkpoints is asserted in tests/compat (their
`check` agreement test runs there); here: the rules themselves and the ignore-collision property.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ckpt_helpers import tiny_diffusers_base
from click.testing import CliRunner
from dqfast.check import check_checkpoint
from dqfast.cli import main
from dqfast.errors import TargetError
from dqfast.fp8 import build_fp8_transformer
from dqfast.mixed import build_mixed_transformer
from dqfast.models import PRESETS
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.reader import open_checkpoint
from dqfast.synth import make_transformer
from dqfast.targets import TARGETS, get_target

SMALL = {
    "flux1": dict(
        blocks=1,
        single_blocks=2,
        heads=2,
        head_dim=16,
        config_overrides=dict(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32),
    ),
    "wan": dict(blocks=4, heads=2, head_dim=16, config_overrides=dict(in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64)),
}


def test_ignore_matching_rules():
    sgl, vo = TARGETS["sglang"], TARGETS["vllm-omni"]
    # vLLM's substring rule: a bare `proj_out` also excludes every `*.proj_out`.
    assert vo.ignored(["proj_out"], "single_transformer_blocks.3.proj_out") == "proj_out"
    assert sgl.ignored(["proj_out"], "single_transformer_blocks.3.proj_out") is None
    # `.` is literal for SGLang, `*` any run; fnmatch for vLLM.
    assert sgl.ignored(["transformer_blocks.*.ff*"], "transformer_blocks.0.ff.net.2") is not None
    assert sgl.ignored(["a.b"], "aXb") is None
    assert vo.ignored(["norm_out*"], "norm_out.linear") == "norm_out*"
    assert [t.name for t in get_target("any")] == ["sglang", "vllm-omni"]
    assert get_target("none") == []
    # The prefix each engine matches `ignore` against (SGLang's Qwen-Image: the Sequential's name).
    assert sgl.runtime_name("qwen-image", "transformer_blocks.3.img_mod.1") == "transformer_blocks.3.img_mod"
    assert vo.runtime_name("qwen-image", "transformer_blocks.3.img_mod.1") == "transformer_blocks.3.img_mod.1"
    assert sgl.runtime_name("flux1", "transformer_blocks.0.ff.net.2") == "transformer_blocks.0.ff.net.2"
    with pytest.raises(ValueError, match="unknown target"):
        get_target("trt")


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory) -> Path:
    return make_transformer(tmp_path_factory.mktemp("flux"), "flux1", **SMALL["flux1"]).base


def test_check_from_bf16_outputs(flux_base, tmp_path):
    ch = tmp_path / "ch"
    build_fp8_transformer(ch, from_bf16=True, base_transformer_dir=flux_base, target="none")  # per-channel
    sgl, vo = check_checkpoint(ch, "any")
    assert sgl.status == "fails" and "FP8_PER_CHANNEL_PER_TOKEN" in sgl.config_error
    assert vo.status == "loads-bf16"
    # vLLM-Omni's FLUX.1 quantizes the single-stream blocks' Linears only; the rest is dequantized.
    # Their proj_out is quantized now that `ignore` no longer lists a bare `proj_out` (substring rule).
    assert vo.modules("quantized") == {
        f"single_transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    }
    nv = tmp_path / "nv"
    build_nvfp4_transformer(nv, from_bf16=True, base_transformer_dir=flux_base, target="none")
    sgl, vo = check_checkpoint(nv, "any")
    assert sgl.status == "loads"
    assert vo.status == "fails"
    assert "transformer_blocks.0.attn.to_q" in vo.modules("error")
    assert not {f"single_transformer_blocks.{i}.proj_out" for i in (0, 1)} & vo.modules("error")


def test_check_cli(flux_base, tmp_path):
    out = tmp_path / "t"
    build_fp8_transformer(out, from_bf16=True, base_transformer_dir=flux_base, weight_granularity="tensor", activation_amax=448.0)
    r = CliRunner().invoke(main, ["check", str(out), "--target", "sglang"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("sglang: loads")
    r = CliRunner().invoke(main, ["check", str(out), "--json"])
    assert r.exit_code == 0
    assert [d["target"] for d in json.loads(r.output)] == ["sglang", "vllm-omni"]
    r = CliRunner().invoke(main, ["check", str(flux_base), "--target", "bogus"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert "target sglang: loads" in r.output and "target vllm-omni: loads" in r.output


def _quantized_modules(d: Path) -> set[str]:
    return {n[: -len(".weight")] for n, t in open_checkpoint(d).tensors.items() if n.endswith(".weight") and t.dtype in ("F8_E4M3", "U8")}


@pytest.fixture(scope="module")
def family_base(tmp_path_factory):
    """A tiny BF16 base per model preset: dqfast.synth's (flux1, wan) or diffusers' own class."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            d = tmp_path_factory.mktemp(family)
            made[family] = make_transformer(d, family, **SMALL[family]).base if family in SMALL else tiny_diffusers_base(d / "t", family)
        return made[family]

    return get


#: Every output kind of the calibration-free builders, each as (builder, kwargs). The export-based
#: builds (FLUX.1 and Wan2.2 ModelOpt exports) are covered the same way in tests/compat.
OUTPUT_KINDS = {
    "fp8-tensor": (build_fp8_transformer, dict(weight_granularity="tensor", activation_amax=448.0)),
    "fp8-channel": (build_fp8_transformer, dict(weight_granularity="channel")),
    "nvfp4": (build_nvfp4_transformer, {}),
    "mixed": (build_mixed_transformer, {}),
}
FAMILIES = sorted(p for p in PRESETS if p != "none")


@pytest.mark.parametrize("fit", ["none", "any-fit"])
@pytest.mark.parametrize("kind", sorted(OUTPUT_KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_no_ignore_entry_matches_a_quantized_module(family, kind, fit, family_base, tmp_path):
    """Property: for every model preset, output kind and target, no `ignore` entry of the output
    matches a module it quantizes under either engine's matching rule. Before the fix, ModelOpt's
    recipe kept the top-level FLUX.1 `proj_out` in BF16, `ignore` listed `proj_out`, and vLLM's
    substring rule excluded the quantized `single_transformer_blocks.*.proj_out` too; `--fit-target`
    adds module names (`transformer_blocks.0.attn.to_q`, a substring of the single blocks' names)."""
    build, kw = OUTPUT_KINDS[kind]
    base = family_base(family)
    out = tmp_path / "out"
    target = (
        dict(target="none") if fit == "none" else dict(target="vllm-omni" if kind in ("mixed", "fp8-channel") else "any", fit_target=True)
    )
    if kind == "mixed":
        build(out, base, **kw, **target)
    else:
        build(out, from_bf16=True, base_transformer_dir=base, **kw, **target)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    quantized = _quantized_modules(out)
    assert quantized
    for t in TARGETS.values():
        hits = {m: t.ignored(ignore, m) for m in quantized}
        assert {m: p for m, p in hits.items() if p is not None} == {}, t.name


def test_ltx2_preset_matches_sglangs_fallback_set():
    """`--model-type ltx2` (SGLang's LTX-2 FP8 fallback set): blocks 0 and 43-47 keep attention/FF in BF16."""
    from dqfast.presets import get_preset

    p = get_preset("ltx2")
    assert p.fp8_fallback_match("transformer_blocks.0.attn1.to_q")
    assert p.fp8_fallback_match("transformer_blocks.45.audio_ff.proj_out")
    assert p.fp8_fallback_match("audio_adaln_single.emb.timestep_embedder.linear_2")
    assert p.fp8_fallback_match("transformer_blocks.1.attn1.to_q") is None


def test_build_target_refuses_what_the_engine_cannot_load(flux_base, tmp_path):
    """`--target`: the `dqfast check` rules run on the plan; a refused build writes nothing."""
    from dqfast.errors import PlanError, TargetError

    out = tmp_path / "nv"
    with pytest.raises(
        TargetError, match=r"--target vllm-omni: vllm-omni==0\.30\.0.* cannot load 'transformer_blocks\.0\.attn\.\w+'.*does not quantize"
    ):
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target="vllm-omni")
    assert not out.exists()
    with pytest.raises(PlanError, match="--fit-target .* needs a --target naming an engine"):
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target="none", fit_target=True)
    with pytest.raises(PlanError, match="--target \\(target\\): unknown target 'trt'"):
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target="trt")
    assert not out.exists()
    # SGLang loads the NVFP4 FLUX.1 build as planned: no refusal, the report names the target.
    rep = build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target="sglang")
    assert rep.target == "sglang" and [r.status for r in check_checkpoint(out, "sglang")] == ["loads"]


@pytest.mark.parametrize("target", ["vllm-omni", "any"])
def test_build_fit_target_adjusts_and_says_so(flux_base, tmp_path, target):
    out = tmp_path / "nv"
    rep = build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target=target, fit_target=True)
    assert {r.target: r.status for r in check_checkpoint(out, target)} == dict.fromkeys([t.name for t in get_target(target)], "loads")
    kept = {w.split("kept ")[1].split(" ")[0] for w in rep.warnings if "kept " in w}
    assert "transformer_blocks.0.attn.to_q" in kept and "single_transformer_blocks.0.proj_out" not in kept
    tensors = open_checkpoint(out).tensors
    assert tensors["transformer_blocks.0.attn.to_q.weight"].dtype == "BF16"
    assert "transformer_blocks.0.attn.to_q.weight_scale" not in tensors
    assert tensors["single_transformer_blocks.0.proj_out.weight"].dtype == "U8"
    # The kept layers' ignore entries do not exclude the quantized single-stream layers (substring rule).
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert all(TARGETS["vllm-omni"].ignored(ignore, m) is None for m in _quantized_modules(out))


def test_build_cli_target_flags(flux_base, tmp_path):
    out = tmp_path / "o"
    args = ["build", "nvfp4", "--from-bf16", "--base-transformer-dir", str(flux_base), "--output-dir", str(out), "-q"]
    r = CliRunner().invoke(main, [*args, "--target", "vllm-omni"])
    assert r.exit_code == 2 and "cannot load 'transformer_blocks." in r.output and not out.exists()
    r = CliRunner().invoke(main, [*args, "--target", "none", "--fit-target"])
    assert r.exit_code == 2 and "--fit-target" in r.output and not out.exists()
    r = CliRunner().invoke(main, [*args, "--target", "vllm-omni", "--fit-target"])
    assert r.exit_code == 0, r.output
    assert check_checkpoint(out, "vllm-omni")[0].status == "loads"
    h = " ".join(CliRunner().invoke(main, ["build", "fp8", "--help"]).output.split())
    assert "[default: any]" in h and "none" in h and "no engine check" in h


def test_build_mixed_target(flux_base, tmp_path):
    from dqfast.errors import TargetError

    with pytest.raises(TargetError, match=r"--target sglang: sglang==0\.5\.23 cannot load quant_algo MIXED_PRECISION"):
        build_mixed_transformer(tmp_path / "m", flux_base, target="sglang", fit_target=True)
    rep = build_mixed_transformer(tmp_path / "m", flux_base, target="vllm-omni", fit_target=True)
    assert rep.warnings and check_checkpoint(tmp_path / "m", "vllm-omni")[0].status in ("loads", "loads-bf16")


def test_batch_manifest_target_option(flux_base, tmp_path):
    """`target` / `fit_target` are builder options in a batch manifest; a bad name is refused
    before anything runs, and a job with a target an output cannot meet fails (nothing written)."""
    from dqfast import batch as B

    m = tmp_path / "m.toml"
    job = f'[[jobs]]\nname = "{{n}}"\nbuilder = "nvfp4"\noutput = "out/{{n}}"\ninputs = {{{{ base_transformer_dir = "{flux_base}" }}}}\n'
    m.write_text(job.format(n="bad") + 'options = { from_bf16 = true, target = "trt" }\n')
    with pytest.raises(B.ManifestError, match="option 'target' must be"):
        B.load_manifest(m)
    m.write_text(
        job.format(n="refused")
        + 'options = { from_bf16 = true, target = "vllm-omni" }\n'
        + job.format(n="fit")
        + 'options = { from_bf16 = true, target = "vllm-omni", fit_target = true }\n'
    )
    s = B.run_batch(B.load_manifest(m))
    by = {j.name: j for j in s.jobs}
    assert by["refused"].status == "failed" and "cannot load 'transformer_blocks." in by["refused"].error
    assert not (tmp_path / "out" / "refused").exists()
    assert by["fit"].status == "done", by["fit"].error
    assert check_checkpoint(tmp_path / "out" / "fit", "vllm-omni")[0].status == "loads"


@pytest.mark.parametrize("target", [None, "any", "sglang"])
def test_mxfp8_refused_where_sglang_is_a_target(flux_base, tmp_path, target):
    """SGLang 0.5.23 does not load dqfast's MXFP8 layout: `build mxfp8` refuses `any` (the default)
    and `sglang` before writing, naming the engine rule and `--target vllm-omni`."""
    args = ["build", "mxfp8", "--base-transformer-dir", str(flux_base), "--output-dir", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args + ([] if target is None else ["--target", target]))
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert r.output.startswith("error: --target") and "sglang==0.5.23 cannot load quant_method mxfp8" in r.output
    assert "weight_scale_inv" in r.output and "pass --target vllm-omni or --target none" in r.output


def test_mxfp8_for_vllm_omni_follows_its_model_classes_and_says_npu_only(flux_base, tmp_path):
    """vLLM-Omni's FLUX.1 builds only its single blocks' attention and MLP projections with the
    MXFP8 method (the compat suite builds its tree with DiffusionMXFP8Config): `--target vllm-omni`
    refused a FLUX.1 MXFP8 build that stores MXFP8 elsewhere only in `dqfast check`, which said the
    output does not load while the build had accepted it. Now the build refuses it (naming the
    layer and --fit-target, not SGLang, which loads no MXFP8), --fit-target keeps the other layers
    in BF16 and lists them in ignored_layers, build and check agree, and both say that vLLM-Omni
    0.30.0 loads serialized MXFP8 on Ascend NPU only."""
    from dqfast.weight_only import build_mxfp8_transformer

    with pytest.raises(
        TargetError, match=r"cannot load 'context_embedder': MXFP8 weight for an unquantized.*--fit-target.*or --target none$"
    ):
        build_mxfp8_transformer(tmp_path / "o", base_transformer_dir=flux_base, target="vllm-omni")
    assert not (tmp_path / "o").exists()
    rep = build_mxfp8_transformer(tmp_path / "o", base_transformer_dir=flux_base, target="vllm-omni", fit_target=True)
    out = open_checkpoint(tmp_path / "o").tensors
    stored = {n[: -len(".weight")] for n, m in out.items() if n.endswith(".weight") and m.dtype == "F8_E4M3"}
    assert stored and all(re.match(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$", m) for m in stored), stored
    single = re.compile(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)\.weight$")
    assert stored == {n[: -len(".weight")] for n in open_checkpoint(flux_base).tensors if single.match(n)}
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    kept = {n[: -len(".weight")] for n, m in out.items() if n.endswith(".weight") and len(m.shape) == 2 and m.dtype == "BF16"}
    assert qc["ignored_layers"] == sorted(qc["ignored_layers"]) and kept <= set(qc["ignored_layers"])
    assert any("Ascend NPU only" in w for w in rep.warnings), rep.warnings
    # The report follows the fit: the layers kept for the target are no longer counted as MXFP8.
    assert rep.counts["mxfp8"] == len(stored) and rep.counts["kept_for_target"] > 0
    assert {d.module for d in rep.decisions if d.action == "mxfp8"} == stored
    (verdict,) = check_checkpoint(tmp_path / "o", "vllm-omni")
    assert verdict.status == "loads" and verdict.modules("quantized") == stored, verdict.summary()
    assert "Ascend NPU only" in verdict.summary()
    (sgl,) = check_checkpoint(tmp_path / "o", "sglang")
    assert sgl.status == "fails" and "quant_method mxfp8 is not accepted" in (sgl.config_error or "")
    # Without a target nothing is checked: every eligible layer is MXFP8.
    none = build_mxfp8_transformer(tmp_path / "n", base_transformer_dir=flux_base, target="none")
    assert none.target == "none" and none.counts["mxfp8"] > len(stored) and not none.warnings


@pytest.mark.parametrize("target", [None, "any", "sglang", "vllm-omni"])
def test_swap_weight_nibbles_by_target(modelopt_fixture, tmp_path, target):
    """--swap-weight-nibbles: SGLang swaps at load by the config flag (its own tool keeps the bytes
    and writes `true`); vLLM-Omni ignores the flag, so the bytes are swapped and no flag written."""
    from dqfast import _core

    f4 = modelopt_fixture("flux", "nvfp4")
    out = tmp_path / "o"
    build_nvfp4_transformer(
        out,
        modelopt_hf_dir=f4.hf_dir,
        base_transformer_dir=f4.base_dir,
        swap_weight_nibbles=True,
        target=target,
        # The whole FLUX.1 export (no preset): neither engine's FLUX.1 loads every layer of it.
        fit_target=target is not None,
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = "single_transformer_blocks.0.attn.to_q.weight"
    from dqfast.reader import read_tensor

    src, got = (read_tensor(open_checkpoint(d).tensors[w].file, w).tobytes() for d in (f4.hf_dir, out))
    if target == "sglang":
        assert qc["swap_weight_nibbles"] is True and got == src
    else:
        assert got == _core.swap_nibbles(src) and got != src
        assert qc.get("swap_weight_nibbles", "absent") == ("absent" if target == "vllm-omni" else False)


def test_single_shard_build_writes_an_index(flux_base, tmp_path):
    """SGLang's builder tools always write `*.safetensors.index.json`; dqfast's builders too."""
    out = tmp_path / "o"
    build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, target="sglang")
    idx = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == {"diffusion_pytorch_model.safetensors"}
    assert set(idx["weight_map"]) == set(open_checkpoint(out).tensors)


def test_components_target(flux_base, tmp_path):
    """`build components` passes --target/--fit-target to each component's builder."""
    import shutil

    root = tmp_path / "pipe"
    shutil.copytree(flux_base, root / "transformer")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["build", "components", "nvfp4", "--root", str(root), "--output-dir", str(out), "--from-bf16", "--target", "vllm-omni"]
    )
    assert r.exit_code == 2 and "cannot load 'transformer_blocks." in r.output and not (out / "transformer").exists()
    args = ["build", "components", "nvfp4", "--root", str(root), "--output-dir", str(out), "--from-bf16", "--target", "any", "--fit-target"]
    r = CliRunner().invoke(main, [*args, "-q"])
    assert r.exit_code == 0, r.output
    assert [x.status for x in check_checkpoint(out / "transformer", "any")] == ["loads", "loads"]


# --- The default target (`any`) and `none` ---------------------------------------------------------


def test_default_target_forces_per_tensor_fp8_and_says_why(flux_base, tmp_path):
    """`build fp8 --from-bf16` with no --target / --weight-granularity: `any` includes SGLang, whose
    loader cannot take per-channel FP8, so the build is per-tensor (static input_scale 1.0) and the
    report says so, one line per forced choice. Before: FP8_PER_CHANNEL_PER_TOKEN, which SGLang refuses."""
    out = tmp_path / "fp8"
    rep = build_fp8_transformer(out, from_bf16=True, base_transformer_dir=flux_base)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "FP8" and rep.target == "any"
    assert [f.split(":")[0] for f in rep.target_forced] == ["weight scales per-tensor", "activation amax 448 (input_scale 1.0)"]
    assert "will be clipped" in rep.target_forced[1]
    assert "sglang==0.5.23" in rep.target_forced[0] and "modelopt_quant.py" in rep.target_forced[0]
    assert rep.to_dict()["target_forced"] == rep.target_forced
    assert [r.status for r in check_checkpoint(out, "any")] == ["loads", "loads-bf16"]
    # The CLI prints each forced choice on its own line (stderr), also with --json.
    args = ["build", "fp8", "--from-bf16", "--base-transformer-dir", str(flux_base), "--json", "--output-dir"]
    r = CliRunner().invoke(main, [*args, str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["target_forced"] == rep.target_forced
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("target any: ")] == [f"target any: {f}" for f in rep.target_forced]


@pytest.mark.parametrize("target", ["none", "vllm-omni"])
def test_fp8_per_channel_default_where_every_engine_of_the_target_loads_it(flux_base, tmp_path, target):
    rep = build_fp8_transformer(tmp_path / "o", from_bf16=True, base_transformer_dir=flux_base, target=target)
    assert rep.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN" and rep.target_forced == [] and rep.target == target


def test_explicit_choice_the_target_cannot_load_is_refused(flux_base, tmp_path):
    """An explicit per-channel choice under `any`: a TargetError naming the flag, the engine rule
    and the way out, before anything is written; `--fit-target` overrides it and says so."""
    from dqfast.errors import TargetError

    out = tmp_path / "o"
    with pytest.raises(
        TargetError, match=r"^--weight-granularity channel .*sglang==0\.5\.23.*modelopt_quant\.py.*pass --target vllm-omni or --target none"
    ):
        build_fp8_transformer(out, from_bf16=True, base_transformer_dir=flux_base, weight_granularity="channel")
    assert not out.exists()
    args = [
        "build",
        "fp8",
        "--from-bf16",
        "--base-transformer-dir",
        str(flux_base),
        "--output-dir",
        str(out),
        "--weight-granularity",
        "channel",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--fit-target" in r.output and not out.exists()
    rep = build_fp8_transformer(
        out, from_bf16=True, base_transformer_dir=flux_base, weight_granularity="channel", activation_amax=100.0, fit_target=True
    )
    assert rep.quant_algo == "FP8" and len(rep.target_forced) == 1 and rep.target_forced[0].endswith("per-tensor instead (--fit-target)")


def test_default_target_refuses_flux1_nvfp4_unless_fitted(flux_base, family_base, tmp_path):
    """vLLM-Omni's FLUX.1 quantizes only the single-stream blocks: plain `build nvfp4` of FLUX.1 under
    the default `any` is refused (naming --fit-target and the engines that would load it); with
    --fit-target both engines load it. Wan2.2 (every Linear quantized in both) builds as before."""
    from dqfast.errors import TargetError

    out = tmp_path / "o"
    with pytest.raises(TargetError, match=r"^--target any: vllm-omni==0\.30\.0.*pass --fit-target .*, or --target sglang or --target none"):
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base)
    assert not out.exists()
    rep = build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux_base, fit_target=True)
    assert rep.target == "any" and [r.status for r in check_checkpoint(out, "any")] == ["loads", "loads"]
    rep = build_nvfp4_transformer(tmp_path / "wan", from_bf16=True, base_transformer_dir=family_base("wan"))
    assert rep.target == "any" and [r.status for r in check_checkpoint(tmp_path / "wan", "any")] == ["loads", "loads"]
    # `none`: no engine check at all.
    rep = build_nvfp4_transformer(tmp_path / "none", from_bf16=True, base_transformer_dir=flux_base, target="none")
    assert rep.target == "none" and check_checkpoint(tmp_path / "none", "vllm-omni")[0].status == "fails"


def test_default_target_refuses_mixed_and_fits_the_default_policy(flux_base, tmp_path):
    """SGLang rejects MIXED_PRECISION: `build mixed` under `any` fails at once (CLI: one line, exit 2,
    pointing at --target vllm-omni). Under vllm-omni the *default* policy is fitted to its FLUX.1."""
    r = CliRunner().invoke(main, ["build", "mixed", "--base-transformer-dir", str(flux_base), "--output-dir", str(tmp_path / "m")])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()
    assert r.output.startswith("error: --target any: sglang==0.5.23 cannot load quant_algo MIXED_PRECISION")
    assert "_resolve_quant_method_name" in r.output and r.output.strip().endswith("pass --target vllm-omni or --target none")
    rep = build_mixed_transformer(tmp_path / "m", flux_base, target="vllm-omni")
    assert rep.target_forced and rep.target_forced[0].startswith("default policy:")
    assert check_checkpoint(tmp_path / "m", "vllm-omni")[0].status in ("loads", "loads-bf16")
    # An explicit policy is the user's choice: checked as written.
    from dqfast.errors import TargetError

    with pytest.raises(TargetError, match="cannot load 'transformer_blocks.0"):
        build_mixed_transformer(tmp_path / "p", flux_base, {"nvfp4": [r"\.ff\."], "fp8": ["."]}, target="vllm-omni")


def test_components_and_batch_default_to_any(flux_base, tmp_path):
    import shutil

    from dqfast import batch as B

    root = tmp_path / "pipe"
    shutil.copytree(flux_base, root / "transformer")
    r = CliRunner().invoke(main, ["build", "components", "nvfp4", "--root", str(root), "--output-dir", str(tmp_path / "c"), "--from-bf16"])
    assert r.exit_code == 2 and "--target any: vllm-omni" in r.output and not (tmp_path / "c" / "transformer").exists()
    m = tmp_path / "m.toml"
    m.write_text(
        f'[[jobs]]\nname = "d"\nbuilder = "fp8"\noutput = "out/d"\ninputs = {{ base_transformer_dir = "{flux_base}" }}\n'
        "options = { from_bf16 = true }\n"
    )
    s = B.run_batch(B.load_manifest(m))
    assert s.jobs[0].status == "done", s.jobs[0].error
    assert json.loads((tmp_path / "out" / "d" / "config.json").read_text())["quantization_config"]["quant_algo"] == "FP8"


@pytest.mark.parametrize("fit", ["none", "any-fit"])
@pytest.mark.parametrize("export", ["flux/fp8", "flux/nvfp4", "wan/fp8", "qwen-image/nvfp4"])
def test_no_ignore_entry_matches_a_quantized_module_of_an_export_build(export, fit, modelopt_fixture, tmp_path):
    """The same property for the builds from real ModelOpt 0.47 exports (FLUX.1, Wan2.2, Qwen-Image),
    whose `ignore` starts from ModelOpt's own list (`proj_out`, `transformer_blocks.0*`, ...)."""
    model, algo = export.split("/")
    fx = modelopt_fixture(model, algo)
    kw = dict(target="none") if fit == "none" else dict(target="any", fit_target=True)
    out = tmp_path / "out"
    if algo == "fp8":
        build_fp8_transformer(out, modelopt_hf_dir=fx.hf_dir, modelopt_backbone_ckpt=fx.backbone, base_transformer_dir=fx.base_dir, **kw)
    else:
        build_nvfp4_transformer(out, modelopt_hf_dir=fx.hf_dir, base_transformer_dir=fx.base_dir, **kw)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    quantized = _quantized_modules(out)
    assert quantized
    for t in TARGETS.values():
        assert {m: t.ignored(ignore, m) for m in quantized if t.ignored(ignore, m)} == {}, t.name
    if fit != "none":
        assert [r.status for r in check_checkpoint(out, "any")] == ["loads", "loads"]


def test_batch_cli_shows_each_jobs_forced_choices_and_unmangled_errors(flux_base, tmp_path):
    """`dqfast batch` prints under each job what `dqfast build` prints on stderr (the choices the
    target forced, warnings) and keeps them in the JSON summary; a failed job's error is printed as
    written even when it holds "[...]" (before: no forced-choice lines at all, and the error went
    through rich markup, which ate "[a-z]")."""
    from dqfast.cli.batch import batch as batch_cmd

    m = tmp_path / "m.toml"
    m.write_text(
        f'[[jobs]]\nname = "d"\nbuilder = "fp8"\noutput = "out/d"\ninputs = {{ base_transformer_dir = "{flux_base}" }}\n'
        "options = { from_bf16 = true }\n"
        f'[[jobs]]\nname = "bad"\nbuilder = "fp8"\noutput = "out/bad"\ninputs = {{ base_transformer_dir = "{flux_base}" }}\n'
        'options = { from_bf16 = true, activation_amax = 448.0, fallback = ["[a-z]x("] }\n'
    )
    r = CliRunner().invoke(batch_cmd, [str(m)])
    assert r.exit_code == 1, r.output
    assert "target any: weight scales per-tensor: sglang==0.5.23" in r.stderr
    assert "target any: activation amax 448 (input_scale 1.0)" in r.stderr
    assert "[a-z]x(" in r.stderr
    m.write_text(m.read_text().replace('output = "out/', 'output = "out2/'))  # fresh outputs: the jobs run again
    r = CliRunner().invoke(batch_cmd, [str(m), "--json"])
    jobs = {j["name"]: j for j in json.loads(r.stdout)["jobs"]}
    forced = [n.split(":")[1].strip() for n in jobs["d"]["notes"] if n.startswith("target any: ")]
    assert forced == ["weight scales per-tensor", "activation amax 448 (input_scale 1.0)"]
    assert all(n.startswith(("target any: ", "warning: ")) for n in jobs["d"]["notes"])


def test_kept_wan_layers_are_also_ignored_under_each_engines_names(tmp_path):
    """Both engines decide Wan2.2 quantization under their own module names: SGLang flattens the
    self-attention (`blocks.0.to_q`, `blocks.0.to_out`) and names the FFN `fc_in`/`fc_out`;
    vLLM-Omni uses `ffn.net_0.proj`, `ffn.net_2`, `to_out`. A diffusers-named `ignore` entry
    excludes the layer in neither, so SGLang cast the BF16 weights of the blocks the wan preset
    keeps into FP8 parameters without scales, and vLLM-Omni's loader raised on them (compat kinds
    `wan-fp8-bf16`, `wan-nvfp4-bf16`). Every builder now lists each kept Linear under each
    engine's name too, and `dqfast check` flags an output that lacks them."""
    paths = make_transformer(tmp_path / "in", "wan", blocks=1, heads=2, head_dim=64, seed=1)
    out = tmp_path / "o"
    build_fp8_transformer(out, base_transformer_dir=paths.base, from_bf16=True)
    cfg = json.loads((out / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    for written, *runtime in [
        ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.net_0.proj", "blocks.0.ffn.fc_in"),
        ("blocks.0.ffn.net.2", "blocks.0.ffn.net_2", "blocks.0.ffn.fc_out"),
        ("blocks.0.attn1.to_out.0", "blocks.0.attn1.to_out", "blocks.0.to_out"),
        ("blocks.0.attn1.to_q", "blocks.0.to_q"),
        ("blocks.0.attn2.to_out.0", "blocks.0.attn2.to_out"),
    ]:
        assert written in ignore and set(runtime) <= set(ignore), (written, ignore)
    assert all(c.status == "loads" for c in check_checkpoint(out, "any"))
    # Without them (what dqfast wrote before), both engines quantize those layers.
    original = [p for p in ignore if not re.search(r"(net_\d|fc_in|fc_out|\.to_out)$|^blocks\.\d+\.to_[qkv]$|net_0\.proj$", p)]
    cfg["quantization_config"]["ignore"] = original
    (out / "config.json").write_text(json.dumps(cfg))
    for engine, layer in (("vllm-omni", "blocks.0.ffn.net.0.proj"), ("sglang", "blocks.0.attn1.to_q")):
        (rep,) = check_checkpoint(out, engine)
        assert rep.status == "fails" and layer in rep.modules("error"), rep.summary()


def test_wan_mixed_entries_are_also_written_under_vllm_omnis_names(tmp_path):
    """vLLM-Omni looks MIXED_PRECISION `quantized_layers` up under its module names: without
    `blocks.N.ffn.net_0.proj` its Wan2.2 built the NVFP4 FFN as BF16 (compat kind
    `wan-mixed-vllm-omni`). Its Wan2.2 fuses only the self-attention's q/k/v: the cross-attention's
    FP8 layers are quantized, not dequantized (dqfast check took every to_q/k/v for a fused shard)."""
    paths = make_transformer(tmp_path / "in", "wan", blocks=2, heads=2, head_dim=64, seed=1)
    out = tmp_path / "o"
    build_mixed_transformer(out, paths.base, policy={"fp8": ["attn"], "nvfp4": ["ffn"]}, target="vllm-omni")
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_layers"]
    nv = [m for m, spec in layers.items() if spec["quant_algo"] == "NVFP4" and ".ffn.net.0.proj" in m]
    assert nv and all(layers[m.replace("net.0.proj", "net_0.proj")] == layers[m] for m in nv), layers
    (rep,) = check_checkpoint(out, "vllm-omni")
    deq, quantized = rep.modules("dequantized"), rep.modules("quantized")
    assert deq and all(".attn1.to_" in m for m in deq), deq
    assert any(".attn2.to_q" in m for m in quantized) and any(".ffn.net.0.proj" in m for m in quantized), quantized


def test_a_fused_layer_whose_shards_are_all_kept_is_ignored_by_its_own_name(modelopt_fixture, tmp_path):
    """vLLM-Omni cannot map Qwen-Image's `add_q_proj`/`add_k_proj`/`add_v_proj` entries to its
    fused `add_kv_proj` (its pipeline class binds no packed mapping, and no shard name is a
    substring of the fused one): its loader raised on the BF16 shards of the blocks a Qwen-Image
    NVFP4 build keeps (compat kind `qwen-image-nvfp4-bf16-fit`), while dqfast check said it loads.
    Builders now list the fused name too, and check decides such shards by the fused layer."""
    q4 = modelopt_fixture("qwen-image", "nvfp4")
    out = tmp_path / "o"
    build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=q4.base_dir, fit_target=True)
    cfg = json.loads((out / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    fused = [p for p in ignore if p.endswith(".attn.add_kv_proj")]
    assert fused and all(f"{f.rsplit('.', 1)[0]}.add_{x}_proj" in ignore for f in fused for x in "qkv"), ignore
    assert all(c.status == "loads" for c in check_checkpoint(out, "any"))
    cfg["quantization_config"]["ignore"] = [p for p in ignore if p not in fused]
    (out / "config.json").write_text(json.dumps(cfg))
    (vo,) = check_checkpoint(out, "vllm-omni")
    assert vo.status == "fails" and f"{fused[0].rsplit('.', 1)[0]}.add_q_proj" in vo.modules("error"), vo.summary()
