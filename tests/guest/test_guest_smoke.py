"""Smoke test of the qlink test guest (guest/build-guest).

Boots two guests under TCG, wired back to back by a UDP unicast socket
netdev on 127.0.0.1, and checks over the serial console that:

* NICs are named by PCI position (bridge 00:03 slot 0x2 -> swp1, bridge
  00:04 slot 0x14 -> swp50), addresses from qlink.addr are applied,
* a pings b over the link,
* lldpd on each side sees the other (system name and port name),
* QMP system_powerdown (ACPI power button) makes the guest power off: QEMU
  exits by itself with status 0.

Skipped when the guest is not built (run guest/build-guest) or
qemu-system-x86_64 is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

QEMU = "qemu-system-x86_64"
GUEST_DIR = Path(os.environ.get("QLINK_GUEST_DIR", "/var/cache/qlink/guest"))
KERNEL = GUEST_DIR / "vmlinuz"
INITRD = GUEST_DIR / "initrd.img"

BOOT_TIMEOUT = 180.0  # TCG, 2 cores, two guests booting at once
LLDP_TIMEOUT = 30.0
POWERDOWN_TIMEOUT = 30.0  # qlink's stop ladder waits as long

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
    pytest.mark.skipif(
        not (KERNEL.is_file() and INITRD.is_file()),
        reason=f"qlink guest not built in {GUEST_DIR} "
        "(run guest/build-guest, or set QLINK_GUEST_DIR)",
    ),
]


def free_udp_ports(n: int) -> list[int]:
    """n distinct free UDP ports on 127.0.0.1 (free at the time of asking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Guest:
    """One QEMU guest with its serial console on a unix socket."""

    def __init__(self, name: str, workdir: Path, nic_args: list[str], append: str):
        self.name = name
        self.sock_path = workdir / f"{name}.con"
        self.log_path = workdir / f"{name}.log"
        self.qemu_log = workdir / f"{name}.qemu"
        self.qmp_path = workdir / f"{name}.qmp"
        self.argv = [
            QEMU,
            "-machine", "q35",
            "-accel", "tcg",
            "-cpu", "max",
            "-m", "256",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-kernel", str(KERNEL),
            "-initrd", str(INITRD),
            "-append", append,
            "-chardev",
            f"socket,id=con,path={self.sock_path},server=on,wait=off,"
            f"logfile={self.log_path},logappend=on",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            *nic_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.started = 0.0
        self.ready_after: float | None = None

    # -- process -------------------------------------------------------
    def start(self) -> None:
        with open(self.qemu_log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()  # SIGKILL to this PID only
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def powerdown(self, timeout: float = POWERDOWN_TIMEOUT) -> tuple[int, float]:
        """QMP system_powerdown (re-sent every 2 s, like qlink) until QEMU exits.

        Returns (QEMU's exit status, seconds from the first press to the exit).
        """
        proc = self.proc
        assert proc is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            start = time.monotonic()
            replies: list[object] = []
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            replies.append(json.loads(f.readline()))
            while True:
                if time.monotonic() - start > timeout:
                    raise AssertionError(
                        f"qemu of guest {self.name} still running {timeout:.0f} s after "
                        f"system_powerdown; QMP: {replies[-4:]}" + self.console_log()
                    )
                with contextlib.suppress(OSError):  # QEMU may be exiting
                    f.write(b'{"execute": "system_powerdown"}\n')
                    f.flush()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rc = proc.wait(timeout=2.0)
                    return rc, time.monotonic() - start

    def console_log(self, tail: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            data = b""
        qemu = b""
        with contextlib.suppress(OSError):
            qemu = self.qemu_log.read_bytes()
        text = data[-tail:].decode(errors="replace")
        if qemu:
            text += "\n--- qemu output ---\n" + qemu[-tail:].decode(errors="replace")
        return f"\n=== console of guest {self.name} (tail) ===\n{text}"

    # -- console -------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock_path))
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"cannot connect to console {self.sock_path}" + self.console_log()
                    ) from None
                time.sleep(0.05)
                continue
            s.setblocking(False)
            self.sock = s
            return

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"qemu of guest {self.name} exited with {self.proc.returncode}" + self.console_log()
            )

    def _fill(self, until: float) -> None:
        """Read what is available (waiting at most until `until`)."""
        assert self.sock is not None
        self.check_alive()
        wait = max(0.0, min(until - time.monotonic(), 0.5))
        r, _, _ = select.select([self.sock], [], [], wait)
        if r:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"console of guest {self.name} closed" + self.console_log())
            self.buf += data

    def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]:
        """Wait for regex `pattern` in the console output; consume up to it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"guest {self.name}: timed out after {timeout:.0f} s "
                    f"waiting for {pattern!r}" + self.console_log()
                )
            self._fill(deadline)

    def check_ready(self) -> bool:
        """True when the ready line has been seen (consumes the console buffer)."""
        if self.ready_after is not None:
            return True
        # The ready line may have been printed before we connected: the
        # logfile has everything.
        rx = re.compile(rb"qlink-ready name=(\S+)")
        m = rx.search(self.buf)
        if m is None:
            with contextlib.suppress(OSError):
                m = rx.search(self.log_path.read_bytes())
        if m is None:
            return False
        self.ready_after = time.monotonic() - self.started
        assert m.group(1).decode() == self.name, m.group(0)
        self.buf = b""
        return True

    def send(self, line: str) -> None:
        assert self.sock is not None
        data = (line + "\n").encode()
        while data:
            self.check_alive()
            _, w, _ = select.select([], [self.sock], [], 1.0)
            if w:
                data = data[self.sock.send(data) :]

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command on the console; return (exit status, output)."""
        tag = uuid.uuid4().hex[:12]
        # The terminal echoes the command line, so the marker is written split
        # ("M""K") and only the shell's output has it in one piece.
        self.send(f'{cmd}; echo "@@M""K{tag} rc=$?@@"')
        m = self.expect(rb"(?s)(.*?)@@MK" + tag.encode() + rb" rc=(\d+)@@", timeout)
        out = m.group(1).decode(errors="replace").replace("\r", "")
        # drop the prompt and the echoed command line
        echo_end = f'K{tag} rc=$?@@"'
        i = out.rfind(echo_end)
        if i >= 0:
            out = out[i + len(echo_end) :]
        out = out.split("\n", 1)[1] if "\n" in out else ""
        return int(m.group(2)), out

    def sync_shell(self, timeout: float = 30.0) -> None:
        """Wait until the interactive shell answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # a wide terminal: no line-editing wraps in the echoed input
                self.run("stty cols 1000 rows 50", timeout=3.0)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise


def wait_all_ready(gs: list[Guest], timeout: float = BOOT_TIMEOUT) -> None:
    """Wait for the ready line of every guest, reading all their consoles.

    Every connected console must be drained: QEMU's serial port stalls the
    guest once the console socket's buffer is full (the serial port writes
    byte by byte, so that is after a few hundred bytes), which slows its boot.
    """
    deadline = time.monotonic() + timeout
    while True:
        pending = [g for g in gs if not g.check_ready()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"guests {[g.name for g in pending]} not ready after {timeout:.0f} s"
                + "".join(g.console_log() for g in pending)
            )
        for g in gs:
            g.check_alive()
        socks = {g.sock: g for g in gs if g.sock is not None}
        readable, _, _ = select.select(list(socks), [], [], 0.5)
        for sock in readable:
            g = socks[sock]
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"console of guest {g.name} closed" + g.console_log())
            g.buf += data


@contextlib.contextmanager
def guests(*specs: tuple[str, list[str], str]) -> Iterator[list[Guest]]:
    """Start guests (name, nic args, append); always kill and reap them."""
    workdir = Path(tempfile.mkdtemp(prefix="qlg-", dir="/tmp"))
    started: list[Guest] = []
    ok = False
    try:
        for name, nic_args, append in specs:
            g = Guest(name, workdir, nic_args, append)
            g.start()
            started.append(g)
        yield started
        ok = True
    finally:
        for g in started:
            g.stop()
        if ok or not os.environ.get("QLINK_KEEP_TMP"):
            shutil.rmtree(workdir, ignore_errors=True)


def lldp_neighbors(g: Guest) -> dict[str, str]:
    rc, out = g.run("lldpcli show neighbors -f keyvalue")
    assert rc == 0, out
    kv = {}
    for line in out.splitlines():
        k, sep, v = line.strip().partition("=")
        if sep:
            kv[k] = v
    return kv


def test_two_guests_ping_and_lldp() -> None:
    pa, pb = free_udp_ports(2)
    nic_a = [
        "-device", "pci-bridge,id=br0,bus=pcie.0,addr=0x3,chassis_nr=1,shpc=off",
        "-netdev", f"socket,id=nd0,udp=127.0.0.1:{pb},localaddr=127.0.0.1:{pa}",
        "-device",
        "virtio-net-pci,netdev=nd0,bus=br0,addr=0x2,mac=52:54:00:71:00:01",
    ]  # fmt: skip
    nic_b = [
        "-device", "pci-bridge,id=br0,bus=pcie.0,addr=0x3,chassis_nr=1,shpc=off",
        "-device", "pci-bridge,id=br1,bus=pcie.0,addr=0x4,chassis_nr=2,shpc=off",
        "-netdev", f"socket,id=nd0,udp=127.0.0.1:{pa},localaddr=127.0.0.1:{pb}",
        "-device",
        "virtio-net-pci,netdev=nd0,bus=br1,addr=0x14,mac=52:54:00:71:00:02",
    ]  # fmt: skip
    common = "console=ttyS0 qlink.ifprefix=swp"
    with guests(
        ("a", nic_a, f"{common} qlink.name=a qlink.addr=swp1=10.0.1.0/31"),
        ("b", nic_b, f"{common} qlink.name=b qlink.addr=swp50=10.0.1.1/31"),
    ) as (a, b):
        for g in (a, b):
            g.connect()
        wait_all_ready([a, b])
        both_ready = time.monotonic()
        for g in (a, b):
            g.sync_shell()
            print(f"guest {g.name}: ready after {g.ready_after:.1f} s")

        # NIC naming by PCI position
        rc, out = a.run("ls /sys/class/net")
        assert rc == 0, out
        assert out.split() == ["lo", "swp1"], out
        rc, out = b.run("ls /sys/class/net")
        assert rc == 0, out
        assert out.split() == ["lo", "swp50"], out
        rc, out = b.run("ip -4 addr show dev swp50")
        assert "inet 10.0.1.1/31" in out, out

        deadline = both_ready + LLDP_TIMEOUT
        seen: dict[str, float] = {}
        last: dict[str, dict[str, str]] = {}
        while len(seen) < 2:
            for g, iface, peer, peer_port in (
                (a, "swp1", "b", "swp50"),
                (b, "swp50", "a", "swp1"),
            ):
                if g.name in seen:
                    continue
                kv = last[g.name] = lldp_neighbors(g)
                if (
                    kv.get(f"lldp.{iface}.chassis.name") == peer
                    and kv.get(f"lldp.{iface}.port.ifname") == peer_port
                ):
                    seen[g.name] = time.monotonic() - both_ready
            if len(seen) < 2:
                assert time.monotonic() < deadline, (
                    f"LLDP neighbours not seen within {LLDP_TIMEOUT:.0f} s "
                    f"(seen: {seen}); last: {last}"
                )
                time.sleep(1.0)
        print(f"LLDP neighbours after both ready: {seen}")

        rc, out = a.run("ping -c 3 -W 2 10.0.1.1", timeout=60)
        assert rc == 0, f"ping a -> b failed:\n{out}" + a.console_log()
        assert " 0% packet loss" in out, out

        # ACPI power button: the guest powers off and QEMU exits by itself
        rc, took = b.powerdown()
        print(f"guest b: QEMU exited {took:.1f} s after system_powerdown")
        assert rc == 0, f"qemu of guest b exited with {rc}" + b.console_log()
