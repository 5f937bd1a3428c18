"""Traffic control on the host's loopback through the `tc` binary (iproute2), as asyncio
subprocesses: read what `lo` holds of qlink's, and bring it to a wanted state
(`plan/qdisc.py` says which commands).

The `tc` binary rather than a netlink library: its command lines are the ones operators
read and type, its JSON is what the state is read from, and a batch of them goes in one
process (`tc -batch -`). Each call is tens of milliseconds, off the event loop.

`netns` runs it all in a network namespace instead (`tc -n NAME`): the tests use their own.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence, Set

import structlog

from qlink.errors import HostError
from qlink.plan.qdisc import (
    DEVICE,
    ROOT,
    Shaped,
    TcState,
    parse_classes,
    parse_filters,
    parse_root,
    reconcile,
)

log = structlog.get_logger("qlinkd")

TC_TIMEOUT = 30.0

NEEDS_NET_ADMIN = (
    "changing the host's traffic control (tc qdiscs and filters on lo) needs CAP_NET_ADMIN: "
    "run qlinkd as root, or give it the capability (AmbientCapabilities=CAP_NET_ADMIN in "
    "its unit)"
)
NO_NETEM = (
    "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM; `modprobe sch_netem` where it is "
    "a module): delay, jitter, loss, duplicate, reorder and corrupt need it; a rate alone "
    "does not (HTB)"
)


class TcError(HostError):
    """tc refused: what it said, and which command."""

    def __init__(self, message: str, command: str | None = None, output: str = "") -> None:
        self.command = command
        self.output = output
        super().__init__(message)


class TrafficControl:
    """The host's `lo` (or a namespace's), through tc."""

    def __init__(self, netns: str | None = None, tc: str | None = None) -> None:
        self.netns = netns
        self._tc = tc

    def _argv(self, *arguments: str) -> list[str]:
        tc = self._tc or shutil.which("tc") or shutil.which("tc", path="/usr/sbin:/sbin")
        if tc is None:
            raise TcError("impairing links needs the tc command: apt-get install iproute2")
        return [tc, *(("-n", self.netns) if self.netns else ()), *arguments]

    async def _run(self, *arguments: str, stdin: str | None = None) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *self._argv(*arguments),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(TC_TIMEOUT):
                out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TcError(f"tc {' '.join(arguments)} did not finish in {TC_TIMEOUT:g} s") from None
        return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def state(self) -> TcState:
        """What `lo` holds now: its root qdisc, and under qlink's root the classes and
        filters."""
        code, out, err = await self._run("-j", "qdisc", "show", "dev", DEVICE)
        if code != 0:
            raise TcError(f"tc cannot read the qdiscs of {DEVICE}: {err.strip()}")
        root = parse_root(out)
        if root != "ours":
            return TcState(root)
        code, classes, err = await self._run("class", "show", "dev", DEVICE, "parent", ROOT)
        if code != 0:
            raise TcError(f"tc cannot read the classes of {DEVICE}: {err.strip()}")
        code, filters, err = await self._run("-j", "filter", "show", "dev", DEVICE, "parent", ROOT)
        if code != 0:
            raise TcError(f"tc cannot read the filters of {DEVICE}: {err.strip()}")
        return TcState(root, parse_classes(classes), parse_filters(filters))

    async def apply(self, wanted: Mapping[int, Shaped], owned: Set[int]) -> list[str]:
        """Bring `lo` to `wanted`, touching only `owned` ports (and wanted ones); returns
        the commands run. Refuses, changing nothing, a root qdisc that is not qlink's."""
        state = await self.state()
        if state.foreign:
            if not wanted:
                return []  # none of ours can be under someone else's root
            raise TcError(
                f"the root qdisc of {DEVICE} is not qlink's ({state.root}; qlink's is htb "
                f"{ROOT}): qlink will not replace it. Remove it (tc qdisc del dev {DEVICE} "
                "root) if nothing needs it, or impair no link"
            )
        lines = reconcile(state, wanted, owned)
        if lines:
            await self.batch(lines)
        return lines

    async def batch(self, lines: Sequence[str]) -> None:
        """Run tc commands in one process; the first that fails stops it (and is named)."""
        code, out, err = await self._run("-batch", "-", stdin="\n".join(lines) + "\n")
        if code == 0:
            return
        raise _explain(err or out, lines)


def _explain(output: str, lines: Sequence[str]) -> TcError:
    """tc's failure in words that say what to do: "Command failed -:N" names the line."""
    failed: str | None = None
    for text in output.splitlines():
        if text.startswith("Command failed -:"):
            number = text.removeprefix("Command failed -:").strip()
            if number.isdigit() and 0 < int(number) <= len(lines):
                failed = lines[int(number) - 1]
    said = output.strip().splitlines()[0] if output.strip() else "no message"
    if "Operation not permitted" in output:
        return TcError(NEEDS_NET_ADMIN, failed, output)
    if "Specified qdisc kind is unknown" in output and failed is not None and "netem" in failed:
        return TcError(NO_NETEM, failed, output)
    where = f" (tc {failed})" if failed else ""
    return TcError(f"tc failed: {said}{where}", failed, output)
