"""dqfast's builders against SGLang 0.5.23's own builder tools, byte for byte.

Each case runs SGLang's ``build_modelopt_fp8_transformer`` / ``build_modelopt_nvfp4_transformer``
(imported from the installed wheel) and dqfast's builder on the same real ModelOpt 0.47 export and
compares files, tensors (dtype, shape, bytes), config.json, quantization_config, ignore list, index
and shard metadata. ``EXPECTED`` lists the differences that exist today (issue #13); every other
field must be equal. A fix of one of them flips its case: update the table (and docs/compat.md).
"""

from __future__ import annotations

import pytest
from builds import sglang_fp8, sglang_nvfp4
from ckpt_helpers import reshard_two
from compare import compare_dirs

INDEX = "diffusion_pytorch_model.safetensors.index.json"
# What dqfast adds to every shard's metadata (and SGLang's NVFP4 tool does not write at all).
DQFAST_MD = ["dqfast_version"]


def _flux_blocks(fmt: list[str], double=(0, 1), single=(0, 1)) -> list[str]:
    out = []
    for f in fmt:
        blocks = single if f.startswith("single_") else double
        out += [f.format(i=i) for i in blocks]
    return sorted(out)


# `ignore` of an FP8 build is SGLang's set (ModelOpt's entries, every kept weight without a calibrated
# scale, RMSNorms included, every fallback). `proj_out` (kept BF16) is written as `p*roj_out`: vLLM would
# match a bare `proj_out` as a substring of the quantized `single_transformer_blocks.*.proj_out` too.
PROJ_OUT_ONLY_DQFAST, PROJ_OUT_ONLY_SGLANG = ["p*roj_out"], ["proj_out"]
# dqfast adds the diffusers name of each FeedForward layer SGLang lists only as `ff.proj_in`/`ff.proj_out`
# (SGLang's FLUX.1 runtime and vLLM-Omni both name it `ff.net.0.proj`/`ff.net.2`); these match no
# quantized module under either engine's rule.
FLUX_FP8_IGNORE_ONLY_DQFAST = sorted(
    PROJ_OUT_ONLY_DQFAST + _flux_blocks(["transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks.{i}.ff.net.2"])
)
FLUX_FP8_IGNORE_ONLY_SGLANG = PROJ_OUT_ONLY_SGLANG
FP8_QC_MD = ["_quantization_metadata", "config", "quantization_config"]  # differ because `ignore` differs
NVFP4_QC = {"checkpoint_weight_scale_layout": ("linear", "<absent>"), "group_size": (16, "<absent>")}
NVFP4_MD_ONLY_DQFAST = ["_class_name", "config", "dqfast_version"]
FLUX_NVFP4_FALLBACK_MODULES = _flux_blocks(
    [
        "transformer_blocks.{i}.norm1.linear",
        "transformer_blocks.{i}.norm1_context.linear",
        "transformer_blocks.{i}.ff.net.0.proj",
        "transformer_blocks.{i}.ff.net.2",
        "transformer_blocks.{i}.ff_context.net.0.proj",
        "transformer_blocks.{i}.ff_context.net.2",
        "single_transformer_blocks.{i}.norm.linear",
        "single_transformer_blocks.{i}.proj_mlp",
    ]
)
FLUX_NVFP4_QUANTIZED_WEIGHTS = _flux_blocks(
    [
        f"transformer_blocks.{{i}}.attn.{m}.weight"
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    ]
    + [f"single_transformer_blocks.{{i}}.{m}.weight" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")]
)
WAN_BLOCK_LINEARS = [f"blocks.{{i}}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "blocks.{i}.ffn.net.0.proj",
    "blocks.{i}.ffn.net.2",
]

EXPECTED: dict[str, dict] = {
    # FLUX.1 FP8, same flags: every tensor byte-identical; index, ignore list and metadata differ.
    "flux-fp8": {
        "ignore_only_dqfast": FLUX_FP8_IGNORE_ONLY_DQFAST,
        "ignore_only_reference": FLUX_FP8_IGNORE_ONLY_SGLANG,
        "metadata_keys_only_dqfast": DQFAST_MD,
        "metadata_values_differ": FP8_QC_MD,
    },
    # --keep-bf16-pattern (dqfast: --fallback): the extra fallback layers are equal byte for byte.
    "flux-fp8-keep-bf16": {
        "ignore_only_dqfast": FLUX_FP8_IGNORE_ONLY_DQFAST,
        "ignore_only_reference": FLUX_FP8_IGNORE_ONLY_SGLANG,
        "metadata_keys_only_dqfast": DQFAST_MD,
        "metadata_values_differ": FP8_QC_MD,
    },
    # A 2-shard export: both keep the source shards (same file names, same weight_map, same index
    # name), and every tensor is equal. The export has `transformer_blocks.0.attn.to_out.0.input_scale`
    # in shard 1 and its weight in shard 2: both write the new scale beside the weight, but SGLang
    # also leaves the export's copy in shard 1 (a tensor in two shards, which strict readers refuse),
    # so its index's total_size counts it twice (+4 bytes). dqfast writes each tensor once.
    "flux-fp8-2shard": {
        "index_differ": ["metadata"],
        "ignore_only_dqfast": FLUX_FP8_IGNORE_ONLY_DQFAST,
        "ignore_only_reference": FLUX_FP8_IGNORE_ONLY_SGLANG,
        "metadata_keys_only_dqfast": DQFAST_MD,
        "metadata_values_differ": FP8_QC_MD,
    },
    # Wan2.2 FP8: SGLang has no Wan preset; ModelOpt's filter already ignores what dqfast's `wan`
    # preset keeps in BF16, so tensors are equal; dqfast lists the preset's fallbacks (the condition
    # embedder) module by module, as SGLang lists the fallbacks of its presets.
    "wan-fp8": {
        "ignore_only_dqfast": sorted(
            [f"condition_embedder.{e}.linear_{j}" for e in ("text_embedder", "time_embedder") for j in (1, 2)]
            + ["condition_embedder.time_proj"]
        ),
        "metadata_keys_only_dqfast": DQFAST_MD,
        "metadata_values_differ": FP8_QC_MD,
    },
    # The NVFP4 export split in 2 files: both keep its shards; index and tensors equal (the
    # differences are those of one file).
    "flux-nvfp4-2shard": {
        "ignore_only_dqfast": PROJ_OUT_ONLY_DQFAST,
        "ignore_only_reference": PROJ_OUT_ONLY_SGLANG,
        "quant_config_differ": NVFP4_QC,
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
    # FLUX.1 NVFP4 with the flux1-nvfp4 preset: tensors equal, ignore list equal but for `proj_out`.
    "flux-nvfp4": {
        "ignore_only_dqfast": PROJ_OUT_ONLY_DQFAST,
        "ignore_only_reference": PROJ_OUT_ONLY_SGLANG,
        "quant_config_differ": NVFP4_QC,
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
    # No preset given: neither applies one (dqfast's default since issue #13; before, it applied FLUX.1's).
    "flux-nvfp4-no-preset": {
        "ignore_only_dqfast": PROJ_OUT_ONLY_DQFAST,
        "ignore_only_reference": PROJ_OUT_ONLY_SGLANG,
        "quant_config_differ": NVFP4_QC,
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
    # Qwen-Image NVFP4 (SGLang 0.5.23 has no Qwen-Image NVFP4 preset; neither builder applies one): the
    # ModelOpt export as written, `ignore` equal (no entry collides with a quantized module here).
    "qwen-image-nvfp4": {
        "quant_config_differ": NVFP4_QC,
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
    # --swap-weight-nibbles --target sglang: dqfast also keeps the bytes and writes the flag.
    "flux-nvfp4-swap-target-sglang": {
        "ignore_only_dqfast": PROJ_OUT_ONLY_DQFAST,
        "ignore_only_reference": PROJ_OUT_ONLY_SGLANG,
        "quant_config_differ": NVFP4_QC,
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
    # --swap-weight-nibbles --target none (or any, or one with vLLM-Omni): SGLang keeps the bytes and
    # writes the flag; dqfast swaps the bytes and writes `false` (vLLM-Omni ignores the flag).
    "flux-nvfp4-swap": {
        "tensors_bytes_differ": FLUX_NVFP4_QUANTIZED_WEIGHTS,
        "ignore_only_dqfast": PROJ_OUT_ONLY_DQFAST,
        "ignore_only_reference": PROJ_OUT_ONLY_SGLANG,
        "quant_config_differ": {**NVFP4_QC, "swap_weight_nibbles": (False, True)},
        "metadata_keys_only_dqfast": NVFP4_MD_ONLY_DQFAST,
        "metadata_values_differ": ["_quantization_metadata", "quantization_config"],
    },
}


def _build_pair(case: str, flux, modelopt_fixture, tmp_path):
    from dqfast.fp8 import build_fp8_transformer
    from dqfast.nvfp4 import build_nvfp4_transformer

    d, s = tmp_path / "dqfast", tmp_path / "sglang"
    f8, f4 = flux["fp8"], flux["nvfp4"]
    if case == "flux-fp8":
        build_fp8_transformer(d, modelopt_hf_dir=f8.hf_dir, modelopt_backbone_ckpt=f8.backbone, base_transformer_dir=f8.base_dir)
        sglang_fp8(f8, s)
    elif case == "flux-fp8-2shard":
        two = reshard_two(f8.hf_dir, tmp_path / "two" / "transformer")
        build_fp8_transformer(d, modelopt_hf_dir=two, modelopt_backbone_ckpt=f8.backbone, base_transformer_dir=f8.base_dir)
        sglang_fp8(f8, s, hf_dir=two)
    elif case == "flux-fp8-keep-bf16":
        pat = r"^single_transformer_blocks\.\d+\.proj_mlp$"
        build_fp8_transformer(
            d, modelopt_hf_dir=f8.hf_dir, modelopt_backbone_ckpt=f8.backbone, base_transformer_dir=f8.base_dir, fallback=[pat]
        )
        sglang_fp8(f8, s, keep_bf16_patterns=[pat])
    elif case == "wan-fp8":
        w8 = modelopt_fixture("wan", "fp8")
        build_fp8_transformer(d, modelopt_hf_dir=w8.hf_dir, modelopt_backbone_ckpt=w8.backbone, base_transformer_dir=w8.base_dir)
        sglang_fp8(w8, s)
    # NVFP4 FLUX.1 does not load in vLLM-Omni (part of the default target `any`): built for SGLang.
    elif case == "flux-nvfp4":
        build_nvfp4_transformer(d, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, model_type="flux1", target="sglang")
        sglang_nvfp4(f4, s, pattern_preset="flux1-nvfp4")
    elif case == "flux-nvfp4-2shard":
        two = reshard_two(f4.hf_dir, tmp_path / "two" / "transformer")
        build_nvfp4_transformer(d, modelopt_hf_dir=two, base_transformer_dir=f4.base_dir, model_type="flux1", target="sglang")
        sglang_nvfp4(f4, s, pattern_preset="flux1-nvfp4", hf_dir=two)
    elif case == "flux-nvfp4-no-preset":
        # The whole ModelOpt export: SGLang's own FLUX.1 (tp_size 1) cannot load it either (its
        # FeedForwards and modulation Linears are BF16 parameters; row `sglang-nvfp4-no-preset`), so
        # `--target sglang` refuses it and the parity build opts out of engine checks.
        from dqfast.errors import TargetError

        with pytest.raises(TargetError, match="cannot load 'single_transformer_blocks.0.norm.linear'"):
            build_nvfp4_transformer(tmp_path / "refused", modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, target="sglang")
        build_nvfp4_transformer(d, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, target="none")
        sglang_nvfp4(f4, s)
    elif case == "qwen-image-nvfp4":  # vLLM-Omni's Qwen-Image cannot load it either (img_mod/txt_mod)
        q4 = modelopt_fixture("qwen-image", "nvfp4")
        build_nvfp4_transformer(d, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir, target="sglang")
        sglang_nvfp4(q4, s)
    elif case == "flux-nvfp4-swap":
        build_nvfp4_transformer(
            d, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, model_type="flux1", swap_weight_nibbles=True, target="none"
        )
        sglang_nvfp4(f4, s, pattern_preset="flux1-nvfp4", swap_weight_nibbles=True)
    elif case == "flux-nvfp4-swap-target-sglang":
        build_nvfp4_transformer(
            d, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, model_type="flux1", swap_weight_nibbles=True, target="sglang"
        )
        sglang_nvfp4(f4, s, pattern_preset="flux1-nvfp4", swap_weight_nibbles=True)
    return d, s


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_builder_parity_with_sglang(case, flux, modelopt_fixture, tmp_path):
    d, s = _build_pair(case, flux, modelopt_fixture, tmp_path)
    got = {k: v for k, v in compare_dirs(d, s).items() if v}
    want = EXPECTED[case]
    if "index_differ" in got:  # which fields differ (the values follow from the other rows)
        got["index_differ"] = sorted(got["index_differ"])
    assert got == want
    if case == "flux-fp8-keep-bf16":  # the pattern really took effect, on both sides
        from dqfast.reader import open_checkpoint

        for out in (d, s):
            assert open_checkpoint(out).tensors["single_transformer_blocks.0.proj_mlp.weight"].dtype == "BF16"


def test_sglang_fp8_tool_runs_as_a_module(flux, tmp_path):
    """The documented entry point (`python -m ...`) works in this venv, with upstream's flags."""
    import subprocess
    import sys

    f8 = flux["fp8"]
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "sglang.multimodal_gen.tools.build_modelopt_fp8_transformer",
        "--modelopt-hf-dir",
        str(f8.hf_dir),
        "--modelopt-backbone-ckpt",
        str(f8.backbone),
        "--base-transformer-dir",
        str(f8.base_dir),
        "--output-dir",
        str(out),
        "--keep-bf16-pattern",
        r"^proj_out$",
        "--maxbound",
        "448",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / INDEX).is_file()


@pytest.mark.parametrize(
    "args,status",
    # ltx2 on the FLUX.1 fixture: upstream takes any preset for any model; dqfast refuses a
    # preset that does not match config.json's _class_name unless forced (issue #11), so both here.
    [(["--keep-bf16-pattern", "^proj_out$"], 0), (["--maxbound", "448"], 0), (["--model-type", "ltx2", "--force-model-type"], 0)],
    ids=["keep-bf16-pattern", "maxbound", "model-type-ltx2"],
)
def test_upstream_fp8_flags(args, status, flux, tmp_path):
    """Upstream `build_modelopt_fp8_transformer` flags on dqfast's `build fp8`: all accepted (0)."""
    from click.testing import CliRunner
    from dqfast.cli import main

    f8 = flux["fp8"]
    r = CliRunner().invoke(
        main,
        ["build", "fp8", "--modelopt-hf-dir", str(f8.hf_dir), "--modelopt-backbone-ckpt", str(f8.backbone)]
        + ["--base-transformer-dir", str(f8.base_dir), "--output-dir", str(tmp_path / "o"), *args],
    )
    assert r.exit_code == status, r.output
    assert (tmp_path / "o").exists() == (status == 0)


def test_presets_equal_sglangs_tables():
    """Every FP8 fallback preset is SGLang 0.5.23's list (FLUX.1, FLUX.2, HunyuanVideo, Qwen-Image,
    LTX-2), and FLUX.1's NVFP4 preset its `flux1-nvfp4`; SGLang's NVFP4 tool has no other preset (so
    no Qwen-Image NVFP4 one: dqfast's `qwen-image` keeps none either)."""
    import sglang.multimodal_gen.tools.build_modelopt_fp8_transformer as fp8_tool
    import sglang.multimodal_gen.tools.build_modelopt_nvfp4_transformer as nvfp4_tool
    from dqfast.models import get_preset

    for family, name in (
        ("flux1", "FLUX1"),
        ("flux2", "FLUX2"),
        ("hunyuan-video", "HUNYUANVIDEO"),
        ("qwen-image", "QWEN_IMAGE"),
        ("ltx2", "LTX2"),
    ):
        assert list(get_preset(family).fp8_fallback) == list(getattr(fp8_tool, f"DEFAULT_{name}_KEEP_BF16_PATTERNS")), family
    assert list(get_preset("flux1").nvfp4_fallback) == list(nvfp4_tool.DEFAULT_FLUX1_NVFP4_FALLBACK_PATTERNS)
    assert nvfp4_tool._preset_patterns("none") == [] and get_preset("qwen-image").nvfp4_fallback == ()
    for other in ("qwen-image", "qwen-image-nvfp4", "flux2-nvfp4", "wan-nvfp4"):
        with pytest.raises(ValueError, match="Unsupported pattern preset"):
            nvfp4_tool._preset_patterns(other)
