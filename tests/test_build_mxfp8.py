"""MXFP8 weight-only builds (``dqfast.weight_only``, ``dqfast build mxfp8``) from synthetic FLUX.1 / Wan2.2
BF16 checkpoints: outputs byte-equal to the Rust kernel (``_core.block_quantize("mxfp8", ...)``) on the base
weights, readable by the safetensors library, the config vLLM-Omni 0.30 reads, and hostile inputs
(K not a multiple of 32, NaN weights, fused groups split by a fallback) handled as documented."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import assert_safetensors_readable
from click.testing import CliRunner
from dqfast import _core
from dqfast.batch import load_manifest, run_batch
from dqfast.cli import main
from dqfast.errors import CheckpointError, PlanError
from dqfast.formats import MXFP8
from dqfast.inspect import inspect_checkpoint
from dqfast.reader import open_checkpoint
from dqfast.stream import CheckpointWriter
from dqfast.synth import make_transformer
from dqfast.weight_only import build_mxfp8_transformer
from hostile.util import tree_digest


def _tensor_bytes(d: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor of a checkpoint directory."""
    out = {}
    for name, meta in open_checkpoint(d).tensors.items():
        dtype, shape, data = _core.read_tensor(meta.file, name)
        out[name] = (dtype, list(shape), bytes(data))
    return out


