"""The real routing lab's figures in BENCHMARKS.md: `make bench-frr` runs the FRR lab test
(tests/guest/test_frr_clos.py) with `QLINK_FRR_FIGURES=FILE`, and this module turns that
file into the report's "Real routing lab" section, between markers of its own.

Two generators share the report: `python -m bench` writes everything else and keeps this
section as it finds it (`kept_section`); this one replaces only what is between its markers.
So neither run, 23 minutes and 10, has to redo the other's.

    python -m bench.frr FIGURES_JSON [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- frr-clos: written by `make bench-frr` (python -m bench.frr); do not edit -->"
END = "<!-- end frr-clos -->"
HEADING = "## 6. Real routing lab"

# The FRR test's figure names, and what each means in the report, in the report's order.
ROWS = (
    ("up --wait", "`qlinkctl up --wait`, all four nodes ready"),
    ("boot to ready spine1", 'boot to ready: spine1 (`ready: {console: "login:"}`)'),
    ("boot to ready spine2", "boot to ready: spine2 (`ready: {agent: true}`)"),
    ("boot to ready leaf1", "boot to ready: leaf1"),
    ("boot to ready leaf2", "boot to ready: leaf2"),
    ("BGP converged after up returned", "every BGP session Established, after `up` returned"),
    ("LLDP as cabled after BGP", "LLDP neighbours as cabled, after BGP"),
    ("ping during spine1 restart", "`qlinkctl restart spine1`: pings lost at leaf1 (every 0.1 s)"),
    ("spine1 restart to Established", "`restart spine1` until its sessions are Established"),
    ("sessions after spine1 ready (restart)", "sessions back after spine1 ready (restart)"),
    ("ping during spine1's own reboot", "`systemctl reboot` inside spine1: pings lost at leaf1"),
    ("spine1 reboot inside: reset to ready", "spine1's own reboot: guest reset to ready"),
    ("sessions after spine1 ready (reboot)", "sessions back after spine1 ready (reboot)"),
    ("day-0 change to leaf2: up to Established", "day-0 change to leaf2: `up` to Established"),
    ("test", "the whole test"),
)


class FiguresError(Exception):
    """A figures file that cannot be reported (names the file and what is wrong)."""


def load_figures(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FiguresError(f"{path}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("figures"), dict):
        raise FiguresError(f"{path}: not a figures file (no 'figures' object)")
    missing = [name for name, _ in ROWS if name not in document["figures"]]
    if missing:
        raise FiguresError(f"{path}: figures missing: {', '.join(missing)}")
    return document


def render_section(document: dict[str, Any]) -> str:
    figures: dict[str, str] = document["figures"]
    lines = [
        BEGIN,
        HEADING,
        "",
        "`configs/frr-clos.yaml` (2 spines, 2 leaves, Debian 12 + FRR from `guest/build-image`, "
        "eBGP unnumbered, `carrier_follows_peer: ready`) under TCG, from "
        "`tests/guest/test_frr_clos.py` (`make bench-frr`): one run, "
        f"{document.get('date', '?')} UTC, commit {document.get('commit', '?')}, "
        f"load average {document.get('load', '?')} at its start. The physical limit here is "
        "the guests' own boot; a restart's loss is the figure that matters: the leaves' ports "
        "lose carrier the moment spine1 stops, so traffic moves to spine2 before a ping is lost.",
        "",
        "| figure | measured |",
        "| --- | --- |",
        *(f"| {label} | {figures[name]} |" for name, label in ROWS),
        "",
        END,
    ]
    return "\n".join(lines)


def kept_section(report: Path) -> list[str]:
    """The section as the report holds it now (lines), or nothing."""
    try:
        text = report.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return []
    return [*text[start : end + len(END)].splitlines(), ""]


def replace_section(text: str, section: str) -> str:
    """`text` with the section between the markers replaced, or added before "## Method"."""
    start, end = text.find(BEGIN), text.find(END)
    if 0 <= start < end:
        return text[:start] + section + text[end + len(END) :]
    method = text.find("\n## Method")
    if method < 0:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return text[: method + 1] + section + "\n\n" + text[method + 1 :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frr", description=__doc__.split("\n")[0])
    parser.add_argument("figures", type=Path, help="the JSON the FRR test wrote")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    try:
        section = render_section(load_figures(args.figures))
        text = args.output.read_text(encoding="utf-8")
    except (FiguresError, OSError) as error:
        print(f"bench.frr: {error}", file=sys.stderr)
        return 2
    args.output.write_text(replace_section(text, section), encoding="utf-8")
    print(f"bench.frr: {args.output}: section {HEADING[3:]!r} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
