"""Every hostile user input of tests/hostile/corpus_inputs.py ends in a typed one-line error (CLI
exit status 2) or a correct output; never a traceback, a hang or a memory blow-up. The input
tree is hashed before and after each case, and nothing is left at the output path after an error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dqfast.errors import DqfastError, InternalError

from hostile.corpus_inputs import CASES, Api, Case, Cli
from hostile.util import tree_digest


def leftovers(out: Path) -> list[str]:
    """Anything at the output path or staged beside it."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}"))


def run_cli(args: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dqfast.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_corpus_size_and_ids() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path) -> None:
    if "torch" in case.tags:
        pytest.importorskip("torch")
    inp = tmp_path / "in"
    out = tmp_path / "out" / "transformer"
    inp.mkdir()
    out.parent.mkdir()
    run = case.make(inp, out)
    before = tree_digest(inp)
    if isinstance(run, Cli):
        try:
            proc = run_cli(run.args, run.timeout, tmp_path)
        except subprocess.TimeoutExpired:
            pytest.fail(f"hung for {run.timeout}s: {run.args}")
        assert "Traceback" not in proc.stderr, proc.stderr
        if case.match is None:
            assert proc.returncode == 0, proc.stderr
            assert case.check is not None
            case.check(out, proc)
        else:
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
            assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
            assert re.search(case.match, lines[0]), lines[0]
            assert "internal error" not in lines[0]
    else:
        assert isinstance(run, Api)
        if case.match is None:
            result = run.fn()
            assert case.check is not None
            case.check(out, result)
        else:
            with pytest.raises(case.error, match=case.match) as e:
                run.fn()
            assert isinstance(e.value, DqfastError) and not isinstance(e.value, InternalError)
            assert "\n" not in str(e.value)
    assert tree_digest(inp) == before, "the input tree was modified"
    if case.match is not None:
        assert leftovers(out) == [], "something was left at the output path"
