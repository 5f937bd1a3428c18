"""`runtime/impair.py` against the real tc and kernel, in a network namespace of the test's
own (its `lo` is the one changed, so the host's is never touched): the qdisc plan applied,
read back, re-applied, cleaned up; a foreign root qdisc refused; a rate measured with UDP
sockets bound as qlink binds a cable's ends; every netem rendering accepted by tc; and the
message without CAP_NET_ADMIN. Needs root and iproute2 (both in CI); about a second.

Where the kernel has netem, the same sockets measure what netem does: one-way delay added
per direction, jitter's spread, loss over 1,000 datagrams, and removal restoring the RTT.
This host's kernel has none, so those skip here; tests/guest/test_netem_vm.py runs this file
inside the Debian lab image (kernel 6.1 with sch_netem), where none may skip."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import statistics
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
C, D = 20003, 20004  # a second cable, never impaired
OTHER_CABLE = f"other cable {C}<->{D} round trip"


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


# --- what netem does to the datagrams (where the kernel has it) ---------------------------

EARLY_MS = 0.5
LATE_MS = 2.0
"""How far a median's increment over the baseline (measured in the same run) may fall short
of the delay set, and overshoot it per delayed direction: netem sends no frame before its
time, so only the medians' noise can make it short; a frame leaves when netem's timer has
fired and the receiver has been scheduled, which a slow guest stretches: 0.6-1.2 ms per
direction measured in the Debian image under TCG (tests/guest/test_netem_vm.py)."""
PINGS = 100
JITTER_PINGS = 200
LOSS_DATAGRAMS = 1000


@pytest.fixture
def netem(netns: str) -> str:
    if not netem_available():
        pytest.skip(NO_NETEM)
    return netns


ECHO_PROBE = textwrap.dedent(
    """\
    import json, socket, sys, time
    count, a_port, b_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def bound(port, peer):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", peer))
        s.settimeout(5)
        return s
    a, b = bound(a_port, b_port), bound(b_port, a_port)
    out = []
    for i in range(count):
        payload = i.to_bytes(4, "big") * 16
        t0 = time.monotonic_ns()
        a.send(payload)
        assert b.recv(2048) == payload
        t1 = time.monotonic_ns()
        b.send(payload)
        assert a.recv(2048) == payload
        t2 = time.monotonic_ns()
        out.append(((t1 - t0) / 1e6, (t2 - t1) / 1e6))
    print(json.dumps(out))
    """
)


def one_way_ms(netns: str, a: int, b: int, count: int = PINGS) -> tuple[list[float], list[float]]:
    """One-way delays a->b and b->a in ms, datagram by datagram: the two sockets, bound as a
    cable's two ends, are in one process, so one clock times both directions."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", ECHO_PROBE, str(count), str(a),
         str(b)],
        capture_output=True, text=True, check=False, timeout=60 + count,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pairs = json.loads(result.stdout)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def median(values: list[float]) -> float:
    return statistics.median(values)


def assert_added(what: str, got: float, want: float, delayed: int = 1) -> None:
    """`got` ms added where `want` ms was set, over `delayed` delayed directions (none: the
    path is not impaired, and only the medians' noise may show)."""
    assert want - EARLY_MS <= got <= want + (LATE_MS * delayed or EARLY_MS), (what, want, got)


def rtt_ms(netns: str, a: int, b: int) -> float:
    there, back = one_way_ms(netns, a, b)
    return median([x + y for x, y in zip(there, back, strict=True)])


async def test_delay_is_added_per_direction_and_only_there(netem: str) -> None:
    base_there, base_back = await asyncio.to_thread(one_way_ms, netem, A, B)
    base_other = await asyncio.to_thread(rtt_ms, netem, C, D)
    await TrafficControl(netem).apply(
        {A: shaped(A, delay="20ms"), B: shaped(B, delay="5ms")}, set()
    )
    there, back = await asyncio.to_thread(one_way_ms, netem, A, B)
    other = await asyncio.to_thread(rtt_ms, netem, C, D)
    added = {
        f"{A}->{B}": (20.0, median(there) - median(base_there)),
        f"{B}->{A}": (5.0, median(back) - median(base_back)),
        "round trip": (
            25.0,
            median([x + y for x, y in zip(there, back, strict=True)])
            - median([x + y for x, y in zip(base_there, base_back, strict=True)]),
        ),
        OTHER_CABLE: (0.0, other - base_other),
    }
    print(f"\nFIGURE netem delay, median of {PINGS} (baseline one-way "
          f"{median(base_there):.3f}/{median(base_back):.3f} ms): "
          + ", ".join(f"{k} set {want:g} ms, added {got:.2f} ms"
                      for k, (want, got) in added.items()))  # fmt: skip
    for what, (want, got) in added.items():
        assert_added(what, got, want, delayed={"round trip": 2, OTHER_CABLE: 0}.get(what, 1))


