"""The whole plan of every config is pinned; a change to any argv shows up as a diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden import golden_path, render, sources


@pytest.mark.parametrize("source", sources(), ids=lambda path: path.name)
def test_plan_matches_golden(source: Path) -> None:
    expected = golden_path(source)
    assert expected.exists(), f"no golden file for {source.name}: run `make golden`"
    assert render(source) == expected.read_text(), (
        f"the plan of {source.name} changed: run `make golden` and review the diff"
    )


def test_every_golden_file_has_a_source() -> None:
    stems = {source.stem for source in sources()}
    orphans = [
        path.name
        for path in golden_path(sources()[0]).parent.glob("*.json")
        if path.stem not in stems
    ]
    assert not orphans
