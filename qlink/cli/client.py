"""The control API's client: HTTP/1.1 on the unix socket, with `socket` and `json` alone.

Every `qlinkctl` command pays for what it imports before it does anything, and `http.client`
alone (it brings the `email` package for its header parsing) was a quarter of what
`qlinkctl status` took. The control API needs little of HTTP, so this speaks that little:

- one request per connection (`Connection: close`): a command makes one or two requests, and
  a fresh unix socket connection costs microseconds;
- a response body framed by `Content-Length` (aiohttp's `json_response`), by the chunked
  transfer coding (a `StreamResponse`: the progress of `up`, captures, `logs -f`) or, failing
  both, by the end of the connection;
- bodies are read as they arrive, so streams reach the terminal as the daemon sends them.

Errors: nothing listening is `DaemonUnreachable` (exit 3); an error status is a `ControlError`
carrying it (or a `ConfigError` with the file's issues); a reply that breaks off is a
`ControlError` too, never a traceback.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

from qlink.errors import ConfigError, ConfigIssue, ControlError, DaemonUnreachable

# Only the type checker needs these (annotations are never evaluated), and `typing` would
# cost every qlinkctl command ~6 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

RECEIVE_SIZE = 65536
MAX_HEAD = 65536
"""A status line and headers larger than this are not from qlinkd."""

# What may appear in a request target as it is; anything else (a space, a control character,
# non-ASCII in a mistyped node name) is percent-encoded, so the request stays well-formed and
# the daemon answers "no such node" instead of the client failing on its own.
_TARGET_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/?&=:%+@!$'()*,;"
)


def request_target(path: str) -> str:
    return "".join(chr(byte) if byte in _TARGET_SAFE else f"%{byte:02X}" for byte in path.encode())


class ReplyBrokenOff(ControlError):
    """qlinkd closed the connection, or sent something that is not HTTP, mid-reply."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"the reply from qlinkd broke off: {what}", status=502)


