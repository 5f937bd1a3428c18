"""`qlinkctl import`: topology_converter DOT and containerlab YAML to qlink files. Golden
conversions, nothing dropped silently, every malformed input located, and the converted labs
valid and planned as qlink files (fixed MACs, boot stages, cables within one node)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from qlink.cli.common import EXIT_OK, EXIT_USAGE
from qlink.cli.main import run
from qlink.errors import ConfigError
from qlink.importers import convert, detect, to_qlink, validate
from qlink.importers.kindmap import load_kinds_file
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.topology import parse_topology_text
from tests.golden import import_golden_path, import_sources, render_import

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "import"
FABRIC = DATA / "fabric16.dot"
CLAB = DATA / "dc.clab.yml"


@pytest.fixture(autouse=True)
def _logging_back_to_defaults() -> Iterator[None]:
    """`validate` and `plan` point qlink's log at stderr, which capsys closes after the
    test: later tests that log (the daemon's, the supervisor's) must not write there."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def kinds_file(tmp_path: Path) -> Path:
    path = tmp_path / "kinds.yaml"
    image = tmp_path / "images" / "nos.qcow2"
    path.write_text(
        "kinds:\n"
        + "".join(
            f"  {kind}: {{image: images/nos.qcow2, memory: 256}}\n"
            for kind in ("cumulus-vx", "sonic-vs", "arista-veos", "linux")
        )
    )
    image.parent.mkdir()
    image.write_text("")
    return path


@pytest.mark.parametrize("source", import_sources(), ids=lambda path: path.name)
def test_conversion_matches_golden(source: Path) -> None:
    expected = import_golden_path(source)
    assert expected.exists(), f"no golden conversion for {source.name}: run `make golden`"
    assert render_import(source) == expected.read_text(), (
        f"the conversion of {source.name} changed: run `make golden` and review the diff"
    )


@pytest.mark.parametrize("source", [FABRIC, DATA / "two-switch.dot"], ids=lambda p: p.name)
def test_no_dot_attribute_is_dropped_silently(source: Path) -> None:
    """Every `key="value"` of the DOT file is in the qlink file: mapped (its comment quotes
    it, or it is a MAC) or reported with its line."""
    output = render_import(source)
    text = source.read_text()
    for number, line in enumerate(text.splitlines(), start=1):
        for key, value in re.findall(r'(\w+)="([^"]*)"', line):
            mapped = f'{key}="{value}"' in output or (
                key.endswith("_mac") and value.lower() in output
            )
            reported = f"{source.name}:{number}: " in output
            assert mapped or reported or key == "memory", (number, key)


def test_the_16_node_fabric_converts_plans_and_keeps_what_it_says(kinds_file: Path) -> None:
    conversion = convert(
        FABRIC.read_text(), str(FABRIC), "dot", load_kinds_file(kinds_file), str(kinds_file)
    )
    lab = validate(conversion, str(FABRIC))
    assert len(lab.nodes) == 16
    assert "legacy-fw" not in lab.nodes  # function="fake"
    # 47 cables written: 1 to the fake node and 9 on management ports are reported, not made.
    assert len(lab.links) == 47 - 1 - 9
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    assert plan.nodes["leaf01"].nic("swp51").mac == "44:38:39:00:00:01"
    assert plan.nodes["spine01"].nic("swp1").mac == "44:38:39:00:00:02"
    # A cable between two ports of one switch: each end's peer is the other port.
    assert plan.nodes["leaf01"].nic("swp45").peer.interface == "swp46"
    assert lab.nodes["spine01"].stage == "spine"
    assert lab.nodes["oob-mgmt-server"].stage == "oob-mgmt"
    waits = lab.boot_waits()
    assert waits["oob-mgmt-server"] == frozenset()
    assert "spine01" in waits["leaf01"]
    assert "internet" not in waits["server01"]  # function="internet": no stage
    assert lab.nodes["leaf01"].image == str(kinds_file.parent / "images" / "nos.qcow2")
    assert lab.nodes["leaf01"].memory == 768  # the node's own memory= over its kind's 256


def test_containerlab_file_converts_and_plans(kinds_file: Path) -> None:
    conversion = convert(
        CLAB.read_text(), str(CLAB), "clab", load_kinds_file(kinds_file), str(kinds_file)
    )
    lab = validate(conversion, str(CLAB))
    assert sorted(lab.nodes) == ["leaf1", "leaf2", "spine1", "spine2", "srv1", "srv2"]
    assert lab.nodes["leaf2"].depends_on == ("spine1",)
    assert lab.nodes["srv1"].day0 is not None  # startup-config of a linux node: its day 0
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    assert plan.nodes["srv1"].nic("eth1").mac == "02:00:00:00:01:01"
    assert plan.nodes["leaf1"].nic("Ethernet8").mac == "02:00:00:00:01:02"
    assert plan.nodes["leaf1"].nic("Ethernet4").position == 2  # clab's eth2 of a SONiC VM
    reports = {note.line: note.text for note in conversion.reports}
    assert reports[23] == "node spine1: mgmt-ipv4"
    assert reports[5] == "mgmt"


