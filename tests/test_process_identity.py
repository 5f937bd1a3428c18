"""A process's identity (PID, start time, command line) as launch records it and adoption
checks it, both from /proc; on real processes (a sleeping Python), no QEMU needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import psutil
import pytest

from qlink.runtime.process import AdoptVerdict, ProcessIdentity, adopt
from qlink.runtime.procfs import read_cmdline, read_stat

# An argument with a space and an empty one: the command line is compared item by item.
ARGV = (sys.executable, "-c", "import time; time.sleep(60)", "a b", "")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(ARGV, stdin=subprocess.DEVNULL)
    yield process
    process.kill()
    process.wait()


def identity_of(process: subprocess.Popen[bytes]) -> ProcessIdentity:
    return ProcessIdentity(process.pid, read_stat(process.pid).start_time, ARGV)


def test_start_time_and_argv_are_what_psutil_says(sleeper: subprocess.Popen[bytes]) -> None:
    """Records written by a qlinkd that used psutil's create_time must still match."""
    assert read_stat(sleeper.pid).start_time == psutil.Process(sleeper.pid).create_time()
    assert read_cmdline(sleeper.pid) == tuple(psutil.Process(sleeper.pid).cmdline())
    assert read_cmdline(sleeper.pid) == ARGV


def test_the_recorded_process_is_adopted(sleeper: subprocess.Popen[bytes]) -> None:
    verdict, process = adopt(identity_of(sleeper))
    assert verdict is AdoptVerdict.ADOPTED
    assert process is not None
    assert process.pid == sleeper.pid
    process.send_signal(signal.SIGKILL)  # through its pidfd
    sleeper.wait()


def test_a_stranger_is_not_adopted(sleeper: subprocess.Popen[bytes]) -> None:
    """The PID is reused: by a process started at another time, or by another command."""
    recorded = identity_of(sleeper)
    for stranger in (replace(recorded, start_time=1.0), replace(recorded, argv=ARGV[:-1])):
        assert adopt(stranger) == (AdoptVerdict.STRANGER, None)


def test_a_zombie_and_a_reaped_process_are_gone(sleeper: subprocess.Popen[bytes]) -> None:
    recorded = identity_of(sleeper)
    os.kill(sleeper.pid, signal.SIGKILL)
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    assert read_stat(sleeper.pid).state == "Z"
    assert adopt(recorded) == (AdoptVerdict.GONE, None)
    sleeper.wait()
    assert adopt(recorded) == (AdoptVerdict.GONE, None)
