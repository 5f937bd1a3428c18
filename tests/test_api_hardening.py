"""Issue #15, hardening of the control API, over a daemon with a fake VM runtime:

1. no request body is a 500: malformed JSON of any depth or encoding is a 400 with a reason;
2. a lab file within the topology cap goes `up` however large, and a body past the API's
   limit is a clear 400 (exit 2), not aiohttp's raw 413;
3. the QMP passthrough runs only read-only and lab-operating commands for callers that are
   not root (SO_PEERCRED), and nothing that takes a VM out of qlink's hands for anyone;
4. `qlinkctl qmp` shows qlinkd's refusal and QEMU's error class, and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import io
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qlink.api import app as api_app
from qlink.api.app import LAB_BODY_LIMIT, MAX_NESTING, QMP_BODY_LIMIT, serve_api
from qlink.api.peer import PeerUid, peer_uid
from qlink.api.qmp_policy import OPEN, QmpRefused, check_qmp, is_open
from qlink.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from qlink.cli.main import build_parser
from qlink.daemon import Daemon
from qlink.errors import QmpCommandError
from qlink.plan.paths import Layout
from qlink.sourcefile import MAX_TOPOLOGY_BYTES
from tests.fakes import FakeRuntime
from tests.test_api import qlinkctl
from tests.test_daemon_core import TRIANGLE, serving, up

DEADLINE = 10.0
NOBODY = 65534


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qlh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def api(root: Path, uid: PeerUid = peer_uid) -> AsyncIterator[tuple[Daemon, FakeRuntime]]:
    """The real API app over a daemon with a fake runtime; `uid` says who each caller is."""
    runtime = FakeRuntime()
    async with serving(root, runtime) as daemon:
        ready = asyncio.Event()
        socket_path = Layout.under(root).control_socket
        task = asyncio.create_task(serve_api(daemon, socket_path, ready, peer_uid=uid))
        await ready.wait()
        try:
            yield daemon, runtime
        finally:
            task.cancel()
            await asyncio.wait({task})


def as_uid(uid: int) -> PeerUid:
    return lambda request: uid


def raw_http(socket_path: Path, method: str, path: str, body: bytes) -> tuple[int, Any]:
    """One request with exactly these bytes as its body; the status and the JSON answer."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: qlink\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(socket_path))
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"chunked" not in headers.lower(), reply[:500]
    try:
        return int(status_line.split()[1]), json.loads(payload)
    except json.JSONDecodeError:
        return int(status_line.split()[1]), payload.decode(errors="replace")


async def post(root: Path, path: str, body: bytes) -> tuple[int, Any]:
    socket_path = Layout.under(root).control_socket
    async with asyncio.timeout(DEADLINE):
        return await asyncio.to_thread(raw_http, socket_path, "POST", path, body)


def monitor_commands(runtime: FakeRuntime) -> list[str]:
    return [command for monitor in runtime.monitors for command in monitor.commands]


