"""The control socket: a running node answers ``punchgate status`` on a Unix socket.

Protocol (one exchange per connection): the client sends one JSON line, the node answers
one JSON line and closes.

* ``{"op": "status"}`` -> the node's status object (see docs/ARCHITECTURE.md, "Control socket").
* ``{"op": "ping"}`` -> ``{"ok": true}``.
* ``{"op": "connect", "service": …, "peer": …}`` -> the connection becomes a tunnel
  session (``runtime/connect.py``, ``punchgate connect``): not limited to one exchange,
  and not counted among the :data:`MAX_CLIENTS` requests served at once.
* anything else -> ``{"error": "..."}``: an unknown op, a request that is not a JSON object,
  longer than :data:`MAX_REQUEST` bytes, or not complete within :data:`READ_DEADLINE` seconds.

Who can reach it: the socket file is 0600 inside a 0700 directory owned by the user
(the runtime directory by default), so only that user (and root) can connect. It is a
local Unix socket, never a libp2p protocol: peers cannot reach it.

The server knows nothing of how the status is gathered: it calls the ``status``
function it was given (``Node.status``) and serialises the plain dict it returns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from punchgate.logs import get_logger

MAX_REQUEST = 4096  # bytes, newline included
READ_DEADLINE = 2.0  # seconds for the whole request
WRITE_DEADLINE = 5.0
MAX_CLIENTS = 16  # connections served at once; more wait their turn
LOCK_WAIT = 5.0  # seconds a starting node waits for another one to finish creating its socket
DRAIN_DEADLINE = 1.0  # after answering, unread input is discarded for at most this long
DRAIN_READS = 64  # ... and at most this many reads

log = get_logger("punchgate.control")


class ControlSocketInUse(OSError):
    """Another live node answers on this socket path."""


def answer(request: bytes, status: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The answer to one request line (no I/O: the protocol in one function)."""
    try:
        message = json.loads(request.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"error": f"bad request: not JSON ({exc.__class__.__name__})"}
    if not isinstance(message, dict):
        return {"error": "bad request: expected a JSON object like {\"op\": \"status\"}"}
    op = message.get("op")
    if op == "status":
        try:
            return status()
        except Exception as exc:  # a bug in status() must not end the node
            log.error("status failed", reason=f"{type(exc).__name__}: {exc}")
            return {"error": f"status failed: {type(exc).__name__}: {exc}"}
    if op == "ping":
        return {"ok": True}
    return {"error": f"unknown op {op!r} (known: status, ping)"}


def _prepare_directory(directory: Path) -> None:
    """Create ``directory`` (0700) or check that an existing one is ours, then make it 0700."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"control socket directory {directory} belongs to another user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)


@contextmanager
def _setup_lock(path: Path) -> Iterator[None]:
    """Nodes starting at the same instant create their sockets one after the other: each
    sees the one before it live, never half-made (bound but not yet listening looks stale)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ControlSocketInUse(errno.EADDRINUSE, f"another punchgate node is creating {path}") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_live(path: Path) -> bool:
    """True if a process accepts connections on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # someone is there, just slow
    return True


Connect = Callable[[trio.SocketStream, dict[str, Any], bytes], Awaitable[None]]


class ControlServer:
    def __init__(self, path: Path, status: Callable[[], dict[str, Any]], connect: Connect | None = None) -> None:
        self.path = path
        self.status = status
        self.connect = connect  # takes over a connection whose request is {"op": "connect", ...}
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._limiter = trio.CapacityLimiter(MAX_CLIENTS)

    def bind(self) -> None:
        """Create the socket now (synchronously), so a bad path fails the start with OSError.

        A socket file left by a node that died is replaced; one that a live node answers
        on raises :class:`ControlSocketInUse`.
        """
        path = self.path
        _prepare_directory(path.parent)
        with _setup_lock(path):
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise OSError(errno.EEXIST, f"{path} exists and is not a socket; remove it or choose another path")
                if _is_live(path):
                    raise ControlSocketInUse(errno.EADDRINUSE, f"another punchgate node answers on {path}")
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                path.chmod(0o600)  # the 0700 directory already keeps others out in between
                sock.listen(MAX_CLIENTS)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise ControlSocketInUse(exc.errno, f"another punchgate node answers on {path}") from None
                raise OSError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None
            self._sock = sock
            self._inode = path.stat().st_ino

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        self._sock = None
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                log.info("control socket", path=str(self.path))
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            self.remove()

    def remove(self) -> None:
        """Remove the socket file if it is still the one we created."""
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            async with self._limiter:
                request, rest = await self._read_request(stream)
                takeover = self._connect_request(request)
                if takeover is None:
                    await self._reply(stream, request)
                    return
            assert self.connect is not None
            await self.connect(stream, takeover, rest)

    def _connect_request(self, request: bytes | dict[str, Any]) -> dict[str, Any] | None:
        """The parsed request if it is a connect request this server takes over, else None."""
        if self.connect is None or isinstance(request, dict):
            return None
        try:
            message = json.loads(request.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return message if isinstance(message, dict) and message.get("op") == "connect" else None

    async def _reply(self, stream: trio.SocketStream, request: bytes | dict[str, Any]) -> None:
        reply = request if isinstance(request, dict) else answer(request, self.status)
        data = json.dumps(reply, default=str).encode() + b"\n"
        with trio.move_on_after(WRITE_DEADLINE):
            try:
                await stream.send_all(data)
                await stream.send_eof()
                # Read what is left of an oversized request (bounded) before closing:
                # closing with unread input would reset the connection under the answer.
                with trio.move_on_after(DRAIN_DEADLINE):
                    for _ in range(DRAIN_READS):
                        if not await stream.receive_some(65536):
                            break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left; nothing to tell it

    @staticmethod
    async def _read_request(stream: trio.SocketStream) -> tuple[bytes | dict[str, Any], bytes]:
        """The request line, or an error answer (too long, too slow, connection broken),
        and the bytes that followed the line (a connect session's first data)."""
        buffer = bytearray()
        with trio.move_on_after(READ_DEADLINE):
            try:
                while b"\n" not in buffer:
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:
                        break  # a request without newline ends at EOF
                    buffer += data
                    if len(buffer) > MAX_REQUEST and b"\n" not in buffer:
                        return {"error": f"bad request: longer than {MAX_REQUEST} bytes"}, b""
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return {"error": "connection broken"}, b""
            line, _, rest = bytes(buffer).partition(b"\n")
            if len(line) >= MAX_REQUEST:
                return {"error": f"bad request: longer than {MAX_REQUEST} bytes"}, b""
            return line, rest
        return {"error": f"bad request: no complete request line within {READ_DEADLINE:.0f} s"}, b""