def _poke(d: Path, tensor: str, element: int, bits: int) -> None:
    """Overwrite one BF16 element of ``tensor`` in the shard holding it."""
    meta = open_checkpoint(d).tensors[tensor]
    with open(meta.file, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        begin = json.loads(f.read(n))[tensor]["data_offsets"][0]
        f.seek(8 + n + begin + 2 * element)
        f.write(struct.pack("<H", bits))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    # in_channels 48: x_embedder's K is not a multiple of 32, so it must stay BF16.
    return make_transformer(
        tmp_path_factory.mktemp("flux"), "flux1", blocks=1, single_blocks=1, heads=2, head_dim=32, config_overrides={"in_channels": 48}
    )


@pytest.fixture(scope="module")
def flux_build(flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "flux-mxfp8"
    return out, build_mxfp8_transformer(out, base_transformer_dir=flux.base, target="none")


def test_quantized_weights_equal_the_kernel_and_everything_else_is_copied(flux, flux_build):
    out, report = flux_build
    assert_safetensors_readable(out)
    base, got = _tensor_bytes(flux.base), _tensor_bytes(out)
    quantized = [d.module for d in report.decisions if d.action == "mxfp8"]
    assert len(quantized) == report.counts["mxfp8"] > 10
    for m in quantized:
        dtype, (n, k), data = base[f"{m}.weight"]
        values, scales = _core.block_quantize("mxfp8", data, dtype, k)
        assert got[f"{m}.weight"] == ("F8_E4M3", [n, k], values), m
        assert got[f"{m}.weight_scale"] == ("U8", [n, k // MXFP8.block], scales), m
    # Every other tensor byte for byte; nothing else added (no input_scale: dynamic activations).
    added = {f"{m}.weight_scale" for m in quantized}
    assert set(got) == set(base) | added
    for name in set(base) - {f"{m}.weight" for m in quantized}:
        assert got[name] == base[name], name


def test_safetensors_library_reads_the_mxfp8_dtypes(flux_build):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    out, report = flux_build
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    m = next(d.module for d in report.decisions if d.action == "mxfp8")
    w, s = sd[f"{m}.weight"], sd[f"{m}.weight_scale"]
    assert (w.dtype, s.dtype) == (torch.float8_e4m3fn, torch.uint8)
    assert s.shape == (w.shape[0], w.shape[1] // 32)


def test_config_is_what_vllm_omni_reads_with_exact_ignored_layers(flux, flux_build):
    out, report = flux_build
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((flux.base / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == base_cfg
    qc = cfg["quantization_config"]
    assert set(qc) == {"quant_method", "is_checkpoint_mxfp8_serialized", "ignored_layers"}
    assert qc["quant_method"] == "mxfp8" and qc["is_checkpoint_mxfp8_serialized"] is True
    base = open_checkpoint(flux.base).tensors
    kept_linears = {d.module for d in report.decisions if d.action == "keep" and len(base[f"{d.module}.weight"].shape) == 2}
    quantized = {d.module for d in report.decisions if d.action == "mxfp8"}
    # Exact names (vLLM matches them exactly): every kept 2-D linear, no quantized one, no pattern.
    assert kept_linears <= set(qc["ignored_layers"])
    assert not quantized & set(qc["ignored_layers"])
    assert not any("*" in n or "\\" in n for n in qc["ignored_layers"])
    reasons = {d.module: d.reason for d in report.decisions}
    assert "x_embedder" in kept_linears and "not a multiple of 32" in reasons["x_embedder"]
    assert report.counts["kept_unquantized"] == 1
    # The preset's FP8 fallbacks apply (FLUX.1: norm1 modulation linears stay BF16).
    assert "transformer_blocks.0.norm1.linear" in kept_linears
    assert report.counts["bf16_fallback"] > 0


def test_inspect_recognizes_mxfp8_and_its_problems(flux_build, tmp_path):
    out, report = flux_build
    r = inspect_checkpoint(out)
    assert r.modules["mxfp8"] == report.counts["mxfp8"] and "fp8" not in r.modules
    assert r.problems == []
    bad = tmp_path / "bad"
    scales = np.full((4, 2), 127, dtype=np.uint8)
    scales[1, 0] = 0xFF
    with CheckpointWriter(bad) as w:
        w.write("a.weight", np.zeros((4, 64), np.uint8), dtype="F8_E4M3")
        w.write("a.weight_scale", scales)
        w.write("b.weight", np.zeros((4, 64), np.uint8), dtype="F8_E4M3")
        w.write("b.weight_scale", np.zeros((4, 3), np.uint8))
    r = inspect_checkpoint(bad)
    assert r.modules == {"mxfp8": 2}
    assert any(p.startswith("a: 1 NaN scale byte") for p in r.problems), r.problems
    assert any(p.startswith("b: MXFP8 weight [4, 64]") and "[4, 2]" in p for p in r.problems), r.problems


def test_wan_with_fallback_and_dry_run(tmp_path):
    wan = make_transformer(tmp_path / "wan", "wan", blocks=1, heads=2, head_dim=32, config_overrides={"ffn_dim": 128, "text_dim": 96})
    dry = build_mxfp8_transformer(tmp_path / "dry", base_transformer_dir=wan.base, fallback=[r"\.ffn\."], dry_run=True, target="none")
    assert dry.dry_run and not (tmp_path / "dry").exists()
    out = tmp_path / "out"
    r = build_mxfp8_transformer(out, base_transformer_dir=wan.base, fallback=[r"\.ffn\."], max_shard_size="40KB", target="none")
    assert [d.module for d in r.decisions] == [d.module for d in dry.decisions] and r.counts == dry.counts
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded, with an index
    assert_safetensors_readable(out)
    decisions = {d.module: d for d in r.decisions}
    assert decisions["blocks.0.ffn.net.0.proj"].action == "keep" and "fallback" in decisions["blocks.0.ffn.net.0.proj"].reason
    assert decisions["blocks.0.attn1.to_q"].action == "mxfp8"
    ignored = json.loads((out / "config.json").read_text())["quantization_config"]["ignored_layers"]
    assert {"blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2"} <= set(ignored)
    base, got = _tensor_bytes(wan.base), _tensor_bytes(out)
    dtype, (_, k), data = base["blocks.0.attn2.to_k.weight"]
    assert got["blocks.0.attn2.to_k.weight_scale"][2] == _core.block_quantize("mxfp8", data, dtype, k)[1]


def test_nan_weight_is_a_checkpoint_error_naming_tensor_and_row(flux, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(flux.base, base)
    name = "transformer_blocks.0.attn.to_k.weight"
    k = open_checkpoint(base).tensors[name].shape[1]
    _poke(base, name, 3 * k + 7, 0x7FC0)  # NaN at row 3, column 7
    before = tree_digest(base)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        build_mxfp8_transformer(out, base_transformer_dir=base, target="none")
    assert e.value.tensor == name and "row 3, column 7" in str(e.value), str(e.value)
    assert not out.exists() and tree_digest(base) == before
    # The CLI: one line, exit 2, nothing at the output.
    r = CliRunner().invoke(
        main, ["build", "mxfp8", "--base-transformer-dir", str(base), "--output-dir", str(out), "-q", "--target", "none"]
    )
    assert r.exit_code == 2, r.output
    assert name in r.output and "row 3" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and tree_digest(base) == before


def test_a_fallback_that_splits_a_fused_group_is_refused(flux, tmp_path):
    with pytest.raises(PlanError, match=r"fused group 'transformer_blocks\.0\.attn\.to_qkv'.*to_k"):
        build_mxfp8_transformer(tmp_path / "o", base_transformer_dir=flux.base, fallback=[r"blocks\.0\.attn\.to_k$"], target="none")
    assert not (tmp_path / "o").exists()


def test_cli_build_and_batch_match_the_api(flux, flux_build, tmp_path):
    out, _ = flux_build
    cli_out = tmp_path / "cli"
    r = CliRunner().invoke(
        main, ["build", "mxfp8", "--base-transformer-dir", str(flux.base), "--output-dir", str(cli_out), "--json", "--target", "none"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{") :])["quant_algo"] == "MXFP8"
    m = tmp_path / "jobs.toml"
    m.write_text(
        f'[[jobs]]\nbuilder = "mxfp8"\noutput = "batch"\ninputs = {{ base_transformer_dir = "{flux.base}" }}\noptions = {{ target = "none" }}\n'
    )
    assert run_batch(load_manifest(m)).jobs[0].status == "done"
    for d in (cli_out, tmp_path / "batch"):
        assert _tensor_bytes(d) == _tensor_bytes(out)
        assert (d / "config.json").read_bytes() == (out / "config.json").read_bytes()


def test_an_mxfp8_checkpoint_is_recognized_and_never_taken_as_a_float_base(flux_build, tmp_path):
    import dqfast

    out, _ = flux_build
    r = inspect_checkpoint(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert r.quant_algo == "MXFP8" and r.ignore == qc["ignored_layers"]
    # Before: an fp8 --from-bf16 build of it "succeeded" with a warning, writing an FP8 config
    # over MXFP8 tensors.
    for build in (build_mxfp8_transformer, lambda o, **kw: dqfast.build_fp8_transformer(o, from_bf16=True, **kw)):
        with pytest.raises(PlanError, match="already quantized"):
            build(tmp_path / "o", base_transformer_dir=out, target="none")
        assert not (tmp_path / "o").exists()


def test_verify_layers_dequantizes_mxfp8_as_vllm_does(flux, flux_build, tmp_path):
    """`dqfast verify layers` on an MXFP8 output (it refused: "MXFP8 weights are not verified"):
    every quantized layer is dequantized as vLLM's reference does, f32(e4m3) * 2^(s - 127) (here
    restated with torch), and compared with the base."""
    torch = pytest.importorskip("torch")
    from dqfast.runtime.loader import _Reader, _tensor_files
    from dqfast.verify.layers import _dequantize_block, layer_errors

    out, report = flux_build
    rows = layer_errors(flux.base, out)
    quantized = {d.module for d in report.decisions if d.action == "mxfp8"}
    assert {r["module"] for r in rows} == quantized
    assert all(r["algo"] == "MXFP8" and not r["nan"] and r["cosine"] > 0.999 for r in rows), rows[:2]
    reader = _Reader(_tensor_files(out))
    for m in sorted(quantized)[:4]:
        w, s = reader.get(f"{m}.weight"), reader.get(f"{m}.weight_scale")
        oracle = w.float() * torch.exp2(s.float() - 127).repeat_interleave(MXFP8.block, dim=1)
        deq, nan = _dequantize_block(reader, m, MXFP8)
        assert nan == 0 and torch.equal(deq, oracle), m
    r = CliRunner().invoke(main, ["verify", "layers", str(flux.base), str(out), "--json", "-"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)["layer_summary"]
    assert summary["layers"] == len(quantized) and not summary["nan_layers"] and not summary["outliers"]