def nested(depth: int) -> str:
    """A body `depth` levels deep: the object, then arrays in its `arguments.x`."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return '{"execute": "query-status", "arguments": {"x": ' + inner + "}}"


# --- 1. no body is a 500 ------------------------------------------------------------------

BAD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not JSON": b"{text: 1}",
    "invalid UTF-8": b'{"text": "\xff\xfe"}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"text": "x"}',
    "lone high surrogate in a value": b'{"text": "name: x", "source": "\\ud800"}',
    "lone low surrogate in a key": b'{"\\udc00": 1}',
    "lone surrogate deep down": b'{"execute": "q", "arguments": {"a": [{"b": "x\\udbff"}]}}',
    "NaN": b'{"execute": "q", "arguments": {"a": NaN}}',
    "-Infinity": b'{"execute": "q", "arguments": {"a": -Infinity}}',
    "a float out of range": b'{"execute": "q", "arguments": {"a": 1e400}}',
    "a 5000-digit integer": b'{"execute": "q", "arguments": {"a": ' + b"9" * 5000 + b"}}",
    f"{MAX_NESTING + 1} levels": nested(MAX_NESTING + 1).encode(),
    "1000 levels": ("[" * 1000 + "]" * 1000).encode(),
    "100,000 levels of arrays": ("[" * 100_000 + "]" * 100_000).encode(),
    "100,000 levels of objects": ('{"a":' * 100_000 + "1" + "}" * 100_000).encode(),
    "an array": b"[]",
    "a string": b'"text"',
    "null": b"null",
    "an unknown field": b'{"text": "x", "execute": "quit"}',
    "text missing": b'{"source": "lab.yaml"}',
    "execute missing": b'{"arguments": {}}',
    "text a number": b'{"text": 5}',
    "source an array": b'{"text": "name: x", "source": ["a"]}',
    "execute an object": b'{"execute": {"quit": 1}}',
    "arguments an array": b'{"execute": "query-status", "arguments": [1]}',
    "arguments null": b'{"execute": "query-status", "arguments": null}',
}


@pytest.mark.parametrize("route", ["/v1/labs", "/v1/nodes/a/qmp"])
async def test_no_body_of_any_shape_is_a_500(root: Path, route: str) -> None:
    async with api(root, as_uid(0)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        for name, body in BAD_BODIES.items():
            status, answer = await post(root, route, body)
            assert status == 400, (name, status, answer)
            assert isinstance(answer, dict), (name, answer)
            assert answer["error"].startswith(f"POST {route}"), (name, answer)
        assert "query-status" not in monitor_commands(runtime)  # none reached QEMU


async def test_the_reasons_say_what_is_wrong(root: Path) -> None:
    async with api(root, as_uid(0)) as (daemon, _):
        await up(daemon, TRIANGLE)
        lab = {name: (await post(root, "/v1/labs", body))[1]["error"]
               for name, body in BAD_BODIES.items()}  # fmt: skip
        qmp = {name: (await post(root, "/v1/nodes/a/qmp", body))[1]["error"]
               for name, body in BAD_BODIES.items()}  # fmt: skip
    assert lab["invalid UTF-8"].endswith("not UTF-8: byte 0xff at byte offset 10")
    assert "lone surrogate U+DBFF at character 1" in qmp["lone surrogate deep down"]
    assert "at arguments.a[0].b" in qmp["lone surrogate deep down"]
    assert "nests deeper than 64 levels (at arguments.x" in qmp["65 levels"]
    assert lab["100,000 levels of objects"].endswith("nests deeper than 64 levels")
    assert "is 600001 bytes, more than the 65536 bytes" in qmp["100,000 levels of objects"]
    assert "NaN, which is not JSON" in qmp["NaN"]
    assert "1e400, which is out of range" in qmp["a float out of range"]
    assert "an integer of 5000 digits" in qmp["a 5000-digit integer"]
    assert lab["text a number"].endswith("'text' must be a string, not a number")
    assert qmp["arguments null"].endswith("'arguments' must be an object, not null")
    assert lab["an unknown field"].endswith("no field 'execute'")
    assert lab["execute missing"].endswith("no field 'arguments'")
    assert qmp["text missing"].endswith("no field 'source'")
    assert qmp["an array"] == (
        'POST /v1/nodes/a/qmp takes {"execute": COMMAND, "arguments": {...}}, not an array'
    )
    assert lab["empty"].startswith("POST /v1/labs: the request body is not JSON: Expecting value")


async def test_nesting_up_to_the_bound_reaches_qemu(root: Path) -> None:
    async with api(root, as_uid(0)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        status, _ = await post(root, "/v1/nodes/a/qmp", nested(MAX_NESTING).encode())
        assert status == 200
        assert monitor_commands(runtime).count("query-status") == 1


# --- 2. sizes -------------------------------------------------------------------------------


def big_lab(path: Path, size: int) -> Path:
    """TRIANGLE (with a kernel that exists) and comments, partly non-ASCII, which JSON
    escapes to 2-4 times its bytes, up to `size` bytes of UTF-8."""
    kernel = path.with_name("vmlinuz")
    kernel.write_bytes(b"")
    lines = [TRIANGLE.replace("kernel: /k", f"kernel: {kernel}")]
    filler = "# spine-to-leaf cabling, rack 12 — vérifié ✓ 🔌\n"
    count = (size - len(lines[0].encode())) // len(filler.encode())
    lines += [filler] * count
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_any_text_within_the_topology_cap_fits_the_body_limit() -> None:
    worst = {  # the longest JSON per UTF-8 byte that json.dumps (qlinkctl's encoder) writes
        "control characters": "\x01" * MAX_TOPOLOGY_BYTES,
        "2-byte characters": "é" * (MAX_TOPOLOGY_BYTES // 2),
        "3-byte characters": "€" * (MAX_TOPOLOGY_BYTES // 3),
        "4-byte characters": "🔌" * (MAX_TOPOLOGY_BYTES // 4),
    }
    source = "/" + "\x01" * 4095  # PATH_MAX, as badly escaped as it gets
    for name, text in worst.items():
        assert len(text.encode()) <= MAX_TOPOLOGY_BYTES, name
        body = json.dumps({"source": source, "text": text}).encode()
        assert len(body) <= LAB_BODY_LIMIT, (name, len(body))


async def test_a_valid_lab_file_of_1_5_mb_goes_up(root: Path, tmp_path: Path) -> None:
    lab = big_lab(tmp_path / "big.yaml", 1_500_000)
    assert lab.stat().st_size > 1_400_000
    assert len(json.dumps({"text": lab.read_text()})) > 2 * 1024 * 1024  # escaped, it grew
    async with api(root) as _:
        code, out, err = await qlinkctl(root, "validate", str(lab))
        assert (code, err) == (EXIT_OK, "")
        code, out, err = await qlinkctl(root, "up", str(lab))
        assert (code, err) == (EXIT_OK, ""), err
        assert re.search(r"tri\s+a\s+running", out)


async def test_a_body_past_the_limit_is_a_clear_error_and_exit_2(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit fits every file qlinkctl sends (above), so a smaller one stands in.
    small = dataclasses.replace(api_app.LAB_BODY, limit=1024 * 1024)
    monkeypatch.setattr(api_app, "LAB_BODY", small)
    lab = big_lab(tmp_path / "big.yaml", 1_500_000)
    async with api(root) as (daemon, _):
        code, _, err = await qlinkctl(root, "up", str(lab))
        assert code == EXIT_USAGE
        assert err.startswith("qlinkctl: POST /v1/labs: the request body is ")
        assert "more than the 1048576 bytes it takes: a topology file may be at most" in err
        assert "Maximum request body size" not in err
        assert daemon.status() == []


async def test_bodies_past_the_real_limits_are_refused_with_the_limit(root: Path) -> None:
    async with api(root, as_uid(0)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        status, answer = await post(root, "/v1/labs", b" " * (LAB_BODY_LIMIT + 1))
        assert status == 400
        assert answer["error"] == (
            f"POST /v1/labs: the request body is {LAB_BODY_LIMIT + 1} bytes, more than the "
            f"{LAB_BODY_LIMIT} bytes it takes: a topology file may be at most "
            f"{MAX_TOPOLOGY_BYTES} bytes (4 MiB)"
        )
        padded = b'{"execute": "query-status"' + b" " * QMP_BODY_LIMIT + b"}"
        status, answer = await post(root, "/v1/nodes/a/qmp", padded)
        assert status == 400
        assert f"more than the {QMP_BODY_LIMIT} bytes it takes" in answer["error"]
        assert monitor_commands(runtime) == []


async def test_aiohttps_own_413_becomes_a_json_400(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked body has no Content-Length; aiohttp counts it against client_max_size."""
    monkeypatch.setattr(api_app, "CLIENT_MAX_SIZE", 1000)
    async with api(root) as _:
        chunk = b" " * 4000
        request = (
            b"POST /v1/labs HTTP/1.1\r\nHost: qlink\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
        )  # fmt: skip

        def send() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(str(Layout.under(root).control_socket))
                sock.sendall(request)
                reply = b""
                while data := sock.recv(65536):
                    reply += data
                return reply

        reply = await asyncio.to_thread(send)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(payload)["error"] == (
        "POST /v1/labs: the request body is over 1000 bytes, more than the "
        f"{LAB_BODY_LIMIT} bytes it takes: a topology file may be at most "
        f"{MAX_TOPOLOGY_BYTES} bytes (4 MiB)"
    )


