"""Impairment: who applies it, and when. One owner for the host's loopback per qlinkd.

What a link gets is its live setting (`qlinkctl link set`, kept in the lab's record) or else
its file's `impair:`. The keeper turns every lab's into one wanted state (by sending port,
`plan/qdisc.py`) and has `tc` bring `lo` to it (`runtime/impair.py`), one change at a time:
at `up` before any VM starts (a refusal starts nothing), on a live change, after `down`,
and when qlinkd starts (re-applied on adoption: the kernel keeps qdiscs across a qlinkd
restart, and the restarted qlinkd owns them again). VM restarts need nothing: a direction is
matched by its port, which a restarted VM binds again.

Ownership is strict: qlink touches only its own root qdisc (htb 716c:) and, under it, only
the ports of this root. Those are kept in a ledger (`impair.json` under the root), written
before tc runs and trimmed after: a qlinkd killed in between leaves ports in the ledger, and
the next qlinkd removes whatever of them no lab wants. tc runs only when what is wanted
differs from what this qlinkd applied (so at its start whenever a lab is impaired): a lab with
no impairment never runs it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from qlink.daemon.events import EventBus
from qlink.daemon.labs import LabRuntime, Labs
from qlink.daemon.records import LabRecord, LabStore
from qlink.errors import Invalid, NotFound, QlinkError
from qlink.impairment import DIRECTIONS, LinkImpairment, Netem
from qlink.plan.lab import LabPlan
from qlink.plan.paths import Layout
from qlink.plan.qdisc import Shaped, lab_shaping
from qlink.runtime.impair import TrafficControl
from qlink.state import write_json
from qlink.topology import Lab, Link

log = structlog.get_logger("qlinkd")

LIVE_DIRECTIONS = ("out", "in", "both")
"""`link set NODE:IF --direction`: what NODE:IF sends, what it receives, or both."""


def effective(record: LabRecord, link: Link) -> LinkImpairment | None:
    """What the link gets now: its live setting, else its file's; None for nothing."""
    impairment = record.impair.get(link.key, link.impair)
    return None if impairment is None or impairment.is_none() else impairment


def impairments(record: LabRecord) -> dict[str, LinkImpairment]:
    return {
        link.key: impairment
        for link in record.lab.links
        if (impairment := effective(record, link)) is not None
    }


def kept_live(old: LabRecord, lab: Lab) -> dict[str, LinkImpairment]:
    """The live settings that outlive `up` of a new file: those of links still there whose
    `impair:` the file did not change (an edited `impair:` is the operator's newer word)."""
    before = {link.key: link.impair for link in old.lab.links}
    return {
        link.key: old.impair[link.key]
        for link in lab.links
        if link.key in old.impair and link.key in before and before[link.key] == link.impair
    }


def netem_of(settings: dict[str, Any]) -> Netem:
    """A live setting, validated as the file's are; errors name the qlinkctl flag."""
    try:
        return Netem.model_validate(settings)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = "--" + str(item["loc"][0]).replace("_", "-") if item["loc"] else "impair"
            problems.append(f"{field}: {str(item['msg']).removeprefix('Value error, ')}")
        raise Invalid("; ".join(problems)) from error


def live_change(
    current: LinkImpairment | None, own: str, direction: str, netem: Netem | None
) -> LinkImpairment:
    """The link's impairment once `netem` (None: nothing) is set on `direction` of the end
    whose frames go `own` (a_to_b or b_to_a); the other direction keeps what it had."""
    if direction not in LIVE_DIRECTIONS:
        raise Invalid(f"direction is one of {', '.join(LIVE_DIRECTIONS)}, not {direction!r}")
    other = next(which for which in DIRECTIONS if which != own)
    choices: dict[str, set[str]] = {"out": {own}, "in": {other}, "both": set(DIRECTIONS)}
    chosen = choices[direction]
    before = current or LinkImpairment()
    ways = {which: netem if which in chosen else before.direction(which) for which in DIRECTIONS}
    return LinkImpairment.directed(ways["a_to_b"], ways["b_to_a"])


LabSource = tuple[LabPlan, LabRecord]


def wanted_of(labs: Iterable[LabSource]) -> dict[int, Shaped]:
    """Every impaired direction of these labs, by sending port."""
    wanted: dict[int, Shaped] = {}
    for plan, record in labs:
        wanted |= lab_shaping(plan, impairments(record))
    return wanted


