"""dqfast.backbone.read_amax against torch.load on real mto.save outputs, and malformed files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from dqfast.backbone import AmaxPair, BackboneError, list_state_keys, read_amax

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")
pytest.importorskip("diffusers")

from modelopt_fixtures import build_fixture, fixture_root  # noqa: E402

CASES = [("flux", "fp8"), ("flux", "nvfp4"), ("wan", "fp8"), ("wan", "nvfp4")]


@pytest.fixture(scope="session")
def modelopt_outputs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {(m, a): build_fixture(fixture_root(base, m), m, a) for m, a in CASES}


def _torch_amax(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(path, mmap=True, weights_only=False)["model_state_dict"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for suffix, slot in ((".weight_quantizer._amax", "weight"), (".input_quantizer._amax", "input")):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[slot] = value
    return out


@pytest.mark.parametrize("model,algo", CASES)
def test_read_amax_matches_torch_load(modelopt_outputs, model, algo):
    paths = modelopt_outputs[(model, algo)]
    expected = _torch_amax(paths.backbone)
    got = read_amax(paths.backbone)
    assert expected, "fixture has no amax at all"
    assert set(got) == set(expected)
    for module, slots in expected.items():
        pair = got[module]
        assert isinstance(pair, AmaxPair)
        for slot in ("weight", "input"):
            mine = getattr(pair, slot)
            if slot not in slots:
                assert mine is None, (module, slot)
                continue
            ref = slots[slot].float().numpy()
            assert isinstance(mine, np.ndarray) and mine.dtype == np.float32
            assert mine.shape == ref.shape, (module, slot)
            assert np.array_equal(mine, ref), (module, slot)


def test_read_amax_accepts_directory(modelopt_outputs):
    paths = modelopt_outputs[("flux", "fp8")]
    by_dir = read_amax(paths.backbone.parent)
    by_file = read_amax(paths.backbone)
    assert set(by_dir) == set(by_file)
    assert list_state_keys(paths.backbone.parent) == list(torch.load(paths.backbone, mmap=True, weights_only=False)["model_state_dict"])


def test_reads_only_selected_storages(modelopt_outputs, monkeypatch):
    paths = modelopt_outputs[("flux", "nvfp4")]
    state = torch.load(paths.backbone, mmap=True, weights_only=False)["model_state_dict"]
    n_amax = sum(1 for k in state if k.endswith("_quantizer._amax"))
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy_open(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy_open)
    read_amax(paths.backbone)
    data_entries = [n for n in opened if "/data/" in n]
    # zf.read goes through open: one storage read per selected amax tensor, nothing else.
    assert len(data_entries) == n_amax
    assert len(state) > n_amax  # the weights were there and were skipped


# --- synthetic checkpoints (torch.save, same zip format as mto.save) ---------------------------


def _save(tmp_path: Path, state: dict, name: str = "backbone.pt", **top) -> Path:
    path = tmp_path / name
    torch.save({"modelopt_state": {"x": 1}, "model_state_dict": state, **top}, path)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_shapes_and_views(tmp_path, dtype):
    big = torch.randn(8, 6, dtype=torch.float32).to(dtype)
    state = {
        "a.weight_quantizer._amax": torch.tensor(3.140625, dtype=dtype),  # 0-dim
        "a.input_quantizer._amax": torch.tensor([2.5], dtype=dtype),  # [1]
        "b.weight_quantizer._amax": torch.randn(5, 1).abs().to(dtype),  # per-channel
        "c.weight_quantizer._amax": big[2:5, 1:2],  # offset view into a shared storage
        "d.input_quantizer._amax": big.t()[1:3, ::2],  # non-contiguous strides
        "d.weight": torch.randn(4, 4).to(dtype),  # not selected
    }
    got = read_amax(_save(tmp_path, state))
    assert set(got) == {"a", "b", "c", "d"}
    assert got["b"].input is None and got["d"].weight is None
    for key, t in state.items():
        if not key.endswith("_amax"):
            continue
        module, slot = key.split(".")[0], "weight" if ".weight_" in key else "input"
        mine = getattr(got[module], slot)
        assert mine.shape == tuple(t.shape)
        assert np.array_equal(mine, t.float().numpy()), key


class _Trap:
    """Unpickling this with pickle.load would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = _save(tmp_path, {"a.weight_quantizer._amax": torch.tensor(1.0)}, trap=_Trap(marker))
    got = read_amax(path)
    assert not marker.exists()
    assert float(got["a"].weight) == 1.0


def test_not_a_zip(tmp_path):
    path = tmp_path / "backbone.pt"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(BackboneError, match="not a torch zip"):
        read_amax(path)


def test_missing_file(tmp_path):
    with pytest.raises(BackboneError, match="no such file"):
        read_amax(tmp_path)  # directory without backbone.pt


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "backbone.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/other", b"x")
    with pytest.raises(BackboneError, match="data.pkl"):
        read_amax(path)


def test_no_model_state_dict(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"modelopt_state": {}, "state_dict": {}}, path)
    with pytest.raises(BackboneError, match="model_state_dict"):
        read_amax(path)


def _rewrite_zip(src: Path, dst: Path, drop: str | None = None, replace: tuple[str, bytes] | None = None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if drop and info.filename.endswith(drop):
                continue
            data = zin.read(info.filename)
            if replace and info.filename.endswith(replace[0]):
                data = replace[1]
            zout.writestr(info, data)


def _amax_storage_key(path: Path) -> str:
    # The only storage is the amax one: find its entry name.
    with zipfile.ZipFile(path) as zf:
        (entry,) = [n for n in zf.namelist() if "/data/" in n]
    return entry.split("/", 1)[1]


def test_missing_storage_entry(tmp_path):
    src = _save(tmp_path, {"m.weight_quantizer._amax": torch.tensor(2.0)}, name="src.pt")
    dst = tmp_path / "backbone.pt"
    _rewrite_zip(src, dst, drop=_amax_storage_key(src))
    with pytest.raises(BackboneError, match=r"m\.weight_quantizer\._amax.*missing") as err:
        read_amax(dst)
    assert str(dst) in str(err.value)


def test_truncated_storage_entry(tmp_path):
    src = _save(tmp_path, {"m.input_quantizer._amax": torch.ones(4, 1)}, name="src.pt")
    dst = tmp_path / "backbone.pt"
    _rewrite_zip(src, dst, replace=(_amax_storage_key(src), b"\x00" * 3))
    with pytest.raises(BackboneError, match="bytes"):
        read_amax(dst)


def test_unsupported_dtype(tmp_path):
    path = _save(tmp_path, {"m.weight_quantizer._amax": torch.tensor([7], dtype=torch.int32)})
    with pytest.raises(BackboneError, match=r"m\.weight_quantizer\._amax.*unsupported storage dtype IntStorage"):
        read_amax(path)


def test_amax_that_is_not_a_tensor(tmp_path):
    path = _save(tmp_path, {"m.weight_quantizer._amax": 3.0})
    with pytest.raises(BackboneError, match="not a tensor"):
        read_amax(path)


def test_corrupt_pickle(tmp_path):
    src = _save(tmp_path, {"m.weight_quantizer._amax": torch.tensor(2.0)}, name="src.pt")
    dst = tmp_path / "backbone.pt"
    _rewrite_zip(src, dst, replace=("/data.pkl", b"\x80\x02garbage"))
    with pytest.raises(BackboneError, match="cannot unpickle"):
        read_amax(dst)
