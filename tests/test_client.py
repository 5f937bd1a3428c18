"""The control API's client against a real aiohttp server on a unix socket, and its HTTP
parsing against bytes written by hand (Content-Length, chunked, end of connection, broken
replies), with the exit codes qlinkctl gives each error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from qlink.cli.client import Client, ReplyBrokenOff, Response, request_target
from qlink.cli.common import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from qlink.cli.main import run
from qlink.errors import ConfigError, ControlError, DaemonUnreachable
from qlink.plan.paths import Layout


@pytest.fixture
def root() -> Iterator[Path]:
    """A root short enough for a unix socket path (pytest's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="qlc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(root: Path, routes: web.RouteTableDef) -> AsyncIterator[Client]:
    """An aiohttp server on the root's control socket, set up as qlinkd sets up its own."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    control = Layout.under(root).control_socket
    control.parent.mkdir(parents=True, exist_ok=True)
    await web.UnixSite(runner, str(control)).start()
    try:
        yield Client(control, timeout=10)
    finally:
        await runner.cleanup()


def response_to(raw: bytes, pieces: int = 1) -> Response:
    """A Response reading `raw`, written in `pieces` writes so that every boundary (a header
    line, a chunk size, a chunk's data) can fall between two reads."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    size = max(1, len(raw) // pieces)

    def write() -> None:
        with theirs:
            for start in range(0, len(raw), size):
                theirs.sendall(raw[start : start + size])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return Response(ours)
    finally:
        writer.join()


# --- parsing, byte by byte ----------------------------------------------------------------


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_content_length_body(pieces: int) -> None:
    raw = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Other: 1\r\n\r\n{"a": [1]}\nTRAILING'
    with response_to(raw, pieces) as response:
        assert (response.status, response.reason) == (200, "OK")
        assert response.headers["x-other"] == "1"
        assert response.read() == b'{"a": [1]}\n'  # not a byte past Content-Length
        assert response.read1() == b""


@pytest.mark.parametrize("pieces", [1, 5, 1000])
def test_chunked_body_with_extensions_and_trailers(pieces: int) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
        b"1;name=value\r\n \r\n"
        b"A\r\nworld\nline\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    with response_to(raw, pieces) as response:
        assert response.read() == b"hello world\nline"


def test_chunked_lines_come_whole_across_chunks() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n6\r\n: 1}\n{\r\n7\r\n"b": 2}\r\n0\r\n\r\n'
    )
    with response_to(raw, 3) as response:
        assert list(response.lines()) == [b'{"a": 1}\n', b'{"b": 2}']


def test_body_without_framing_runs_to_the_end_of_the_connection() -> None:
    with response_to(b"HTTP/1.0 200 OK\r\n\r\nall of it", 4) as response:
        assert response.read() == b"all of it"


def test_no_body_for_204() -> None:
    with response_to(b"HTTP/1.1 204 No Content\r\n\r\n") as response:
        assert response.read() == b""


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "7 bytes early"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "closed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n", "longer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
    ],
)
def test_a_broken_body_is_a_control_error(raw: bytes, what: str) -> None:
    with pytest.raises(ReplyBrokenOff, match=what) as caught, response_to(raw, 2) as response:
        response.read()
    assert isinstance(caught.value, ControlError)
    assert caught.value.status == 502


