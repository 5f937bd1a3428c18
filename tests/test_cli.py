"""qlinkctl without a daemon: validate, plan, graph, and the exit codes of the contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlink.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from qlink.cli.main import run
from qlink.cli.render import argv_lines, graph_dot
from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent
CLOS = REPO / "configs" / "clos.yaml"


def test_validate_good_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("")
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"name: x\ndefaults: {{kernel: {kernel}}}\nnodes: {{a: {{}}}}\n")
    assert run(["validate", str(lab)]) == EXIT_OK
    assert "lab x: 1 nodes, 0 links: valid" in capsys.readouterr().out


def test_validate_bad_file_exits_2_with_location(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lab = tmp_path / "lab.yaml"
    lab.write_text("name: x\nnodes: {a: {kernel: /k}}\nlinks:\n  - [a:e1, b:e1]\n")
    assert run(["validate", str(lab)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{lab}:4: links[0].endpoints[1]: unknown node 'b'" in err


def test_plan_of_one_node_is_a_pasteable_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--root", "/q", "plan", str(CLOS), "leaf1"]) == EXIT_OK
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("# ")]
    lines = out.splitlines()[len(comments) :]
    # The sockets qlinkd hands over, which the argv names by descriptor number only.
    assert [line.split(" connected")[0] for line in comments] == [
        "# fd 151: UDP 127.0.0.1:20000",
        "# fd 152: UDP 127.0.0.1:20002",
        # And whose CPUs qlinkd runs once QEMU started (its start hold).
        "# -S: qlinkd runs the CPUs (QMP `cont`) once this QEMU has started",
    ]
    assert "    -S \\" in lines
    assert comments[0].endswith(" to 127.0.0.1:20001 (swp51 to spine1:swp1)")
    assert lines[0].endswith("qemu-system-x86_64 \\")
    assert "    -name guest=leaf1,debug-threads=on \\" in lines
    assert "    -netdev dgram,id=net-swp51,local.type=fd,local.str=151 \\" in lines
    assert lines[-1].startswith("    -device virtio-net-pci,netdev=net-swp52")


def test_plan_json_has_every_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--root", "/q", "plan", str(CLOS), "-o", "json"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert sorted(document["nodes"]) == ["leaf1", "leaf2", "leaf3", "leaf4", "spine1", "spine2"]
    assert len(document["links"]) == 8


def test_plan_of_unknown_node_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--root", "/q", "plan", str(CLOS), "leaf9"]) == EXIT_USAGE
    assert "no node 'leaf9'" in capsys.readouterr().err


def test_argv_lines_quote_for_the_shell() -> None:
    text = argv_lines(["qemu", "-append", "console=ttyS0 quiet", "-S", "-m", "64M"])
    assert text == "qemu \\\n    -append 'console=ttyS0 quiet' \\\n    -S \\\n    -m 64M"


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        run(["no-such-verb"])
    assert caught.value.code == EXIT_USAGE


def test_daemon_verbs_without_a_daemon_exit_3(tmp_path: Path) -> None:
    assert run(["--root", str(tmp_path), "status"]) == EXIT_UNREACHABLE


def test_graph_of_a_file_is_dot(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["graph", str(CLOS)]) == EXIT_OK
    dot = capsys.readouterr().out
    assert dot.startswith('graph "clos" {')
    assert dot.count(" -- ") == 8
    assert '"spine1" -- "leaf1" [taillabel="swp1", headlabel="swp51"];' in dot


def test_graph_shows_link_state() -> None:
    links = [
        {"admin": "down", "a": {"endpoint": "a:e1", "carrier": "down (admin)"},
         "b": {"endpoint": "b:e1", "carrier": "down (admin)"}},
        {"admin": "up", "a": {"endpoint": "a:e2", "carrier": "down (c not running)"},
         "b": {"endpoint": "c:e2", "carrier": "up"}},
    ]  # fmt: skip
    dot = graph_dot("l", links, {"a": "running", "b": "running", "c": "stopped"})
    assert 'headlabel="e1", color="#c0392b", style=dashed]' in dot
    assert 'headlabel="e2", color="#999999", style=dotted]' in dot
    assert '"c" [label="c\\n(stopped)", fillcolor="#f6dada"];' in dot


def test_graph_renders_svg_with_graphviz(tmp_path: Path) -> None:
    require(shutil.which("dot") is not None, "graphviz is not installed (apt-get install graphviz)")
    image = tmp_path / "clos.svg"
    assert run(["graph", str(CLOS), "-o", str(image)]) == EXIT_OK
    assert "<svg" in image.read_text()
    assert image.read_text().count('class="edge"') == 8