BAD = [
    ("syntax.dot", 3, "not DOT: Expected rbrace"),
    ("bad-mac.dot", 4, "bad MAC address '44:38:39:1eaf:11'"),
    ("twice.dot", 5, "a:swp1 is already cabled (line 4)"),
    ("no-port.dot", 2, "memory='lots' is not a positive number"),
    ("no-port.dot", 3, 'endpoint "b" must be "node":"port"'),
    ("bad-names.dot", 2, "node name 'a b' cannot be a qlink name"),
    ("bad-names.dot", 3, "interface name 'Ethernet1/1' cannot be a qlink name"),
    ("bad-links.clab.yml", 6, "unknown node 'zz'"),
    ("bad-links.clab.yml", 7, "a cable has exactly two ends"),
    ("bad-links.clab.yml", 8, "endpoint 'a-eth3' must be NODE:INTERFACE"),
    ("bad-memory.clab.yml", 4, "memory 'plenty'"),
    ("no-topology.clab.yml", 1, "a containerlab file has topology: {nodes: ...}"),
    ("not-yaml.clab.yml", 5, "not valid YAML"),
]


@pytest.mark.parametrize(("name", "line", "message"), BAD, ids=[f"{b[0]}:{b[1]}" for b in BAD])
def test_malformed_input_is_a_located_error(name: str, line: int, message: str) -> None:
    path = DATA / "bad" / name
    text = path.read_text()
    kind = detect(path, text)
    assert kind is not None
    with pytest.raises(ConfigError) as caught:
        convert(text, str(path), kind)
    issues = [issue for issue in caught.value.issues if issue.line == line]
    assert any(message in issue.message for issue in issues), caught.value.issues
    assert all(issue.file == str(path) for issue in caught.value.issues)


def test_import_cli_writes_the_file_and_reports_on_stderr(
    tmp_path: Path, kinds_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fabric.yaml"
    assert run(["import", str(FABRIC), "-o", str(out), "--kinds", str(kinds_file)]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"{FABRIC}:20: not converted: node legacy-fw" in err
    assert "16 nodes, 37 links converted, 34 constructs reported" in err
    # The written file is a plain qlink file: it validates and plans on its own.
    assert run(["--root", str(tmp_path), "plan", str(out), "leaf01"]) == EXIT_OK
    assert "mac=44:38:39:00:00:01" in capsys.readouterr().out


def test_validate_and_plan_take_the_foreign_file_as_it_is(
    tmp_path: Path, kinds_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--root", str(tmp_path), "validate", str(CLAB), "--kinds", str(kinds_file)]) == 0
    assert "lab dc-fabric: 6 nodes, 7 links: valid" in capsys.readouterr().out
    # Without --kinds the kinds have no image: the error is at the containerlab file's line.
    assert run(["--root", str(tmp_path), "validate", str(CLAB)]) == EXIT_USAGE
    assert f"{CLAB}:21: nodes.spine1: needs `kernel`" in capsys.readouterr().err


def test_an_unknown_format_is_bad_usage(tmp_path: Path) -> None:
    path = tmp_path / "lab.txt"
    path.write_text("hello\n")
    assert run(["import", str(path)]) == EXIT_USAGE


def test_the_conversion_is_valid_qlink_yaml() -> None:
    text, origin = to_qlink(convert(FABRIC.read_text(), str(FABRIC), "dot"))
    with pytest.raises(ConfigError) as caught:  # valid but for images (no --kinds)
        parse_topology_text(text, "fabric.yaml")
    assert {issue.message.split(",")[0] for issue in caught.value.issues} == {
        "needs `kernel` (direct boot) or `image` (a disk)"
    }
    assert origin[text.splitlines().index("  leaf01:  # fabric16.dot:8") + 1] == 8


CLAB_SHAPES = [
    "topology: {nodes: {a: 5}}",
    "topology: {nodes: {a: {kind: linux}}, links: 5}",
    "topology: {nodes: {a: {kind: linux}}, links: [5, [a, b], {endpoints: 3}]}",
    "topology: {nodes: {a: {kind: [1]}}, kinds: [1], defaults: 7}",
    "topology: {nodes: {a: {kind: linux, memory: [1], cpu: {}}}}",
    "topology: {nodes: {a: {stages: 3, wait-for: {x: 1}}}}",
    "topology: {nodes: {a: {}}, links: [{endpoints: [{node: a}, {interface: x, mac: 5}]}]}",
    "topology: {nodes: {'a b': {}}, links: [{type: [1]}]}",
    "name: [1]\ntopology: {nodes: {a: null}}",
    "- 1\n- 2",
    "topology: 5",
]
DOT_SHAPES = [
    "graph {}",
    "digraph g { a -> b }",
    'graph g { "a":"p":"n" -- "b":"q" }',
    "graph g { a [memory=0]; a:p -- a:p }",
    "graph g { subgraph s { a -- b } c:x -- d:y }",
    'graph g { a [vagrant="bad name"] }',
    "strict graph g { a:p -- b:q [left_mac=1] }",
    "graph g { { a b } -- c:x }",
]


@pytest.mark.parametrize("text", CLAB_SHAPES)
def test_odd_containerlab_shapes_are_located_errors_or_reports(text: str) -> None:
    _converts_or_is_located(text, "odd.clab.yml", "clab")


@pytest.mark.parametrize("text", DOT_SHAPES)
def test_odd_dot_shapes_are_located_errors_or_reports(text: str) -> None:
    _converts_or_is_located(text, "odd.dot", "dot")


def _converts_or_is_located(text: str, source: str, kind: str) -> None:
    issues = []
    try:
        to_qlink(convert(text, source, kind))  # and what it made can be written
    except ConfigError as error:
        issues = list(error.issues)
    assert all(issue.file == source and issue.message for issue in issues)
