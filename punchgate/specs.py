"""Parsing of the user-facing specs: ``NAME=HOST:PORT``, ``PEER:SVC@HOST:PORT``, ``SVC@HOST:PORT``.

A service or tunnel spec may end in ``/udp`` (a UDP service: datagrams carried on the
stream) or ``/tcp`` (the default, the same as no suffix).

Every parser returns a small frozen value or raises :class:`SpecError` with a message
that says what is wrong with the value; the CLI adds the flag name and an example.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import multiaddr
from multiaddr.exceptions import Error as MultiaddrError

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


BASE58_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")
TRANSPORTS = ("tcp", "udp")


class SpecError(ValueError):
    """A user-supplied value does not parse."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ExposeSpec:
    """``--expose NAME=HOST:PORT``: serve the local TCP service at ``target`` as ``name``."""

    name: str
    target: HostPort
    transport: str = "tcp"  # "udp": ``NAME=HOST:PORT/udp``


@dataclass(frozen=True)
class TunnelSpec:
    """``--tunnel PEER_ID:SERVICE@BIND``: a local listener forwarding to a known peer."""

    peer_id: str
    service: str
    bind: HostPort
    transport: str = "tcp"  # "udp": ``…@HOST:PORT/udp``, a UDP socket at ``bind``


@dataclass(frozen=True)
class TunnelByNameSpec:
    """``--tunnel-by-name SERVICE@BIND``: a local listener forwarding to whoever provides SERVICE."""

    service: str
    bind: HostPort
    transport: str = "tcp"


def parse_service_name(text: str) -> str:
    if not SERVICE_NAME_RE.match(text):
        raise SpecError(
            f"service name {text!r} must be 1-63 characters of letters, digits, '.', '_' or '-'"
            " and start with a letter or digit"
        )
    return text


def parse_port(text: str) -> int:
    if not text.isdigit():
        raise SpecError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise SpecError(f"port {port} is out of range 1-65535")
    return port


def parse_host(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise SpecError(f"{text!r} is not an IPv6 address") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if HOSTNAME_RE.match(text):
        return text
    raise SpecError(f"{text!r} is not an IP address or host name")


def parse_host_port(text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise SpecError(f"{text!r} is not HOST:PORT")
    if ":" in host and not host.startswith("["):
        raise SpecError(f"{text!r}: write IPv6 addresses in brackets, as [::1]:PORT")
    return HostPort(parse_host(host), parse_port(port))


def parse_peer_id(text: str) -> str:
    """Check that ``text`` is a libp2p peer ID (multiaddr's /p2p codec validates it)."""
    if not BASE58_RE.match(text):  # also keeps out "ID/tcp/1", which multiaddr would read as two parts
        raise SpecError(f"{text!r} is not a valid peer ID")
    try:
        multiaddr.Multiaddr(f"/p2p/{text}")
    except (MultiaddrError, ValueError):
        raise SpecError(f"{text!r} is not a valid peer ID") from None
    return text


def split_transport(text: str) -> tuple[str, str]:
    """``HOST:PORT/udp`` -> (``HOST:PORT``, "udp"); without a suffix the transport is TCP."""
    head, sep, suffix = text.rpartition("/")
    if not sep:
        return text, "tcp"
    if suffix.lower() not in TRANSPORTS:
        raise SpecError(f"{text!r}: unknown transport {suffix!r} after '/' (use /tcp or /udp)")
    return head, suffix.lower()


def parse_expose(text: str) -> ExposeSpec:
    name, sep, target = text.partition("=")
    if not sep:
        raise SpecError(f"{text!r} has no '='")
    target, transport = split_transport(target)
    return ExposeSpec(parse_service_name(name), parse_host_port(target), transport)


def parse_tunnel(text: str) -> TunnelSpec:
    left, sep, bind = text.rpartition("@")
    if not sep:
        raise SpecError(f"{text!r} has no '@'")
    peer, sep, service = left.partition(":")
    if not sep:
        raise SpecError(f"{text!r} has no ':' between peer ID and service")
    bind, transport = split_transport(bind)
    return TunnelSpec(parse_peer_id(peer), parse_service_name(service), parse_host_port(bind), transport)


def parse_tunnel_by_name(text: str) -> TunnelByNameSpec:
    service, sep, bind = text.rpartition("@")
    if not sep:
        raise SpecError(f"{text!r} has no '@'")
    bind, transport = split_transport(bind)
    return TunnelByNameSpec(parse_service_name(service), parse_host_port(bind), transport)


def _parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except (MultiaddrError, ValueError) as exc:
        detail = " ".join(str(exc).split())  # the library's messages may span lines
        raise SpecError(f"{text!r} is not a multiaddr ({detail})") from None


def _transport_of(names: list[str]) -> str | None:
    """'tcp' or 'quic' for /ip*/…/tcp/N or /ip*/…/udp/N/quic-v1, else None."""
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return None
    if names[1] == "tcp" and len(names) == 2:
        return "tcp"
    if names[1:3] == ["udp", "quic-v1"] and len(names) == 3:
        return "quic"
    return None


def parse_listen_addr(text: str) -> multiaddr.Multiaddr:
    addr = _parse_multiaddr(text)
    names = [p.name for p in addr.protocols()]
    if not names or names[0] not in ("ip4", "ip6") or _transport_of(names) is None:
        raise SpecError(f"{text!r} is not a TCP or QUIC listen address")
    return addr


def parse_bootstrap_addr(text: str) -> multiaddr.Multiaddr:
    addr = _parse_multiaddr(text)
    names = [p.name for p in addr.protocols()]
    if not names or names[-1] != "p2p":
        raise SpecError(f"{text!r} does not end in /p2p/<PEER_ID>")
    if _transport_of(names[:-1]) is None:
        raise SpecError(f"{text!r} is not a TCP or QUIC address of a peer")
    return addr


def transport_of(addr: multiaddr.Multiaddr) -> str | None:
    """The transport ('tcp' or 'quic') of a plain IP address, ignoring a trailing /p2p."""
    try:
        names = [p.name for p in addr.protocols()]
    except MultiaddrError:  # bytes from a peer the library accepted but cannot read back
        return None
    if names and names[-1] == "p2p":
        names = names[:-1]
    return _transport_of(names)


def parse_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise SpecError(f"{text!r} is not a number of seconds") from None
    if not 1 <= seconds <= 86400:
        raise SpecError(f"{seconds:g} s is outside 1-86400 s")
    return seconds


def without_peer_id(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` without a trailing ``/p2p/<id>`` (an inner one, as in a circuit, stays)."""
    try:
        names = [p.name for p in addr.protocols()]
    except MultiaddrError:  # bytes from a peer the library accepted but cannot read back
        return addr
    if names and names[-1] == "p2p":
        text = str(addr)
        return multiaddr.Multiaddr(text[: text.rindex("/p2p/")])
    return addr
