"""Shared fixtures: what real-QEMU and real-guest tests need, and the guarantee that no QEMU
a test started outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
GUEST_DIR = Path(os.environ.get("QLINK_GUEST_DIR", "/var/cache/qlink/guest"))


def require(condition: bool, reason: str) -> None:
    """Skip with a reason on a developer's machine; in CI a missing prerequisite fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    require(
        found is not None, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    )
    assert found is not None
    return found


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path


@pytest.fixture(scope="session")
def guest_files() -> GuestFiles:
    files = GuestFiles(GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.img")
    require(
        files.kernel.is_file() and files.initrd.is_file(),
        f"the test guest is not built in {GUEST_DIR} (run guest/build-guest)",
    )
    return files


def _qemu_started_under(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # gone, whatever psutil says; PID 1 reaps orphans only now and then
        if cmdline and "qemu-system" in cmdline[0] and any(str(root) in arg for arg in cmdline):
            found.append(process)
    return found


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A root short enough for unix socket paths (107 bytes), unlike pytest's tmp_path.

    On the way out it guarantees that no QEMU started under it survives the test: any left
    is killed (by PID) and the test errors, because tests must clean up after themselves.
    """
    root = Path(tempfile.mkdtemp(prefix="qlink-", dir="/tmp"))
    yield root
    leftovers = _qemu_started_under(root)
    for process in leftovers:
        process.kill()
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"the test left QEMU running: pids {[p.pid for p in leftovers]}"


# --- a real qlinkd, as a separate process -------------------------------------------------


class Qlinkd:
    """A `qlinkd --root ROOT` subprocess, started and waited for the way systemd does it:
    through NOTIFY_SOCKET, so READY=1 is an event, and a tested one."""

    def __init__(self, root: Path, extra: list[str] | None = None) -> None:
        self.root = root
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / f"qlinkd-{time.monotonic_ns()}.log"

    def start(self, timeout: float = 30.0) -> Qlinkd:
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(timeout)
            environment = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "qlink.qlinkd", "--root", str(self.root),
                     "--log-format", "json", *self.extra],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=environment,
                )  # fmt: skip
            try:
                while True:
                    message = notify.recv(4096).decode()
                    if "READY=1" in message.split("\n"):
                        return self
            except TimeoutError:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"qlinkd sent no READY=1 in {timeout} s:\n{self.log()}"
                ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctl(self, *argv: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run qlinkctl against this daemon, as an operator would."""
        return subprocess.run(
            [sys.executable, "-m", "qlink.cli", "--root", str(self.root), *argv],
            capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def ctl_ok(self, *argv: str, timeout: float = 300.0) -> str:
        result = self.ctl(*argv, timeout=timeout)
        assert result.returncode == 0, f"qlinkctl {' '.join(argv)}: {result.returncode}\n" + (
            result.stdout + result.stderr
        )
        return result.stdout

    @contextlib.contextmanager
    def events(self) -> Iterator[EventStream]:
        """`qlinkctl events -o json` running beside the test: wait on what the daemon says
        happened instead of polling `status`."""
        stream = EventStream(self.root)
        try:
            yield stream
        finally:
            stream.close()

    def status(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.ctl_ok("status", "-o", "json"))
        return {f"{row['lab']}/{row['node']}": row for row in rows}

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class EventStream:
    """The daemon's events, one JSON object a line, from a `qlinkctl events` subprocess.
    Ready once the daemon has confirmed the subscription: nothing after that is missed."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qlink.cli", "--root", str(root), "events", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.process.stdout is not None
        self._stdout = self.process.stdout
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.seen: list[dict[str, Any]] = []
        self.until(lambda event: event["event"] == "subscribed", timeout)

    def until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first event (from now on) that `wanted` accepts; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                event: dict[str, Any] = json.loads(line)
                self.seen.append(event)
                if wanted(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise AssertionError(f"no such event within {timeout} s; seen: {self.seen}")
            chunk = os.read(self._stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"qlinkctl events ended; seen: {self.seen}")
            self._buffer += chunk

    def close(self) -> None:
        self._selector.close()
        self.process.kill()
        self.process.wait()
        self._stdout.close()


@pytest.fixture
def qlinkd(short_root: Path) -> Iterator[Callable[..., Qlinkd]]:
    """Start qlinkd processes on the test's root; on teardown every lab still up is taken
    down (so no VM survives the test) and every daemon is stopped."""
    started: list[Qlinkd] = []

    def start(*extra: str) -> Qlinkd:
        daemon = Qlinkd(short_root, list(extra)).start()
        started.append(daemon)
        return daemon

    yield start
    try:
        live = [daemon for daemon in started if daemon.process and daemon.process.poll() is None]
        if live:
            labs = {key.split("/")[0] for key in live[-1].status()}
            for lab in labs:
                live[-1].ctl("down", lab, timeout=120)
    finally:
        # Even when taking the labs down failed, no daemon outlives the test (and
        # short_root then kills any QEMU left).
        for daemon in started:
            daemon.stop()


def write_lab(root: Path, text: str, name: str = "lab.yaml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(text))
    return path


def console_paths(root: Path, lab: str, node: str) -> tuple[Path, Path]:
    """A node's console log and console socket under a qlinkd `--root`."""
    return (
        root / "lib" / "labs" / lab / "nodes" / node / "console.log",
        root / "run" / lab / node / "console.sock",
    )


def qemu_pid_of(root: Path, lab: str, node: str) -> int:
    """The PID from QEMU's own pidfile."""
    return int((root / "run" / lab / node / "qemu.pid").read_text().strip())


def cmdline_of(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()
