"""`qlinkctl console` with a real guest: a shell answers through qlinkd, two viewers see the
same output and both can type, a viewer that stops reading holds up nobody, and detaching
leaves the guest running.

Boots one guest under TCG (about 8 s on an idle machine).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import GuestFiles, Qlinkd, qemu_pid_of, write_lab
from tests.qemu.test_console import Viewer

pytestmark = pytest.mark.guest

StartDaemon = Callable[..., Qlinkd]
BOOT_TIMEOUT = 300.0  # TCG on a shared, busy machine


def run_until_seen(viewer: Viewer, command: str, answer: bytes, timeout: float) -> None:
    """Type `command` until `answer` shows up on the viewer's stdout: right after the ready
    line, busybox init may still be starting the shell, and a line typed then is lost."""
    start = len(viewer.out)
    waited = 0.0
    while True:
        viewer.type(command.encode() + b"\n")
        try:
            viewer.expect(re.escape(answer), 5.0, start=start)
            return
        except AssertionError:
            waited += 5.0
            if waited >= timeout:
                raise


def test_console_of_a_real_guest(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd("--powerdown-timeout", "0")  # the guest has no acpid: down quits at once
    try:
        check_console(daemon, short_root, guest_files)
    except AssertionError as error:
        log = daemon.ctl("logs", "solo").stdout[-3000:]
        raise AssertionError(f"{error}\n--- qlinkctl logs solo (tail) ---\n{log}") from None


def check_console(daemon: Qlinkd, short_root: Path, guest_files: GuestFiles) -> None:
    lab = write_lab(
        short_root,
        f"""\
        name: solo-lab
        nodes:
          solo:
            kernel: {guest_files.kernel}
            initrd: {guest_files.initrd}
            append: "console=ttyS0 qlink.name=solo"
            accel: tcg
            memory: 256
        """,
    )
    daemon.ctl_ok("up", str(lab))
    pid = qemu_pid_of(short_root, "solo-lab", "solo")
    # The ready line, read from the console log as QEMU writes it (`logs -f`, inotify).
    with Viewer(short_root, "solo", ("logs", "-f", "--only", "console")) as follower:
        follower.expect(rb"qlink-ready name=solo", BOOT_TIMEOUT)

    with (
        Viewer(short_root, "solo", name="first viewer") as first,
        Viewer(short_root, "solo", name="second viewer") as second,
    ):
        first.attached()
        second.attached()
        second_from = len(second.out)
        run_until_seen(first, "echo hello-$((6*7))", b"hello-42", timeout=60)
        second.expect(rb"hello-42", 10, start=second_from)  # the same output, to both
        # What the second viewer types reaches the guest too, and both see the answer.
        first_from = len(first.out)
        second.type(b"echo from-second-$((2*5))\n")
        second.expect(rb"from-second-10", 30, start=second_from)
        first.expect(rb"from-second-10", 30, start=first_from)
        # A viewer that stops reading holds up nobody: the others get everything at once,
        # and it is told what it lost once it reads again.
        os.kill(second.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            first_from = len(first.out)
            # 590 kB: more than the socket buffers and the stopped viewer's outbox hold.
            first.type(b"seq 1 100000; echo flood-$((1+1))-done\n")
            first.expect(rb"\n100000\r?\nflood-2-done", 300, start=first_from)
            flooded_in = time.monotonic() - started
        finally:
            os.kill(second.process.pid, signal.SIGCONT)
        # Once it reads again, it gets what was kept, and with the next output a notice of
        # what it lost (the end of the flood, here).
        first_from, second_from = len(first.out), len(second.out)
        first.type(b"echo after-$((1+2))\n")
        first.expect(rb"after-3", 30, start=first_from)
        second.expect(rb"after-3", 30, start=second_from)
        dropped = second.expect(rb"\[qlinkd\] (\d+) bytes of output dropped", 1, stream="err")
        assert int(dropped.group(1)) > 100_000, dropped.group(0)
        assert b"flood-2-done" not in second.out
        print(f"590 kB through the console in {flooded_in:.1f} s, a stopped viewer attached")
        assert first.detach_by_escape() == 0, first.transcript()
        assert second.process.poll() is None
        assert second.detach_by_eof() == 0, second.transcript()

    # Detaching did nothing to the guest: same QEMU, and its shell answers a new viewer.
    assert qemu_pid_of(short_root, "solo-lab", "solo") == pid
    assert daemon.status()["solo-lab/solo"]["state"] == "running"
    with Viewer(short_root, "solo-lab/solo") as again:
        again.attached()
        run_until_seen(again, "echo again-$((3*3))", b"again-9", timeout=30)
        assert again.detach_by_eof() == 0, again.transcript()
    # QEMU logged the whole session itself.
    assert "hello-42" in daemon.ctl_ok("logs", "--only", "console", "solo")
    assert qemu_pid_of(short_root, "solo-lab", "solo") == pid
