"""Building the libp2p host and choosing the connection a tunnel stream rides on.

Decisions:

* **Noise is the only security protocol.** py-libp2p's default host also accepts
  ``/plaintext/2.0.0``, secio and TLS; a plaintext dialer would get an unencrypted
  session. We pass Noise alone, so negotiation with anything else fails.
* **Tunnel streams ride TCP connections** (direct, or relayed over TCP). py-libp2p
  0.8.1's QUIC drops data past its 2 MiB receive buffer and kills streams idle for
  30 s, so QUIC stays available for what is safe (identify, ping, discovery) while
  tunnels open their streams with :func:`open_stream_on` on a connection chosen by
  ``runtime/paths.py``, never on one the swarm picks.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.transport.quic.connection import QUICConnection
from libp2p.utils.varint import encode_delim

from punchgate import libp2p_fixes
from punchgate.runtime.addresses import AddressBook
from punchgate.specs import transport_of

DIAL_TIMEOUT = 10.0
NEGOTIATE_TIMEOUT = 10
PEERSTORE_TTL = 365 * 24 * 3600  # addresses given by the user do not expire


def check_ports_free(listen_addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Fail (OSError) if a fixed listen port is taken.

    py-libp2p listens with SO_REUSEPORT (hole punching dials from the listen port), so
    a second node on the same port would silently share it, the kernel splitting
    connections between the two. A probe without SO_REUSEPORT finds the owner.
    """
    for addr in listen_addrs:
        kind = transport_of(addr)
        port = int(addr.value_for_protocol("tcp" if kind == "tcp" else "udp"))
        if port == 0:
            continue
        ip6 = "/ip6/" in str(addr)
        host = addr.value_for_protocol("ip6" if ip6 else "ip4")
        family = socket.AF_INET6 if ip6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None


class NoRouteError(Exception):
    """No usable connection to a peer could be had."""


def build_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr],
    address_book: AddressBook | None = None,
) -> IHost:
    libp2p_fixes.install()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    wants_quic = any(transport_of(a) == "quic" for a in listen_addrs)
    return new_host(
        key_pair=key_pair,
        listen_addrs=list(listen_addrs),
        sec_opt={NOISE_PROTOCOL_ID: noise},
        enable_quic=wants_quic,
        negotiate_timeout=NEGOTIATE_TIMEOUT,
        addrs_factory=address_book if address_book is not None else AddressBook(),
    )


def connection_transport(conn: INetConn) -> str:
    """'relay', 'quic' or 'tcp' for a live connection."""
    if conn.get_connection_type() is ConnectionType.RELAYED:
        return "relay"
    if isinstance(conn.muxed_conn, QUICConnection):
        return "quic"
    return "tcp"


def live_connection(host: IHost, peer_id: ID, kind: str) -> INetConn | None:
    for conn in host.get_network().get_connections(peer_id):
        if not conn.is_closed and connection_transport(conn) == kind:
            return conn
    return None


async def dial_tcp(host: IHost, peer_id: ID, timeout: float = DIAL_TIMEOUT) -> INetConn:
    """A new direct TCP connection to one of ``peer_id``'s known TCP addresses."""
    addrs = [a for a in host.get_peerstore().addrs(peer_id) if transport_of(a) == "tcp"]
    if not addrs:
        raise NoRouteError(f"no TCP address known for peer {peer_id}")
    errors = []
    for addr in addrs:
        with trio.move_on_after(timeout) as scope:
            try:
                return await host.get_network().dial_addr(addr, peer_id)
            except Exception as exc:  # the swarm raises several types for a failed dial
                errors.append(f"{addr}: {exc}")
        if scope.cancelled_caught:
            errors.append(f"{addr}: timed out after {timeout:.0f}s")
    raise NoRouteError(f"cannot reach peer {peer_id} directly: {'; '.join(errors)}")


async def open_stream_on(conn: INetConn, protocol: str, request: bytes = b"") -> tuple[INetStream, bytes]:
    """Open a stream for ``protocol`` on this very connection (not one the swarm picks).

    Negotiation is pipelined ("lazy" multistream-select for one protocol): the
    multistream header, the protocol id and ``request`` (the protocol's first
    message, if any) go out in one write; then the peer's two answers are read,
    its header and the echo of ``protocol``. A peer that answers step by step
    sees the same bytes in the same order as from a client that waits, so this
    is wire-compatible; it only saves the round trip a client would spend
    waiting for the header. Returns the stream and any bytes the peer sent after
    its answers (they belong to ``protocol``). If the peer refuses ``protocol``
    (``na``) the stream is reset and ``MultiselectClientError`` raised; the
    request it never saw as such then makes it drop the stream.
    """
    stream = await conn.new_stream()
    try:
        with trio.move_on_after(NEGOTIATE_TIMEOUT) as scope:
            await stream.write(_NEGOTIATION_HEADER + encode_delim(protocol.encode()) + request)
            answers, rest = await _read_multistream_messages(stream, 2)
        if scope.cancelled_caught:
            raise MultiselectClientError(f"no multistream-select answer within {NEGOTIATE_TIMEOUT}s")
        if answers[0] != MULTISELECT_PROTOCOL_ID.encode():
            raise MultiselectClientError(f"peer does not speak {MULTISELECT_PROTOCOL_ID}: {answers[0]!r}")
        if answers[1] != protocol.encode():
            if answers[1] == PROTOCOL_NOT_FOUND_MSG.encode():
                raise MultiselectClientError(f"protocol not supported: {protocol}")
            raise MultiselectClientError(f"unrecognized answer to {protocol}: {answers[1]!r}")
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    stream.set_protocol(TProtocol(protocol))
    return stream, rest


_NEGOTIATION_HEADER = encode_delim(MULTISELECT_PROTOCOL_ID.encode())
_MAX_MULTISTREAM_MESSAGE = 64 * 1024


async def _read_multistream_messages(stream: INetStream, count: int) -> tuple[list[bytes], bytes]:
    """Read ``count`` multistream-select messages (uvarint length, text, newline);
    return their texts and the bytes that followed them."""
    buffer = b""
    messages: list[bytes] = []
    while True:
        while len(messages) < count:
            parsed = _split_message(buffer)
            if parsed is None:
                break
            message, buffer = parsed
            messages.append(message)
        if len(messages) == count:
            return messages, buffer
        try:
            data = await stream.read(4096)
        except StreamEOF:
            data = b""
        if not data:
            raise MultiselectClientError("stream ended during multistream-select")
        buffer += data


def _split_message(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first complete message in ``buffer`` (without its newline) and the rest, or None."""
    length = shift = 0
    for index, byte in enumerate(buffer[:10]):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        if len(buffer) >= 10:
            raise MultiselectClientError("malformed multistream-select length")
        return None  # the length itself is still incomplete
    if length > _MAX_MULTISTREAM_MESSAGE:
        raise MultiselectClientError(f"multistream-select message of {length} B")
    start = index + 1
    if len(buffer) < start + length:
        return None
    body = buffer[start : start + length]
    if not body.endswith(b"\n"):
        raise MultiselectClientError(f"multistream-select message without newline: {body[:80]!r}")
    return body[:-1], buffer[start + length :]
