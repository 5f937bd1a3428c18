"""The demo: the CLOS lab of configs/clos.yaml, end to end, with the real commands.

    python -m labdriver.demo            # what `make demo` runs

It starts its own qlinkd on a scratch root, brings the lab up, shows every node running and
every LLDP adjacency (read in the guests over their serial consoles), restarts spine1, shows
that the five other QEMU processes kept their PIDs and that the adjacencies came back, and
tears everything down, even when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labdriver.serial import close_consoles, lldp_neighbors, log_sizes, open_consoles, wait_ready

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOPOLOGY = REPO / "configs" / "clos.yaml"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def qlinkctl(root: Path, *argv: str, show: bool = True) -> str:
    """Run qlinkctl as an operator would, echoing the command and its output."""
    command = [sys.executable, "-m", "qlink.cli", "--root", str(root), *argv]
    if show:
        print(f"$ qlinkctl {' '.join(argv)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if show and result.stdout:
        print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(
            f"qlinkctl {' '.join(argv)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result.stdout


@contextmanager
def running_qlinkd(root: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """qlinkd on `root`, waited for through NOTIFY_SOCKET as systemd would; stopped after."""
    notify_path = root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        log = (root / "qlinkd.log").open("ab")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qlink.qlinkd", "--root", str(root), *options],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )  # fmt: skip
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
        except TimeoutError:
            daemon.kill()
            raise SystemExit(f"qlinkd did not become ready; see {root / 'qlinkd.log'}") from None
    try:
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()


def adjacency_table(seen: Mapping[str, Mapping[str, tuple[str, str]]]) -> str:
    rows = [
        f"  {node:<8} {port:<6} -> {peer:<8} {peer_port}"
        for node, neighbors in seen.items()
        for port, (peer, peer_port) in sorted(neighbors.items())
    ]
    return "\n".join(rows)


async def adjacencies(sockets: Mapping[str, Path]) -> dict[str, dict[str, tuple[str, str]]]:
    consoles = await open_consoles(sockets, timeout=120)
    try:
        return {name: await lldp_neighbors(console) for name, console in consoles.items()}
    finally:
        await close_consoles(consoles)


async def converged(
    sockets: Mapping[str, Path], expected: int, timeout: float = 120
) -> dict[str, dict[str, tuple[str, str]]]:
    """LLDP tables once every node sees `expected` adjacencies in all (lldpd sends every
    second; a node that just booted needs a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await adjacencies(sockets)
        if sum(len(table) for table in seen.values()) >= expected or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(1)  # the next LLDP round; nothing to wait on but the guests' timers


def pids(root: Path) -> dict[str, int]:
    rows: list[dict[str, Any]] = json.loads(qlinkctl(root, "status", "-o", "json", show=False))
    return {row["node"]: row["pid"] for row in rows}


def run_demo(topology: Path, root: Path, restart: str) -> None:
    plan = json.loads(qlinkctl(root, "plan", str(topology), "-o", "json", show=False))
    nodes = plan["nodes"]
    logs = {name: Path(node["paths"]["console_log"]) for name, node in nodes.items()}
    sockets = {name: Path(node["paths"]["console_socket"]) for name, node in nodes.items()}
    links = len(plan["links"])

    say(f"qlinkd on {root}; bringing up {plan['lab']}: {len(nodes)} VMs, {links} links")
    started = time.monotonic()
    qlinkctl(root, "up", str(topology))
    up_seconds = time.monotonic() - started
    asyncio.run(wait_ready(logs, timeout=600))
    print(f"(up returned in {up_seconds:.1f} s; all guests booted "
          f"{time.monotonic() - started:.1f} s after up)")  # fmt: skip
    qlinkctl(root, "links")

    say("LLDP adjacencies, as each guest's lldpd sees them")
    print(adjacency_table(asyncio.run(converged(sockets, 2 * links))))

    before = pids(root)
    say(f"restart {restart}: only its QEMU is replaced")
    offsets = log_sizes({restart: logs[restart]})
    started = time.monotonic()
    qlinkctl(root, "restart", restart)
    print(f"(restart took {time.monotonic() - started:.1f} s)")
    after = pids(root)
    for name, pid in before.items():
        verdict = "new" if name == restart else ("unchanged" if after[name] == pid else "CHANGED")
        print(f"  {name:<8} pid {pid:>7} -> {after[name]:>7}  {verdict}")
    asyncio.run(wait_ready({restart: logs[restart]}, offsets, timeout=600))
    print(f"({restart} booted again {time.monotonic() - started:.1f} s after the restart)")

    say("LLDP adjacencies again")
    print(adjacency_table(asyncio.run(converged(sockets, 2 * links))))
    if any(after[name] != pid for name, pid in before.items() if name != restart):
        raise SystemExit("a node other than the restarted one changed PID")

    say(f"down {plan['lab']}")
    qlinkctl(root, "down", plan["lab"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m labdriver.demo", description=__doc__)
    parser.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    parser.add_argument("--restart", default="spine1", help="the node to restart")
    parser.add_argument("--keep-root", action="store_true", help="keep the scratch root")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qlink-demo-", dir="/tmp"))
    lab = json.loads(qlinkctl(root, "plan", str(args.topology), "-o", "json", show=False))["lab"]
    try:
        with running_qlinkd(root, "--log-format", "json", "--powerdown-timeout", "10"):
            try:
                run_demo(args.topology, root, args.restart)
            except BaseException:
                # Whatever happened, no VM outlives the demo.
                subprocess.run(
                    [sys.executable, "-m", "qlink.cli", "--root", str(root), "down", lab],
                    capture_output=True, check=False, timeout=300,
                )  # fmt: skip
                raise
    finally:
        if not args.keep_root:
            shutil.rmtree(root, ignore_errors=True)
    say("done: every VM stopped, qlinkd stopped")


if __name__ == "__main__":
    main()
