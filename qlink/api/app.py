"""The control API: HTTP + JSON on a unix socket, versioned paths, as Docker and Incus do.

    curl --unix-socket /run/qlink/qlinkd.sock http://qlink/v1/status

Long operations (`up`, `down`) answer with a stream of JSON lines (application/x-ndjson):
progress events, then one `{"event": "done", ...}`. Errors are JSON objects with `error`,
optional `issues` (file, line, field, message), `hint` and `error_class` (QEMU's, for a QMP
command it refused), and an HTTP status the CLI maps to exit codes.

A request body is a client's input, and no input is a 500: every route that reads one does so
through `read_body`, which answers 400 with the reason to anything but a JSON object of the
route's fields, within the route's size and MAX_NESTING, in UTF-8 without lone surrogates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from qlink.api import peer
from qlink.api.consoles import add_console_routes
from qlink.api.logs import logs_route
from qlink.api.qmp_policy import QmpRefused, check_qmp
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
from qlink.sourcefile import MAX_TOPOLOGY_BYTES

API = "/v1"
WAIT_LIMIT = 24 * 3600.0

log = structlog.get_logger("qlinkd")

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
    if isinstance(error, QmpRefused):
        body["hint"] = error.instead
    return status, body


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except QlinkError as error:
        status, body = _error_body(error)
        return web.json_response(body, status=status)


# --- request bodies -----------------------------------------------------------------------

MAX_NESTING = 64
"""The deepest a body may nest (the body itself is level 1). No request needs more than a
handful; QMP arguments go on to QEMU, whose parser gives up at 1024 with an error that has no
id, and qemu.qmp ends the VM's QMP session on such an error (a "server parse failure")."""

LAB_BODY_LIMIT = 6 * MAX_TOPOLOGY_BYTES + 64 * 1024
"""Any topology text within its cap (in UTF-8 bytes) fits, however it is escaped. qlinkctl
sends `json.dumps` output, which is ASCII: a control character (1 byte in UTF-8) becomes
`\\u0001`, 6 bytes, the worst case; a 2-byte character becomes `\\u00e9` (3x), a 3-byte one
`\\u20ac` (2x), a 4-byte one a 12-byte surrogate pair (3x). The other 64 KiB hold the
envelope and a `source` path (PATH_MAX, 4096 bytes, even at 6x). 24.06 MiB in all."""

QMP_BODY_LIMIT = 64 * 1024
"""QEMU parses a command on its main loop at ~8.5 µs per JSON token (QEMU 7.2, measured: 100k
tokens 0.73 s, 500k 4.3 s), while the VM's QMP answers nothing else. 64 KiB is at most ~32k
tokens, under 0.3 s; no real command comes near it."""

CLIENT_MAX_SIZE = max(LAB_BODY_LIMIT, QMP_BODY_LIMIT)
"""aiohttp's own cap on any body (its default is 1 MiB, which refused valid labs)."""

_DECODE_INLINE = 64 * 1024
"""Bodies up to this size decode on the loop (well under a millisecond); larger ones, up to
LAB_BODY_LIMIT (tens of milliseconds), in a thread, as topology parsing does."""


@dataclass(frozen=True, slots=True)
class BodySpec:
    """What a route takes: its fields and their JSON types, which are required, a size."""

    shape: str
    """The body as the route's users know it, for error messages."""
    fields: Mapping[str, type]
    required: Collection[str]
    limit: int
    why_limit: str


LAB_BODY = BodySpec(
    '{"source": PATH, "text": YAML}', {"source": str, "text": str}, {"text"}, LAB_BODY_LIMIT,
    f"a topology file may be at most {MAX_TOPOLOGY_BYTES} bytes "
    f"({MAX_TOPOLOGY_BYTES // (1024 * 1024)} MiB)",
)  # fmt: skip
IMPAIR_BODY = BodySpec(
    '{"direction": "out"|"in"|"both", "settings": {"delay": "20ms", ...}, "clear": BOOL}',
    {"direction": str, "settings": dict, "clear": bool}, set(), 64 * 1024,
    "a link's impairment is a handful of short values",
)  # fmt: skip
QMP_BODY = BodySpec(
    '{"execute": COMMAND, "arguments": {...}}', {"execute": str, "arguments": dict},
    {"execute"}, QMP_BODY_LIMIT, "QEMU would parse a larger command with the VM's QMP on hold",
)  # fmt: skip


