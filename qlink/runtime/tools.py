"""Host tools qlinkd runs on the way to a launch (qemu-img, ssh-keygen), as asyncio
subprocesses: a launch waiting on one must not stall every other VM's supervision."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from qlink.errors import HostError


async def run_tool(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Run `argv` to completion: (exit status, stdout, stderr); killed past `timeout`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise HostError(f"cannot run {argv[0]}: {error}") from error
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
