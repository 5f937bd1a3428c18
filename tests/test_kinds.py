"""Kinds (built-in and the file's), their port naming, and the boot order's validation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qlink import bootorder
from qlink.errors import ConfigError, ConfigIssue
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.topology import Lab, parse_topology_text

REPO = Path(__file__).resolve().parent.parent


def lab_of(text: str) -> Lab:
    return parse_topology_text(textwrap.dedent(text), "lab.yaml")


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        lab_of(text)
    return list(caught.value.issues)


def test_a_kind_sits_between_defaults_and_the_node() -> None:
    lab = lab_of("""\
        name: k
        kinds:
          cumulus-vx: {image: /img/cvx.qcow2, memory: 1024}
          tiny: {kernel: /k, memory: 128, ports: {prefix: p, first: 1}}
        defaults: {memory: 300, cpus: 3}
        nodes:
          a: {kind: cumulus-vx}
          b: {kind: tiny, memory: 64}
        """)
    a, b = lab.nodes["a"], lab.nodes["b"]
    # The file's cumulus-vx is laid over the built-in one: its memory, the built-in's rest.
    assert (a.memory, a.cpus, a.mgmt, a.mgmt_port) == (1024, 2, True, "eth0")
    assert a.ready is not None
    assert a.image == "/img/cvx.qcow2"
    assert (b.memory, b.cpus, b.kind) == (64, 3, "tiny")


def test_port_naming_places_ports_in_the_kinds_order() -> None:
    lab = parse_topology_text((REPO / "tests/data/kinds.yaml").read_text(), "kinds.yaml")
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    positions = {
        (name, nic.interface): nic.position
        for name, node in plan.nodes.items()
        for nic in node.nics
    }
    assert positions[("cumulus", "swp1")] == 1
    assert positions[("sonic", "Ethernet0")] == 1
    assert positions[("sonic", "Ethernet4")] == 2
    assert positions[("sonic", "Ethernet8")] == 3
    assert positions[("veos", "Ethernet3")] == 3
    assert positions[("server", "eth2")] == 2
    assert plan.nodes["veos"].node.nic_model == "e1000"


def test_a_port_the_kind_does_not_have_is_located() -> None:
    [issue] = issues_of("""\
        name: k
        kinds: {sonic-vs: {image: /i}}
        nodes:
          s: {kind: sonic-vs}
          t: {kind: sonic-vs}
        links:
          - [s:Ethernet0, t:Ethernet3]
        """)
    assert (issue.line, issue.field) == (7, "links[0].endpoints[1]")
    assert "no port Ethernet3" in issue.message
    assert "Ethernet0, Ethernet4" in issue.message


def test_the_management_port_cannot_be_cabled_while_mgmt_takes_it() -> None:
    [issue] = issues_of("""\
        name: k
        kinds: {cumulus-vx: {image: /i}}
        nodes:
          s: {kind: cumulus-vx}
          t: {kind: cumulus-vx, mgmt: false}
        links:
          - [s:eth0, t:eth0]
        """)
    assert issue.field == "links[0].endpoints[0]"
    assert "management port" in issue.message


def test_unknown_kind_is_located_and_lists_the_known_ones() -> None:
    [issue] = issues_of("""\
        name: k
        defaults: {kernel: /k}
        nodes:
          a: {kind: junos}
        """)
    assert (issue.line, issue.field) == (4, "nodes.a.kind")
    assert "cumulus-vx" in issue.message


def test_a_boot_order_cycle_is_located() -> None:
    [issue] = issues_of("""\
        name: k
        defaults: {kernel: /k}
        nodes:
          spine1: {stage: spine, depends_on: [host1]}
          leaf1: {stage: leaf}
          host1: {stage: host}
        """)
    assert (issue.line, issue.field) == (4, "nodes.spine1.depends_on")
    assert "spine1 -> host1 -> leaf1 -> spine1" in issue.message


def test_depends_on_an_unknown_node_is_located() -> None:
    [issue] = issues_of("""\
        name: k
        defaults: {kernel: /k}
        nodes:
          a: {depends_on: [b]}
        """)
    assert issue.field == "nodes.a.depends_on[0]"


def test_stages_and_depends_on_make_waves() -> None:
    lab = lab_of("""\
        name: k
        defaults: {kernel: /k}
        nodes:
          oob: {stage: oob-mgmt}
          spine1: {stage: spine}
          leaf1: {stage: leaf}
          leaf2: {stage: 45}
          host1: {depends_on: [leaf1]}
          free: {}
        """)
    waits = lab.boot_waits()
    assert waits["leaf1"] == {"leaf2"}  # the stage before leaf (50) is 45, after spine's
    assert waits["leaf2"] == {"spine1"}
    assert waits["host1"] == {"leaf1"}
    assert bootorder.waves(waits) == [
        ["free", "oob"], ["spine1"], ["leaf2"], ["leaf1"], ["host1"]
    ]  # fmt: skip