async def read_body(request: web.Request, spec: BodySpec) -> dict[str, Any]:
    """The request's body as `spec` says, or Invalid (400) saying what is wrong with it."""
    where = f"{request.method} {request.path}"
    declared = request.content_length
    if declared is not None and declared > spec.limit:
        raise Invalid(_too_big(where, f"{declared} bytes", spec))
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:  # no Content-Length: aiohttp counted
        raise Invalid(_too_big(where, f"over {CLIENT_MAX_SIZE} bytes", spec)) from error
    if len(raw) > spec.limit:
        raise Invalid(_too_big(where, f"{len(raw)} bytes", spec))
    if len(raw) <= _DECODE_INLINE:
        return decode_body(raw, spec, where)
    return await asyncio.to_thread(decode_body, raw, spec, where)


def _too_big(where: str, size: str, spec: BodySpec) -> str:
    return (
        f"{where}: the request body is {size}, more than the {spec.limit} bytes it takes: "
        f"{spec.why_limit}"
    )


def decode_body(raw: bytes, spec: BodySpec, where: str) -> dict[str, Any]:
    """Pure: UTF-8, then JSON, then its values (depth, strings), then its shape."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Invalid(
            f"{where}: the request body is not UTF-8: byte 0x{raw[error.start]:02x} "
            f"at byte offset {error.start}"
        ) from error
    value = _parse_json(text, where)
    _check_values(value, where)
    return _check_shape(value, spec, where)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(
            text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer
        )
    except RecursionError as error:
        # The C scanner stops at the interpreter's recursion limit, fast (100,000 levels:
        # 0.1 ms); whatever depth it reached, it is past MAX_NESTING.
        raise Invalid(_too_deep(where)) from error
    except _NotANumber as error:
        raise Invalid(f"{where}: the request body holds {error}") from error
    except json.JSONDecodeError as error:
        raise Invalid(f"{where}: the request body is not JSON: {error}") from error


class _NotANumber(Exception):
    """A number Python's json takes and QEMU's does not (or that Python cannot hold)."""


# QEMU's JSON has no NaN or Infinity: it would answer a parse error without an id, which ends
# the VM's QMP session (see MAX_NESTING). Python's json takes and writes both by default.
def _no_constant(name: str) -> Any:
    raise _NotANumber(f"{name}, which is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotANumber(f"{text}, which is out of range for a double")
    return number


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError as error:  # Python refuses over 4300 digits (CVE-2020-10735)
        raise _NotANumber(f"an integer of {len(text)} digits, too long to convert") from error


def _check_values(value: Any, where: str) -> None:
    """Depth and strings, iteratively: the value may be ~1000 levels deep, past what Python
    would recurse through from a handler."""
    pending: list[tuple[Any, tuple[str | int, ...]]] = (
        [(value, ())] if isinstance(value, dict | list) else []
    )
    while pending:
        container, path = pending.pop()
        if len(path) >= MAX_NESTING:
            raise Invalid(_too_deep(where, f" (at {_path_text(path)})"))
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(key, str):
                _check_string(key, (*path, key), where, "key")
            if isinstance(item, str):
                _check_string(item, (*path, key), where, "value")
            elif isinstance(item, dict | list):
                pending.append((item, (*path, key)))


def _too_deep(where: str, at: str = "") -> str:
    return f"{where}: the request body nests deeper than {MAX_NESTING} levels{at}"


def _check_string(text: str, path: tuple[str | int, ...], where: str, what: str) -> None:
    """A lone surrogate (`"\\ud800"`) decodes into a str that no UTF-8 encoder takes: the
    topology parser, a log line or QEMU (whose parser refuses it, ending the QMP session)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise Invalid(
            f"{where}: the {what} at {_path_text(path)} holds a lone surrogate "
            f"U+{ord(text[error.start]):04X} at character {error.start}: \\ud800-\\udfff "
            "escapes come in pairs in JSON text"
        ) from error


def _path_text(path: tuple[str | int, ...]) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return text.lstrip(".") or "the top"


_JSON_TYPE: Mapping[type, str] = {
    dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "a number",
    float: "a number", type(None): "null",
}  # fmt: skip


def _check_shape(value: Any, spec: BodySpec, where: str) -> dict[str, Any]:
    takes = f"{where} takes {spec.shape}"
    if not isinstance(value, dict):
        raise Invalid(f"{takes}, not {_JSON_TYPE[type(value)]}")
    unknown = sorted(set(value) - set(spec.fields))
    if unknown:
        raise Invalid(f"{takes}: no field {unknown[0]!r}")
    missing = [name for name in spec.required if name not in value]
    if missing:
        raise Invalid(f"{takes}: {missing[0]!r} is missing")
    for name, kind in spec.fields.items():
        if name in value and type(value[name]) is not kind:
            raise Invalid(
                f"{takes}: {name!r} must be {_JSON_TYPE[kind]}, not {_JSON_TYPE[type(value[name])]}"
            )
    return value


