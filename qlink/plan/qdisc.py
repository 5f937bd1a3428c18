"""The qdisc plan: the tc commands that give each impaired direction of a cable its shaping
on the host's loopback, and nothing else (pure: `runtime/impair.py` runs them).

Every cable end is a UDP socket qlink binds on 127.x without SO_REUSEADDR, so the frames one
end sends are exactly the IPv4 UDP datagrams with that end's source address and port. qlink
owns one root qdisc on `lo`, recognised by its handle:

    htb 716c: root, default 0        unmatched traffic is sent at once (HTB's direct queue):
     │                               the host's and every other cable's loopback traffic
     ├─ u32 filter pref P            src 127.0.0.1 sport P, UDP  ->  class 716c:P
     └─ class 716c:P  htb rate R     R: the direction's `rate`, or 100gbit (no limit)
         └─ netem (delay, loss...)   or a bfifo when only the rate is set

P is the sending end's port, in hex in the class id (`716c:4e21` is port 20001) and as the
filter's preference: a direction's class and filter are named by its port, so a qlinkd that
starts after another was killed finds them without any record of handles. A port is held by
one socket at a time, so one class per port is enough for every lab of every root.

Why these pieces: HTB's `default 0` sends unclassified packets straight on (no class, no
shaping), so the host's own loopback traffic only passes one classifier; HTB classes take a
64-bit rate; netem does the rest. `0x716c` is "ql".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from qlink.impairment import DIRECTIONS, MAX_RATE, LinkImpairment, Netem
from qlink.plan.lab import LabPlan

DEVICE = "lo"
ROOT_MAJOR = 0x716C
ROOT = f"{ROOT_MAJOR:x}:"
DIRECT_QLEN = 100_000
"""Unmatched packets wait in HTB's direct queue; `lo` has none of its own (noqueue), so it
is long enough never to drop what `lo` would have passed (its default, txqueuelen, is 1000)."""
QUANTUM = 200_000
"""Classes never borrow from each other (rate = ceil), so the quantum does not matter; set,
it keeps HTB from warning that rate/r2q is too big."""
NETEM_LIMIT = 10_000
"""Packets netem may hold (its default is 1000): 20 ms of delay at 1 Gbit/s of 1500-byte
frames is 1,700 packets in flight."""
FIFO_SECONDS = 0.1
"""A rate-limited direction without netem queues 100 ms of its rate, as a router's buffer
would, and at least one largest datagram."""
LARGEST_DATAGRAM = 65_536


@dataclass(frozen=True, slots=True)
class Shaped:
    """One impaired direction: the frames sent from `address:port`."""

    address: str
    port: int
    netem: Netem

    @property
    def classid(self) -> str:
        return f"{ROOT}{self.port:x}"


def link_key(a: str, b: str) -> str:
    return "--".join(sorted((a, b)))


def lab_shaping(plan: LabPlan, impairments: Mapping[str, LinkImpairment]) -> dict[int, Shaped]:
    """The lab's impaired directions by sending port; `impairments` by `Link.key`."""
    shaped: dict[int, Shaped] = {}
    for link in plan.links:
        impairment = impairments.get(link_key(str(link.a), str(link.b)))
        if impairment is None:
            continue
        for which, sender in zip(DIRECTIONS, (link.a, link.b), strict=True):
            netem = impairment.direction(which)
            if netem is None:
                continue
            nic = plan.nodes[sender.node].nic(sender.interface)
            shaped[nic.local_port] = Shaped(nic.local_address, nic.local_port, netem)
    return shaped


def lab_ports(plan: LabPlan) -> set[int]:
    return {port for link in plan.links for port in (link.a_port, link.b_port)}


# --- what the kernel has ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcState:
    """What `lo` holds of qlink's (and whether its root qdisc is someone else's)."""

    root: str
    """`none` (lo's own noqueue), `ours`, or the foreign root qdisc as `kind handle`."""
    classes: frozenset[int] = frozenset()
    """Ports that have a class under qlink's root."""
    filters: Mapping[int, tuple[str, int] | None] | None = None
    """By preference (= port): the (address, port) the filter matches; None if unreadable."""

    @property
    def foreign(self) -> bool:
        return self.root not in ("none", "ours")


NO_STATE = TcState("none")


def parse_root(qdisc_json: str) -> str:
    """`none`, `ours` or `kind handle` from `tc -j qdisc show dev lo`."""
    for qdisc in json.loads(qdisc_json or "[]"):
        if not qdisc.get("root"):
            continue
        kind, handle = qdisc.get("kind", "?"), qdisc.get("handle", "?")
        if kind == "noqueue":
            return "none"
        if kind == "htb" and handle == ROOT:
            return "ours"
        return f"{kind} {handle}"
    return "none"


_CLASS_RE = re.compile(rf"^class htb {ROOT}([0-9a-f]+) ", re.MULTILINE)


def parse_classes(class_text: str) -> frozenset[int]:
    """Ports with a class, from `tc class show dev lo` (tc 6.1 prints HTB classes as text
    even under -j)."""
    return frozenset(int(minor, 16) for minor in _CLASS_RE.findall(class_text))


def parse_filters(filter_json: str) -> dict[int, tuple[str, int] | None]:
    """{preference: (source address, source port) it matches} from `tc -j filter show dev lo
    parent 716c:`; u32 prints its keys as repeated `match` members, so pairs are kept."""
    found: dict[int, tuple[str, int] | None] = {}
    for pairs in json.loads(filter_json or "[]", object_pairs_hook=_pairs):
        entry = dict(pairs)
        pref = entry.get("pref")
        if not isinstance(pref, int):
            continue
        found.setdefault(pref, None)
        options = entry.get("options")
        if options is not None and any(key == "match" for key, _ in options):
            found[pref] = _u32_source(options)
    return found


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


