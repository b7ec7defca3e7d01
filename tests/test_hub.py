"""Hub ids as builder inputs, resolved from a local hub cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from dqfast.cli import main
from dqfast.errors import CheckpointError, PlanError
from dqfast.fp8 import build_fp8_transformer
from dqfast.hub import HubCacheError, hub_spec, parse_hub_spec, resolve_input
from dqfast.synth import make_transformer

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, src: Path, repo: str, commit: str = COMMIT, branch: str = "main") -> Path:
    """``models--org--name/{blobs,snapshots/<commit>,refs/<branch>}`` with every snapshot file a
    relative symlink to its blob, as the hub writes them."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)
    return repo_dir / "snapshots" / commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    syn = make_transformer(root / "syn", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=32)
    snap = _hub_cache(root / "cache", syn.root / "base", "acme/tiny-flux")
    assert (snap / "transformer" / "config.json").is_symlink()
    return root / "cache", snap, syn.base


@pytest.fixture
def cache_env(hub, monkeypatch):
    cache, snap, base = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: resolution never touches the network
    return snap, base


def test_spec_parsing():
    assert parse_hub_spec("hf://org/name@v1/transformer/sub") == ("org/name", "v1", "transformer/sub")
    assert parse_hub_spec("hf://org/name") == ("org/name", None, None)
    assert parse_hub_spec(str(Path("hf://org/name"))) == ("org/name", None, None)  # Path() keeps one slash
    assert parse_hub_spec("org/name-that-does-not-exist") == ("org/name-that-does-not-exist", None, None)
    assert parse_hub_spec("/abs/path") is None and parse_hub_spec("a/b/c") is None
    assert hub_spec("org/name", "main", "transformer") == "hf://org/name@main/transformer"
    with pytest.raises(PlanError, match="hf://<org>/<name>"):
        parse_hub_spec("hf://justone")


def test_cached_repo_resolves_by_id_branch_commit_and_subfolder(cache_env):
    snap, _ = cache_env
    assert resolve_input("acme/tiny-flux") == snap
    assert resolve_input("acme/tiny-flux", subfolder="transformer") == snap / "transformer"
    assert resolve_input(f"hf://acme/tiny-flux@{COMMIT}/transformer") == snap / "transformer"
    assert resolve_input("hf://acme/tiny-flux", revision="main") == snap


def test_uncached_repo_revision_or_subfolder_is_a_typed_error(cache_env):
    with pytest.raises(HubCacheError, match=r"acme/other \(revision main\) is not in .*huggingface-cli download acme/other") as e:
        resolve_input("acme/other")
    assert isinstance(e.value, CheckpointError)
    with pytest.raises(HubCacheError, match="revision v2"):
        resolve_input("acme/tiny-flux", revision="v2")
    with pytest.raises(HubCacheError, match="has no 'vae'"):
        resolve_input("hf://acme/tiny-flux/vae")


def test_a_local_path_wins_over_a_hub_id(cache_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "tiny-flux").mkdir(parents=True)
    assert resolve_input("acme/tiny-flux") == Path("acme/tiny-flux")
    with pytest.raises(PlanError, match="--revision applies to hub ids"):
        resolve_input("acme/tiny-flux", revision="main")


