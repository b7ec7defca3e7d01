"""The engine's I/O modes (direct reads/writes vs memory map + page cache) write the same bytes,
through every builder and the CLI; the report says which path was taken."""

from __future__ import annotations

import os
from pathlib import Path

import dqfast
import pytest
from ckpt_helpers import assert_safetensors_readable
from click.testing import CliRunner
from dqfast.cli import main as cli
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.synth import make_transformer


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _direct_supported(d: Path) -> bool:
    try:
        fd = os.open(d / "config.json", os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory) -> Path:
    """A FLUX.1-shaped BF16 transformer wide enough (dim 1024: 2-8 MiB weights) that its
    weights pass the engine's 1 MiB direct-read threshold."""
    root = tmp_path_factory.mktemp("wide")
    make_transformer(root, "flux1", blocks=1, single_blocks=1, heads=8, head_dim=128, max_shard_bytes=20_000_000)
    return root / "base" / "transformer"


@pytest.mark.parametrize("kind", ["fp8", "nvfp4"])
def test_direct_and_buffered_builds_are_byte_identical(wide_flux, tmp_path, kind):
    build = dqfast.build_fp8_transformer if kind == "fp8" else build_nvfp4_transformer
    kw = dict(base_transformer_dir=wide_flux, from_bf16=True, activation_amax=8.0, fsync=False, max_shard_size="30MB", target="sglang")
    reports = {io: build(tmp_path / io, io=io, **kw) for io in ("buffered", "direct", "auto")}
    want = _files(tmp_path / "buffered")
    assert_safetensors_readable(tmp_path / "buffered")
    assert len([n for n in want if n.endswith(".safetensors")]) > 1, "several output shards"
    for io in ("direct", "auto"):
        assert _files(tmp_path / io) == want, io
    assert reports["buffered"].bytes_read_direct == 0 and not reports["buffered"].direct_writes
    if _direct_supported(wide_flux):
        assert reports["direct"].bytes_read_direct > 0.9 * reports["direct"].bytes_read
        assert reports["direct"].direct_writes


def test_auto_reads_cached_inputs_through_the_map(wide_flux, tmp_path):
    """Fully cached inputs are cheaper through the map than read again from disk."""
    for f in wide_flux.glob("*.safetensors"):
        f.read_bytes()  # now in the page cache
    r = dqfast.build_fp8_transformer(tmp_path / "o", base_transformer_dir=wide_flux, from_bf16=True, fsync=False)
    assert r.bytes_read_direct == 0


def test_cli_io_option(wide_flux, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "fp8",
            "--base-transformer-dir",
            str(wide_flux),
            "--from-bf16",
            "--output-dir",
            str(tmp_path / "cli"),
            "--io",
            "direct",
            "--no-fsync",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    ref = dqfast.build_fp8_transformer(tmp_path / "ref", base_transformer_dir=wide_flux, from_bf16=True, fsync=False, io="buffered")
    assert ref.bytes_read_direct == 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "ref")
    bad = CliRunner().invoke(
        cli,
        ["build", "fp8", "--base-transformer-dir", str(wide_flux), "--from-bf16", "--output-dir", str(tmp_path / "bad"), "--io", "mmap"],
    )
    assert bad.exit_code != 0 and "mmap" in bad.output
    with pytest.raises(dqfast.PlanError, match="io must be one of"):
        dqfast.build_fp8_transformer(tmp_path / "bad2", base_transformer_dir=wide_flux, from_bf16=True, io="mmap")