# --- 3. the QMP policy ------------------------------------------------------------------------


def refusal(command: str, arguments: dict[str, Any], uid: int | None) -> QmpRefused | None:
    try:
        check_qmp("a", command, arguments, uid, daemon_uid=0)
    except QmpRefused as refused:
        return refused
    return None


ROOT_ONLY_SAMPLES = [
    ("migrate", {"uri": "exec:touch /tmp/owned"}),
    ("human-monitor-command", {"command-line": "info status"}),
    ("dump-guest-memory", {"paging": False, "protocol": "file:/etc/shadow"}),
    ("screendump", {"filename": "/etc/passwd"}),
    ("migrate-set-parameters", {}),
    ("chardev-add", {}),
    ("object-add", {}),
    ("device_add", {}),
    ("netdev_add", {"type": "tap", "id": "t0", "script": "/tmp/x"}),
    ("blockdev-add", {}),
    ("drive-mirror", {}),
    ("add-fd", {}),
    ("getfd", {"fdname": "x"}),
    ("balloon", {"value": 1}),
    ("qom-set", {}),
    ("device_del", {"id": "mine"}),
    ("a-command-qemu-adds-next-year", {}),
]


@pytest.mark.parametrize(("command", "arguments"), ROOT_ONLY_SAMPLES)
def test_root_only_commands(command: str, arguments: dict[str, Any]) -> None:
    for uid in (1000, NOBODY, None):
        refused = refusal(command, arguments, uid)
        assert refused is not None, (command, uid)
        assert "for root only" in refused.reason
        assert refused.instead.startswith("run it as root")
    assert refusal(command, arguments, 0) is None
    assert refusal(command, arguments, 1000) is not None
    # qlinkd's own user gains nothing through QEMU that it lacks: it may.
    check_qmp("a", command, arguments, 1000, daemon_uid=1000)