@pytest.mark.parametrize("raw", [b"", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: 1"])
def test_a_broken_head_is_refused(raw: bytes) -> None:
    with pytest.raises(ReplyBrokenOff):
        response_to(raw)


def test_request_targets_are_percent_encoded() -> None:
    assert request_target("/v1/nodes/lab/a b/logs?which=all&tail=3") == (
        "/v1/nodes/lab/a%20b/logs?which=all&tail=3"
    )
    assert request_target("/v1/nodes/é\r\n#x/start") == "/v1/nodes/%C3%A9%0D%0A%23x/start"


# --- against aiohttp ----------------------------------------------------------------------


async def test_get_post_and_a_strange_node_name(root: Path) -> None:
    routes = web.RouteTableDef()

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"nodes": [{"node": "a", "text": "é" * 10000}]})

    @routes.post("/v1/nodes/{node}/{verb}")
    async def verb(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response(
            {
                "node": request.match_info["node"],
                "query": dict(request.query),
                "body": body.decode(),
            }
        )

    async with serving(root, routes) as client:
        document = await asyncio.to_thread(client.get, "/status")
        assert document == {"nodes": [{"node": "a", "text": "é" * 10000}]}
        reply = await asyncio.to_thread(client.post, "/nodes/a b/stop?force=1")
        assert reply == {"node": "a b", "query": {"force": "1"}, "body": ""}
        reply = await asyncio.to_thread(client.post, "/nodes/x/qmp", {"execute": "quit"})
        assert json.loads(reply["body"]) == {"execute": "quit"}


async def test_stream_yields_each_event_as_it_is_sent(root: Path) -> None:
    """The second event is sent only once the client has shown it has the first: a client
    that waited for the end of the body would wait forever."""
    first_seen = asyncio.Event()
    routes = web.RouteTableDef()

    @routes.post("/v1/labs")
    async def up(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(json.dumps({"event": "plan", "lab": "x"}).encode() + b"\n")
        await first_seen.wait()
        await response.write(json.dumps({"event": "done", "failed": {}}).encode() + b"\n")
        await response.write_eof()
        return response

    loop = asyncio.get_running_loop()
    async with serving(root, routes) as client:
        events = client.stream("POST", "/labs", {"text": ""})
        assert await asyncio.to_thread(next, events) == {"event": "plan", "lab": "x"}
        loop.call_soon(first_seen.set)
        assert await asyncio.to_thread(list, events) == [{"event": "done", "failed": {}}]


async def test_an_error_event_in_a_stream_is_raised(root: Path) -> None:
    routes = web.RouteTableDef()

    @routes.delete("/v1/labs/{lab}")
    async def down(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"event": "node_state"}\n')
        await response.write(b'{"event": "error", "status": 409, "error": "busy"}\n')
        await response.write_eof()
        return response

    async with serving(root, routes) as client:
        events = client.stream("DELETE", "/labs/x")
        with pytest.raises(ControlError, match="busy") as caught:
            await asyncio.to_thread(list, events)
    assert caught.value.status == 409


async def test_closing_a_raw_stream_hangs_up_on_the_daemon(root: Path) -> None:
    """How `capture` and `logs -f` stop the daemon's side: the handler is cancelled."""
    handler_ended = asyncio.Event()
    routes = web.RouteTableDef()

    @routes.get("/v1/captures/{end}")
    async def capture(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.tcpdump.pcap"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"\xd4\xc3\xb2\xa1" * 256)
                await asyncio.sleep(0.01)
        finally:
            handler_ended.set()

    async with serving(root, routes) as client:
        response = await asyncio.to_thread(client.raw_stream, "/captures/a:eth1")
        received = b""
        while len(received) < 4096:
            received += await asyncio.to_thread(response.read1, 65536)
        assert received.startswith(b"\xd4\xc3\xb2\xa1")
        response.close()
        async with asyncio.timeout(10):
            await handler_ended.wait()


# --- errors and exit codes ----------------------------------------------------------------


def error_routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "no", "hint": "say yes"}, status=404)

    @routes.get("/v1/links")
    async def links(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "it broke"}, status=409)

    @routes.post("/v1/labs")
    async def up(request: web.Request) -> web.StreamResponse:
        issue = {"file": "lab.yaml", "line": 3, "field": "nodes.a", "message": "bad"}
        return web.json_response({"error": "invalid topology", "issues": [issue]}, status=400)

    @routes.post("/v1/nodes/{node}/start")
    async def start(request: web.Request) -> web.StreamResponse:
        return web.Response(text="plain text, not JSON", status=500)

    return routes


