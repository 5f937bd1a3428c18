"""qlinkd, the process: one per root, systemd-ready, leaving the VMs running when it goes."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import structlog

from qlink import logs
from qlink.api.app import serve_api
from qlink.daemon import Daemon
from qlink.errors import HostError, QlinkError
from qlink.host import host_resources, probe_host
from qlink.plan.paths import Layout, layout_from
from qlink.policy import Backoff, Liveness, SupervisorSettings
from qlink.runtime.process import StopTimeouts
from qlink.systemd import notify

log = structlog.get_logger("qlinkd")


class RootLock:
    """One qlinkd per root: an flock held for the life of the process (the kernel drops it
    when the process dies, even by SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise HostError(
                f"another qlinkd (pid {holder}) already runs on this root ({self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd


async def run_daemon(layout: Layout, settings: SupervisorSettings) -> None:
    RootLock(layout.daemon_lock).acquire()
    # A first probe runs QEMU (~0.1 s, up to its timeout on a broken KVM): not on the loop.
    host = await asyncio.to_thread(probe_host)
    resources = await asyncio.to_thread(host_resources)
    daemon = Daemon(layout, host, settings, resources=resources)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    log.info(
        "qlinkd_starting", pid=os.getpid(), root=str(layout.state_dir),
        qemu=host.qemu_binary, kvm=host.kvm_usable,
    )  # fmt: skip
    async with asyncio.TaskGroup() as group:
        supervising, serving = asyncio.Event(), asyncio.Event()
        daemon_task = group.create_task(daemon.serve(ready=supervising.set))
        await supervising.wait()
        api_task = group.create_task(serve_api(daemon, layout.control_socket, serving))
        await serving.wait()
        # READY only once the control socket answers: `systemctl start` returning means
        # qlinkctl works.
        notify("READY=1", f"STATUS=serving {len(daemon.labs)} labs")
        log.info("qlinkd_ready", socket=str(layout.control_socket), labs=len(daemon.labs))
        await stop_requested.wait()
        notify("STOPPING=1")
        log.info("qlinkd_stopping", note="VMs keep running")
        api_task.cancel()
        daemon_task.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlinkd", description="The qlink lab supervisor.")
    parser.add_argument(
        "--root", help="keep everything under DIR (default /var/lib/qlink and /run/qlink)"
    )
    parser.add_argument(
        "--log-format", choices=("auto", "journal", "json", "text"), default="auto",
        help="auto: journald's fields when systemd connects stderr to the journal, JSON lines "
        "when stderr is not a terminal, text on a terminal",
    )  # fmt: skip
    # The defaults are the settings' own, so that there is one place to change them.
    backoff, liveness, settings = Backoff(), Liveness(), SupervisorSettings()
    parser.add_argument("--backoff-initial", type=float, default=backoff.initial, metavar="SECONDS")
    parser.add_argument("--backoff-attempts", type=int, default=backoff.attempts, metavar="N")
    parser.add_argument(
        "--liveness-interval", type=float, default=liveness.interval, metavar="SECONDS",
        help=f"how often each VM's QMP is asked `query-status` (default {liveness.interval:g})",
    )  # fmt: skip
    parser.add_argument(
        "--powerdown-timeout", type=float, default=settings.stop_timeouts.powerdown,
        metavar="SECONDS",
    )  # fmt: skip
    parser.add_argument(
        "--unplug-timeout", type=float, default=settings.unplug_timeout, metavar="SECONDS",
        help="how long a guest gets to release the NIC of a removed link before its node "
        f"is restarted instead (default {settings.unplug_timeout:g})",
    )  # fmt: skip
    parser.add_argument(
        "--vm-nice", type=int, default=settings.vm_nice, choices=range(20), metavar="0-19",
        help="run the VMs this many nice steps below qlinkd, so that a boot storm does not "
        f"starve the control plane (default {settings.vm_nice}; 0: the same priority)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    if args.log_format == "journal":
        logs.configure(journal=True)
    else:
        logs.configure(json={"auto": None, "json": True, "text": False}[args.log_format])
    settings = SupervisorSettings(
        backoff=Backoff(initial=args.backoff_initial, attempts=args.backoff_attempts),
        liveness=Liveness(interval=args.liveness_interval),
        stop_timeouts=StopTimeouts(powerdown=args.powerdown_timeout),
        unplug_timeout=args.unplug_timeout,
        vm_nice=args.vm_nice,
    )
    try:
        asyncio.run(run_daemon(layout_from(args.root), settings))
    except QlinkError as error:
        print(f"qlinkd: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(0)


if __name__ == "__main__":
    main()
