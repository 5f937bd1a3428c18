"""Fixtures of the real-guest tests: the CLOS lab, once per test module that asks for it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GuestFiles, Qlinkd
from tests.guest.clos import BOOT_TIMEOUT, CONFIG, DAEMON_ARGS, ClosLab, take_down
from tests.guest.harness import wait_ready


@pytest.fixture(scope="module")
def clos(qemu_binary: str, guest_files: GuestFiles) -> Iterator[ClosLab]:
    """configs/clos.yaml up under a qlinkd of our own, all six guests ready.

    Teardown always downs the lab, stops the daemon and kills (by PID) any QEMU started
    under the root, whatever the tests did to the daemon or the lab's file.
    """
    root = Path(tempfile.mkdtemp(prefix="qlink-", dir="/tmp"))
    lab = ClosLab(root, Qlinkd(root, DAEMON_ARGS))
    try:
        lab.daemon.start()
        started = time.monotonic()
        lab.daemon.ctl_ok("up", str(CONFIG), timeout=300)
        lab.figure("up command", f"{time.monotonic() - started:.1f} s")
        lab.load_plan(CONFIG)
        ready = asyncio.run(wait_ready(lab.console_logs(), timeout=BOOT_TIMEOUT))
        lab.figure(
            "all six ready after up started",
            f"{max(ready.values()) - started:.1f} s (first {min(ready.values()) - started:.1f} s)",
        )
        yield lab
    finally:
        problems = take_down(lab)
        print(f"\nqlinkd logs: {sorted(str(p) for p in root.glob('qlinkd-*.log'))}")
        print("\n".join(f"FIGURE {name}: {value}" for name, value in lab.figures.items()))
        if os.environ.get("QLINK_KEEP_TMP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    assert not problems, problems
