"""What `up` does to a running lab, decided without a daemon: `changes.diff_lab`."""

from __future__ import annotations

from qlink.daemon.changes import RunningNode, argv_difference, diff_lab
from qlink.plan.allocations import Allocations
from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import LabPlan, plan_lab
from qlink.states import VmState
from qlink.topology import parse_topology_text
from tests.test_plan import LAYOUT

HOST = HostFacts()
BASE = """\
name: l
defaults: {kernel: /k}
nodes: {spine: {}, leaf1: {}, leaf2: {}}
links:
  - [spine:swp1, leaf1:swp51]
  - [spine:swp2, leaf2:swp51]
"""


def planned(text: str, allocations: Allocations | None = None) -> tuple[LabPlan, Allocations]:
    return plan_lab(parse_topology_text(text, "l.yaml"), LAYOUT, allocations or Allocations())


def running(plan: LabPlan, **states: VmState) -> dict[str, RunningNode]:
    return {
        name: RunningNode(node, build_argv(node, HOST), states.get(name, VmState.RUNNING))
        for name, node in plan.nodes.items()
    }


def argvs(plan: LabPlan) -> dict[str, list[str]]:
    return {name: build_argv(node, HOST) for name, node in plan.nodes.items()}


def test_a_lab_that_is_not_up_starts_every_node() -> None:
    plan, _ = planned(BASE)
    change = diff_lab(None, set(), plan, argvs(plan), HOST)
    assert change.as_dict()["start"] == {n: "new lab" for n in ("leaf1", "leaf2", "spine")}


def test_the_same_file_changes_nothing() -> None:
    plan, allocations = planned(BASE)
    again, _ = planned(BASE, allocations)
    change = diff_lab(running(plan), set(), again, argvs(again), HOST)
    assert change.as_dict() == {"start": {}, "restart": {}, "remove": {}, "replug": {}}


def test_a_changed_node_restarts_alone_with_the_options_that_differ() -> None:
    plan, allocations = planned(BASE)
    edited, _ = planned(BASE.replace("leaf1: {}", "leaf1: {memory: 1024}"), allocations)
    change = diff_lab(running(plan), set(), edited, argvs(edited), HOST)
    assert list(change.restart) == ["leaf1"]
    assert change.restart["leaf1"] == "command line changed: - -m 512M; + -m 1024M"
    assert not change.start
    assert not change.replug


def test_new_links_are_replugs_new_nodes_starts_and_gone_nodes_removals() -> None:
    plan, allocations = planned(BASE)
    edited_text = (
        BASE.replace("leaf2: {}", "leaf3: {}").replace("leaf2:swp51", "leaf3:swp51")
        + "  - [spine:swp3, leaf3:swp52]\n"
    )
    edited, _ = planned(edited_text, allocations)
    change = diff_lab(running(plan), set(), edited, argvs(edited), HOST)
    assert change.start == {"leaf3": "new node"}
    assert change.remove == {"leaf2": "not in the file any more"}
    assert change.as_dict()["replug"] == {
        "spine": "unplug swp2 (to leaf2:swp51), plug swp2 (to leaf3:swp51), "
        "plug swp3 (to leaf3:swp52)"
    }
    assert not change.restart


def test_a_recabled_nic_is_a_change_though_the_command_line_is_the_same() -> None:
    plan, allocations = planned(BASE)
    edited, _ = planned(BASE.replace("[spine:swp2, leaf2:swp51]", "[spine:swp2, leaf2:swp52]"),
                        allocations)  # fmt: skip
    assert argvs(edited)["spine"] == argvs(plan)["spine"]  # the argv names descriptors only
    change = diff_lab(running(plan), set(), edited, argvs(edited), HOST)
    assert change.as_dict()["replug"] == {
        "spine": "unplug swp2 (to leaf2:swp51), plug swp2 (to leaf2:swp52)",
        "leaf2": "unplug swp51 (to spine:swp2), plug swp52 (to spine:swp2)",
    }
    # Stopped, it takes the new cable at its next start; nothing to do now.
    idle = running(plan, spine=VmState.STOPPED)
    change = diff_lab(idle, {"spine"}, edited, argvs(edited), HOST)
    assert "spine" not in change.start
    assert "spine" not in change.restart


def test_idle_nodes_start_unless_an_operator_stopped_them() -> None:
    plan, allocations = planned(BASE)
    again, _ = planned(BASE, allocations)
    current = running(plan, leaf1=VmState.FAILED, leaf2=VmState.STOPPED)
    change = diff_lab(current, {"leaf2"}, again, argvs(again), HOST)
    assert change.start == {"leaf1": "was failed"}
    # An idle node whose command line changed starts with it, never as a replug.
    edited, _ = planned(BASE.replace("leaf1: {}", "leaf1: {cpus: 2}"), allocations)
    change = diff_lab(current, {"leaf2"}, edited, argvs(edited), HOST)
    assert change.start["leaf1"].startswith("command line changed: - -smp 1; + -smp 2")
    assert not change.replug


def test_argv_difference_names_added_and_removed_options() -> None:
    assert argv_difference(["q", "-m", "1"], ["q", "-m", "2", "-S"]) == "- -m 1; + -m 2; + -S"
    assert argv_difference(["q", "-S", "-m", "1"], ["q", "-m", "1", "-S"]) == (
        "option order changed"
    )


def test_a_day_zero_change_restarts_that_node_alone() -> None:
    text = BASE.replace(
        "defaults: {kernel: /k}",
        "defaults: {kernel: /k, cloud_init: {hostname: '{{ node }}'}, vars: {asn: 1}}",
    )
    plan, allocations = planned(text)
    edited, _ = planned(text.replace("leaf1: {}", "leaf1: {vars: {asn: 2}}"), allocations)
    assert plan.nodes["leaf1"].seed == edited.nodes["leaf1"].seed  # asn is not in the template
    edited, _ = planned(
        text.replace("leaf1: {}", "leaf1: {cloud_init: {hostname: 'x-{{ node }}'}}"), allocations
    )
    change = diff_lab(running(plan), set(), edited, argvs(edited), HOST)
    assert change.restart == {"leaf1": "day-0 config changed (cloud_init, network_config or vars)"}
    assert not change.start
    assert not change.replug
