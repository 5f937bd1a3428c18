"""Link impairment, pure: the settings as written (units, ranges, rules, located errors), the
qdisc plan (which directions, which tc lines, from which kernel state), live changes, and the
daemon's keeper over a fake tc (applied before `up` starts anything, kept, re-applied by the
next qlinkd, gone with `down`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qlink.cli.main import run
from qlink.cli.render import impair_text
from qlink.daemon import Daemon
from qlink.daemon.impairs import kept_live, live_change, netem_of
from qlink.daemon.records import LabRecord
from qlink.errors import ConfigError, HostError, Invalid, NotFound
from qlink.impairment import LinkImpairment, Netem
from qlink.plan.allocations import Allocations
from qlink.plan.argv import HostFacts
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.plan.qdisc import (
    ROOT,
    Shaped,
    TcState,
    gilbert,
    lab_shaping,
    leaf_arguments,
    parse_classes,
    parse_filters,
    parse_root,
    reconcile,
)
from qlink.runtime.impair import NO_NETEM, TcError
from qlink.topology import parse_topology_text
from tests.fakes import FakeRuntime, FakeTrafficControl
from tests.test_daemon_core import DEADLINE, SETTINGS, up


def n(**settings: Any) -> Netem:
    """Settings as written (text with units), validated."""
    return Netem.model_validate(settings)


PAIR = """\
name: imp
defaults: {kernel: /k}
nodes: {r1: {}, r2: {}}
links:
  - endpoints: [r1:eth1, r2:eth1]
    ports: [21001, 21002]
    impair: {delay: 20ms, jitter: 5ms, distribution: normal, loss: 1%}
  - endpoints: [r1:eth2, r2:eth2]
    ports: [21003, 21004]
    impair:
      b_to_a: {rate: 10mbit}
  - [r1:eth3, r2:eth3]