# --- replies -------------------------------------------------------------------------------


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


def build_app(daemon: Daemon, peer_uid: peer.PeerUid = peer.peer_uid) -> web.Application:
    """`peer_uid` tells who is calling (the QMP passthrough's policy depends on it)."""
    routes = web.RouteTableDef()
    _lab_routes(routes, daemon)
    _node_routes(routes, daemon, peer_uid)
    app = web.Application(middlewares=[errors_as_json], client_max_size=CLIENT_MAX_SIZE)
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
        body = await read_body(request, LAB_BODY)
        lab = await daemon.parse(body["text"], body.get("source", "<request>"))
        dry_run = request.query.get("dry_run", "0") not in ("0", "false", "")
        return await _stream(request, daemon.up(lab, dry_run=dry_run))

    @routes.delete(API + "/labs/{lab}")
    async def down(request: web.Request) -> web.StreamResponse:
        graceful = request.query.get("force", "0") in ("0", "false", "")
        return await _stream(request, daemon.down(request.match_info["lab"], graceful))


def _node_routes(routes: web.RouteTableDef, daemon: Daemon, peer_uid: peer.PeerUid) -> None:
    @routes.post(API + "/nodes/{node:.+}/{verb:start|stop|restart}")
    async def node_verb(request: web.Request) -> web.StreamResponse:
        graceful = request.query.get("force", "0") in ("0", "false", "")
        status = await daemon.node_command(
            request.match_info["node"], request.match_info["verb"], graceful
        )
        return web.json_response({"node": request.match_info["node"], **status.as_dict()})

    @routes.post(f"{API}/wait")
    async def wait(request: web.Request) -> web.StreamResponse:
        """`?node=N&node=M&timeout=S`: answered once they are ready (every node when none is
        named), or at the timeout with those that are not."""
        try:
            timeout = float(request.query.get("timeout", "300"))
        except ValueError:
            raise Invalid("timeout= is a number of seconds") from None
        if not 0 < timeout <= WAIT_LIMIT:
            raise Invalid(f"timeout= is more than 0 and at most {WAIT_LIMIT:g} seconds")
        nodes = request.query.getall("node", [])
        not_ready = await daemon.wait_ready(nodes, timeout)
        return web.json_response({"not_ready": not_ready})

    @routes.post(API + "/links/{endpoint:.+}/{state:up|down}")
    async def link_state(request: web.Request) -> web.StreamResponse:
        row = await daemon.set_link(
            request.match_info["endpoint"], request.match_info["state"] == "up"
        )
        return web.json_response(row)

    @routes.post(API + "/links/{endpoint:.+}/impair")
    async def link_impair(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, IMPAIR_BODY)
        if body.get("clear") and body.get("settings"):
            raise Invalid("give settings or clear, not both")
        settings = None if body.get("clear") else body.get("settings", {})
        row = await daemon.set_impair(
            request.match_info["endpoint"], body.get("direction", "both"), settings
        )
        return web.json_response(row)

    @routes.post(API + "/nodes/{node:.+}/qmp")
    async def qmp(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, QMP_BODY)
        node, command = request.match_info["node"], body["execute"]
        arguments: dict[str, Any] = body.get("arguments", {})
        uid = peer_uid(request)
        try:
            check_qmp(node, command, arguments, uid, os.geteuid())
        except QmpRefused as refused:
            log.warning("qmp_refused", node=node, command=command, uid=uid, why=refused.reason)
            raise
        # Every command let through, and who sent it; not its arguments, which may hold
        # secrets (object-add of a secret).
        log.info("qmp_passthrough", node=node, command=command, uid=uid)
        result = await daemon.qmp(node, command, arguments)
        return web.json_response({"return": result})


async def serve_api(
    daemon: Daemon,
    socket_path: Path,
    ready: asyncio.Event,
    peer_uid: peer.PeerUid = peer.peer_uid,
) -> None:
    """Serve until cancelled. The socket is 0660: its group may use the API, with the QMP
    passthrough limited to what `qmp_policy` opens to callers that are not root."""
    # handler_cancellation: a client that hangs up (Ctrl-C on `capture`, `logs -f`) cancels
    # its handler, which is how long-running streams learn to clean up.
    runner = web.AppRunner(
        build_app(daemon, peer_uid),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
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
