"""qlinkctl's interop verbs against a stand-in control API: `up` of a DOT file sends the
converted qlink text, `inventory` and `ssh-config` read `status`, and `up --dry-run` prints
the boot order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from qlink.cli.common import EXIT_OK
from qlink.cli.main import run
from qlink.cli.render import progress_line
from tests.test_client import root, serving

__all__ = ["root"]  # the fixture, imported for this module's tests

DOT = Path(__file__).parent / "data" / "import" / "two-switch.dot"
ROWS: list[dict[str, Any]] = [
    {"lab": "dc1", "node": "leaf1", "ssh": "127.0.0.1:2201", "kind": "cumulus-vx",
     "stage": "leaf"},
    {"lab": "dc1", "node": "server1", "ssh": None, "kind": "linux", "stage": "host"},
]  # fmt: skip


@pytest.fixture(autouse=True)
def _logging_back_to_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()


async def test_up_of_a_dot_file_sends_its_qlink_conversion(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kinds = tmp_path / "kinds.yaml"
    kinds.write_text("kinds: {cumulus-vx: {kernel: /k}, linux: {kernel: /k}}\n")
    bodies: list[dict[str, Any]] = []
    routes = web.RouteTableDef()

    @routes.post("/v1/labs")
    async def up(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        plan = {"event": "plan", "lab": "dc1", "start": {"leaf1": "new"},
                "boot_order": [["leaf1", "leaf2"], ["server1"]]}  # fmt: skip
        for event in (plan, {"event": "done", "lab": "dc1", "failed": {}, "dry_run": True}):
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
        return response

    async with serving(root, routes):
        argv = ["--root", str(root), "up", str(DOT), "--kinds", str(kinds), "--dry-run"]
        assert await asyncio.to_thread(run, argv) == EXIT_OK
    [body] = bodies
    assert body["source"] == str(DOT.resolve())
    assert "# Made by `qlinkctl import` from two-switch.dot" in body["text"]
    assert "cumulus-vx: {kernel: /k}" in body["text"]
    assert "boot order: 1. leaf1, leaf2; 2. server1" in capsys.readouterr().out


async def test_inventory_and_ssh_config_read_status(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response({"nodes": ROWS})

    async with serving(root, routes):
        assert await asyncio.to_thread(run, ["--root", str(root), "inventory", "-o", "json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert listing["_meta"]["hostvars"]["leaf1"]["ansible_port"] == 2201
        assert listing["leaf"]["hosts"] == ["leaf1"]
        assert await asyncio.to_thread(run, ["--root", str(root), "ssh-config"]) == EXIT_OK
        captured = capsys.readouterr()
        assert "Host leaf1\n  HostName 127.0.0.1\n  Port 2201\n  User root\n" in captured.out
        assert "dc1/server1 has no SSH forward" in captured.err


def test_a_node_waiting_for_others_is_a_progress_line() -> None:
    event = {"event": "boot_wait", "lab": "l", "node": "leaf1", "waits_for": ["spine1"]}
    assert progress_line(event) == "  leaf1: waits for spine1 to be ready"