@pytest.mark.parametrize(
    "command",
    [*OPEN, "query-status", "query-pci", "x-query-virtio", "qom-get"],
)
def test_read_only_and_lab_operating_commands_are_open(command: str) -> None:
    assert refusal(command, {}, NOBODY) is None
    assert refusal(command, {}, None) is None


def test_no_prefix_opens_more_than_it_says() -> None:
    assert not is_open("x-exit-preconfig")
    assert not is_open("querystatus")
    assert not is_open("query")


@pytest.mark.parametrize(
    ("command", "arguments", "instead"),
    [
        ("quit", {}, "qlinkctl stop a"),
        ("device_del", {"id": "nic-eth1"}, "qlinkctl link down"),
        ("device_del", {"id": "/machine/peripheral/nic-mgmt"}, "qlinkctl link down"),
        ("device_del", {"id": "qlink-br0"}, "qlinkctl link down"),
        ("netdev_del", {"id": "net-eth1"}, "qlinkctl link down"),
        ("netdev_del", {"id": "mgmt"}, "qlinkctl link down"),
        ("chardev-remove", {"id": "qmp"}, "qlinkd needs them"),
        ("object-del", {"id": "qlink-capture-3"}, "qlinkctl capture"),
        ("blockdev-del", {"node-name": "disk0"}, "qlinkctl stop a"),
    ],
)
def test_nobody_may_take_the_vm_out_of_qlinks_hands(
    command: str, arguments: dict[str, Any], instead: str
) -> None:
    for uid in (0, NOBODY):
        refused = refusal(command, arguments, uid)
        assert refused is not None
        assert "for root only" not in refused.reason
        assert instead in refused.instead


