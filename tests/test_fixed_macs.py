"""Fixed MACs in the long form of a link: validated where written, kept by the plan, and never
handed out again by qlink's own derivation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qlink.errors import ConfigError, ConfigIssue
from qlink.plan.identity import mac_address
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.topology import parse_topology_text

BASE = """\
name: lab1
defaults: {kernel: /k, mgmt: true}
nodes: {a: {}, b: {}, c: {}}
links:
"""


def lab_text(links: str) -> str:
    return BASE + textwrap.indent(textwrap.dedent(links), "  ")


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_topology_text(text, "lab.yaml")
    return list(caught.value.issues)


def test_fixed_macs_reach_the_plan_normalised() -> None:
    lab = parse_topology_text(
        lab_text("""\
        - endpoints: [a:swp1, b:swp1]
          macs: [44:38:39:1E:AF:11, null]
        - endpoints: [a:swp2, c:swp1]
          macs: [44-38-39-1e-af-12, 44:38:39:1e:af:21]
        """),
        "lab.yaml",
    )
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    assert plan.nodes["a"].nic("swp1").mac == "44:38:39:1e:af:11"
    assert plan.nodes["a"].nic("swp2").mac == "44:38:39:1e:af:12"
    assert plan.nodes["c"].nic("swp1").mac == "44:38:39:1e:af:21"
    assert plan.nodes["b"].nic("swp1").mac == mac_address("lab1", "b", "swp1")


@pytest.mark.parametrize(
    ("mac", "message"),
    [
        ("45:38:39:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "not a usable address"),
        ("44:38:39:00:00", "six octets"),
        ("44:38:39:00:00:zz", "six octets"),
    ],
)
def test_a_bad_mac_is_located(mac: str, message: str) -> None:
    [issue] = issues_of(lab_text(f"- endpoints: [a:swp1, b:swp1]\n  macs: [null, '{mac}']\n"))
    assert (issue.line, issue.field) == (6, "links[0].macs[1]")
    assert message in issue.message


def test_a_mac_used_twice_names_both_places() -> None:
    [issue] = issues_of(
        lab_text("""\
        - endpoints: [a:swp1, b:swp1]
          macs: [44:38:39:00:00:01, null]
        - endpoints: [a:swp2, c:swp1]
          macs: [null, 44:38:39:00:00:01]
        """)
    )
    assert (issue.line, issue.field) == (8, "links[1].macs[1]")
    assert "already used by links[0].macs[0]" in issue.message


def test_a_derived_mac_never_takes_a_fixed_one() -> None:
    # Fix c:swp1 to exactly the MAC qlink would derive for b:swp1 and for a's management NIC.
    taken = mac_address("lab1", "b", "swp1")
    mgmt = mac_address("lab1", "a", "@mgmt")
    lab = parse_topology_text(
        lab_text(f"""\
        - endpoints: [a:swp1, b:swp1]
        - endpoints: [c:swp1, c:swp2]
          macs: ['{taken}', '{mgmt}']
        """),
        "lab.yaml",
    )
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    macs = [nic.mac for node in plan.nodes.values() for nic in node.nics]
    macs += [node.mgmt.mac for node in plan.nodes.values() if node.mgmt is not None]
    assert len(macs) == len(set(macs)) == 7
    assert plan.nodes["c"].nic("swp1").mac == taken
    assert plan.nodes["b"].nic("swp1").mac not in (taken, mgmt)
    assert plan.nodes["a"].mgmt is not None
    assert plan.nodes["a"].mgmt.mac != mgmt
    # The re-derivation is a function of the file: planning again gives the same MACs.
    again, _ = plan_lab(lab, Layout.under(Path("/q")))
    assert again.nodes["b"].nic("swp1").mac == plan.nodes["b"].nic("swp1").mac
