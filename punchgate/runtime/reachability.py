"""Is this node reachable from outside? Another peer dials us back on a fresh connection.

Two protocols, asked in this order of a connected bootstrap peer:

* ``/punchgate/dialback/1.1.0``, ours: the client sends the TCP ports it listens on
  (``ports``) and its QUIC ones (``quic_ports``; servers that do not know the field
  ignore it); the server answers at once with the address it sees
  (``{"observed": "ip:port"}``), then dials ``/ip4/<that IP>/tcp/<port>`` with
  ``swarm.dial_addr`` (always a new connection, authenticated by Noise as the same
  peer) and ``/ip4/<that IP>/udp/<port>/quic-v1`` from a port other than its QUIC
  listener's (a packet from the listener's port would pass the client's NAT on the
  mapping of the connection the request came on), and answers
  ``{"reachable": bool, "observed": "ip:port"}``. The first answer tells, within one
  round trip, whether our NAT keeps our port (the observed port equals our end of the
  connection): DCUtR predicts our port as our listen port, so with a NAT that maps
  ports at random a hole punch cannot work and is not tried. (The final answer comes
  only when the dial-back worked or timed out, 3 s later behind a NAT.)
  ``/punchgate/dialback/1.0.0`` is the same without the first answer; both are served,
  and 1.0.0 is asked of a peer that does not speak 1.1.0.
* AutoNAT v1 (``/libp2p/autonat/1.0.0``), the standard that go-, rust- and js-libp2p
  nodes speak. We serve it too, with the library's service fixed to dial back on a new
  connection (``libp2p_fixes/autonat.py``).

A peer that speaks neither answers ``na``: the check ends at once with method "none",
and the state machine does not ask that peer again. Behind a NAT with a stateful
firewall a dial-back is dropped, so the answer is "not reachable" after the server's
dial timeout. Servers refuse requests over relayed connections and answer each peer at
most once per :data:`MIN_INTERVAL`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutonatMessage
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from punchgate.libp2p_fixes.autonat import FreshDialAutoNAT
from punchgate.logs import get_logger
from punchgate.runtime.addresses import interface_ips
from punchgate.runtime.handshake import read_message
from punchgate.runtime.multistream import open_stream_on
from punchgate.specs import transport_of
from punchgate.state.model import NatStatus
from punchgate.transports.quic.connection import QuicConn
from punchgate.transports.quic.transport import QuicTransport
from punchgate.wire import WireError, encode

PROTOCOL_ID = "/punchgate/dialback/1.1.0"
PROTOCOL_V1 = "/punchgate/dialback/1.0.0"
DIALBACK_TIMEOUT = 3.0
REQUEST_TIMEOUT = 15.0
MIN_INTERVAL = 10.0
MAX_PORTS = 4
AUTONAT_TIMEOUT = 20.0
MAX_AUTONAT_MESSAGE = 8 * 1024
IDENTIFY_WAIT = 3.0
IDENTIFY_POLL = 0.05

log = get_logger("punchgate.reachability")


@dataclass
class Verdict:
    status: NatStatus
    method: str  # "dialback", "autonat", or "none" (the peer speaks neither)
    port_preserving: bool | None = None
    details: dict = field(default_factory=dict)


class DialbackServer:
    """Answers dial-back requests from connected peers; also serves AutoNAT v1."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._last_answered: dict[tuple[ID, int, tuple[int, ...], tuple[int, ...]], float] = {}
        self.autonat = FreshDialAutoNAT(host, serve=True)  # type: ignore[arg-type]

    async def handle_stream(self, stream: INetStream) -> None:
        """``/punchgate/dialback/1.1.0``: the observed address at once, then the verdict."""
        await self._serve(stream, early=True)

    async def handle_stream_v1(self, stream: INetStream) -> None:
        await self._serve(stream, early=False)

    async def _serve(self, stream: INetStream, early: bool) -> None:
        try:
            answer = await self._answer(stream, early)
            await stream.write(encode(answer))
            await stream.close()
        except Exception:  # a broken or malicious requester: drop the stream
            try:
                await stream.reset()
            except Exception:
                pass

    async def _answer(self, stream: INetStream, early: bool) -> dict:
        peer = stream.muxed_conn.peer_id
        if stream.muxed_conn.get_connection_type() is ConnectionType.RELAYED:
            return {"error": "dial-back is not offered over relayed connections"}
        message, _ = await read_message(stream, REQUEST_TIMEOUT)
        ports, quic_ports = _port_list(message.get("ports")), _port_list(message.get("quic_ports", []))
        # Once per connection, question and MIN_INTERVAL (a node that restarted asks again on
        # its new connection at once; its own ports and its router's mapped ones are two
        # questions, asked at the same moment; asking more often needs a new Noise handshake).
        key = (peer, id(stream.muxed_conn), tuple(sorted(ports[:MAX_PORTS])), tuple(sorted(quic_ports[:MAX_PORTS])))
        now = trio.current_time()
        if now - self._last_answered.get(key, -MIN_INTERVAL) < MIN_INTERVAL:
            return {"error": "asked too often"}
        self._last_answered[key] = now
        if len(self._last_answered) > 4096:  # forget the oldest requesters
            for old in sorted(self._last_answered, key=self._last_answered.__getitem__)[:2048]:
                del self._last_answered[old]
        remote = stream.get_remote_address()
        if remote is None:
            return {"error": "cannot see your address"}
        ip = remote[0]
        family = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"
        observed = f"{ip}:{remote[1]}"
        if early:
            await stream.write(encode({"observed": observed}))
        candidates = [f"/{family}/{ip}/tcp/{port}" for port in ports[:MAX_PORTS]]
        candidates += [f"/{family}/{ip}/udp/{port}/quic-v1" for port in quic_ports[:MAX_PORTS]]
        for addr in candidates:
            with trio.move_on_after(DIALBACK_TIMEOUT):
                if await self._dial_back(multiaddr.Multiaddr(addr), peer):
                    return {"reachable": True, "observed": observed, "dialed": addr}
        return {"reachable": False, "observed": observed}

    async def _dial_back(self, addr: multiaddr.Multiaddr, peer: ID) -> bool:
        """Whether a new connection to ``peer`` at ``addr`` can be made (closed at once)."""
        quic = _quic_transport(self.host) if transport_of(addr) == "quic" else None
        conn: QuicConn | INetConn
        try:
            if quic is not None:
                conn = await quic.dial(addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")), fresh_port=True)
            else:
                conn = await self.host.get_network().dial_addr(addr, peer)
        except Exception:  # refused, unreachable, wrong peer
            return False
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await conn.close()
        return True


async def check(
    host: IHost, server: ID, on_mapping: Callable[[bool], None] = lambda keeps: None, ports: list[int] | None = None
) -> Verdict:
    """Ask ``server`` whether we are reachable, with the first protocol it speaks: on our
    listen ports, or on ``ports`` (the external ports our router maps to us).

    ``on_mapping(port_preserving)`` is called as soon as that is known (before the verdict)."""
    conn = _direct_connection(host, server)
    if conn is None:
        return Verdict(NatStatus.UNKNOWN, "dialback", details={"error": "not connected directly"})
    if ports is None:
        ports, quic_ports = _listen_ports(host, "tcp"), _listen_ports(host, "quic")
        keeps = await _mapping_from_identify(host, conn)
        if keeps is not None:
            on_mapping(keeps)
    else:
        quic_ports = []  # the external TCP ports our router maps to us: a question of their own
    if not ports and not quic_ports:
        return Verdict(NatStatus.UNKNOWN, "none", details={"error": "no TCP or QUIC listen address"})
    for protocol in (PROTOCOL_ID, PROTOCOL_V1):
        try:
            return await _dialback(conn, ports, quic_ports, protocol, on_mapping)
        except MultiselectClientError as exc:
            if "not supported" not in str(exc):
                raise
    try:
        return await _autonat(host, conn, ports, quic_ports)
    except MultiselectClientError as exc:
        if "not supported" not in str(exc):
            raise
    return Verdict(NatStatus.UNKNOWN, "none", details={"error": "speaks neither dial-back protocol"})


async def _dialback(
    conn: INetConn, ports: list[int], quic_ports: list[int], protocol: str, on_mapping: Callable[[bool], None]
) -> Verdict:
    limit = REQUEST_TIMEOUT + DIALBACK_TIMEOUT * 2 * MAX_PORTS
    request = {"ports": ports, "quic_ports": quic_ports} if quic_ports else {"ports": ports}
    with trio.fail_after(limit):
        stream, rest = await open_stream_on(conn, protocol, encode(request))
        local = _local_address(stream)
        try:
            while True:  # 1.1.0: {"observed"} first, then the verdict (or an error)
                answer, rest = await read_message(stream, limit, already_read=rest)
                port_preserving = _keeps_port(answer, local)
                if "reachable" in answer or "error" in answer:
                    break
                if port_preserving is not None:
                    on_mapping(port_preserving)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
    if "error" in answer:
        return Verdict(NatStatus.UNKNOWN, "dialback", details=answer)
    if local is not None:
        answer["local"] = f"{local[0]}:{local[1]}"
    status = NatStatus.PUBLIC if answer.get("reachable") is True else NatStatus.PRIVATE
    return Verdict(status, "dialback", port_preserving, answer)


def _keeps_port(answer: dict, local: tuple[str, int] | None) -> bool | None:
    """Whether the port the helper sees is our end's (our NAT keeps ports), if it can tell."""
    observed = str(answer.get("observed", ""))
    if local is None or not observed.rpartition(":")[2].isdigit():
        return None
    return int(observed.rpartition(":")[2]) == local[1]


async def _autonat(host: IHost, conn: INetConn, ports: list[int], quic_ports: list[int]) -> Verdict:
    request = AutonatMessage()
    request.type = AutonatMessage.DIAL
    request.dial.peer.id = host.get_id().to_bytes()
    for addr in _candidate_addrs(host, ports, quic_ports):
        request.dial.peer.addrs.append(addr.to_bytes())
    with trio.fail_after(AUTONAT_TIMEOUT):
        stream, early = await open_stream_on(conn, AUTONAT_PROTOCOL_ID, encode_varint_prefixed(request.SerializeToString()))
        try:
            data = await read_varint_prefixed_bytes_limited(_Prefixed(stream, early), MAX_AUTONAT_MESSAGE)  # type: ignore[arg-type]  # it only reads
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
    answer = AutonatMessage()
    answer.ParseFromString(data)
    status = answer.dialResponse.status
    details: dict[str, str | None] = {
        "status": AutonatMessage.ResponseStatus.Name(status), "text": answer.dialResponse.statusText
    }
    if status == AutonatMessage.OK:
        details["dialed"] = str(multiaddr.Multiaddr(answer.dialResponse.addr)) if answer.dialResponse.addr else None
        return Verdict(NatStatus.PUBLIC, "autonat", details=details)
    if status == AutonatMessage.E_DIAL_ERROR:
        return Verdict(NatStatus.PRIVATE, "autonat", details=details)
    # Refused (e.g. none of our addresses matches the IP it sees), bad request, internal error.
    return Verdict(NatStatus.UNKNOWN, "autonat", details=details)


class _Prefixed:
    """A stream whose first bytes were already read (``early``): reads give those first."""

    def __init__(self, stream: INetStream, early: bytes) -> None:
        self.stream = stream
        self.early = early

    async def read(self, n: int | None = None) -> bytes:
        if self.early:
            size = len(self.early) if n is None else n
            data, self.early = self.early[:size], self.early[size:]
            return data
        return await self.stream.read(n)


async def _mapping_from_identify(host: IHost, conn: INetConn) -> bool | None:
    """Whether our NAT keeps ports, from the address the peer's identify says it sees us
    at on ``conn`` (every libp2p node sends it), compared with our end of ``conn``.

    Identify runs as the connection opens; there is no event for its answer, so this
    looks for it every :data:`IDENTIFY_POLL` s, at most :data:`IDENTIFY_WAIT` s."""
    local = _local_address_of(conn)
    manager = getattr(host, "_observed_addr_manager", None)
    if local is None or manager is None:
        return None
    with trio.move_on_after(IDENTIFY_WAIT):
        while True:
            seen = manager._conn_observations.get(id(conn))  # (local, observed, group, ref)
            if seen is not None and seen[3]() is conn:
                port = _port_of(str(seen[1]))
                return port == local[1] if port is not None else None
            await trio.sleep(IDENTIFY_POLL)
    return None


def _port_list(value: object) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in value):
        raise WireError("ports must be a list of port numbers")
    return value


