"""The QUIC transport as py-libp2p's swarm uses it: dial, listen, addresses.

:class:`QuicTransport` is an ``ITransport`` for ``/ip4|ip6/<ip>/udp/<port>/quic-v1``
addresses. It hands the swarm connections that are already secured (libp2p TLS 1.3)
and multiplexed (QUIC streams), which the swarm registers as they are
(``provides_native_muxing``). Each listen address is one :class:`Endpoint`; a dial
leaves from the listening endpoint of the same address family when there is one (so
the NAT sees one mapping, the listener's), otherwise from a dial-only endpoint made on
first use. Every endpoint runs in the swarm's background nursery and ends with it.
"""

from __future__ import annotations

import socket
from typing import Any

import multiaddr
import trio
from libp2p.abc import IListener, ITransport
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import THandler
from libp2p.peer.id import ID
from libp2p.transport.exceptions import OpenConnectionError

from punchgate.limits import ConnectionAdmission
from punchgate.transports.quic.certificate import make_certificate
from punchgate.transports.quic.connection import QuicConn, configuration, quic_multiaddr
from punchgate.transports.quic.endpoint import Endpoint, family_of, udp_socket

HANDSHAKE_TIMEOUT = 10.0


def parse_quic_addr(addr: multiaddr.Multiaddr) -> tuple[str, int, ID | None] | None:
    """(ip, port, peer ID or None) of ``/ip4|ip6/<ip>/udp/<port>/quic-v1[/p2p/<id>]``, else None."""
    parts = [(p.name, v) for p, v in addr.items()]
    peer = None
    if parts and parts[-1][0] == "p2p":
        try:
            peer = ID.from_base58(str(parts[-1][1]))
        except Exception:  # not a peer ID
            return None
        parts = parts[:-1]
    if len(parts) != 3 or parts[0][0] not in ("ip4", "ip6") or parts[1][0] != "udp" or parts[2][0] != "quic-v1":
        return None
    return str(parts[0][1]), int(parts[1][1]), peer


