"""The control API's client: HTTP/1.1 on a unix socket with the standard library only, so that
`qlinkctl status` starts in a few tens of milliseconds."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlink.errors import ConfigError, ConfigIssue, ControlError, DaemonUnreachable


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float | None) -> None:
        super().__init__("qlink", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path, timeout: float | None = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None
    ) -> http.client.HTTPResponse:
        connection = _UnixConnection(self.socket_path, timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            connection.request(method, f"/v1{path}", body=payload, headers=headers)
            response = connection.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise DaemonUnreachable(str(self.socket_path), error.strerror or str(error)) from error
        except PermissionError as error:
            raise DaemonUnreachable(
                str(self.socket_path), "permission denied (are you in its group?)"
            ) from error
        if response.status >= 400:
            raise _error_from(response.status, response.read())
        return response

    def get(self, path: str) -> Any:
        return json.loads(self._send("GET", path, None, self.timeout).read())

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        # Stop ladders can take minutes (ACPI power-down, then quit, then signals).
        return json.loads(self._send("POST", path, body, None).read())

    def raw_stream(self, path: str) -> http.client.HTTPResponse:
        """A GET whose body is bytes to pass on as they come (captures, logs)."""
        return self._send("GET", path, None, None)

    def stream(self, method: str, path: str, body: dict[str, Any] | None = None) -> Iterator[Any]:
        """JSON lines from a long operation, each as soon as the daemon sends it."""
        response = self._send(method, path, body, None)
        for line in response:
            if line.strip():
                event = json.loads(line)
                if event.get("event") == "error":
                    raise _error_from(int(event.get("status", 500)), json.dumps(event).encode())
                yield event


def _error_from(status: int, raw: bytes) -> Exception:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return ControlError(raw.decode(errors="replace").strip() or f"HTTP {status}", status)
    if body.get("issues"):
        return ConfigError(
            [
                ConfigIssue(i["file"], i.get("line"), i.get("field", ""), i["message"])
                for i in body["issues"]
            ]
        )
    return ControlError(str(body.get("error", f"HTTP {status}")), status, body.get("hint"))