def test_every_id_qlink_gives_qemu_is_its_own() -> None:
    """Each id and node-name in every golden plan's argv (the ids the ownership check
    matches by pattern) is refused to `*_del` even for root: the patterns are not stale."""
    removal = {
        "-device": ("device_del", "id"),
        "-netdev": ("netdev_del", "id"),
        "-chardev": ("chardev-remove", "id"),
        "-blockdev": ("blockdev-del", "node-name"),
    }
    seen: set[str] = set()
    for golden in glob.glob(str(Path(__file__).parent / "golden" / "*.json")):
        for node in json.loads(Path(golden).read_text())["nodes"].values():
            argv = node["argv"]
            for flag, value in itertools.pairwise(argv):
                if flag not in removal:
                    continue
                command, key = removal[flag]
                for option in value.split(","):
                    name, _, target = option.partition("=")
                    if name == key:
                        seen.add(f"{flag} {target}")
                        assert refusal(command, {key: target}, 0) is not None, (flag, target)
    assert {"-device nic-eth1", "-netdev mgmt", "-chardev qmp", "-blockdev disk0"} <= seen


async def test_a_caller_that_is_not_root_cannot_reach_root_only_commands(root: Path) -> None:
    async with api(root, as_uid(1000)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        for command, arguments in ROOT_ONLY_SAMPLES[:3]:
            body = json.dumps({"execute": command, "arguments": arguments}).encode()
            status, answer = await post(root, "/v1/nodes/a/qmp", body)
            assert status == 403, (command, answer)
            assert answer["error"].startswith(f"QMP {command} refused: it is for root only")
            assert "this is uid 1000" in answer["error"]
            assert answer["hint"].startswith("run it as root")
        status, answer = await post(root, "/v1/nodes/a/qmp", b'{"execute": "query-status"}')
        assert (status, answer) == (200, {"return": {"status": "running", "running": True}})
        assert monitor_commands(runtime) == ["query-status"]


async def test_root_may_run_them(root: Path) -> None:
    async with api(root, as_uid(0)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        for command in ("query-status", "human-monitor-command"):
            body = json.dumps({"execute": command}).encode()
            assert (await post(root, "/v1/nodes/a/qmp", body))[0] == 200
        status, answer = await post(root, "/v1/nodes/a/qmp", b'{"execute": "quit"}')
        assert status == 403
        assert answer["hint"] == "stop it with `qlinkctl stop a` (or replace its QEMU: " \
            "`qlinkctl restart a`)"  # fmt: skip
        assert monitor_commands(runtime) == ["query-status", "human-monitor-command"]


def request_as(uid: int, gid: int, socket_path: Path, body: bytes) -> tuple[int, Any]:
    """`raw_http` from a forked child that has dropped to `uid` and `gid`: SO_PEERCRED, for
    real. The child only uses sockets and os, and always leaves by os._exit."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            status, answer = raw_http(socket_path, "POST", "/v1/nodes/a/qmp", body)
            os.write(write_end, json.dumps([status, answer]).encode())
        except BaseException as error:  # reported to the parent, never raised in the child
            os.write(write_end, json.dumps([-1, repr(error)]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reply = reader.read()
    os.waitpid(pid, 0)
    status, answer = json.loads(reply)
    return int(status), answer


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid takes root")
async def test_the_peer_uid_is_the_kernels_word(root: Path) -> None:
    """A child process in the socket's group (as a `qlink` group member would be), with
    uid 65534, is refused migrate to exec:; its query-status goes through; the test itself,
    root, may run human-monitor-command. No injected uid: SO_PEERCRED decides."""
    async with api(root) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        socket_path = Layout.under(root).control_socket
        for directory in (root, socket_path.parent):  # the group may reach the socket (0660)
            directory.chmod(0o750)
        group = socket_path.stat().st_gid
        migrate = {"execute": "migrate", "arguments": {"uri": f"exec:touch {root}/owned"}}
        async with asyncio.timeout(DEADLINE):
            status, answer = await asyncio.to_thread(
                request_as, NOBODY, group, socket_path, json.dumps(migrate).encode()
            )
            assert status == 403, answer
            assert f"this is uid {NOBODY}" in answer["error"]
            status, answer = await asyncio.to_thread(
                request_as, NOBODY, group, socket_path, b'{"execute": "query-status"}'
            )
            assert status == 200, answer
        status, _ = await post(root, "/v1/nodes/a/qmp", b'{"execute": "human-monitor-command"}')
        assert status == 200
        assert monitor_commands(runtime) == ["query-status", "human-monitor-command"]
        assert not (root / "owned").exists()


# --- 4. qlinkctl qmp ------------------------------------------------------------------------


async def test_qlinkctl_qmp_shows_the_refusal_and_exits_1(root: Path) -> None:
    async with api(root, as_uid(1000)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        code, out, err = await qlinkctl(root, "qmp", "a", "migrate", "uri=exec:id > /tmp/x")
        assert (code, out) == (EXIT_FAILED, "")
        lines = err.splitlines()
        assert lines[0].startswith("qlinkctl: QMP migrate refused: it is for root only")
        assert "an exec: URI runs a shell command" in lines[0]
        assert lines[1].startswith("hint: run it as root (sudo qlinkctl qmp ...)")
        code, _, err = await qlinkctl(root, "qmp", "a", "quit")
        assert code == EXIT_FAILED
        assert "hint: stop it with `qlinkctl stop a`" in err
        assert monitor_commands(runtime) == []


async def test_qlinkctl_qmp_shows_qemus_error_class(root: Path) -> None:
    async with api(root, as_uid(1000)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        for monitor in runtime.monitors:
            monitor.refuse["query-bogus"] = QmpCommandError(
                "query-bogus", "CommandNotFound", "The command query-bogus has not been found"
            )
        code, _, err = await qlinkctl(root, "qmp", "a", "query-bogus", "x=1")
        assert code == EXIT_FAILED
        assert err == (
            "qlinkctl: QMP query-bogus failed: CommandNotFound: "
            "The command query-bogus has not been found\n"
        )


async def test_qlinkctl_qmp_refuses_what_is_not_text_before_asking(root: Path) -> None:
    async with api(root, as_uid(0)) as (daemon, runtime):
        await up(daemon, TRIANGLE)
        # A byte that is not UTF-8 in argv reaches Python as a lone surrogate (surrogateescape).
        for argv in (["a", "qom-get", "path=\udcff"], ["a", "qom-\udcff"], ["a", "x", "k=1", "k=2"],
                     ["a", "qom-get", "=1"], ["a", "qom-get", "k=" + "[" * 100_000]):  # fmt: skip
            code, _, err = await qlinkctl(root, "qmp", *argv)
            assert code == EXIT_USAGE, (argv, err)
        code, _, err = await qlinkctl(root, "qmp", "a", "qom-get", "k=NaN")
        assert code == EXIT_USAGE
        assert "NaN, which is not JSON" in err
        assert monitor_commands(runtime) == []


def test_the_help_lists_what_is_open_to_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping, which breaks names at hyphens
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        build_parser().parse_args(["qmp", "--help"])
    description = " ".join(shown.getvalue().split())
    for command in OPEN:
        assert re.search(rf"\b{re.escape(command)}\b", description), command
