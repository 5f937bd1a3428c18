"""Launch readiness shares one inotify instance: the kernel allows only 128 per user, and a
200-VM lab launches more than that at once (qlinkd died there before)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from qlink.runtime.process import CreationWatcher


async def test_one_watcher_serves_more_launches_than_the_instance_limit(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    watcher = CreationWatcher()
    targets = [tmp_path / f"vm{index}" / "console.sock" for index in range(limit + 72)]
    try:
        async with asyncio.TaskGroup() as group:
            dispatcher = group.create_task(watcher.run())
            futures = []
            with contextlib.ExitStack() as stack:
                for target in targets:
                    target.parent.mkdir()
                    futures.append(stack.enter_context(watcher.expecting(target)))
                for target in targets:
                    target.touch()
                async with asyncio.timeout(10):
                    await asyncio.gather(*futures)
            dispatcher.cancel()
    finally:
        watcher.close()
    assert all(future.done() for future in futures)


async def test_a_watch_on_a_shared_directory_outlives_one_waiter(tmp_path: Path) -> None:
    watcher = CreationWatcher()
    try:
        async with asyncio.TaskGroup() as group:
            dispatcher = group.create_task(watcher.run())
            with watcher.expecting(tmp_path / "a") as first:
                with watcher.expecting(tmp_path / "b") as second:
                    (tmp_path / "b").touch()
                    async with asyncio.timeout(5):
                        await second
                assert not first.done()
                (tmp_path / "a").touch()
                async with asyncio.timeout(5):
                    await first
            dispatcher.cancel()
    finally:
        watcher.close()
