"""The plan: identity, PCI places, port allocation, and their stability under edits."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlink.errors import PlanError
from qlink.plan.allocations import Allocations
from qlink.plan.identity import (
    POSITION_CAPACITY,
    PciPlace,
    assign_positions,
    bridges_needed,
    mac_address,
    natural_position,
    place_of,
)
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.topology import Endpoint, Lab, Link, Node

LAYOUT = Layout.under(Path("/q"))


def node(name: str, **overrides: object) -> Node:
    fields: dict[str, object] = {
        "name": name, "memory": 256, "cpus": 1, "accel": "tcg", "machine": "q35", "cpu": None,
        "kernel": "/k", "initrd": None, "append": None, "image": None,
        "nic_model": "virtio-net-pci", "mgmt": False, "restart": "on-failure", "extra_args": (),
    }  # fmt: skip
    fields.update(overrides)
    return Node.model_validate(fields)


def link(a: str, b: str, ports: tuple[int, int] | None = None) -> Link:
    first, second = (Endpoint.model_validate(text) for text in (a, b))
    return Link(endpoints=(first, second), ports=ports)


def make_lab(name: str, links: list[Link], nodes: list[str] | None = None) -> Lab:
    names = nodes or sorted({end.node for item in links for end in item.endpoints})
    return Lab(
        name=name, source=f"{name}.yaml", nodes={n: node(n) for n in names}, links=tuple(links)
    )


# --- identity ------------------------------------------------------------------------------


def test_mac_is_locally_administered_unicast_and_stable() -> None:
    mac = mac_address("clos", "spine1", "swp1")
    first_octet = int(mac.split(":")[0], 16)
    assert first_octet & 0x02
    assert not first_octet & 0x01
    assert mac == mac_address("clos", "spine1", "swp1")
    assert mac != mac_address("clos2", "spine1", "swp1")
    assert mac != mac_address("clos", "spine1", "swp2")


@pytest.mark.parametrize(
    ("name", "position"),
    [("swp1", 1), ("eth0", 0), ("Ethernet48", 48), ("swp1s3", 3), ("uplink", None), ("e999", None)],
)
def test_natural_position_is_the_trailing_number(name: str, position: int | None) -> None:
    assert natural_position(name) == position


def test_places_follow_positions_across_bridges() -> None:
    assert place_of(0) == PciPlace("qlink-br0", 1)
    assert place_of(30) == PciPlace("qlink-br0", 31)
    assert place_of(31) == PciPlace("qlink-br1", 1)
    assert place_of(52) == PciPlace("qlink-br1", 22)
    assert place_of(POSITION_CAPACITY - 1) == PciPlace("qlink-br27", 31)
    with pytest.raises(ValueError, match="outside"):
        place_of(POSITION_CAPACITY)


def test_all_places_are_distinct() -> None:
    places = [place_of(position) for position in range(POSITION_CAPACITY)]
    assert len(set(places)) == POSITION_CAPACITY


def test_bridges_are_contiguous_up_to_the_highest_position() -> None:
    assert bridges_needed([]) == 0
    assert bridges_needed([0]) == 1
    assert bridges_needed([1, 30]) == 1
    assert bridges_needed([1, 31]) == 2
    assert bridges_needed([52]) == 2


def test_number_collisions_go_to_the_name_that_sorts_first() -> None:
    positions = assign_positions(["swp1", "eth1", "uplink"], {})
    assert positions["eth1"] == 1
    assert positions["swp1"] == 30  # highest free on bridge 0, the only bus in use
    assert positions["uplink"] == 29


def test_unnumbered_names_stay_on_buses_already_in_use() -> None:
    positions = assign_positions(["swp40", "mgmt-ish", "uplink"], {})
    assert positions["swp40"] == 40
    assert positions["mgmt-ish"] == 61
    assert positions["uplink"] == 60


def test_remembered_positions_win_over_natural_ones() -> None:
    positions = assign_positions(["swp1", "eth1"], {"swp1": 1})
    assert positions == {"swp1": 1, "eth1": 30}


def test_sixty_four_interfaces_fit_with_stable_bridges() -> None:
    names = [f"swp{number}" for number in range(1, 65)]
    plan, _ = plan_lab(make_lab("wide", [link(f"a:{n}", f"b:{n}") for n in names]), LAYOUT)
    nics = plan.nodes["a"].nics
    assert [nic.interface for nic in nics] == names
    assert plan.nodes["a"].bridges == 3
    assert len({nic.place for nic in nics}) == 64
    assert nics[63].place == PciPlace("qlink-br2", 64 - 62 + 1)


# --- ports ---------------------------------------------------------------------------------


def test_both_ends_of_a_link_point_at_each_other() -> None:
    plan, _ = plan_lab(make_lab("l", [link("a:swp1", "b:swp1")]), LAYOUT)
    a, b = plan.nodes["a"].nic("swp1"), plan.nodes["b"].nic("swp1")
    assert a.remote_port == b.local_port
    assert b.remote_port == a.local_port
    assert a.local_port != b.local_port


def test_fixed_ports_are_used_as_written() -> None:
    plan, allocations = plan_lab(make_lab("l", [link("a:swp1", "b:swp1", (8000, 9000))]), LAYOUT)
    assert plan.nodes["a"].nic("swp1").local_port == 8000
    assert plan.nodes["b"].nic("swp1").local_port == 9000
    assert allocations.udp_ports == {"l/a/swp1": 8000, "l/b/swp1": 9000}


def test_fixed_port_held_by_another_lab_is_refused() -> None:
    _, first = plan_lab(make_lab("one", [link("a:swp1", "b:swp1")]), LAYOUT)
    taken = first.udp_ports["one/a/swp1"]
    with pytest.raises(PlanError, match=f"port {taken} of link 1 end x:swp1 .* used by one/a/swp1"):
        plan_lab(make_lab("two", [link("x:swp1", "y:swp1", (taken, 9999))]), LAYOUT, first)


def test_exhausted_pool_is_an_error() -> None:
    lab = make_lab("l", [link("a:swp1", "b:swp1"), link("a:swp2", "b:swp2")])
    with pytest.raises(PlanError, match="no free UDP port left in 100-102"):
        plan_lab(lab, LAYOUT, udp_pool=range(100, 103))


def test_two_labs_planned_together_never_share_a_port() -> None:
    links = [link(f"s{sp}:swp{lf}", f"l{lf}:swp5{sp}") for sp in (1, 2) for lf in (1, 2, 3)]
    first_plan, memory = plan_lab(make_lab("one", links), LAYOUT)
    second_plan, memory = plan_lab(make_lab("two", links), LAYOUT, memory)
    first = {p for n in first_plan.nodes.values() for p in n.udp_ports()}
    second = {p for n in second_plan.nodes.values() for p in n.udp_ports()}
    assert len(first) == len(second) == 12
    assert not first & second
    # Re-planning the first lab keeps its ports and still leaves the second's alone.
    again, _ = plan_lab(make_lab("one", links), LAYOUT, memory)
    assert {p for n in again.nodes.values() for p in n.udp_ports()} == first


def test_long_socket_paths_are_refused() -> None:
    with pytest.raises(PlanError, match="longer than the 107 bytes"):
        plan_lab(make_lab("l", [link("a:swp1", "b:swp1")]), Layout.under(Path("/x" * 50)))


def test_mgmt_gets_a_stable_ssh_port_and_its_own_mac() -> None:
    lab = make_lab("l", [link("a:swp1", "b:swp1")])
    lab = lab.model_copy(update={"nodes": {**lab.nodes, "a": node("a", mgmt=True)}})
    plan, memory = plan_lab(lab, LAYOUT)
    mgmt = plan.nodes["a"].mgmt
    assert mgmt is not None
    assert mgmt.ssh_port == 2200
    assert mgmt.mac not in {nic.mac for nic in plan.nodes["a"].nics}
    assert plan.nodes["b"].mgmt is None
    assert memory.ssh_ports == {"l/a/ssh": 2200}


# --- stability under edits (property tests) ------------------------------------------------

NODE_NAMES = [f"n{index}" for index in range(6)]
INTERFACE_NAMES = [f"swp{n}" for n in range(1, 60)] + ["uplink", "peer", "eth1", "eth7", "x.1"]


@st.composite
def labs(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A random set of links between random interfaces; no interface used twice."""
    count = draw(st.integers(min_value=1, max_value=18))
    ends = draw(
        st.lists(
            st.tuples(st.sampled_from(NODE_NAMES), st.sampled_from(INTERFACE_NAMES)),
            min_size=2 * count,
            max_size=2 * count,
            unique=True,
        )
    )
    return [
        (f"{a[0]}:{a[1]}", f"{b[0]}:{b[1]}") for a, b in zip(ends[::2], ends[1::2], strict=True)
    ]