def _u32_source(options: list[tuple[str, Any]]) -> tuple[str, int] | None:
    keys = {dict(value).get("off"): dict(value) for key, value in options if key == "match"}
    address, port = keys.get(12), keys.get(20)
    if address is None or port is None:
        return None
    try:
        packed = int(str(address["value"]), 16)
        sport = int(str(port["value"]), 16) >> 16
    except (KeyError, ValueError):
        return None
    return ".".join(str((packed >> shift) & 0xFF) for shift in (24, 16, 8, 0)), sport


# --- what to change -------------------------------------------------------------------------


def reconcile(state: TcState, wanted: Mapping[int, Shaped], owned: Set[int]) -> list[str]:
    """The `tc -batch` lines that bring `lo` to `wanted`, touching only ports in `owned`
    (or wanted): another qlinkd's classes under the same root are left alone. The root goes
    once it holds nothing. Empty when there is nothing to do (no tc at all)."""
    filters = state.filters or {}
    lines: list[str] = []
    if wanted and state.root == "none":
        lines.append(
            f"qdisc add dev {DEVICE} root handle {ROOT} htb default 0 direct_qlen {DIRECT_QLEN}"
        )
    for port in sorted(wanted):
        lines += _direction_lines(wanted[port], filters)
    gone = sorted(port for port in owned if port not in wanted)
    for port in gone:
        if port in filters:
            # The filter first: packets go straight on, and HTB refuses to delete a class
            # that a filter still points to.
            lines.append(f"filter del dev {DEVICE} parent {ROOT} protocol ip pref {port}")
        if port in state.classes:
            lines.append(f"class del dev {DEVICE} classid {ROOT}{port:x}")
    remaining = (state.classes - set(gone)) | set(wanted)
    if state.root == "ours" and not remaining and not set(filters) - set(gone):
        lines.append(f"qdisc del dev {DEVICE} root handle {ROOT} htb")
    return lines


def _direction_lines(shaped: Shaped, filters: Mapping[int, tuple[str, int] | None]) -> list[str]:
    rate = shaped.netem.rate or MAX_RATE
    lines = [
        f"class replace dev {DEVICE} parent {ROOT} classid {shaped.classid} "
        f"htb rate {rate}bit ceil {rate}bit quantum {QUANTUM}",
        f"qdisc replace dev {DEVICE} parent {shaped.classid} {leaf_arguments(shaped.netem)}",
    ]
    match = (shaped.address, shaped.port)
    if filters.get(shaped.port, ("", 0)) == match:
        return lines  # there already, matching the same socket
    if shaped.port in filters:
        lines.append(f"filter del dev {DEVICE} parent {ROOT} protocol ip pref {shaped.port}")
    lines.append(
        f"filter add dev {DEVICE} parent {ROOT} protocol ip pref {shaped.port} u32 "
        f"match ip protocol 17 0xff match ip src {shaped.address}/32 "
        f"match ip sport {shaped.port} 0xffff flowid {shaped.classid}"
    )
    return lines


def leaf_arguments(netem: Netem) -> str:
    """The class's leaf qdisc: netem with the direction's settings, or a plain byte FIFO
    when only the rate is set (which works without netem in the kernel)."""
    if not netem.needs_netem():
        limit = max(round((netem.rate or MAX_RATE) / 8 * FIFO_SECONDS), LARGEST_DATAGRAM)
        return f"bfifo limit {limit}"
    return " ".join(["netem", f"limit {NETEM_LIMIT}", *netem_arguments(netem)])


def _pct(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") + "%"


def netem_arguments(netem: Netem) -> list[str]:
    """netem's options for one direction, in tc's syntax."""
    parts: list[str] = []
    if netem.delay:
        delay = f"delay {netem.delay}us"
        if netem.jitter:
            delay += f" {netem.jitter}us"
            if netem.distribution not in (None, "uniform"):  # uniform is netem's own default
                delay += f" distribution {netem.distribution}"
        parts.append(delay)
    if netem.loss and netem.burst:
        good_to_bad, bad_to_good = gilbert(netem.loss, netem.burst)
        # Simple Gilbert: every frame is lost in the bad state (1-h = 100%), none in the
        # good one (1-k = 0%).
        parts.append(f"loss gemodel {_pct(good_to_bad)} {_pct(bad_to_good)} 100% 0%")
    elif netem.loss:
        correlation = f" {_pct(netem.loss_correlation)}" if netem.loss_correlation else ""
        parts.append(f"loss random {_pct(netem.loss)}{correlation}")
    for name in ("duplicate", "reorder", "corrupt"):
        value = getattr(netem, name)
        if value:
            parts.append(f"{name} {_pct(value)}")
    return parts


def gilbert(loss: float, burst: float) -> tuple[float, float]:
    """Transition percentages (good->bad p, bad->good r) of a Gilbert chain that loses
    `loss` percent of frames in bursts of `burst` on average: a burst lasts 1/r frames, and
    the chain is bad p/(p+r) of the time."""
    bad_to_good = 100.0 / burst
    good_to_bad = loss * bad_to_good / (100.0 - loss)
    return good_to_bad, bad_to_good