class Response:
    """A response whose body is read as it arrives; close it (or use `with`) when done.

    Closing before the end hangs up, which is how a daemon's stream (a capture, `logs -f`)
    learns that nobody reads it any more.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()  # received, not yet consumed
        self.status, self.reason, self.headers = self._read_head()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        # Bytes left in the body (Content-Length) or in the current chunk; None: the body
        # runs to the end of the connection.
        self._left: int | None = None
        self._in_chunk = False  # a chunk's data was read: its closing CRLF comes next
        self._done = self.status in (204, 304) or 100 <= self.status < 200
        if self._done:
            return
        if self._chunked:
            self._left = 0  # the first chunk's size line comes first
        elif "content-length" in self.headers:
            length = self.headers["content-length"]
            if not length.isdigit():
                raise ReplyBrokenOff(f"bad Content-Length {length!r}")
            self._left = int(length)
            self._done = self._left == 0

    # --- reading the wire ---------------------------------------------------------------

    def _receive(self) -> bool:
        """Append what the socket has to the buffer; False at the end of the connection."""
        try:
            data = self._sock.recv(RECEIVE_SIZE)
        except TimeoutError as error:
            raise ReplyBrokenOff("no answer in time") from error
        except OSError as error:
            raise ReplyBrokenOff(error.strerror or str(error)) from error
        self._buffer += data
        return bool(data)

    def _line(self) -> bytes:
        """One CRLF-terminated line of the head or of the chunk framing, without the CRLF."""
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise ReplyBrokenOff("a header line is too long")
            if not self._receive():
                raise ReplyBrokenOff("the connection closed")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        version, _, rest = self._line().partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise ReplyBrokenOff(f"not an HTTP response: {version + b' ' + rest!r}")
        headers: dict[str, str] = {}
        size = 0
        while line := self._line():
            size += len(line)
            if size > MAX_HEAD:
                raise ReplyBrokenOff("the headers are too long")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(code), reason.decode("latin-1"), headers

    def _next_chunk(self) -> bool:
        """Start the next chunk of a chunked body; False after the last (and its trailers)."""
        if self._in_chunk and self._line():  # the CRLF that closes the previous chunk
            raise ReplyBrokenOff("a chunk is longer than it said")
        size_text = self._line().split(b";", 1)[0].strip()  # chunk extensions: ignored
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ReplyBrokenOff(f"bad chunk size {size_text!r}") from None
        if size == 0:
            while self._line():  # trailers, up to the empty line that ends the message
                pass
            self._done = True
            return False
        self._left, self._in_chunk = size, True
        return True

    # --- the body -----------------------------------------------------------------------

    def read1(self, limit: int = RECEIVE_SIZE) -> bytes:
        """The next bytes of the body, at most `limit`, as soon as there are some; b"" at its
        end. Blocks only while nothing of the body has arrived."""
        while not self._done:
            if self._chunked and self._left == 0 and not self._next_chunk():
                break
            if not self._buffer and not self._receive():
                if self._left is None:
                    self._done = True  # no framing: the end of the connection ends the body
                    break
                raise ReplyBrokenOff(f"the connection closed {self._left} bytes early")
            take = min(len(self._buffer), limit)
            if self._left is not None:
                take = min(take, self._left)
                self._left -= take
                self._done = self._left == 0 and not self._chunked
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            if piece:
                return piece
        return b""

    def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := self.read1():
            parts.append(piece)
        return b"".join(parts)

    def lines(self) -> Iterator[bytes]:
        """The body line by line (each with its newline), each as soon as it is complete."""
        pending = b""
        while piece := self.read1():
            *complete, pending = (pending + piece).split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    def __init__(self, socket_path: Path, timeout: float | None = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None
    ) -> Response:
        """Send one request; the response once its head has arrived. An error status is
        raised here, with the daemon's message and hint."""
        payload = json.dumps(body).encode() if body is not None else b""
        head = [
            f"{method} {request_target('/v1' + path)} HTTP/1.1",
            "Host: qlink",
            "Connection: close",
        ]
        if body is not None:
            head.append("Content-Type: application/json")
        if body is not None or method == "POST":
            head.append(f"Content-Length: {len(payload)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.socket_path))
                sock.sendall(request)
                response = Response(sock)
            except ReplyBrokenOff as error:
                # No status line came back: whatever holds the socket is not serving it.
                raise DaemonUnreachable(str(self.socket_path), error.what) from error
            except PermissionError as error:
                raise DaemonUnreachable(
                    str(self.socket_path), "permission denied (are you in its group?)"
                ) from error
            except OSError as error:
                raise DaemonUnreachable(
                    str(self.socket_path), error.strerror or str(error)
                ) from error
            if response.status >= 400:
                raise _error_from(response.status, response.read())
        except BaseException:
            sock.close()
            raise
        return response

    def get(self, path: str) -> Any:
        with self._send("GET", path, None, self.timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        # Stop ladders can take minutes (ACPI power-down, then quit, then signals).
        with self._send("POST", path, body, None) as response:
            return json.loads(response.read())

    def raw_stream(self, path: str) -> Response:
        """A GET whose body is bytes to pass on as they come (captures, logs)."""
        return self._send("GET", path, None, None)

    def stream(self, method: str, path: str, body: dict[str, Any] | None = None) -> Iterator[Any]:
        """JSON lines from a long operation, each as soon as the daemon sends it."""
        with self._send(method, path, body, None) as response:
            for line in response.lines():
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
    if not isinstance(body, dict):
        return ControlError(f"HTTP {status}: {body!r}", status)
    if body.get("issues"):
        return ConfigError(
            [
                ConfigIssue(i["file"], i.get("line"), i.get("field", ""), i["message"])
                for i in body["issues"]
            ]
        )
    return ControlError(str(body.get("error", f"HTTP {status}")), status, body.get("hint"))
