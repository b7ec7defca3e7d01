"""Every builder keeps the source's sharding by default (issue #13 item 3, SGLang 0.5.23's builders'
rule): the output has the source's shard file names, each tensor in the file its source tensor was
in (BF16 fallbacks where the converted checkpoint held them, scales beside their weight), and an
index named like the source's; ``max_shard_size`` re-shards greedily as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dqfast.components import build_components
from dqfast.fp8 import build_fp8_transformer
from dqfast.mixed import build_mixed_transformer
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.plan import split_module
from dqfast.reader import open_checkpoint
from dqfast.synth import make_transformer
from dqfast.weight_only import build_mxfp8_transformer

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _files(d: Path) -> dict[str, str]:
    """tensor -> shard file name."""
    return {n: Path(m.file).name for n, m in open_checkpoint(d).tensors.items()}


def assert_source_layout(src: Path, out: Path, report: Any) -> dict[str, str]:
    """``out`` is laid out like ``src``: same shard names; a synthesized scale (ops ``f32``,
    ``scale``) beside its module's weight, every other tensor where ``src`` held it; an index
    named like the source's that lists every tensor."""
    want, got = _files(src), _files(out)
    op = {t["name"]: t["op"] for t in report.tensors}
    src_shards = sorted({p.name for p in src.glob("*.safetensors")})
    assert len(src_shards) >= 2, "the input must be sharded"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(got.values()))
    assert set(got.values()) <= set(src_shards)
    for name, f in got.items():
        module, _ = split_module(name)
        if op[name] in ("f32", "scale") and f"{module}.weight" in got:
            assert f == got[f"{module}.weight"], name
        else:  # where the source held it, else (a new name) its source weight's file
            assert f == want.get(name, want.get(f"{module}.weight")), name
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == got
    assert index["metadata"]["total_size"] == sum(m.nbytes for m in open_checkpoint(out).tensors.values())
    assert sorted(p.name for p in out.glob("*.index.json")) == [INDEX]
    return got


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # 200 kB shards: base and export both in several files, split at different tensors.
    root = tmp_path_factory.mktemp("sharded")
    return make_transformer(
        root, "flux1", blocks=1, single_blocks=1, heads=2, head_dim=64, seed=3, modelopt_fp8_export=True, max_shard_bytes=200_000
    )


BUILDS = {
    "fp8_from_export": lambda o, p: (
        p.export,
        build_fp8_transformer(
            o, modelopt_hf_dir=p.export_root, modelopt_backbone_ckpt=p.backbone, base_transformer_dir=p.base, fsync=False
        ),
    ),
    # A fallback read from the base lands where the export held that tensor.
    "fp8_from_export_fallback": lambda o, p: (
        p.export,
        build_fp8_transformer(
            o,
            modelopt_hf_dir=p.export_root,
            modelopt_backbone_ckpt=p.backbone,
            base_transformer_dir=p.base,
            fallback=[r"^single_transformer_blocks\.0\.proj_mlp$"],
            fsync=False,
        ),
    ),
    "fp8_from_bf16": lambda o, p: (p.base, build_fp8_transformer(o, base_transformer_dir=p.base, from_bf16=True, fsync=False)),
    "nvfp4_from_bf16": lambda o, p: (
        p.base,
        build_nvfp4_transformer(o, base_transformer_dir=p.base, from_bf16=True, fsync=False, target="none"),
    ),
    "mixed": lambda o, p: (p.base, build_mixed_transformer(o, p.base, fsync=False, target="none")),
    "mxfp8": lambda o, p: (p.base, build_mxfp8_transformer(o, base_transformer_dir=p.base, fsync=False, target="none")),
}


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_builders_keep_the_source_shards(synth: Any, tmp_path: Path, build: str) -> None:
    out = tmp_path / "out"
    src, report = BUILDS[build](out, synth)
    got = assert_source_layout(src, out, report)
    assert [s["file"] for s in report.shards] == sorted(set(got.values()))
    if build == "fp8_from_export_fallback":
        name = "single_transformer_blocks.0.proj_mlp.weight"
        assert open_checkpoint(out).tensors[name].dtype == "BF16"
        assert got[name] == _files(synth.export)[name]


def test_max_shard_size_re_shards(synth: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = build_fp8_transformer(out, base_transformer_dir=synth.base, from_bf16=True, max_shard_size="100KB", fsync=False)
    n = len(report.shards)
    assert n > len(list(synth.base.glob("*.safetensors")))
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    one = tmp_path / "one"
    build_fp8_transformer(one, base_transformer_dir=synth.base, from_bf16=True, max_shard_size="5GB", fsync=False)
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", INDEX]


def test_a_one_file_source_keeps_its_name(tmp_path: Path) -> None:
    """SGLang keeps a single file's name and names the index after it; so does dqfast."""
    p = make_transformer(tmp_path / "in", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=64, seed=3)
    (f,) = p.base.glob("*.safetensors")
    f.rename(p.base / "x.safetensors")
    out = tmp_path / "out"
    build_fp8_transformer(out, base_transformer_dir=p.base, from_bf16=True, fsync=False)
    assert sorted(q.name for q in out.iterdir()) == ["config.json", "x.safetensors", "x.safetensors.index.json"]
    sized = tmp_path / "sized"
    build_fp8_transformer(sized, base_transformer_dir=p.base, from_bf16=True, fsync=False, max_shard_size="5GB")
    # Only the name differs: the file's bytes are those of the size-based layout's one shard.
    assert (out / "x.safetensors").read_bytes() == (sized / "diffusion_pytorch_model.safetensors").read_bytes()


def test_components_keep_each_transformers_shards(synth: Any, tmp_path: Path) -> None:
    root = synth.base.parent
    out = tmp_path / "out"
    rep = build_components("fp8", root, out, ["transformer"], from_bf16=True, fsync=False)
    assert_source_layout(synth.base, out / "transformer", rep.components["transformer"])


def test_nvfp4_export_keeps_its_shards(modelopt_fixture: Any, tmp_path: Path) -> None:
    """A real ModelOpt NVFP4 export split in two, with a base: fallbacks go where the export held them."""
    from ckpt_helpers import reshard_two

    f4 = modelopt_fixture("flux", "nvfp4")
    two = reshard_two(f4.hf_dir, tmp_path / "two" / "transformer")
    out = tmp_path / "out"
    rep = build_nvfp4_transformer(
        out, modelopt_hf_dir=two, base_transformer_dir=f4.base_dir, model_type="flux1", fsync=False, target="sglang"
    )
    assert_source_layout(two, out, rep)