def test_builders_read_hub_inputs_bit_identically(cache_env, tmp_path):
    _, base = cache_env
    build_fp8_transformer(tmp_path / "local", base_transformer_dir=base, from_bf16=True)
    build_fp8_transformer(tmp_path / "hub", base_transformer_dir="hf://acme/tiny-flux", from_bf16=True)  # finds transformer/
    a = (tmp_path / "local" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == (tmp_path / "hub" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_cli_hub_inputs_with_revision_and_subfolder(cache_env, tmp_path):
    out = tmp_path / "o"
    args = ["build", "fp8", "--from-bf16", "--base-transformer-dir", "acme/tiny-flux", "--subfolder", "transformer"]
    r = CliRunner().invoke(main, [*args, "--revision", COMMIT, "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file()
    r = CliRunner().invoke(main, [*args, "--revision", "v9", "--output-dir", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "is not in" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["build", "fp8", "--from-bf16", "--base-transformer-dir", "no/such", "--output-dir", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "no/such (revision main) is not in" in r.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_components_from_a_hub_pipeline(cache_env, tmp_path):
    from dqfast.components import build_components

    rep = build_components("fp8", "acme/tiny-flux", tmp_path / "pipe", from_bf16=True)
    assert list(rep.components) == ["transformer"]
    shutil.rmtree(tmp_path / "pipe")


def test_a_variant_beside_the_main_weights_is_not_refused(tmp_path):
    """diffusers writes `<name>.fp16.safetensors` next to `<name>.safetensors`; like diffusers
    without a variant, dqfast reads the main file (it used to refuse the directory)."""
    import numpy as np
    from dqfast.reader import open_checkpoint, read_tensor
    from dqfast.synth import write_safetensors

    d = tmp_path / "t"
    d.mkdir()
    write_safetensors(d / "diffusion_pytorch_model.safetensors", {"w": ("F32", np.ones((2, 2), np.float32))})
    write_safetensors(d / "diffusion_pytorch_model.fp16.safetensors", {"w": ("F32", np.full((2, 2), 2, np.float32))})
    info = open_checkpoint(d)
    assert [f.name for f in info.files] == ["diffusion_pytorch_model.safetensors"]
    assert read_tensor(d, "w").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    write_safetensors(d / "other.safetensors", {"x": ("F32", np.ones(1, np.float32))})
    with pytest.raises(CheckpointError, match="no index json"):
        open_checkpoint(d)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """A transformer dir with main weights (seed 0) and an `fp16` variant (seed 1: different
    bytes, same layout), single-file and sharded as diffusers names them; plus the seed-1 dir."""
    import json

    root = tmp_path_factory.mktemp("variants")
    kw = dict(blocks=1, single_blocks=1, heads=2, head_dim=32)
    main_ = make_transformer(root / "main", "flux1", seed=0, **kw).base
    other = make_transformer(root / "other", "flux1", seed=1, **kw).base
    single = root / "single"
    shutil.copytree(main_, single)
    shutil.copy(other / "diffusion_pytorch_model.safetensors", single / "diffusion_pytorch_model.fp16.safetensors")
    sharded_src = make_transformer(root / "sh", "flux1", seed=1, max_shard_bytes=300_000, **kw).base
    sharded = root / "sharded"
    shutil.copytree(main_, sharded)
    index = json.loads((sharded_src / "diffusion_pytorch_model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        new = shard.replace("diffusion_pytorch_model-", "diffusion_pytorch_model.fp16-")
        shutil.copy(sharded_src / shard, sharded / new)
        renamed[shard] = new
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (sharded / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    return main_, other, single, sharded


def _weights(d: Path) -> dict[str, bytes]:
    """Every tensor's bytes (the layout follows the input's shards, so files are not compared)."""
    from dqfast.reader import open_checkpoint, read_tensor

    info = open_checkpoint(d)
    return {n: read_tensor(m.file, n, raw=True).tobytes() for n, m in info.tensors.items()}


def test_variant_selects_the_variant_weights_single_and_sharded(variants, tmp_path):
    from dqfast.hub import input_variant

    main_, other, single, sharded = variants
    build_fp8_transformer(tmp_path / "want_main", base_transformer_dir=main_, from_bf16=True)
    build_fp8_transformer(tmp_path / "want_fp16", base_transformer_dir=other, from_bf16=True)
    for d in (single, sharded):
        build_fp8_transformer(tmp_path / f"{d.name}-main", base_transformer_dir=d, from_bf16=True)
        assert _weights(tmp_path / f"{d.name}-main") == _weights(tmp_path / "want_main")
        with input_variant("fp16"):
            build_fp8_transformer(tmp_path / f"{d.name}-fp16", base_transformer_dir=d, from_bf16=True)
        assert _weights(tmp_path / f"{d.name}-fp16") == _weights(tmp_path / "want_fp16"), d.name
    # The output keeps the variant's shards under the main names (no `.fp16` tag), which loaders
    # without a variant look for.
    out = sorted(p.name for p in (tmp_path / "sharded-fp16").iterdir())
    n = len(out) - 2
    assert n > 1
    want = [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert out == sorted(["config.json", "diffusion_pytorch_model.safetensors.index.json", *want])
    assert sorted(p.name for p in (tmp_path / "single-fp16").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]


def test_variant_on_the_cli_and_a_missing_variant(variants, tmp_path):
    _, _, single, sharded = variants
    base = ["build", "fp8", "--from-bf16", "--base-transformer-dir"]
    r = CliRunner().invoke(main, [*base, str(sharded), "--variant", "fp16", "--output-dir", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, str(single), "--variant", "bf16", "--output-dir", str(tmp_path / "b")])
    assert r.exit_code == 2 and "no 'bf16' variant" in r.output and "variants here: fp16" in r.output, r.output
    assert not (tmp_path / "b").exists()
    # The variant does not stick to the process after the command.
    r = CliRunner().invoke(main, [*base, str(single), "--output-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
