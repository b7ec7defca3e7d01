"""One shard-discovery rule: the Rust reader's (``dqfast.reader.open_checkpoint``). ``ptq`` and
``verify`` load a diffusers transformer with ``from_pretrained`` when accelerate is installed;
diffusers' own rule then picked the files, so a directory every other dqfast command refuses
(two weight files and no index to say how they fit) loaded — as whichever file diffusers names."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dqfast.errors import CheckpointError  # noqa: E402
from dqfast.ptq.loading import load_transformer  # noqa: E402
from dqfast.reader import open_checkpoint  # noqa: E402
from modelopt_fixtures import _new_model  # noqa: E402


@pytest.fixture(params=["from_pretrained", "state_dict"])
def path_taken(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # load_transformer takes from_pretrained when `import accelerate` works. A stand-in module
    # takes that path here (diffusers itself decides accelerate's use by the installed package,
    # so its loading is unchanged); without it, the state-dict path.
    if request.param == "from_pretrained":
        monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    else:
        monkeypatch.setitem(sys.modules, "accelerate", None)  # import raises ImportError
    return str(request.param)


def test_loading_uses_the_readers_rule(tmp_path: Path, path_taken: str) -> None:
    comp = tmp_path / "flux"
    _new_model("flux").save_pretrained(comp)
    assert load_transformer(comp) is not None  # a plain diffusers directory loads either way
    shutil.copy(comp / "diffusion_pytorch_model.safetensors", comp / "extra.safetensors")
    with pytest.raises(CheckpointError) as reader:
        open_checkpoint(comp)
    with pytest.raises(CheckpointError) as loader:
        load_transformer(comp)
    assert str(loader.value) == str(reader.value)
    assert "no index json" in str(loader.value)
