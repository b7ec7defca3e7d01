"""The README's engine matrix is the rendering of the verdict table the suite asserts."""

from __future__ import annotations

from matrix import README, updated_readme


def test_readme_matrix_is_up_to_date():
    text = README.read_text()
    assert updated_readme(text) == text, "README engine matrix is stale: run `python tests/compat/matrix.py --write`"