async def test_jitter_spreads_the_delay(netem: str) -> None:
    """delay 20ms jitter 5ms (uniform, netem's default): every delay between 15 and 25 ms,
    the middle half 5 ms wide."""
    base, _ = await asyncio.to_thread(one_way_ms, netem, A, B)
    await TrafficControl(netem).apply({A: shaped(A, delay="20ms", jitter="5ms")}, set())
    there, _ = await asyncio.to_thread(one_way_ms, netem, A, B, JITTER_PINGS)
    added = sorted(x - median(base) for x in there)
    q1, q2, q3 = statistics.quantiles(added, n=4)
    p5, p95 = added[len(added) // 20], added[-len(added) // 20]
    print(f"\nFIGURE netem jitter, delay 20ms jitter 5ms uniform, {JITTER_PINGS} datagrams: "
          f"added median {q2:.2f} ms, quartiles {q1:.2f}-{q3:.2f} ms (IQR {q3 - q1:.2f}, "
          f"uniform: 5), 5-95% {p5:.2f}-{p95:.2f} ms (uniform: 15.5-24.5), "
          f"min {added[0]:.2f}, max {added[-1]:.2f}, stdev {statistics.stdev(added):.2f} ms "
          "(uniform: 2.89)")  # fmt: skip
    assert_added("median", q2, 20.0)
    assert abs((q3 - q1) - 5.0) <= 1.0, (q1, q3)  # sampling error of the IQR: ~0.4 ms
    assert min(there) >= 15.0, min(there)  # netem never sends before its time
    # Uniform: 15.5 ms; every datagram may come up to LATE_MS late, as the medians may (a
    # TCG guest measured 17.09 once). Without the jitter it would be 20.
    assert p5 <= 15.5 + LATE_MS, p5
    assert p95 >= 23.0, p95


LOSS_PROBE = textwrap.dedent(
    """\
    import json, socket, sys, time
    count, a_port, b_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def bound(port, peer):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE (root): no overflow
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", peer))
        s.setblocking(False)
        return s
    def drain(rx):
        got = 0
        while True:
            try:
                rx.recv(2048)
            except BlockingIOError:
                return got
            got += 1
    def through(tx, rx):
        got = 0
        for i in range(count):
            tx.send(i.to_bytes(4, "big") * 16)
            got += drain(rx)
        time.sleep(0.5)
        return got + drain(rx)
    a, b = bound(a_port, b_port), bound(b_port, a_port)
    print(json.dumps({"sent": count, "forward": through(a, b), "reverse": through(b, a)}))
    """
)


def received(netns: str, a: int, b: int) -> dict[str, int]:
    """LOSS_DATAGRAMS sent a->b, then b->a; how many each receiver got."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", LOSS_PROBE, str(LOSS_DATAGRAMS),
         str(a), str(b)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    counts: dict[str, int] = json.loads(result.stdout)
    return counts


async def test_loss_over_1000_datagrams(netem: str) -> None:
    """loss 10% on a->b: the count lost is binomial (n 1000, p 0.1: mean 100, sigma 9.5);
    within 4 sigma, a false failure once in ~16,000 runs. b->a loses nothing."""
    await TrafficControl(netem).apply({A: shaped(A, loss="10%")}, set())
    counts = await asyncio.to_thread(received, netem, A, B)
    lost = counts["sent"] - counts["forward"]
    sigma = (LOSS_DATAGRAMS * 0.1 * 0.9) ** 0.5
    print(f"\nFIGURE netem loss, set 10% on {A}->{B}: {lost} of {counts['sent']} lost "
          f"({100 * lost / counts['sent']:.1f} %; 4 sigma {4 * sigma:.0f}), reverse lost "
          f"{counts['sent'] - counts['reverse']}")  # fmt: skip
    assert abs(lost - 100) <= 4 * sigma, counts
    assert counts["reverse"] == counts["sent"], counts


async def test_clearing_restores_the_rtt(netem: str) -> None:
    base = await asyncio.to_thread(rtt_ms, netem, A, B)
    control = TrafficControl(netem)
    await control.apply({A: shaped(A, delay="20ms"), B: shaped(B, delay="5ms")}, set())
    impaired = await asyncio.to_thread(rtt_ms, netem, A, B)
    await control.apply({}, {A, B})  # what `qlinkctl link set ... --clear` leads to
    assert (await control.state()).root == "none"
    cleared = await asyncio.to_thread(rtt_ms, netem, A, B)
    print(f"\nFIGURE netem clear: RTT median {base:.3f} ms before, {impaired:.3f} ms with "
          f"20+5 ms, {cleared:.3f} ms after removal")  # fmt: skip
    assert_added("impaired", impaired - base, 25.0, delayed=2)
    assert_added("cleared", cleared - base, 0.0, delayed=0)
