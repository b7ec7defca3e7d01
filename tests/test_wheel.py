"""Packaging: extras, the one-line message for a missing extra, and the release wheel installed
into a fresh venv without torch (``make test-wheel`` builds it first; the ``wheel`` tests skip when
``dist/`` holds no wheel)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution name, for the extras table.
DIST = {
    "torch": "torch",
    "safetensors": "safetensors",
    "diffusers": "diffusers",
    "modelopt": "nvidia-modelopt",
    "yaml": "pyyaml",
    "ray": "ray",
    "huggingface_hub": "huggingface-hub",
}


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_extras_match_the_commands_and_dev_pins_do_not_ship():
    from dqfast.extras import EXTRAS

    extras = _extras()
    assert "dev" not in extras  # the pins live in requirements-dev.txt
    for extra, modules in EXTRAS.items():
        reqs = {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in extras[extra]}
        assert {DIST[m] for m in modules} <= reqs, extra
    assert not any(r.startswith("ray") for r in extras["batch"])  # the local executor needs no ray
    assert "torch==2.13.0" in (ROOT / "requirements-dev.txt").read_text()


@pytest.mark.parametrize(
    "args, extra",
    [
        (["verify", "layers", "a", "b"], "verify"),
        (["ptq", "--model-dir", ".", "--out", "x"], "ptq"),
    ],
)
def test_missing_extra_is_one_line_and_exit_2(monkeypatch, args, extra):
    import importlib.util

    from dqfast.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'dqfast[{extra}]'" in lines[0], r.output
    assert "Traceback" not in r.output


def test_ray_executor_names_the_extra(monkeypatch):
    from dqfast import batch
    from dqfast.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(MissingExtraError, match=r"dqfast\[ray\]"):
        batch._import_ray()


def _wheel() -> Path:
    env = os.environ.get("DQFAST_WHEEL")
    found = [Path(env)] if env else sorted((ROOT / "dist").glob("dqfast-*.whl"))
    if not found:
        pytest.skip("no wheel in dist/: run `make test-wheel` (make test does)")
    return found[-1]


def _elf_sections(data: bytes) -> list[str]:
    """Section names of a little-endian ELF64 file."""
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize, shnum, shstrndx = (int.from_bytes(data[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E))
    hdr = [data[shoff + i * shentsize : shoff + (i + 1) * shentsize] for i in range(shnum)]
    stroff = int.from_bytes(hdr[shstrndx][0x18:0x20], "little")
    names = []
    for h in hdr:
        start = stroff + int.from_bytes(h[0:4], "little")
        names.append(data[start : data.index(b"\0", start)].decode())
    return names


@pytest.mark.wheel
def test_wheel_is_manylinux_abi3_stripped_and_has_no_dev_pins():
    whl = _wheel()
    assert re.search(r"-cp310-abi3-manylinux_2_28_x86_64\.", whl.name) or "manylinux_2_28" in whl.name, whl.name
    with zipfile.ZipFile(whl) as z:
        so = [n for n in z.namelist() if n.startswith("dqfast/_core") and n.endswith(".so")]
        assert len(so) == 1
        sections = _elf_sections(z.read(so[0]))
        assert not [s for s in sections if s.startswith(".debug_")], sections
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: dev" not in meta and "torch==2.13.0" not in meta
    for extra in ("verify", "ptq", "runtime", "batch", "ray", "hub"):
        assert f"Provides-Extra: {extra}" in meta
    sdists = sorted((ROOT / "dist").glob("dqfast-*.tar.gz"))
    if not os.environ.get("DQFAST_WHEEL"):
        assert sdists, "make wheel also writes the sdist"
        with tarfile.open(sdists[-1]) as t:
            names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        assert {
            "Cargo.lock",
            "Cargo.toml",
            "rust/dqfast-core/src/plan/mod.rs",
            "rust/dqfast-py/src/lib.rs",
            "python/dqfast/cli/__init__.py",
        } <= names


@pytest.mark.wheel
def test_wheel_installs_into_a_torch_free_venv_and_builds(tmp_path):
    whl = _wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, cli = venv / "bin" / "python", venv / "bin" / "dqfast"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(whl)], check=True, timeout=600)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, cwd=tmp_path, timeout=600, check=check)

    r = run(str(py), "-c", "import importlib.util as u, dqfast; print(u.find_spec('torch') is None, dqfast.__file__)")
    assert r.stdout.split()[0] == "True", "the fresh venv must not have torch"
    assert str(venv) in r.stdout  # the installed wheel, not this checkout
    r = run(str(cli), "demo", "--workdir", "demo")
    assert r.returncode == 0, r.stderr
    r = run(
        str(py),
        "-c",
        "from dqfast.synth import make_transformer; make_transformer('syn', 'wan', blocks=1, heads=2, head_dim=32)",
    )
    r = run(str(cli), "build", "fp8", "--from-bf16", "--base-transformer-dir", "syn/base/transformer", "--output-dir", "out", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    r = run(str(cli), "verify", "layers", "syn/base/transformer", "out", check=False)
    assert r.returncode == 2 and "pip install 'dqfast[verify]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
