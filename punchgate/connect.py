"""``punchgate connect [PEER_ID:]SERVICE``: standard input and output joined to a service
through the running node (its control socket), e.g. ``ssh -o ProxyCommand='punchgate
connect ssh' host``.

The client side of ``runtime/connect.py``; no trio or libp2p here, so it starts at once.
One request line, one answer line, then bytes both ways: standard input to the socket (its
end becomes a half-close, ``shutdown(SHUT_WR)``) and the socket to standard output (the
node's end closes standard output). It ends when both directions have ended.

Exit status: 0 when the session ended cleanly; 1 when no node runs, the node could not
reach the service (the reason on stderr) or the connection broke; 2 for bad usage.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from punchgate.control_client import NodeNotRunning, exchange
from punchgate.specs import SpecError, parse_peer_id, parse_service_name

ANSWER_TIMEOUT = 300.0  # the node answers within its --connect-timeout; this only bounds a hung node
MAX_ANSWER = 65536
CHUNK = 256 * 1024


class ConnectError(Exception):
    """The session could not be opened; ``str()`` is the line for the user."""


def parse_target(text: str) -> tuple[str, str | None]:
    """``SERVICE`` or ``PEER_ID:SERVICE`` -> (service, peer or None); raises SpecError."""
    peer, colon, service = text.rpartition(":")
    if colon:
        return parse_service_name(service), parse_peer_id(peer)
    return parse_service_name(text), None


def open_session(path: Path, service: str, peer: str | None, timeout: float = ANSWER_TIMEOUT) -> tuple[socket.socket, bytes, dict[str, Any]]:
    """Ask the node at ``path`` for a session; return the connected socket, bytes of the
    session that came with the answer, and the answer."""
    try:
        sock, answer, rest = exchange(
            path, {"op": "connect", "service": service, "peer": peer}, timeout, max_answer=MAX_ANSWER
        )
    except NodeNotRunning as exc:
        raise ConnectError(str(exc)) from None
    try:
        if not isinstance(answer, dict):
            raise ConnectError(f"the node at {path} sent no readable answer (is it an older punchgate?)")
        if "error" in answer:
            raise ConnectError(f"cannot reach {peer + ':' if peer else ''}{service}: {answer['error']}")
        sock.settimeout(None)
        return sock, rest, answer
    except BaseException:
        sock.close()
        raise


def relay_stdio(sock: socket.socket, first: bytes = b"", stdin_fd: int = 0, stdout_fd: int = 1) -> str | None:
    """Copy stdin -> sock and sock -> stdout until both end; None if clean, else what broke.

    After the node's end of file, standard input is still copied (a half-close) until it
    ends, unless the node closes the connection altogether (the session is over: POLLHUP),
    so an idle standard input never keeps a finished session alive."""
    problems: list[str] = []

    def upstream() -> None:
        try:
            while data := os.read(stdin_fd, CHUNK):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            problems.append(f"sending: {exc.strerror or exc}")

    sender = threading.Thread(target=upstream, name="stdin->node", daemon=True)
    sender.start()
    try:
        _write_all(stdout_fd, first)
        while data := sock.recv(CHUNK):
            _write_all(stdout_fd, data)
    except BrokenPipeError:
        # Whoever read our standard output stopped reading (`| head`): the session is of no
        # more use, and not in error. Leave without waiting for standard input.
        sock.close()
        return None
    except OSError as exc:
        problems.append(f"receiving: {exc.strerror or exc}")
    finally:
        try:
            os.close(stdout_fd)  # the node's end of file: our reader sees EOF
        except OSError:
            pass
    hangup = select.poll()
    hangup.register(sock, select.POLLHUP)
    while sender.is_alive() and not problems:
        if hangup.poll(200):
            break  # the node closed the session: nothing will read what stdin still has
        sender.join(0)
    sock.close()
    return "; ".join(problems) or None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str], control_socket: Path) -> int:
    """Run with an already parsed target; ``argv`` is [target]."""
    try:
        service, peer = parse_target(argv[0])
    except SpecError as exc:
        print(f"punchgate: error: connect {argv[0]!r}: {exc} (example: punchgate connect ssh)", file=sys.stderr)
        return 2
    try:
        sock, first, _ = open_session(control_socket, service, peer)
    except ConnectError as exc:
        print(f"punchgate: error: {exc}", file=sys.stderr)
        return 1
    problem = relay_stdio(sock, first)
    if problem is not None:
        print(f"punchgate: error: the session to {service} broke: {problem}", file=sys.stderr)
        return 1
    return 0