def build(pairs: list[tuple[str, str]]) -> Lab:
    return make_lab("prop", [link(a, b) for a, b in pairs], nodes=NODE_NAMES)


def identities(lab: Lab, memory: Allocations) -> tuple[dict[str, object], Allocations]:
    plan, remembered = plan_lab(lab, LAYOUT, memory)
    seen: dict[str, object] = {}
    for node_plan in plan.nodes.values():
        for nic in node_plan.nics:
            key = f"{node_plan.name}:{nic.interface}"
            seen[key] = (nic.mac, nic.position, nic.place, nic.local_port, nic.remote_port)
    return seen, remembered


Edit = tuple[str, int, tuple[str, str] | None]


@st.composite
def edits(draw: st.DrawFn) -> list[Edit]:
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["add", "remove", "move"]),
                st.integers(min_value=0, max_value=40),
                st.none()
                | st.tuples(
                    st.tuples(st.sampled_from(NODE_NAMES), st.sampled_from(INTERFACE_NAMES)),
                    st.tuples(st.sampled_from(NODE_NAMES), st.sampled_from(INTERFACE_NAMES)),
                ).map(lambda pair: (f"{pair[0][0]}:{pair[0][1]}", f"{pair[1][0]}:{pair[1][1]}")),
            ),
            min_size=1,
            max_size=6,
        )
    )