def _port_of(addr: str) -> int | None:
    """The TCP or UDP port of an address string (``/ip4/1.2.3.4/udp/4001/quic-v1`` -> 4001)."""
    parts = addr.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("tcp", "udp") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _local_address_of(conn: INetConn) -> tuple[str, int] | None:
    """Our end of a direct connection: the QUIC endpoint's, or the TCP socket's under Noise."""
    muxed = conn.muxed_conn
    if isinstance(muxed, QuicConn):
        return muxed.get_local_address()
    secured = getattr(muxed, "secured_conn", None)
    get_local = getattr(secured, "get_local_address", None)
    return get_local() if callable(get_local) else None


def _quic_transport(host: IHost) -> QuicTransport | None:
    for transport in host.get_network().transport_manager.get_transports():  # type: ignore[attr-defined]
        if isinstance(transport, QuicTransport):
            return transport
    return None


def _direct_connection(host: IHost, peer: ID) -> INetConn | None:
    for conn in host.get_network().get_connections(peer):
        if not conn.is_closed and conn.get_connection_type() is not ConnectionType.RELAYED:
            return conn
    return None


def _listen_ports(host: IHost, transport: str) -> list[int]:
    """The ports we listen on with ``transport`` ("tcp" or "quic")."""
    kind = "tcp" if transport == "tcp" else "udp"
    return sorted({int(a.value_for_protocol(kind)) for a in host.get_transport_addrs() if transport_of(a) == transport})


