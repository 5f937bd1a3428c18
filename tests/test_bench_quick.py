"""`python -m bench --quick` runs to the end and writes every section, so the benchmark
cannot rot. Its targets are not asserted here: they belong to the benchmark's report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.report import SECTIONS
from tests.conftest import GuestFiles

pytestmark = [pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_quick_benchmark_completes(
    qemu_binary: str, guest_files: GuestFiles, tmp_path: Path
) -> None:
    report, plot = tmp_path / "report.md", tmp_path / "bringup.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(report), "--plot", str(plot)],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    for heading in SECTIONS:
        assert heading in text, f"the report has no {heading!r} section:\n{text}"
    for row in ("| 4 |", "| 8 |"):
        assert row in text, f"bring-up has no row {row!r}:\n{text}"
    assert "Did not complete" not in text
    assert plot.stat().st_size > 0
    # Everything it started is gone: no QEMU names its root any more.
    root = re.search(r"root: (\S+)", done.stderr)
    assert root is not None, done.stderr
    assert not Path(root.group(1)).exists()
    left = [
        process.pid
        for process in psutil.process_iter(["cmdline", "status"])
        if any(root.group(1) in arg for arg in process.info["cmdline"] or [])
        and process.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert not left, f"QEMU left running under {root.group(1)}: {left}"