def apply(pairs: list[tuple[str, str]], changes: list[Edit]) -> list[tuple[str, str]]:
    result = list(pairs)
    for kind, index, new in changes:
        if kind == "remove" and result:
            result.pop(index % len(result))
        elif kind == "move" and result:
            result.insert(index % (len(result) + 1), result.pop(index % len(result)))
        elif kind == "add" and new is not None:
            used = {end for pair in result for end in pair}
            if new[0] != new[1] and not used & set(new):
                result.insert(index % (len(result) + 1), new)
    return result


STABILITY_EXAMPLES = 400


@settings(max_examples=STABILITY_EXAMPLES, deadline=None)
@given(labs(), edits())
def test_edits_keep_every_untouched_link_and_interface(
    pairs: list[tuple[str, str]], changes: list[Edit]
) -> None:
    before, memory = identities(build(pairs), Allocations())
    edited = apply(pairs, changes)
    if not edited:
        return
    after, _ = identities(build(edited), memory)
    untouched = {end for pair in set(pairs) & set(edited) for end in pair}
    for key in untouched:
        assert after[key] == before[key], key


@settings(max_examples=200, deadline=None)
@given(labs(), st.randoms(use_true_random=False))
def test_a_fresh_plan_ignores_the_order_of_links(
    pairs: list[tuple[str, str]], shuffler: object
) -> None:
    shuffled = list(pairs)
    shuffler.shuffle(shuffled)  # type: ignore[attr-defined]
    assert (
        identities(build(pairs), Allocations())[0] == identities(build(shuffled), Allocations())[0]
    )


@settings(max_examples=200, deadline=None)
@given(labs())
def test_macs_and_places_do_not_depend_on_other_links(pairs: list[tuple[str, str]]) -> None:
    """A numbered interface whose number no other interface of its node shares keeps its MAC
    and place with no memory at all, whatever else exists."""
    alone: dict[str, object] = {}
    for pair in pairs:
        seen, _ = identities(build([pair]), Allocations())
        alone.update(seen)
    together, _ = identities(build(pairs), Allocations())
    numbers: dict[tuple[str, int], int] = {}
    for key in together:
        node_name, interface = key.split(":")
        if (number := natural_position(interface)) is not None:
            numbers[node_name, number] = numbers.get((node_name, number), 0) + 1
    for key, value in together.items():
        node_name, interface = key.split(":")
        number = natural_position(interface)
        if number is not None and numbers[node_name, number] == 1:
            assert value[:3] == alone[key][:3], key  # type: ignore[index]


def test_fresh_ports_avoid_ports_busy_on_the_host_but_remembered_ones_stay() -> None:
    lab = make_lab("l", [link("a:swp1", "b:swp1")])
    plan, memory = plan_lab(lab, LAYOUT, busy_udp=frozenset({20000, 20002}))
    assert sorted(plan.nodes["a"].udp_ports() + plan.nodes["b"].udp_ports()) == [20001, 20003]
    again, _ = plan_lab(lab, LAYOUT, memory, busy_udp=frozenset({20001, 20003}))
    assert again.nodes["a"].udp_ports() == plan.nodes["a"].udp_ports()
