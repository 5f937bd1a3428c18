"""bench/frr.py: the FRR lab's figures into BENCHMARKS.md, between its own markers, and kept
by the main report's next run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.frr import BEGIN, END, HEADING, ROWS, kept_section, main, replace_section

REPORT = "# qlink benchmarks\n\n## 5. Boot storm\n\nstorm table\n\n## Method\n\nhow\n"


def figures_file(tmp_path: Path, **overrides: str) -> Path:
    figures = {name: f"{index}.5 s" for index, (name, _) in enumerate(ROWS)}
    figures.update(overrides)
    path = tmp_path / "figures.json"
    document = {"date": "2026-11-26 16:00", "commit": "abc1234", "load": "1.00", "figures": figures}
    path.write_text(json.dumps(document))
    return path


def test_the_section_goes_before_the_method_then_replaces_itself(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(REPORT)
    assert main([str(figures_file(tmp_path)), "--output", str(report)]) == 0
    first = report.read_text()
    assert first.index("storm table") < first.index(HEADING) < first.index("## Method")
    assert "| `qlinkctl restart spine1`: pings lost at leaf1 (every 0.1 s) | 7.5 s |" in first

    assert main([str(figures_file(tmp_path, test="99.0 s")), "--output", str(report)]) == 0
    second = report.read_text()
    assert second.count(BEGIN) == second.count(END) == 1
    assert "| the whole test | 99.0 s |" in second
    assert second.replace("99.0 s", f"{len(ROWS) - 1}.5 s") == first


def test_the_main_report_keeps_the_section_as_it_finds_it(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(replace_section(REPORT, "\n".join([BEGIN, HEADING, "| a | b |", END])))
    assert kept_section(report) == [BEGIN, HEADING, "| a | b |", END, ""]
    assert kept_section(tmp_path / "none.md") == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "figures.json: Expecting property name"),
        ('{"date": "x"}', "no 'figures' object"),
        ('{"figures": {"test": "1 s"}}', "figures missing: up --wait, boot to ready spine1"),
    ],
)
def test_a_bad_figures_file_changes_nothing_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, why: str
) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(REPORT)
    bad = tmp_path / "figures.json"
    bad.write_text(content)
    assert main([str(bad), "--output", str(report)]) == 2
    assert why in capsys.readouterr().err
    assert report.read_text() == REPORT
