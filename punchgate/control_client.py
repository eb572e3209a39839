"""One request to a running node over its control socket (``runtime/control.py``), as a
client: one JSON line out, one JSON line back. Used by ``punchgate status`` and the
service commands (``status.py``) and by ``punchgate connect`` (``connect.py``), which
keeps the socket for the session that follows. Plain sockets, no trio, libp2p or rich,
so the commands start at once.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

MAX_ANSWER = 4 << 20


class NodeNotRunning(Exception):
    """No node answers on the control socket; ``str()`` is the line for the user."""


def exchange(
    path: Path, request: dict[str, Any], timeout: float, max_answer: int = MAX_ANSWER
) -> tuple[socket.socket, Any, bytes]:
    """Send ``request`` as one JSON line to the node at ``path`` and read its answer line.

    Returns the still-open socket (the caller closes it), the decoded answer (None if it
    is not JSON) and the bytes that followed the answer line. Every way of not reaching
    the node raises :class:`NodeNotRunning` with the line for the user. Shared by
    ``punchgate status`` (and the other service commands) and ``punchgate connect``."""
    try:
        present = path.exists()
    except PermissionError:
        present = True  # connect() says it, in the same words as any other refusal
    if not present:
        raise NodeNotRunning(f"no punchgate node is running (no control socket at {path})")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = bytearray()
            while b"\n" not in data and len(data) < max_answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionRefusedError:
            raise NodeNotRunning(f"no punchgate node is running (stale control socket at {path})") from None
        except PermissionError:
            raise NodeNotRunning(f"cannot open the control socket {path}: permission denied (another user's node?)") from None
        except TimeoutError:
            raise NodeNotRunning(f"the node at {path} did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise NodeNotRunning(f"cannot reach the node at {path}: {exc.strerror or exc}") from None
        line, newline, rest = bytes(data).partition(b"\n")
        try:
            answer = json.loads(line) if newline else None
        except json.JSONDecodeError:
            answer = None
        return sock, answer, rest
    except BaseException:
        sock.close()
        raise
