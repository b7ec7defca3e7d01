"""dqfast.stream: validated zero-copy reading and atomic sharded writing."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest
from dqfast import ops
from dqfast.errors import CheckpointError, OutputExistsError, PlanError
from dqfast.stream import CheckpointReader, CheckpointWriter, write_checkpoint
from dqfast.synth import make_transformer

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return make_transformer(root / "syn", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=32, max_shard_bytes=200_000).base


def _all(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_reader_gives_zero_copy_views_of_every_tensor(sharded):
    ref = _all(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    with CheckpointReader(sharded) as r:
        assert set(r.keys()) == set(ref)
        seen = 0
        for name, a in r:
            t = ref[name]
            assert not a.flags.writeable and not a.flags.owndata
            base = a
            while isinstance(base, np.ndarray):
                base = base.base
            assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)  # a view over the map
            assert a.shape == tuple(t.shape)
            want = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
            assert np.array_equal(a, want), name
            seen += 1
        assert seen == len(ref)


def test_reader_refuses_a_corrupt_file_before_mapping(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((100).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        CheckpointReader(bad)


def test_transform_and_write_sharded_readable_by_safetensors(sharded, tmp_path):
    out = tmp_path / "fp8"
    with CheckpointReader(sharded) as r, CheckpointWriter(out, max_shard_size=100_000, metadata={"producer": "test"}) as w:
        for name, a in r:
            meta = r.tensors[name]
            if name.endswith(".weight") and meta.dtype == "BF16" and a.ndim == 2:
                q, s = ops.quantize_e4m3(a, dtype="BF16", granularity="channel")
                w.write(name, q, dtype="F8_E4M3")
                w.write(name.removesuffix("weight") + "weight_scale", s)
            else:
                w.write(name, a, dtype=meta.dtype)
        w.write_file("config.json", json.dumps({"hello": 1}))
        staged = w._core().staging_dir
        assert staged is not None and not out.exists()
    assert len(w.shards) > 1
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(w.shards)
    got = _all(out)
    ref = _all(sharded)
    for name, t in ref.items():
        if got[name].dtype == torch.float8_e4m3fn:
            s = got[name.removesuffix("weight") + "weight_scale"]
            want = (t.float() / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
        else:
            assert torch.equal(got[name], t), name
    assert json.loads((out / "config.json").read_text()) == {"hello": 1}
    with st.safe_open(str(out / w.shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "test"}
    # dqfast's own validating reader accepts it too.
    assert len(CheckpointReader(out)) == len(got)


def test_torch_tensors_and_single_shard(tmp_path):
    out = tmp_path / "one"
    t = torch.randn(3, 5).to(torch.bfloat16)
    names = write_checkpoint(out, [("a", t), ("b", np.arange(6, dtype=np.int64)), ("c", torch.ones(2, dtype=torch.float8_e4m3fn))])
    assert names == ["diffusion_pytorch_model.safetensors"]
    assert not (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    got = load_file(str(out / names[0]))
    assert torch.equal(got["a"], t) and got["b"].tolist() == list(range(6)) and got["c"].dtype == torch.float8_e4m3fn


def test_exception_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def tensors():
        yield "a", np.ones((1000, 1000), np.float32)
        yield "b", np.ones(10, np.float32)
        raise RuntimeError("converter failed")

    with pytest.raises(RuntimeError, match="converter failed"):
        write_checkpoint(out, tensors(), max_shard_size=1000)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory either
    with pytest.raises(ValueError), CheckpointWriter(out) as w:
        w.write("x", np.ones(3, np.float32))
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_errors_are_typed(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.write("a", np.ones(2, np.float32))
        with pytest.raises(PlanError, match="written twice"):
            w.write("a", np.ones(2, np.float32))
        with pytest.raises(PlanError, match="element sizes differ"):
            w.write("b", np.ones(2, np.float32), dtype="BF16")
        with pytest.raises(PlanError, match="not allowed"):
            w.write_file("x.safetensors", "no")
    with pytest.raises(OutputExistsError):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as w:
        w.write("z", np.zeros(1, np.float32))
    assert set(load_file(str(out / "diffusion_pytorch_model.safetensors"))) == {"z"}
    with pytest.raises(PlanError, match="closed"):
        w.write("late", np.zeros(1, np.float32))


_ITER_RSS = """
import resource, sys
import numpy as np
from dqfast.stream import CheckpointReader
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with CheckpointReader(sys.argv[1]) as r:
    before = peak()
    total = 0
    for name, a in r:
        total += int(a.view(np.uint8)[::4096].sum())  # touches every page of the tensor
    print(peak() - before, total)
"""


def test_iteration_keeps_about_one_tensor_resident(tmp_path):
    """Pages are released as iteration moves on: 256 MiB read, far less resident at the peak."""
    import subprocess
    import sys

    src = tmp_path / "big"
    with CheckpointWriter(src, fsync=False) as w:
        for i in range(8):
            w.write(f"t{i}", np.full(32 << 20, i + 1, np.uint8))  # 32 MiB each
    r = subprocess.run([sys.executable, "-c", _ITER_RSS, str(src)], capture_output=True, text=True, check=True, timeout=300)
    growth, total = (int(x) for x in r.stdout.split())
    assert total == sum((i + 1) * (32 << 20) // 4096 for i in range(8))
    assert growth < 96 << 20, f"peak RSS grew by {growth >> 20} MiB while reading 256 MiB"


def test_writer_keeps_a_checkpoints_shards_when_told_the_file(sharded, tmp_path):
    """``shard=`` puts each tensor into the named file: a copy keeps the source's sharding."""
    from dqfast.reader import open_checkpoint

    src = open_checkpoint(sharded)
    where = {n: Path(m.file).name for n, m in src.tensors.items()}
    out = tmp_path / "copy"
    with CheckpointReader(sharded) as r, CheckpointWriter(out, always_index=True) as w:
        for name, a in r:
            w.write(name, a, dtype=r.tensors[name].dtype, shard=where[name])
    assert sorted(w.shards) == sorted(set(where.values()))
    assert {n: Path(m.file).name for n, m in open_checkpoint(out).tensors.items()} == where
    for f in w.shards:  # safetensors itself reads every file
        assert set(load_file(str(out / f))) == {n for n, s in where.items() if s == f}
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == where
    with pytest.raises(PlanError, match="not both"), CheckpointWriter(tmp_path / "mixed") as w2:
        w2.write("a", np.zeros(2, np.float32), shard="a.safetensors")
        w2.write("b", np.zeros(2, np.float32))
    assert not (tmp_path / "mixed").exists()