def _candidate_addrs(host: IHost, ports: list[int], quic_ports: tuple[int, ...] | list[int] = ()) -> list[multiaddr.Multiaddr]:
    """Addresses an AutoNAT server may dial: our listen ports at every IP we might be seen at
    (the IPs peers observed us at, and our interfaces' own)."""
    ips: list[str] = []
    manager = getattr(host, "_observed_addr_manager", None)
    if manager is not None:
        for addr in manager.addrs(min_observers=1):
            for family in ("ip4", "ip6"):
                try:
                    ips.append(addr.value_for_protocol(family))
                except Exception:  # no such part in this address
                    continue
    ips += [ip for ip in interface_ips() if not ipaddress.ip_address(ip).is_loopback]
    result = []
    for ip in dict.fromkeys(ips):
        family = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"
        result += [multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}") for port in ports]
        result += [multiaddr.Multiaddr(f"/{family}/{ip}/udp/{port}/quic-v1") for port in quic_ports]
    return result[:16]


def _local_address(stream: INetStream) -> tuple[str, int] | None:
    """Our end of the connection a stream runs on (QUIC, or TCP when our Noise session can tell)."""
    muxed = stream.muxed_conn
    if isinstance(muxed, QuicConn):
        return muxed.get_local_address()
    secured = getattr(muxed, "secured_conn", None)
    get_local = getattr(secured, "get_local_address", None)
    return get_local() if callable(get_local) else None