class QuicTransport(ITransport):
    provides_native_muxing = True

    def __init__(self, host_key: PrivateKey) -> None:
        self._certificate, self._certificate_key = make_certificate(host_key)
        self._listeners: list[QuicListener] = []
        self._dialers: dict[int, Endpoint] = {}  # by address family
        self._nursery: trio.Nursery | None = None
        self.swarm: Any = None
        # Inbound caps for every listener (host.build_host shares TCP's): None admits all.
        self.admission: ConnectionAdmission | None = None
        self.handshake_timeout = HANDSHAKE_TIMEOUT

    # -- wiring by the swarm -------------------------------------------------------

    def set_background_nursery(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def set_swarm(self, swarm: Any) -> None:
        self.swarm = swarm

    def protocols(self) -> list[str]:
        return ["quic-v1"]

    def can_dial(self, maddr: multiaddr.Multiaddr) -> bool:
        return parse_quic_addr(maddr) is not None

    def can_listen(self, maddr: multiaddr.Multiaddr) -> bool:
        return parse_quic_addr(maddr) is not None

    def make_configuration(self, is_client: bool) -> Any:
        return configuration(is_client, self._certificate, self._certificate_key)

    # -- dialing --------------------------------------------------------------------

    async def dial(self, maddr: multiaddr.Multiaddr, fresh_port: bool = False) -> QuicConn:  # type: ignore[override]  # a muxed connection
        """A verified connection to the peer ``maddr`` names, from the listening port (or,
        with ``fresh_port``, from another one: a dial-back that must not ride the NAT
        mapping of a connection the peer already has with us)."""
        parsed = parse_quic_addr(maddr)
        if parsed is None:
            raise OpenConnectionError(f"not a QUIC address: {maddr}")
        ip, port, peer = parsed
        if peer is None:
            raise OpenConnectionError(f"a QUIC dial needs the peer ID: {maddr}")
        try:
            endpoint = await (self._dial_only_endpoint(family_of(ip)) if fresh_port else self._endpoint_for(ip))
            conn = endpoint.connect((ip, port), peer)
        except OSError as exc:
            raise OpenConnectionError(f"cannot dial {maddr}: {exc}") from exc
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await conn.handshake_done.wait()
        except BaseException:
            conn.close_now("dial abandoned")
            raise
        if conn.error is not None or not conn.established:
            raise OpenConnectionError(f"QUIC handshake with {maddr} failed: {conn.error}")
        return conn

    async def _endpoint_for(self, ip: str) -> Endpoint:
        """The listener's endpoint that can reach ``ip`` (same family, a wildcard or the
        same kind of address), else this family's dial-only endpoint."""
        family = family_of(ip)
        loopback = ip.startswith("127.") or ip == "::1"
        for listener in self._listeners:
            endpoint = listener.endpoint
            if endpoint is None or endpoint.closed or endpoint.family != family:
                continue
            bound = endpoint.local_address[0]
            if bound in ("0.0.0.0", "::") or (bound.startswith("127.") or bound == "::1") == loopback:
                return endpoint
        return await self._dial_only_endpoint(family)

    async def _dial_only_endpoint(self, family: int) -> Endpoint:
        endpoint = self._dialers.get(family)
        if endpoint is None or endpoint.closed:
            if self._nursery is None:
                raise OSError("the QUIC transport is not running (no swarm nursery)")
            wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
            endpoint = Endpoint(udp_socket(family, wildcard, 0), self.make_configuration)
            await self._nursery.start(endpoint.run)
            self._dialers[family] = endpoint
        return endpoint

    def send_raw(self, data: bytes, ip: str, port: int) -> bool:
        """Send a non-QUIC datagram from the listening port of ``ip``'s family (hole punching)."""
        family = family_of(ip)
        for listener in self._listeners:
            endpoint = listener.endpoint
            if endpoint is not None and not endpoint.closed and endpoint.family == family:
                endpoint.send_raw(data, (ip, port))
                return True
        return False

    # -- listening ------------------------------------------------------------------

    def create_listener(self, handler_function: THandler) -> QuicListener:
        listener = QuicListener(self, handler_function)
        self._listeners.append(listener)
        return listener

    def forget(self, listener: QuicListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def endpoints(self) -> list[Endpoint]:
        found = [listener.endpoint for listener in self._listeners if listener.endpoint is not None]
        return found + list(self._dialers.values())

    async def close(self) -> None:
        for endpoint in self._dialers.values():
            endpoint.close()
        self._dialers.clear()
        await trio.lowlevel.checkpoint()


class QuicListener(IListener):
    background_nursery: trio.Nursery | None = None  # set by the swarm before listen()

    def __init__(self, transport: QuicTransport, handler: THandler) -> None:
        self.transport = transport
        self.handler = handler
        self.endpoint: Endpoint | None = None

    async def listen(self, maddr: multiaddr.Multiaddr) -> None:
        parsed = parse_quic_addr(maddr)
        if parsed is None:
            raise OpenConnectionError(f"not a QUIC listen address: {maddr}")
        ip, port, _ = parsed
        nursery = self.background_nursery or self.transport._nursery
        if nursery is None:
            raise OpenConnectionError("the QUIC transport is not running (no swarm nursery)")
        try:
            sock = udp_socket(family_of(ip), ip, port)
        except OSError as exc:
            raise OpenConnectionError(f"cannot listen on {maddr}: {exc.strerror or exc}") from exc
        self.endpoint = Endpoint(sock, self.transport.make_configuration, accept=self._accepted)
        self.endpoint.admission = self.transport.admission
        self.endpoint.handshake_timeout = self.transport.handshake_timeout
        await nursery.start(self.endpoint.run)

    async def _accepted(self, conn: QuicConn) -> None:
        """A verified inbound connection: the swarm takes it (or the handler, without a swarm)."""
        swarm = self.transport.swarm
        try:
            if swarm is not None:
                await swarm.add_conn(conn, direction="inbound")
            else:
                await self.handler(conn)  # type: ignore[arg-type]
        except Exception:  # refused by the swarm's limits, or a closed swarm
            conn.close_now("refused")

    def get_addrs(self) -> tuple[multiaddr.Multiaddr, ...]:
        if self.endpoint is None:
            return ()
        ip, port = self.endpoint.local_address
        return (quic_multiaddr(ip, port),)

    async def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.transport.forget(self)
        await trio.lowlevel.checkpoint()
