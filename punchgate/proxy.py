"""The proxy entry (``--proxy HOST:PORT``): SOCKS5 and HTTP CONNECT requests, parsed without I/O.

One port speaks both; the first byte tells them apart (0x05: SOCKS5, an ASCII letter: an
HTTP request line; 0x04, SOCKS4, is answered with SOCKS4's own rejection). The runtime
(``runtime/proxy.py``) reads bytes and calls these parsers until they return a request,
raise :class:`ProxyRefusal` (whose ``reply`` is the answer in the client's protocol, sent
before closing), or the read deadline passes.

* SOCKS5 (RFC 1928): a greeting offering "no authentication" (method 0x00; otherwise
  0xFF, no acceptable method), then ``CONNECT`` (other commands: reply 0x07) to a domain
  name (ATYP 0x03; what ``socks5h://`` sends), an IPv4 or an IPv6 address (those are never
  ours: 0x02). The port is ignored: the service decides where the connection goes.
* HTTP: ``CONNECT host:port HTTP/1.x`` and headers up to an empty line, at most
  :data:`MAX_HTTP_REQUEST` bytes and :data:`MAX_HTTP_HEADERS` header lines (431 beyond).
  Other methods are answered 405 (``Allow: CONNECT``), other versions 505, anything
  malformed 400.

Destinations (:func:`parse_destination`): ``SERVICE.punchgate`` reaches a provider of
SERVICE by name, ``SERVICE.PEER_ID.punchgate`` that peer (case kept: peer IDs are
base58). Anything else is refused: SOCKS5 0x02 (not allowed by ruleset), HTTP 403.

When the node cannot reach the service, :func:`classify_close` reads the session's close
event and reason and the failure is answered in the protocol's own terms
(:data:`SOCKS_REPLY`, :data:`HTTP_STATUS`): no provider -> 0x04 / 404, refused by the
provider -> 0x05 / 502, no path -> 0x03 / 502, no tunnel in time -> 0x06 / 504, node
shutting down -> 0x01 / 503.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from punchgate.specs import SpecError, parse_peer_id, parse_service_name

SUFFIX = ".punchgate"
MAX_HTTP_REQUEST = 8192  # request line + headers + the empty line
MAX_HTTP_HEADERS = 64
SOCKS5 = 0x05
SOCKS4 = 0x04
NO_AUTHENTICATION = 0x00
NO_ACCEPTABLE_METHOD = 0xFF
CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04

METHOD_ACCEPTED = bytes([SOCKS5, NO_AUTHENTICATION])
METHOD_REFUSED = bytes([SOCKS5, NO_ACCEPTABLE_METHOD])
SOCKS4_REJECTED = bytes([0x00, 0x5B, 0, 0, 0, 0, 0, 0])  # SOCKS4: "request rejected or failed"
HTTP_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class Failure(enum.Enum):
    GENERAL = "general failure"
    NOT_OURS = "not a punchgate destination"
    NO_PROVIDER = "no peer provides the service"
    REFUSED = "the provider refused"
    UNREACHABLE = "no path to the peer"
    TIMEOUT = "no tunnel in time"
    SHUTTING_DOWN = "the node is shutting down"


# RFC 1928 section 6 reply codes
SOCKS_REPLY = {
    Failure.GENERAL: 0x01,
    Failure.NOT_OURS: 0x02,  # connection not allowed by ruleset
    Failure.UNREACHABLE: 0x03,  # network unreachable
    Failure.NO_PROVIDER: 0x04,  # host unreachable
    Failure.REFUSED: 0x05,  # connection refused
    Failure.TIMEOUT: 0x06,  # TTL expired (what SOCKS servers answer for a timeout)
    Failure.SHUTTING_DOWN: 0x01,
}
SOCKS_COMMAND_NOT_SUPPORTED = 0x07
SOCKS_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

HTTP_STATUS = {
    Failure.GENERAL: 502,
    Failure.NOT_OURS: 403,
    Failure.NO_PROVIDER: 404,
    Failure.REFUSED: 502,
    Failure.UNREACHABLE: 502,
    Failure.TIMEOUT: 504,
    Failure.SHUTTING_DOWN: 503,
}
HTTP_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class ProxyRefusal(Exception):
    """The request cannot be served: ``str()`` says why; ``reply`` is the answer to send
    in the client's protocol before closing (empty: close without one)."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True)
