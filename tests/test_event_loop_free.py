"""Defect 4 of the architecture issue: qemu-img, ssh-keygen and the walk of the host's
sockets ran on the event loop, stalling every VM's supervision, every API call and every
console meanwhile. Each test runs the product path with the slow part made slower, while a
ticker measures the longest time the loop went unanswered."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from qlink.daemon import core, hooks
from qlink.daemon.hooks import DaemonHooks
from qlink.plan.paths import Layout
from qlink.runtime.ports import BusyPorts, ports_in_use
from qlink.runtime.process import create_overlay
from qlink.runtime.sshkey import ensure_ssh_credential
from tests.fakes import FakeRuntime
from tests.test_daemon_core import TRIANGLE, lab_of, serving

SLOW = 0.6
STALL_LIMIT = 0.2


async def longest_stall(work: Awaitable[Any]) -> float:
    """Run `work`; meanwhile tick every 10 ms and return the longest gap between ticks."""
    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        await work
    finally:
        ticking.cancel()
    return longest


def slow_tool(directory: Path, name: str, then: str) -> None:
    """A stand-in for a host tool that takes SLOW seconds, then does what `then` says."""
    directory.mkdir(exist_ok=True)
    tool = directory / name
    tool.write_text(f"#!/bin/sh\nsleep {SLOW}\n{then}\n")
    tool.chmod(0o755)


async def test_qemu_img_runs_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    slow_tool(bin_dir, "qemu-img", 'case "$1" in info) echo \'{"format": "qcow2"}\';; '
              'create) touch "$9";; esac')  # fmt: skip
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"QFI\xfb")
    started = time.monotonic()
    stall = await longest_stall(create_overlay(image, tmp_path / "overlay.qcow2"))
    assert time.monotonic() - started >= 2 * SLOW  # both tools ran, slowly
    assert (tmp_path / "overlay.qcow2").exists()
    assert stall < STALL_LIMIT


async def test_ssh_keygen_runs_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    real = "/usr/bin/ssh-keygen"
    slow_tool(bin_dir, "ssh-keygen", f'exec {real} "$@"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    layout = Layout.under(tmp_path)
    stall = await longest_stall(ensure_ssh_credential(layout.ssh_key, layout.ssh_credential))
    assert layout.ssh_credential.exists()
    assert stall < STALL_LIMIT


async def test_port_checks_and_the_socket_walk_run_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_walk(tcp: bool = True) -> BusyPorts:
        time.sleep(SLOW)
        return ports_in_use(tcp)  # the real walk: other labs may run beside the tests

    real_check = hooks.check_node_ports

    def slow_check(plan: Any) -> None:
        time.sleep(SLOW / 3)
        real_check(plan)

    monkeypatch.setattr(core, "host_ports_in_use", slow_walk)
    monkeypatch.setattr(hooks, "check_node_ports", slow_check)
    monkeypatch.setattr(core, "check_node_ports", slow_check)
    async with serving(tmp_path, FakeRuntime()) as daemon:
        assert isinstance(daemon.hooks, DaemonHooks)

        async def bring_up() -> None:
            events = [event async for event in daemon.up(lab_of(TRIANGLE))]
            assert events[-1]["failed"] == {}

        stall = await longest_stall(bring_up())
    assert stall < STALL_LIMIT
