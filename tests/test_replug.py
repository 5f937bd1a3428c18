"""Which edits a running node takes by NIC hotplug, and which need a restart."""

from __future__ import annotations

import dataclasses

from qlink.plan.allocations import Allocations
from qlink.plan.argv import (
    HostFacts,
    build_argv,
    nic_device_options,
    nic_netdev_arguments,
    nic_netdev_options,
)
from qlink.plan.lab import LabPlan, NodePlan, plan_lab
from qlink.plan.replug import NicReplug, nic_replug
from qlink.topology import Lab
from tests.test_plan import LAYOUT, link, make_lab

HOST = HostFacts()
SPINE_LEAF = [link("spine:swp1", "leaf1:swp51"), link("spine:swp2", "leaf2:swp51")]


def planned(lab: Lab, allocations: Allocations | None = None) -> tuple[LabPlan, Allocations]:
    return plan_lab(lab, LAYOUT, allocations or Allocations())


def replug_of(running: LabPlan, node: str, wanted: NodePlan) -> NicReplug | None:
    """`nic_replug` for `node` of the lab `running`, its QEMU running the planned argv."""
    return nic_replug(running.nodes[node], build_argv(running.nodes[node], HOST), wanted, HOST)


def test_a_new_link_is_plugged_into_the_running_node() -> None:
    before, allocations = planned(make_lab("l", SPINE_LEAF))
    after, _ = planned(make_lab("l", [*SPINE_LEAF, link("spine:swp3", "leaf3:swp51")]), allocations)
    replug = replug_of(before, "spine", after.nodes["spine"])
    assert replug is not None
    assert replug.unplug == ()
    assert [nic.interface for nic in replug.plug] == ["swp3"]
    assert replug.describe() == "plug swp3 (to leaf3:swp51)"
    # What gets plugged is what the new command line holds, option for option.
    nic = replug.plug[0]
    argv = build_argv(after.nodes["spine"], HOST)
    assert nic_netdev_options(nic) == {
        "type": "dgram", "id": "net-swp3", "local.type": "fd", "local.str": 103,
    }  # fmt: skip
    assert "dgram,id=net-swp3,local.type=fd,local.str=103" in argv
    # Over QMP the socket is passed first and named in place of the number.
    assert nic_netdev_arguments(nic, "net-swp3") == {
        "type": "dgram", "id": "net-swp3", "local": {"type": "fd", "str": "net-swp3"},
    }  # fmt: skip
    device = nic_device_options(after.nodes["spine"], nic)
    assert device["bus"] == "qlink-br0"
    assert device["addr"] == "0x4"
    # The other nodes are untouched: nothing to replug.
    assert replug_of(before, "leaf1", after.nodes["leaf1"]) is None


def test_a_removed_link_is_unplugged_and_a_recabled_one_swapped() -> None:
    before, allocations = planned(make_lab("l", SPINE_LEAF))
    recabled = [link("spine:swp1", "leaf1:swp51"), link("spine:swp2", "leaf1:swp52")]
    after, _ = planned(make_lab("l", recabled, nodes=["spine", "leaf1"]), allocations)
    replug = replug_of(before, "spine", after.nodes["spine"])
    assert replug is not None
    assert replug.describe() == "unplug swp2 (to leaf2:swp51), plug swp2 (to leaf1:swp52)"
    removed, _ = planned(make_lab("l", SPINE_LEAF[:1]), allocations)
    replug = replug_of(before, "spine", removed.nodes["spine"])
    assert replug is not None
    assert [nic.interface for nic in replug.unplug] == ["swp2"]
    assert replug.plug == ()


def test_anything_else_changed_means_a_restart() -> None:
    before, allocations = planned(make_lab("l", SPINE_LEAF))
    after, _ = planned(make_lab("l", [*SPINE_LEAF, link("spine:swp3", "leaf3:swp51")]), allocations)
    spine = after.nodes["spine"]
    bigger = dataclasses.replace(spine, node=spine.node.model_copy(update={"memory": 512}))
    assert replug_of(before, "spine", bigger) is None


def test_a_link_that_needs_a_new_bridge_means_a_restart() -> None:
    before, allocations = planned(make_lab("l", SPINE_LEAF))
    after, _ = planned(
        make_lab("l", [*SPINE_LEAF, link("spine:swp40", "leaf3:swp51")]), allocations
    )
    assert before.nodes["spine"].bridges == 1
    assert after.nodes["spine"].bridges == 2
    assert replug_of(before, "spine", after.nodes["spine"]) is None


def test_unchanged_nics_are_not_replugged_and_a_recabled_one_is() -> None:
    before, allocations = planned(make_lab("l", SPINE_LEAF))
    again, _ = planned(make_lab("l", SPINE_LEAF), allocations)
    assert replug_of(before, "spine", again.nodes["spine"]) is None
    # The same interfaces, so the same argv, but spine:swp2 now goes to another peer's port.
    recabled, _ = planned(
        make_lab("l", [SPINE_LEAF[0], link("spine:swp2", "leaf1:swp52")], nodes=["spine", "leaf1"]),
        allocations,
    )
    spine = recabled.nodes["spine"]
    assert build_argv(spine, HOST) == build_argv(before.nodes["spine"], HOST)
    replug = replug_of(before, "spine", spine)
    assert replug is not None
    assert replug.describe() == "unplug swp2 (to leaf2:swp51), plug swp2 (to leaf1:swp52)"