"""


# --- the settings -------------------------------------------------------------------------


def test_values_carry_units_and_keep_one_canonical_text() -> None:
    netem = Netem.model_validate(
        {"delay": "1.5s", "jitter": "250us", "loss": "0.50%", "rate": "2500kbit", "burst": 4}
    )
    assert (netem.delay, netem.jitter, netem.loss, netem.rate) == (1_500_000, 250, 0.5, 2_500_000)
    assert netem.settings() == {
        "delay": "1500ms", "jitter": "250us", "loss": "0.5%", "burst": 4, "rate": "2500kbit",
    }  # fmt: skip
    assert Netem.model_validate(netem.settings()) == netem
    assert netem.text() == "delay 1500ms±250us, loss 0.5% (bursts of 4), rate 2500kbit"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"delay": 20}, "give a time with its unit, e.g. 20ms"),
        ({"delay": "20 sec"}, "is not a time"),
        ({"delay": "11s"}, "11s is more than 10 s"),
        ({"loss": "1"}, "is not a percentage"),
        ({"loss": "100.5%"}, "100.5% is more than 100%"),
        ({"rate": "1kbit"}, "1kbit is outside 8kbit..100gbit"),
        ({"rate": "10mbps"}, "is not a rate"),
        ({"jitter": "5ms"}, "jitter needs a delay"),
        ({"delay": "5ms", "distribution": "normal"}, "distribution needs jitter"),
        ({"reorder": "5%"}, "reorder needs a delay"),
        ({"burst": 3}, "burst needs loss"),
        ({"loss": "1%", "burst": 1}, "outside 1 (exclusive)..1000"),
        ({"loss": "1%", "burst": 3, "loss_correlation": "5%"}, "either burst or loss_corr"),
        ({"loss": "100%", "burst": 3}, "loss bursts need loss under 100%"),
        ({"latency": "5ms"}, "Extra inputs are not permitted"),
    ],
)
def test_out_of_range_and_ill_fitting_values_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Netem.model_validate(settings)


def test_a_link_takes_both_directions_or_each_not_both() -> None:
    both = LinkImpairment.model_validate({"delay": "20ms"})
    assert both.direction("a_to_b") == both.direction("b_to_a") == n(delay="20ms")
    each = LinkImpairment.model_validate({"b_to_a": {"loss": "2%"}})
    assert each.direction("a_to_b") is None
    assert each.document() == {"a_to_b": None, "b_to_a": {"loss": "2%"}}
    assert LinkImpairment().document() is None
    with pytest.raises(ValidationError, match="or a_to_b and b_to_a, not both"):
        LinkImpairment.model_validate({"delay": "20ms", "a_to_b": {"loss": "1%"}})


def test_errors_in_the_file_name_the_line_and_the_field() -> None:
    text = PAIR.replace("loss: 1%}", "loss: 150%}").replace("rate: 10mbit", "rate: fast")
    with pytest.raises(ConfigError) as raised:
        parse_topology_text(text, "pair.yaml")
    assert [str(issue) for issue in raised.value.issues] == [
        "pair.yaml:7: links[0].impair.loss: 150% is more than 100%",
        "pair.yaml:11: links[1].impair.b_to_a.rate: 'fast' is not a rate: a number and bit, "
        "kbit, mbit or gbit",
    ]


# --- the qdisc plan -----------------------------------------------------------------------


def test_each_impaired_direction_is_its_sending_port(tmp_path: Path) -> None:
    lab = parse_topology_text(PAIR, "pair.yaml")
    plan, _ = plan_lab(lab, Layout.under(tmp_path), Allocations())
    shaping = lab_shaping(plan, {link.key: link.impair for link in lab.links if link.impair})
    both = n(delay="20ms", jitter="5ms", distribution="normal", loss="1%")
    assert shaping == {
        21001: Shaped("127.0.0.1", 21001, both),  # r1:eth1 sends
        21002: Shaped("127.0.0.1", 21002, both),
        21004: Shaped("127.0.0.1", 21004, n(rate="10mbit")),  # r2:eth2 sends (b_to_a)
    }
    assert shaping[21001].classid == f"{ROOT}5209"


def test_netem_and_rate_in_tc_words() -> None:
    assert leaf_arguments(n(delay="20ms", jitter="5ms", distribution="normal")) == (
        "netem limit 10000 delay 20000us 5000us distribution normal"
    )
    assert leaf_arguments(n(delay="20ms", jitter="5ms", distribution="uniform")) == (
        "netem limit 10000 delay 20000us 5000us"
    )
    assert leaf_arguments(n(loss="1%", loss_correlation="25%", duplicate="0.1%")) == (
        "netem limit 10000 loss random 1% 25% duplicate 0.1%"
    )
    gemodel = "netem limit 10000 loss gemodel 0.252525% 25% 100% 0%"
    assert leaf_arguments(n(loss="1%", burst=4)) == gemodel
    # A rate alone: a byte FIFO of 100 ms at the rate, at least one largest datagram.
    assert leaf_arguments(n(rate="100mbit")) == "bfifo limit 1250000"
    assert leaf_arguments(n(rate="1mbit")) == "bfifo limit 65536"


def test_gilbert_loses_the_share_asked_in_bursts_of_the_length_asked() -> None:
    good_to_bad, bad_to_good = gilbert(2.0, 5.0)
    assert bad_to_good == 20.0  # a burst lasts 1/r = 5 frames
    assert good_to_bad / (good_to_bad + bad_to_good) == pytest.approx(0.02)


QDISCS = (
    '[{"kind":"htb","handle":"716c:","root":true,"refcnt":2,"options":{"r2q":10,"default":"0",'
    '"direct_packets_stat":0,"direct_qlen":100000}},{"kind":"bfifo","handle":"8002:",'
    '"parent":"716c:4e21","options":{"limit":100000}}]'
)
CLASSES = (
    "class htb 716c:4e21 root leaf 8002: prio 0 rate 8Mbit ceil 8Mbit burst 1600b cburst 1600b\n"
    "class htb 716c:4e23 root prio 0 rate 100Gbit ceil 100Gbit burst 0b cburst 0b \n"
)
FILTERS = (
    '[{"parent":"716c:","protocol":"ip","pref":20001,"kind":"u32","chain":0},{"parent":"716c:",'
    '"protocol":"ip","pref":20001,"kind":"u32","chain":0,"options":{"fh":"800:","ht_divisor":1}},'
    '{"parent":"716c:","protocol":"ip","pref":20001,"kind":"u32","chain":0,"options":{"fh":'
    '"800::800","order":2048,"key_ht":"800","bkt":"0","flowid":"716c:4e21","not_in_hw":true,'
    '"match":{"value":"110000","mask":"ff0000","offmask":"","off":8},"match":{"value":'
    '"7f000001","mask":"ffffffff","offmask":"","off":12},"match":{"value":"4e210000","mask":'
    '"ffff0000","offmask":"","off":20}}}]'
)


def test_the_kernel_state_is_read_from_tc_output() -> None:
    assert parse_root(QDISCS) == "ours"
    assert parse_root('[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2}]') == "none"
    assert parse_root('[{"kind":"tbf","handle":"1:","root":true}]') == "tbf 1:"
    assert parse_classes(CLASSES) == {20001, 20003}
    assert parse_filters(FILTERS) == {20001: ("127.0.0.1", 20001)}


def test_reconcile_adds_the_root_once_and_touches_only_owned_ports() -> None:
    new = Shaped("127.0.0.1", 20005, n(rate="1mbit"))
    lines = reconcile(TcState("none"), {20005: new}, set())
    assert lines == [
        f"qdisc add dev lo root handle {ROOT} htb default 0 direct_qlen 100000",
        f"class replace dev lo parent {ROOT} classid {ROOT}4e25 htb rate 1000000bit "
        "ceil 1000000bit quantum 200000",
        f"qdisc replace dev lo parent {ROOT}4e25 bfifo limit 65536",
        f"filter add dev lo parent {ROOT} protocol ip pref 20005 u32 match ip protocol 17 0xff "
        f"match ip src 127.0.0.1/32 match ip sport 20005 0xffff flowid {ROOT}4e25",
    ]
    state = TcState("ours", frozenset({20001, 20003}), {20001: ("127.0.0.1", 20001)})
    # 20001 is ours and no longer wanted; 20003 belongs to another qlinkd: left alone.
    assert reconcile(state, {}, {20001}) == [
        f"filter del dev lo parent {ROOT} protocol ip pref 20001",
        f"class del dev lo classid {ROOT}4e21",
    ]
    # The last of them gone, the root goes too.
    assert reconcile(state, {}, {20001, 20003})[-1] == f"qdisc del dev lo root handle {ROOT} htb"
    # A filter that matches another address is put right.
    moved = Shaped("127.0.0.2", 20001, n(rate="1mbit"))
    assert [line.split(" u32")[0] for line in reconcile(state, {20001: moved}, set())[2:]] == [
        f"filter del dev lo parent {ROOT} protocol ip pref 20001",
        f"filter add dev lo parent {ROOT} protocol ip pref 20001",
    ]
    assert reconcile(TcState("none"), {}, {20001}) == []


# --- live changes -------------------------------------------------------------------------


def test_a_live_change_sets_the_directions_asked_and_keeps_the_other() -> None:
    current = LinkImpairment.model_validate({"delay": "20ms"})
    loss = n(loss="1%")
    out = live_change(current, "b_to_a", "out", loss)
    assert (out.direction("a_to_b"), out.direction("b_to_a")) == (n(delay="20ms"), loss)
    cleared = live_change(current, "a_to_b", "both", None)
    assert cleared.is_none()
    with pytest.raises(Invalid, match="direction is one of out, in, both"):
        live_change(None, "a_to_b", "sideways", loss)


def test_live_values_are_refused_naming_the_flag() -> None:
    with pytest.raises(Invalid, match=r"--loss-correlation: .*is not a percentage"):
        netem_of({"loss": "1%", "loss_correlation": "lots"})


def test_up_keeps_live_settings_unless_the_file_changed_that_link(tmp_path: Path) -> None:
    lab = parse_topology_text(PAIR, "pair.yaml")
    live = LinkImpairment.directed(n(rate="1mbit"), None)
    keys = [link.key for link in lab.links]
    record = LabRecord(lab=lab, impair={keys[0]: live, keys[2]: live})
    edited = parse_topology_text(PAIR.replace("loss: 1%", "loss: 2%"), "pair.yaml")
    assert kept_live(record, lab) == {keys[0]: live, keys[2]: live}
    assert kept_live(record, edited) == {keys[2]: live}


def test_links_show_impairment_per_direction_or_once() -> None:
    row: dict[str, Any] = {"a": {"endpoint": "r1:eth1"}, "b": {"endpoint": "r2:eth1"}}
    assert impair_text({**row, "impair": None}) == "-"
    same = {"delay": "20ms", "loss": "1%"}
    assert impair_text({**row, "impair": {"a_to_b": same, "b_to_a": same}}) == (
        "delay=20ms loss=1%"
    )
    assert impair_text({**row, "impair": {"a_to_b": None, "b_to_a": {"rate": "1mbit"}}}) == (
        "r1:eth1> -; r2:eth1> rate=1mbit"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["link", "set", "r1:eth1"],
        ["link", "set", "r1:eth1", "--delay", "5ms", "--clear"],
        ["link", "up", "r1:eth1", "--delay", "5ms"],
    ],
)
def test_qlinkctl_link_set_wants_settings_or_clear(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--root", str(tmp_path), *argv]) == 2
    assert "qlinkctl:" in capsys.readouterr().err


# --- the daemon's keeper, over a fake tc -----------------------------------------------------


async def serve(daemon: Daemon) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.serve(ready=ready.set))
    async with asyncio.timeout(DEADLINE):
        await ready.wait()
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait({task})


def new_daemon(root: Path, traffic: FakeTrafficControl) -> Daemon:
    return Daemon(Layout.under(root), HostFacts(), SETTINGS, FakeRuntime(), traffic=traffic)


async def test_the_keeper_applies_keeps_reapplies_and_removes(tmp_path: Path) -> None:
    traffic = FakeTrafficControl()
    daemon = new_daemon(tmp_path, traffic)
    task = await serve(daemon)
    try:
        with daemon.subscribe() as events:
            assert (await up(daemon, PAIR))["failed"] == {}
            assert set(traffic.current) == {21001, 21002, 21004}
            told = [e for e in iter(events.get_nowait, None) if e["event"] == "impair"]
        assert [(e["link"], e["source"]) for e in told] == [
            ("r1:eth1--r2:eth1", "file"), ("r1:eth2--r2:eth2", "file"),
        ]  # fmt: skip
        row = await daemon.set_impair("r2:eth1", "out", {"rate": "1mbit"})
        assert row["impair"]["b_to_a"] == {"rate": "1mbit"}
        assert traffic.current[21002].netem == n(rate="1mbit")
        await daemon.set_impair("r1:eth3", "both", {"delay": "5ms"})
        assert len(traffic.current) == 5  # r1:eth3's two directions too
        ledger = json.loads((tmp_path / "lib" / "impair.json").read_text())
        assert ledger == sorted(traffic.current)
        # `up` of the same file keeps the live settings; of a file that edits a link's
        # `impair:`, that link's live setting gives way to the file's.
        await up(daemon, PAIR)
        assert traffic.current[21002].netem == n(rate="1mbit")
        await up(daemon, PAIR.replace("loss: 1%}", "loss: 2%}"))
        assert traffic.current[21002].netem == n(delay="20ms", jitter="5ms",
                                                  distribution="normal", loss="2%")  # fmt: skip
        await daemon.set_impair("r2:eth1", "out", {"rate": "1mbit"})
        with pytest.raises(NotFound):
            await daemon.set_impair("r1:eth9", "both", {"delay": "5ms"})
        with pytest.raises(Invalid, match="--delay"):
            await daemon.set_impair("r1:eth1", "both", {"delay": "5 parsecs"})
    finally:
        await stop(task)  # as a SIGKILL would leave it: the VMs and lo as they are

    again = FakeTrafficControl()
    daemon = new_daemon(tmp_path, again)
    task = await serve(daemon)
    try:
        # The next qlinkd owns the same impairment, the live changes included.
        assert again.applied[0][0] == traffic.current
        async with asyncio.timeout(DEADLINE):
            _ = [event async for event in daemon.down("imp", graceful=False)]
        assert again.current == {}
        assert again.applied[-1] == ({}, set(traffic.current))
        assert json.loads((tmp_path / "lib" / "impair.json").read_text()) == []
    finally:
        await stop(task)


async def test_a_refusal_by_tc_starts_nothing_and_records_nothing(tmp_path: Path) -> None:
    traffic = FakeTrafficControl()
    traffic.refuse = TcError(NO_NETEM)
    daemon = new_daemon(tmp_path, traffic)
    task = await serve(daemon)
    try:
        with pytest.raises(HostError, match="no netem"):
            await up(daemon, PAIR)
        assert daemon.status() == []
        assert not (tmp_path / "lib" / "labs" / "imp" / "lab.json").exists()
        traffic.refuse = None
        assert (await up(daemon, PAIR))["failed"] == {}
        assert [row["node"] for row in daemon.status()] == ["r1", "r2"]
    finally:
        await stop(task)


async def test_tc_runs_only_for_a_change(tmp_path: Path) -> None:
    """Once a lab's impairment is applied, neither `up` of its unchanged file nor of another
    lab without impairment asks tc anything, so a tc that fails meanwhile refuses neither."""
    traffic = FakeTrafficControl()
    daemon = new_daemon(tmp_path, traffic)
    task = await serve(daemon)
    try:
        await up(daemon, PAIR)
        traffic.refuse = TcError("tc is broken now")
        assert (await up(daemon, PAIR))["failed"] == {}
        plain = "name: plain\ndefaults: {kernel: /k}\nnodes: {a: {}, b: {}}\n"
        assert (await up(daemon, plain + "links: [[a:eth1, b:eth1]]\n"))["failed"] == {}
        assert len(traffic.applied) == 1
        with pytest.raises(TcError, match="broken"):
            await daemon.set_impair("a:eth1", "both", {"rate": "1mbit"})
        links = daemon.links()
        assert links[-1]["impair"] is None  # refused: nothing recorded
        # Until a pass succeeds, what `links` shows of the impaired links may not be so.
        assert links[0]["impair_error"] == "tc is broken now"
        assert impair_text(links[0]).endswith("(NOT APPLIED: see qlinkd's log)")
    finally:
        await stop(task)


async def test_a_lab_without_impairment_never_runs_tc(tmp_path: Path) -> None:
    traffic = FakeTrafficControl()
    daemon = new_daemon(tmp_path, traffic)
    task = await serve(daemon)
    try:
        plain = "name: plain\ndefaults: {kernel: /k}\nnodes: {a: {}, b: {}}\n"
        await up(daemon, plain + "links: [[a:eth1, b:eth1]]\n")
        async with asyncio.timeout(DEADLINE):
            _ = [event async for event in daemon.down("plain", graceful=False)]
    finally:
        await stop(task)
    assert traffic.applied == []
