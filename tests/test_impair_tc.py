"""`runtime/impair.py` against the real tc and kernel, in a network namespace of the test's
own (its `lo` is the one changed, so the host's is never touched): the qdisc plan applied,
read back, re-applied, cleaned up; a foreign root qdisc refused; a rate measured with UDP
sockets bound as qlink binds a cable's ends; every netem rendering accepted by tc; and the
message without CAP_NET_ADMIN. Needs root and iproute2 (both in CI); about a second."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlink.impairment import Netem
from qlink.plan.qdisc import ROOT, Shaped, leaf_arguments
from qlink.runtime.impair import NEEDS_NET_ADMIN, NO_NETEM, TcError, TrafficControl
from tests.conftest import require

A, B = 20001, 20002


def _root_with_tc() -> None:
    require(shutil.which("tc") is not None, "tc is not installed (apt-get install iproute2)")
    require(os.geteuid() == 0, "changing qdiscs needs root (CAP_NET_ADMIN)")


@functools.cache
def netem_available() -> bool:
    """Whether this kernel has netem, tried in a namespace of our own."""
    if shutil.which("tc") is None or os.geteuid() != 0:
        return False
    name = f"qlink-probe-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        probe = subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem"],
                               capture_output=True, check=False)  # fmt: skip
        return probe.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    _root_with_tc()
    name = f"qlink-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def shaped(port: int, **settings: str) -> Shaped:
    return Shaped("127.0.0.1", port, Netem.model_validate(settings))


async def test_applied_read_back_reapplied_and_cleaned(netns: str) -> None:
    control = TrafficControl(netns)
    wanted = {A: shaped(A, rate="8mbit"), B: shaped(B, rate="1gbit")}
    first = await control.apply(wanted, set())
    assert first[0].startswith(f"qdisc add dev lo root handle {ROOT} htb")
    state = await control.state()
    assert state.root == "ours"
    assert state.classes == {A, B}
    assert state.filters == {A: ("127.0.0.1", A), B: ("127.0.0.1", B)}
    # Again: classes and leaves are replaced in place, the filters are left as they are.
    again = await control.apply(wanted, set(wanted))
    assert not any(line.startswith("filter") for line in again), again
    # A port this root does not own is not touched, even under qlink's root.
    await control.apply({A: wanted[A]}, {A})
    assert (await control.state()).classes == {A, B}
    await control.apply({}, {A, B})
    assert (await control.state()).root == "none"
    assert await control.apply({}, {A, B}) == []  # nothing left to do: no tc batch at all


async def test_a_foreign_root_qdisc_is_refused_and_left_alone(netns: str) -> None:
    foreign = ["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"]
    await asyncio.to_thread(subprocess.run, foreign, check=True)
    control = TrafficControl(netns)
    with pytest.raises(TcError, match=r"root qdisc of lo is not qlink's \(htb 1:"):
        await control.apply({A: shaped(A, rate="8mbit")}, set())
    assert (await control.state()).root == "htb 1:"
    assert await control.apply({}, {A}) == []  # removing: nothing of ours can be under it


def test_every_netem_rendering_is_tc_syntax(netns: str) -> None:
    """tc parses netem's options before the kernel sees them: each rendering is accepted
    (applied where the kernel has netem, refused as an unknown kind where it has not)."""
    subprocess.run(["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "handle", ROOT,
                    "htb", "default", "0"], check=True)  # fmt: skip
    subprocess.run(["tc", "-n", netns, "class", "add", "dev", "lo", "parent", ROOT, "classid",
                    f"{ROOT}1", "htb", "rate", "1gbit", "quantum", "200000"],
                   check=True)  # fmt: skip
    examples = [
        {"delay": "20ms"},
        {"delay": "20ms", "jitter": "5ms", "distribution": "normal"},
        {"delay": "1.5s", "jitter": "100us", "distribution": "paretonormal", "reorder": "25%"},
        {"loss": "1%", "loss_correlation": "25%"},
        {"loss": "0.5%", "burst": 4},
        {"duplicate": "1%", "corrupt": "0.1%", "rate": "10mbit"},
        {"rate": "10mbit"},
    ]
    for example in examples:
        leaf = leaf_arguments(Netem.model_validate(example)).split()
        result = subprocess.run(
            ["tc", "-n", netns, "qdisc", "replace", "dev", "lo", "parent", f"{ROOT}1", *leaf],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        unknown_kind = "Specified qdisc kind is unknown" in result.stderr
        assert result.returncode == 0 or (unknown_kind and leaf[0] == "netem"), (
            example, leaf, result.stderr,
        )  # fmt: skip


async def test_without_netem_the_error_says_so(netns: str) -> None:
    if netem_available():
        pytest.skip("this kernel has netem")
    with pytest.raises(TcError) as raised:
        await TrafficControl(netns).apply({A: shaped(A, delay="20ms")}, set())
    assert str(raised.value) == NO_NETEM


async def test_without_cap_net_admin_the_error_says_what_is_needed(tmp_path: Path) -> None:
    """tc as `nobody` with no capabilities, on the host's lo: the change is refused by the
    kernel before anything happens, and the message says what qlinkd needs."""
    _root_with_tc()
    wrapper = tmp_path / "tc"
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups '
                       f'--inh-caps=-all {shutil.which("tc")} "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    with pytest.raises(TcError) as raised:
        await TrafficControl(tc=str(wrapper)).apply({A: shaped(A, rate="8mbit")}, set())
    assert str(raised.value) == NEEDS_NET_ADMIN
    assert "CAP_NET_ADMIN" in NEEDS_NET_ADMIN


RATE_PROBE = textwrap.dedent(
    """\
    import socket, sys, threading, time
    sender, receiver, source = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", receiver))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((source, sender))
    tx.connect(("127.0.0.1", receiver))
    rx.settimeout(0.3)
    stop = time.monotonic() + 1.0
    def send():
        while time.monotonic() < stop:
            try:
                tx.send(b"x" * 1000)
            except OSError:
                pass
            time.sleep(0.0001)
    threading.Thread(target=send, daemon=True).start()
    got, first, last = 0, None, None
    while True:
        try:
            got += len(rx.recv(2048))
        except socket.timeout:
            break
        last = time.monotonic()
        first = first or last
    print(got * 8 / (last - first))
    """
)


def udp_rate(netns: str, sender: int, receiver: int, source: str = "127.0.0.1") -> float:
    """Payload bits per second from `source:sender` to 127.0.0.1:receiver, in the namespace."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", RATE_PROBE, str(sender),
         str(receiver), source],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return float(result.stdout)


async def test_rate_shapes_exactly_the_sending_socket(netns: str) -> None:
    # 2mbit: far below what the probe sends even when the cores are busy (8.5 Mbit/s under a
    # load of 35), so that the unshaped directions stay clearly above it
    await TrafficControl(netns).apply({A: shaped(A, rate="2mbit")}, set())
    rates = await asyncio.to_thread(
        lambda: {
            "shaped": udp_rate(netns, A, B),
            "reverse": udp_rate(netns, B, A),
            "same port, other address": udp_rate(netns, A, B, "127.0.0.2"),
        }
    )
    print(f"\nFIGURE UDP payload rates (2mbit on {A}): "
          + ", ".join(f"{k} {v / 1e6:.2f} Mbit/s" for k, v in rates.items()))  # fmt: skip
    # 1000-byte payloads in 1028-byte IP packets, which HTB counts.
    expected = 2e6 * 1000 / 1028
    assert abs(rates["shaped"] - expected) <= 0.1 * expected, rates
    assert rates["reverse"] > 2 * expected, rates
    assert rates["same port, other address"] > 2 * expected, rates