class ConnectRequest:
    host: str
    port: int
    size: int  # bytes of input the request took; what follows is the client's data


@dataclass(frozen=True)
class Destination:
    service: str
    peer: str | None  # None: any provider of the service, found by name


def socks_reply(code: int) -> bytes:
    """A SOCKS5 reply; the bound address is 0.0.0.0:0 (clients do not use it for CONNECT)."""
    return bytes([SOCKS5, code, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0])


def http_reply(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 error answer with a one-line plain-text body; the connection closes after it."""
    body = (text + "\n").encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {status} {HTTP_PHRASES.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def failure_reply(protocol: str, failure: Failure, reason: str) -> bytes:
    if protocol == "socks5":
        return socks_reply(SOCKS_REPLY[failure])
    return http_reply(HTTP_STATUS[failure], reason)


def protocol_of(first: int) -> str | None:
    """'socks5', 'socks4' or 'http' from the first byte a client sends; None for anything else."""
    if first == SOCKS5:
        return "socks5"
    if first == SOCKS4:
        return "socks4"
    if 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:  # a method name starts with a letter
        return "http"
    return None


def parse_socks_greeting(data: bytes) -> int | None:
    """Bytes the greeting took, or None if more are needed. The answer to send is
    :data:`METHOD_ACCEPTED`; a refusal carries :data:`METHOD_REFUSED`."""
    if len(data) < 2:
        return None
    if data[0] != SOCKS5:
        raise ProxyRefusal(f"SOCKS version {data[0]} (only 5 is spoken here)", b"")
    count = data[1]
    if count == 0:
        raise ProxyRefusal("SOCKS5 greeting offers no authentication method", METHOD_REFUSED)
    if len(data) < 2 + count:
        return None
    if NO_AUTHENTICATION not in data[2 : 2 + count]:
        raise ProxyRefusal("SOCKS5 client does not offer 'no authentication'", METHOD_REFUSED)
    return 2 + count


def parse_socks_request(data: bytes) -> ConnectRequest | None:
    """The CONNECT request after the greeting, or None if more bytes are needed."""
    if len(data) < 4:
        if data and data[0] != SOCKS5:
            raise ProxyRefusal(f"SOCKS version {data[0]} in the request", socks_reply(SOCKS_REPLY[Failure.GENERAL]))
        return None
    version, command, _reserved, kind = data[0], data[1], data[2], data[3]
    if version != SOCKS5:
        raise ProxyRefusal(f"SOCKS version {version} in the request", socks_reply(SOCKS_REPLY[Failure.GENERAL]))
    if command != CONNECT:
        raise ProxyRefusal(f"SOCKS5 command {command} (only CONNECT)", socks_reply(SOCKS_COMMAND_NOT_SUPPORTED))
    if kind == ATYP_IPV4:
        end = 4 + 4
        host = str(ipaddress.IPv4Address(data[4:end])) if len(data) >= end else ""
    elif kind == ATYP_IPV6:
        end = 4 + 16
        host = str(ipaddress.IPv6Address(data[4:end])) if len(data) >= end else ""
    elif kind == ATYP_DOMAIN:
        if len(data) < 5:
            return None
        end = 5 + data[4]
        if data[4] == 0:
            raise ProxyRefusal("SOCKS5 request with an empty host name", socks_reply(SOCKS_REPLY[Failure.NOT_OURS]))
        host = data[5:end].decode("latin-1")
    else:
        raise ProxyRefusal(f"SOCKS5 address type {kind}", socks_reply(SOCKS_ADDRESS_TYPE_NOT_SUPPORTED))
    if len(data) < end + 2:
        return None
    port = int.from_bytes(data[end : end + 2], "big")
    return ConnectRequest(host, port, end + 2)


def _bad_request(reason: str, status: int = 400, headers: tuple[tuple[str, str], ...] = ()) -> ProxyRefusal:
    return ProxyRefusal(reason, http_reply(status, reason, headers))


def parse_http_connect(data: bytes) -> ConnectRequest | None:
    """``CONNECT host:port HTTP/1.x`` and its headers, or None if the empty line has not come yet."""
    ends = [(at, len(mark)) for mark in (b"\r\n\r\n", b"\n\n") if (at := data.find(mark)) >= 0]
    if not ends:
        if len(data) > MAX_HTTP_REQUEST:
            raise _bad_request(f"request longer than {MAX_HTTP_REQUEST} bytes", 431)
        return None
    at, mark = min(ends)
    size = at + mark
    if size > MAX_HTTP_REQUEST:
        raise _bad_request(f"request longer than {MAX_HTTP_REQUEST} bytes", 431)
    lines = data[:at].decode("latin-1").split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    if len(lines) - 1 > MAX_HTTP_HEADERS:
        raise _bad_request(f"more than {MAX_HTTP_HEADERS} header lines", 431)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise _bad_request("the request line is not METHOD TARGET HTTP/1.x")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _bad_request(f"{version[:20]!r}: only HTTP/1.0 and HTTP/1.1 are spoken here", 505)
    if method != "CONNECT":
        raise _bad_request(
            f"{method[:20]} is not served here: this proxy only tunnels (CONNECT; curl --proxytunnel)",
            405,
            (("Allow", "CONNECT"),),
        )
    for line in lines[1:]:
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _bad_request("a header line is not NAME: VALUE")
    host, port = _authority(target)
    return ConnectRequest(host, port, size)


def _authority(target: str) -> tuple[str, int]:
    if target.startswith("["):
        inside, bracket, rest = target[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise _bad_request(f"{target[:80]!r} is not HOST:PORT")
        host, port = inside, rest[1:]
    else:
        host, colon, port = target.rpartition(":")
        if not colon:
            raise _bad_request(f"{target[:80]!r} is not HOST:PORT")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or len(port) > 5:
        raise _bad_request(f"{target[:80]!r} is not HOST:PORT")
    return host, int(port)


def parse_destination(host: str) -> Destination:
    """``SERVICE.punchgate`` or ``SERVICE.PEER_ID.punchgate`` (a trailing dot allowed);
    raises :class:`ValueError` with the reason for anything else."""
    name = host[:-1] if host.endswith(".") else host
    if not name.lower().endswith(SUFFIX) or len(name) == len(SUFFIX):
        raise ValueError(f"{host[:80]!r} is not SERVICE.punchgate or SERVICE.PEER_ID.punchgate")
    inner = name[: -len(SUFFIX)]
    head, dot, last = inner.rpartition(".")
    if dot and head:
        try:
            peer = parse_peer_id(last)
        except SpecError:
            peer = None
        if peer is not None:
            try:
                return Destination(parse_service_name(head), peer)
            except SpecError as exc:
                raise ValueError(str(exc)) from None
    try:
        return Destination(parse_service_name(inner), None)
    except SpecError as exc:
        raise ValueError(str(exc)) from None


def classify_close(event: str, reason: str) -> Failure:
    """What kind of failure the state machine's ``CloseSession(event, reason)`` reports.

    The machine closes a session with "client tunnel rejected" when the provider (or every
    provider) refused, and "client tunnel error" otherwise: at its connect deadline
    ("no tunnel to … within N s", with "no peer provides this service" when nobody
    does), or at once when no path can carry a tunnel (a limited relay and no punch)."""
    if event == "client tunnel rejected":
        return Failure.REFUSED
    if "no peer provides this service" in reason:
        return Failure.NO_PROVIDER
    if reason.startswith("no tunnel to "):
        return Failure.TIMEOUT
    return Failure.UNREACHABLE
