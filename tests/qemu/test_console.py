"""`qlinkctl console` and `qlinkctl logs` against a real qlinkd and real QEMU, no guest.

The VMs are paused (`-S`), so their consoles are silent: these tests cover attaching,
detaching, several viewers, sessions that outlive a QEMU restart or end with the lab, and the
logs. What a guest prints and what viewers type is checked with a real guest
(tests/guest/test_console_guest.py).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from tests.conftest import GuestFiles, Qlinkd, qemu_pid_of, write_lab

pytestmark = pytest.mark.qemu

StartDaemon = Callable[..., Qlinkd]
FAST = ("--backoff-initial", "0.2", "--backoff-attempts", "3", "--powerdown-timeout", "0")
BANNER = re.compile(rb"attached to the console of \S+; detach with Ctrl-\]")


class Viewer:
    """`qlinkctl console NODE` as a subprocess with stdin a pipe, as a script would run it
    (or another verb that streams, such as `logs -f`)."""

    def __init__(
        self, root: Path, node: str, verb: tuple[str, ...] = ("console",), name: str = ""
    ) -> None:
        self.node = node
        self.name = name or f"{' '.join(verb)} {node}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qlink.cli", "--root", str(root), *verb, node],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.out = bytearray()
        self.err = bytearray()
        self._open: dict[int, bytearray] = {}
        for stream, buffer in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            assert stream is not None
            fd = stream.fileno()
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            self._open[fd] = buffer

    def __enter__(self) -> Viewer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:
            self.process.kill()  # this viewer's PID only
        self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def _read(self, until: float) -> None:
        """Take in what the viewer printed, waiting at most until `until`."""
        if not self._open:
            return
        ready, _, _ = select.select(list(self._open), [], [], max(0.0, until - time.monotonic()))
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                self._open[fd] += data
            else:
                del self._open[fd]

    def transcript(self) -> str:
        return (
            f"\n--- stdout of {self.name} ---\n{self.out.decode(errors='replace')}"
            f"\n--- stderr ---\n{self.err.decode(errors='replace')}"
        )

    def expect(
        self, pattern: bytes, timeout: float, stream: str = "out", start: int = 0
    ) -> re.Match[bytes]:
        """The first match of `pattern` in stdout (or stderr) from `start` on."""
        buffer = self.out if stream == "out" else self.err
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (found := compiled.search(buffer, start)) is None:
            if time.monotonic() > deadline or not self._open:
                raise AssertionError(
                    f"{self.name}: no {pattern!r} on std{stream} within {timeout:g} s"
                    + self.transcript()
                )
            self._read(deadline)
        return found

    def attached(self, timeout: float = 30.0) -> Viewer:
        self.expect(BANNER.pattern, timeout, stream="err")
        return self

    def type(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the viewer to exit, reading all it prints; its exit code."""
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            self._read(deadline)
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def detach_by_escape(self) -> int:
        self.type(b"\x1d")
        return self.finish()

    def detach_by_eof(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.finish()


def paused_pair(root: Path, guest: GuestFiles) -> Path:
    return write_lab(
        root,
        f"""\
        name: t
        defaults:
          memory: 64
          accel: tcg
          kernel: {guest.kernel}
          extra_args: [-S]
        nodes:
          a: {{}}
          b: {{}}
        links:
          - [a:eth1, b:eth1]
        """,
        name="t.yaml",
    )


def events(daemon: Qlinkd, name: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if f'"event": "{name}"' in line]


def test_attach_and_detach_leave_the_vm_alone(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    pid = qemu_pid_of(short_root, "t", "a")
    with Viewer(short_root, "a") as viewer:
        viewer.attached()
        assert viewer.detach_by_escape() == 0, viewer.transcript()
        assert b"detached from a" in viewer.err
    with Viewer(short_root, "t/a") as viewer:  # LAB/NODE works too; end of input detaches
        viewer.attached()
        assert viewer.detach_by_eof() == 0, viewer.transcript()
    assert qemu_pid_of(short_root, "t", "a") == pid
    assert daemon.status()["t/a"]["state"] == "running"
    # Each session connected to QEMU's console socket and hung up again when it ended.
    assert len(events(daemon, "console_connected")) == 2
    assert len(events(daemon, "console_viewer_detached")) == 2


def test_two_viewers_share_one_connection(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    with Viewer(short_root, "a") as first:
        first.attached()
        with Viewer(short_root, "a") as second:
            second.attached()
            attached = events(daemon, "console_viewer_attached")
            assert ['"viewers": 1' in attached[0], '"viewers": 2' in attached[1]] == [True, True]
            # QEMU serves one client: both viewers share the daemon's single connection.
            assert len(events(daemon, "console_connected")) == 1
            assert first.detach_by_escape() == 0, first.transcript()
            assert second.process.poll() is None  # the other viewer stays attached
            assert second.detach_by_eof() == 0, second.transcript()


def test_unknown_node_exits_2_and_no_daemon_exits_3(
    qlinkd: StartDaemon, short_root: Path, tmp_path: Path
) -> None:
    nobody = subprocess.run(
        [sys.executable, "-m", "qlink.cli", "--root", str(tmp_path), "console", "a"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert nobody.returncode == 3, nobody.stderr
    assert "qlinkd is not answering" in nobody.stderr
    daemon = qlinkd(*FAST)
    result = daemon.ctl("console", "nope")
    assert result.returncode == 2, result.stderr
    assert "no node 'nope' in any lab that is up" in result.stderr
    result = daemon.ctl("logs", "nope")
    assert result.returncode == 2, result.stderr
    assert "no node 'nope'" in result.stderr


def test_a_session_survives_a_restart_and_ends_with_the_lab(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    with Viewer(short_root, "a") as viewer:
        viewer.attached()
        daemon.ctl_ok("restart", "--force", "a")
        new_pid = qemu_pid_of(short_root, "t", "a")
        viewer.expect(rb"QEMU closed the console of t/a", 30, stream="err")
        viewer.expect(rf"t/a runs again \(pid {new_pid}\)".encode(), 30, stream="err")
        daemon.ctl_ok("down", "t")
        assert viewer.finish() == 1, viewer.transcript()
        assert b"qlinkd no longer runs t/a" in viewer.err


def test_stopping_qlinkd_ends_sessions_at_once(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    with Viewer(short_root, "a") as viewer:
        viewer.attached()
        started = time.monotonic()
        daemon.stop()
        stopped_in = time.monotonic() - started
        assert viewer.finish() == 1, viewer.transcript()
    # aiohttp would wait for open WebSockets for a minute; the console closes them.
    assert stopped_in < 10, f"qlinkd took {stopped_in:.1f} s to stop with a viewer attached"
    qlinkd(*FAST)  # adopts the VMs, so that the fixture takes the lab down


def test_logs_print_and_follow_both_files(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    node_dir = short_root / "lib/labs/t/nodes/a"
    console_log, qemu_log = node_dir / "console.log", node_dir / "qemu.log"
    # A paused guest prints nothing: append as QEMU would.
    with console_log.open("ab") as log:
        log.write(b"boot line 1\nboot line 2\n")
    with qemu_log.open("ab") as log:
        log.write(b"qemu-system-x86_64: a warning\n")
    both = daemon.ctl_ok("logs", "a")
    assert both == (
        f"==> {console_log} <==\nboot line 1\nboot line 2\n\n"
        f"==> {qemu_log} <==\nqemu-system-x86_64: a warning\n"
    )
    assert daemon.ctl_ok("logs", "--only", "console", "a") == "boot line 1\nboot line 2\n"
    assert daemon.ctl_ok("logs", "--only", "console", "-n", "1", "t/a") == "boot line 2\n"

    # Started as a shell starts a background job: SIGINT ignored, which a child inherits.
    # A user's Ctrl-C must end it all the same (it hung for 30 s on a busy machine).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited across exec
    try:
        follower = subprocess.Popen(
            [sys.executable, "-m", "qlink.cli", "--root", str(short_root), "logs", "-f", "a"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert follower.stdout is not None
        seen = b""
        while b"a warning\n" not in seen:  # the first copy, then inotify
            chunk = os.read(follower.stdout.fileno(), 65536)
            assert chunk, seen
            seen += chunk
        with console_log.open("ab") as log:
            log.write(b"appended later\n")
        while b"appended later\n" not in seen:
            chunk = os.read(follower.stdout.fileno(), 65536)
            assert chunk, seen
            seen += chunk
        assert seen.endswith(f"==> {console_log} <==\nappended later\n".encode()), seen
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C
        assert follower.wait(timeout=5) == 0
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
    # The follower's handler ended when it hung up: the daemon still answers.
    assert daemon.ctl_ok("logs", "--only", "console", "a").endswith("appended later\n")


def test_a_terminal_is_raw_while_attached_and_restored_after(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_pair(short_root, guest_files)))
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    process = subprocess.Popen(
        [sys.executable, "-m", "qlink.cli", "--root", str(short_root), "console", "a"],
        stdin=terminal, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"detach with Ctrl-]" not in seen:
            ready, _, _ = select.select([controller], [], [], max(0, deadline - time.monotonic()))
            assert ready, f"no banner on the terminal: {seen!r}"
            seen += os.read(controller, 4096)
        assert b"end of input" not in seen  # on a terminal only the escape detaches
        attrs = termios.tcgetattr(terminal)
        assert not attrs[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw
        os.write(controller, b"\x03")  # Ctrl-C goes to the guest; the viewer stays
        assert process.poll() is None
        os.write(controller, b"\x1d")
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
        os.close(terminal)