class ImpairKeeper:
    def __init__(
        self,
        layout: Layout,
        labs: Labs,
        store: LabStore,
        events: EventBus,
        control: TrafficControl | None = None,
    ) -> None:
        self._ledger_path: Path = layout.state_dir / "impair.json"
        self._labs = labs
        self._store = store
        self._events = events
        self._control = control or TrafficControl()
        self._lock = asyncio.Lock()
        self._applied: dict[int, Shaped] = {}
        self.error: str | None = None
        """Why the last pass failed, until one succeeds: `links` shows it."""

    # --- what the daemon asks -------------------------------------------------------------

    def wanted(self, replacing: LabSource | None = None) -> dict[int, Shaped]:
        """Every lab's impaired directions, with `replacing`'s lab as it is about to be."""
        name = replacing[0].name if replacing is not None else None
        sources = [(lab.plan, lab.record) for lab in self._labs if lab.name != name]
        return wanted_of([*sources, *((replacing,) if replacing is not None else ())])

    async def before_up(self, plan: LabPlan, record: LabRecord, commit: Callable[[], None]) -> None:
        """`up`: the lab's impairment in place before any of it starts; refused, nothing is
        committed (`up` then starts nothing)."""
        before = {lab.name: impairments(lab.record) for lab in self._labs}.get(plan.name, {})
        await self.change(lambda: self.wanted((plan, record)), commit)
        self._tell(record.lab, before, impairments(record), "file")

    async def set_live(
        self, reference: str, direction: str, settings: dict[str, Any] | None
    ) -> tuple[LabRuntime, Link]:
        """`qlinkctl link set NODE:IF ...` (settings None: `--clear`): applied, then kept in
        the lab's record; refused (bad value, tc), nothing changes."""
        lab, supervisor, interface = self._labs.find_endpoint(reference)
        link = lab.record.lab.link_of(supervisor.name, interface)
        assert link is not None
        netem = None if settings is None else netem_of(settings)
        if netem is not None and netem.is_empty():
            raise Invalid("say what to impair (--delay, --loss, --rate, ...), or --clear")
        first = link.endpoints[0]
        sends_first = (first.node, first.interface) == (supervisor.name, interface)
        own = "a_to_b" if sends_first else "b_to_a"
        pending: list[LabRecord] = []

        def compute() -> dict[int, Shaped]:
            if self._labs.get(lab.name) is not lab:
                raise NotFound(f"lab {lab.name!r} went down meanwhile")
            new = live_change(effective(lab.record, link), own, direction, netem)
            record = lab.record.model_copy(update={"impair": {**lab.record.impair, link.key: new}})
            pending.append(record)
            return self.wanted((lab.plan, record))

        def commit() -> None:
            lab.record = pending[-1]
            self._store.save(lab.record)

        before = impairments(lab.record)
        await self.change(compute, commit)
        self._tell(lab.record.lab, before, impairments(lab.record), "live")
        return lab, link

    async def settle(self, why: str) -> None:
        """Bring `lo` to every lab's impairment where nobody waits for the answer (qlinkd's
        start, after `down`): a failure is logged, kept for `links`, and told as an event."""
        try:
            await self.change(self.wanted)
        except QlinkError as error:
            log.error("impairment_failed", why=why, error=str(error))
            self._events.publish("impair_error", why=why, error=str(error))

    def _tell(
        self, lab: Lab, before: dict[str, LinkImpairment], after: dict[str, LinkImpairment],
        source: str,
    ) -> None:  # fmt: skip
        """An `impair` event per link whose impairment changed (`a`, `b`: its ends as
        written, which `a_to_b` and `b_to_a` refer to)."""
        for link in lab.links:
            if before.get(link.key) == after.get(link.key):
                continue
            impairment = after.get(link.key)
            document = impairment.document() if impairment is not None else None
            a, b = (str(end) for end in link.endpoints)
            log.info("link_impaired", lab=lab.name, link=link.key, impair=document, source=source)
            self._events.publish(
                "impair", lab=lab.name, link=link.key, a=a, b=b, impair=document, source=source
            )

    # --- the one way to change lo ---------------------------------------------------------

    def _ledger(self) -> set[int]:
        try:
            return set(json.loads(self._ledger_path.read_text()))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, TypeError) as error:
            log.warning("impair_ledger_unreadable", path=str(self._ledger_path), error=str(error))
            return set()

    def _write_ledger(self, ports: set[int]) -> None:
        if ports or self._ledger_path.exists():
            write_json(self._ledger_path, sorted(ports), durable=False)

    async def change(
        self, compute: Callable[[], dict[int, Shaped]], commit: Callable[[], None] | None = None
    ) -> None:
        """Apply what `compute` wants (called under the keeper's lock, so that changes do
        not interleave), then `commit` what made it so. Should tc refuse, what was applied
        before is put back as far as it goes, nothing is committed, and the error is raised."""
        async with self._lock:
            wanted = compute()
            ledger = self._ledger()
            if wanted == self._applied and ledger <= set(wanted):
                # Nothing to change (a lab without `impair:` never gets here with any): no
                # tc at all, so a tc that fails now cannot refuse an `up` that changes none.
                if commit is not None:
                    commit()
                return
            owned = ledger | set(wanted) | set(self._applied)
            self._write_ledger(owned)  # first: a crash during tc leaves them known
            try:
                commands = await self._control.apply(wanted, owned)
            except QlinkError as error:
                self.error = str(error)
                await self._put_back(owned)
                raise
            self.error = None
            self._applied = dict(wanted)
            self._write_ledger(set(wanted))
            if commit is not None:
                commit()
            if commands:
                log.info("impairment_applied", directions=len(wanted), commands=commands)

    async def _put_back(self, owned: set[int]) -> None:
        try:
            await self._control.apply(self._applied, owned)
        except QlinkError as error:
            log.error("impairment_not_restored", error=str(error))
        else:  # lo holds what was applied before again, which is what `links` shows
            self.error = None
            self._write_ledger(set(self._applied))
