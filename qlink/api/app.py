"""The control API: HTTP + JSON on a unix socket, versioned paths, as Docker and Incus do.

    curl --unix-socket /run/qlink/qlinkd.sock http://qlink/v1/status

Long operations (`up`, `down`) answer with a stream of JSON lines (application/x-ndjson):
progress events, then one `{"event": "done", ...}`. Errors are JSON objects with `error`,
optional `issues` (file, line, field, message) and an HTTP status the CLI maps to exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from qlink.api.consoles import add_console_routes
from qlink.api.logs import logs_route
from qlink.api.streams import capture_route, events_route
from qlink.daemon import Daemon
from qlink.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    HostError,
    Invalid,
    LaunchError,
    NotFound,
    QlinkError,
    QmpCommandError,
    VmError,
)

API = "/v1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# The one place that turns the core's errors into HTTP statuses; the first match wins.
STATUS_OF: tuple[tuple[type[QlinkError], int], ...] = (
    (ConfigError, 400),
    (Invalid, 400),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (HostError, 409),
    (QmpCommandError, 422),
    (LaunchError, 500),
    (VmError, 500),
)


def _error_body(error: QlinkError) -> tuple[int, dict[str, Any]]:
    if isinstance(error, ConfigError):
        issues = [
            {"file": i.file, "line": i.line, "field": i.field, "message": i.message}
            for i in error.issues
        ]
        return 400, {"error": "invalid topology", "issues": issues}
    status = next((code for kind, code in STATUS_OF if isinstance(error, kind)), 409)
    body: dict[str, Any] = {"error": str(error)}
    if isinstance(error, QmpCommandError):
        body["error_class"] = error.error_class
    return status, body


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except QlinkError as error:
        status, body = _error_body(error)
        return web.json_response(body, status=status)
    except json.JSONDecodeError as error:
        return web.json_response({"error": f"request body is not JSON: {error}"}, status=400)


async def _stream(
    request: web.Request, events: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """Send events as JSON lines; an error before the first event is a plain error reply."""
    iterator = aiter(events)
    first = await anext(iterator)  # errors here become a normal JSON error response
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    await response.write(json.dumps(first).encode() + b"\n")
    try:
        async for event in iterator:
            await response.write(json.dumps(event).encode() + b"\n")
    except QlinkError as error:
        status, body = _error_body(error)
        await response.write(
            json.dumps({"event": "error", "status": status, **body}).encode() + b"\n"
        )
    await response.write_eof()
    return response


def build_app(daemon: Daemon) -> web.Application:
    routes = web.RouteTableDef()
    _lab_routes(routes, daemon)
    _node_routes(routes, daemon)
    app = web.Application(middlewares=[errors_as_json])
    app.add_routes(routes)
    add_console_routes(app, daemon)  # GET .../console (WebSocket), and the streams' shutdown
    app.router.add_get(API + "/nodes/{node:.+}/logs", logs_route)
    app.router.add_get(API + "/captures/{endpoint:.+}", capture_route)
    app.router.add_get(API + "/events", events_route)
    return app


def _lab_routes(routes: web.RouteTableDef, daemon: Daemon) -> None:
    @routes.get(f"{API}/status")
    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"nodes": daemon.status()})

    @routes.get(f"{API}/links")
    async def links(request: web.Request) -> web.StreamResponse:
        return web.json_response({"links": daemon.links()})

    @routes.get(f"{API}/labs")
    async def labs(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"labs": [{"name": lab.name, "source": lab.plan.source, "nodes": list(lab.plan.nodes)}
                      for lab in daemon.labs]}
        )  # fmt: skip

    @routes.post(f"{API}/labs")
    async def up(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise Invalid('body must be {"source": PATH, "text": YAML}')
        lab = await daemon.parse(body["text"], str(body.get("source", "<request>")))
        dry_run = request.query.get("dry_run", "0") not in ("0", "false", "")
        return await _stream(request, daemon.up(lab, dry_run=dry_run))

    @routes.delete(API + "/labs/{lab}")
    async def down(request: web.Request) -> web.StreamResponse:
        graceful = request.query.get("force", "0") in ("0", "false", "")
        return await _stream(request, daemon.down(request.match_info["lab"], graceful))


def _node_routes(routes: web.RouteTableDef, daemon: Daemon) -> None:
    @routes.post(API + "/nodes/{node:.+}/{verb:start|stop|restart}")
    async def node_verb(request: web.Request) -> web.StreamResponse:
        graceful = request.query.get("force", "0") in ("0", "false", "")
        status = await daemon.node_command(
            request.match_info["node"], request.match_info["verb"], graceful
        )
        return web.json_response({"node": request.match_info["node"], **status.as_dict()})

    @routes.post(API + "/links/{endpoint:.+}/{state:up|down}")
    async def link_state(request: web.Request) -> web.StreamResponse:
        row = await daemon.set_link(
            request.match_info["endpoint"], request.match_info["state"] == "up"
        )
        return web.json_response(row)

    @routes.post(API + "/nodes/{node:.+}/qmp")
    async def qmp(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("execute"), str):
            raise Invalid('body must be {"execute": COMMAND, "arguments": {...}}')
        arguments = body.get("arguments") or {}
        result = await daemon.qmp(request.match_info["node"], body["execute"], arguments)
        return web.json_response({"return": result})


async def serve_api(daemon: Daemon, socket_path: Path, ready: asyncio.Event) -> None:
    """Serve until cancelled; the socket is 0660 so that a `qlink` group can be given access."""
    # handler_cancellation: a client that hangs up (Ctrl-C on `capture`, `logs -f`) cancels
    # its handler, which is how long-running streams learn to clean up.
    runner = web.AppRunner(
        build_app(daemon), access_log=None, handle_signals=False, handler_cancellation=True
    )
    await runner.setup()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    # The root lock is held, so a socket file left here is a dead daemon's: replace it.
    socket_path.unlink(missing_ok=True)
    site = web.UnixSite(runner, str(socket_path))
    try:
        await site.start()
        os.chmod(socket_path, 0o660)
        ready.set()
        await asyncio.Future()
    finally:
        await runner.cleanup()
        with contextlib.suppress(OSError):
            socket_path.unlink()