async def test_errors_carry_the_daemons_message_hint_and_issues(root: Path) -> None:
    async with serving(root, error_routes()) as client:
        with pytest.raises(ControlError) as caught:
            await asyncio.to_thread(client.get, "/status")
        assert (str(caught.value), caught.value.status, caught.value.hint) == ("no", 404, "say yes")
        with pytest.raises(ConfigError) as config:
            await asyncio.to_thread(list, client.stream("POST", "/labs", {"text": ""}))
        assert str(config.value) == "lab.yaml:3: nodes.a: bad"
        with pytest.raises(ControlError, match="plain text, not JSON"):
            await asyncio.to_thread(client.post, "/nodes/a/start")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["status"], EXIT_USAGE, "qlinkctl: no\nhint: say yes\n"),
        (["links"], EXIT_FAILED, "qlinkctl: it broke\n"),
        (["start", "a"], EXIT_FAILED, "qlinkctl: plain text, not JSON\n"),
    ],
)
async def test_exit_codes_of_daemon_errors(
    root: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    async with serving(root, error_routes()):
        assert await asyncio.to_thread(run, ["--root", str(root), *argv]) == code
    assert capsys.readouterr().err == message


async def test_a_bad_file_sent_to_up_exits_2_with_its_location(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = root / "lab.yaml"
    lab.write_text("name: x\n")
    async with serving(root, error_routes()):
        assert await asyncio.to_thread(run, ["--root", str(root), "up", str(lab)]) == EXIT_USAGE
    assert capsys.readouterr().err == "lab.yaml:3: nodes.a: bad\n"


def test_nobody_listening_exits_3(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--root", str(root), "status"]) == EXIT_UNREACHABLE
    assert "qlinkd is not answering on" in capsys.readouterr().err


def raw_server(root: Path, answer: Callable[[socket.socket], object]) -> threading.Thread:
    """A unix socket server that answers one connection with `answer`, as a broken or dying
    qlinkd would."""
    control = Layout.under(root).control_socket
    control.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control))
    listener.listen()
    listener.settimeout(10)  # a test that fails before it connects must not hang

    def serve() -> None:
        with listener, listener.accept()[0] as connection:
            connection.recv(65536)
            answer(connection)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_a_daemon_that_hangs_up_without_a_reply_is_unreachable(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = raw_server(root, lambda connection: None)
    assert run(["--root", str(root), "status"]) == EXIT_UNREACHABLE
    server.join()
    assert "the connection closed" in capsys.readouterr().err


def test_a_reply_that_breaks_off_fails(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def half(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")

    server = raw_server(root, half)
    assert run(["--root", str(root), "status"]) == EXIT_FAILED
    server.join()
    assert "broke off: the connection closed 99 bytes early" in capsys.readouterr().err


def test_a_reply_too_slow_is_unreachable(root: Path) -> None:
    answered = threading.Event()
    server = raw_server(root, lambda connection: answered.wait(10))
    client = Client(Layout.under(root).control_socket, timeout=0.2)
    with pytest.raises(DaemonUnreachable, match="no answer in time"):
        client.get("/status")
    answered.set()
    server.join()


def test_status_prints_what_the_daemon_sent(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"lab": "l", "node": "a", "state": "running", "pid": 7}]
    body = json.dumps({"nodes": rows}).encode()

    def chunked(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 10):
            piece = body[start : start + 10]
            connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.sendall(b"0\r\n\r\n")

    server = raw_server(root, chunked)
    assert run(["--root", str(root), "status", "-o", "json"]) == EXIT_OK
    server.join()
    assert json.loads(capsys.readouterr().out) == rows


# --- what the daemon verbs import ---------------------------------------------------------

# The planning stack, the console's client, psutil; and from the standard library what costs
# milliseconds that `status` has no use for.
HEAVY = ("pydantic", "yaml", "structlog", "aiohttp", "psutil", "http.client", "email",
         "subprocess", "typing", "dataclasses", "inspect")  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [["status"], ["status", "-o", "json"], ["links"], ["start", "a"], ["stop", "a"],
     ["restart", "a"], ["down", "x"], ["up", __file__], ["link", "down", "a:e1"]],
)  # fmt: skip
def test_daemon_verbs_import_nothing_heavy(root: Path, argv: list[str]) -> None:
    """Every command pays for its imports first: the daemon verbs load the client and none
    of the planning stack, the console's WebSocket client, or psutil."""
    script = (
        "import sys\n"
        "from qlink.cli.main import run\n"
        f"code = run(['--root', {str(root)!r}, *{argv!r}])\n"
        "print(code, ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    code, modules = done.stdout.split(" ", 1)
    assert int(code) == EXIT_UNREACHABLE, done.stderr  # it got as far as the socket
    loaded = [m for m in modules.split() if m.split(".")[0] in HEAVY or m.startswith(HEAVY)]
    assert not loaded, f"qlinkctl {' '.join(argv)} imported {loaded}"
