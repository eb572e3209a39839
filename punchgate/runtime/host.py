"""Building the libp2p host and choosing the connection a tunnel stream rides on.

Decisions:

* **Noise is the only security protocol.** py-libp2p's default host also accepts
  ``/plaintext/2.0.0``, secio and TLS; a plaintext dialer would get an unencrypted
  session. We pass Noise alone, so negotiation with anything else fails.
* **QUIC is ours** (``punchgate.transports.quic``, on aioquic): py-libp2p 0.8.1's QUIC
  loses data, kills idle streams and dials from a fresh socket, so the host gets our
  transport instead, and identify's answer names the address of the connection it was
  asked on (``punchgate.transports.identify``: ``/udp/…/quic-v1`` on QUIC). Tunnel
  streams open with ``runtime/multistream.open_stream_on`` on the connection the state
  machine chose (direct TCP, direct QUIC or relayed), never on one the swarm picks.
* **No dial behind our back.** The swarm's auto-connector dials peers from the
  peerstore on its own; who is dialled when is the state machine's decision, so it is
  turned off (``libp2p_fixes/auto_connector.py``).
* **A private network turns QUIC off.** With a network key every connection is wrapped
  in the pnet protector at the security upgrade (``libp2p_fixes/pnet.py``); QUIC
  connections arrive already secured and never pass there, so a node with a key
  neither listens on QUIC nor dials it (:func:`listen_addrs_for`), and says so once.
* **Inbound connections are admitted by us** (``libp2p_fixes/inbound.py``): caps in total
  and per IP, a handshake deadline, slots released when a connection closes. QUIC
  connections take a slot of the same counts at the peer's first Initial packet
  (``transports/quic/endpoint.py``: over a cap the packet is dropped).
* **Our dials are single attempts.** The swarm retries a failed dial three times on its
  own and, once every address of a peer failed, refuses to dial it again for 60 s (a
  negative cache). When to try again is the state machine's decision, so the swarm's
  retries are turned off and :func:`dial_direct` dials addresses with ``dial_addr``,
  which the negative cache does not block: a restarted bootstrap node is reached again
  as soon as it listens.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import multiaddr
from libp2p import new_swarm
from libp2p.abc import IHost, INetConn
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.host.basic_host import BasicHost
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.rcmgr import new_resource_manager
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.transport.tcp.tcp import TCP

from punchgate import libp2p_fixes
from punchgate.libp2p_fixes.inbound import guard_inbound
from punchgate.libp2p_fixes.pnet import protect_host
from punchgate.limits import Limits
from punchgate.runtime.addresses import AddressBook, is_unhelpful_addr
from punchgate.specs import transport_of, without_peer_id
from punchgate.transports.identify import identify_handler
from punchgate.transports.quic.connection import QuicConn
from punchgate.transports.quic.transport import QuicTransport

DIAL_TIMEOUT = 10.0
NEGOTIATE_TIMEOUT = 10  # the library's own protocol negotiations
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


def listen_addrs_for(
    listen_addrs: Sequence[multiaddr.Multiaddr], private: bool
) -> tuple[list[multiaddr.Multiaddr], list[multiaddr.Multiaddr]]:
    """(addresses to listen on, addresses dropped): a private network drops QUIC ones."""
    if not private:
        return list(listen_addrs), []
    kept = [a for a in listen_addrs if transport_of(a) != "quic"]
    return kept, [a for a in listen_addrs if transport_of(a) == "quic"]


def build_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr],
    address_book: AddressBook | None = None,
    network_key: bytes | None = None,
    limits: Limits | None = None,
) -> IHost:
    """A host listening (once run) on ``listen_addrs``; with ``network_key``, a member of
    that private network only (``listen_addrs`` must then hold no QUIC address)."""
    libp2p_fixes.install()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    if network_key is not None and any(transport_of(a) == "quic" for a in listen_addrs):
        raise ValueError("a private network cannot use QUIC: filter the addresses with listen_addrs_for")
    # Both transports, whatever we listen on: a node that listens on one can still dial the
    # other. A private network is TCP only (its protector sits in TCP's security upgrade).
    transports = [TCP()] if network_key is not None else [TCP(), QuicTransport(key_pair.private_key)]
    resource_manager = new_resource_manager()  # what new_host() gives every host by default
    swarm = new_swarm(
        key_pair=key_pair,
        listen_addrs=list(listen_addrs),
        transports=transports,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        resource_manager=resource_manager,
        retry_config=RetryConfig(max_retries=0),
    )
    host = Host(
        network=swarm,
        negotiate_timeout=NEGOTIATE_TIMEOUT,
        resource_manager=resource_manager,
        addrs_factory=address_book if address_book is not None else AddressBook(),
    )
    host.set_stream_handler(IDENTIFY_PROTOCOL, identify_handler(host))
    limits = limits or Limits()
    # Our gate's deadline is the one that counts; the library's own (inside it) is later.
    host.get_network().connection_config.inbound_upgrade_timeout = limits.handshake_timeout + 1  # type: ignore[attr-defined]
    gate = guard_inbound(host, limits)
    quic = quic_transport(host)
    if quic is not None:  # QUIC connections count against the same caps and deadline
        quic.admission = gate.admission
        quic.handshake_timeout = limits.handshake_timeout
    if network_key is not None:
        protect_host(host, network_key)
    return host


class Host(BasicHost):
    """py-libp2p's host, whose advertised addresses keep relay circuit addresses whole.

    ``BasicHost.get_addrs`` (``libp2p/host/basic_host.py`` ~530-539) passes the candidate
    addresses through our ``addrs_factory`` (``AddressBook``: what the state machine says
    to advertise) and then, to append ``/p2p/<our id>``, decapsulates the address's
    *first* ``/p2p`` value: for ``<relay addr>/p2p/<relay>/p2p-circuit`` that is the
    relay's, which cut the address back to the relay's own socket, labelled with our
    peer ID. Identify, DHT provider records and DCUtR all read ``get_addrs()``, so a node
    behind NAT advertised a wrong address instead of its circuit address. Here only a
    trailing ``/p2p/<id>`` is replaced."""

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        own = multiaddr.Multiaddr(f"/p2p/{self.get_id()!s}")
        candidates = list(self.get_transport_addrs())
        manager = self._observed_addr_manager
        if manager is not None:
            candidates += [a for a in manager.addrs() if a not in candidates]
        addrs = list(self._addrs_factory(candidates)) if self._addrs_factory is not None else candidates
        return [without_peer_id(a).encapsulate(own) for a in addrs]


def quic_transport(host: IHost) -> QuicTransport | None:
    for transport in host.get_network().transport_manager.get_transports():  # type: ignore[attr-defined]
        if isinstance(transport, QuicTransport):
            return transport
    return None


def connection_transport(conn: INetConn) -> str:
    """'relay', 'quic' or 'tcp' for a live connection."""
    if conn.get_connection_type() is ConnectionType.RELAYED:
        return "relay"
    if isinstance(conn.muxed_conn, QuicConn):
        return "quic"
    return "tcp"


def known_addrs(host: IHost, peer_id: ID) -> list[multiaddr.Multiaddr]:
    """The peerstore's addresses for ``peer_id`` (none when it does not know the peer: the
    peerstore raises for an unknown one)."""
    try:
        return list(host.get_peerstore().addrs(peer_id))
    except Exception:  # PeerStoreError
        return []


def own_record_addrs(host: IHost, peer_id: ID) -> list[str]:
    """The addresses ``peer_id`` itself last advertised, as its signed peer record says (from
    identify or a DHT answer): not addresses others saw it at (a hole-punched connection's
    address works only with a punch)."""
    try:
        envelope = host.get_peerstore().get_peer_record(peer_id)
        addrs = [] if envelope is None else envelope.record().addrs
    except Exception:  # unknown peer, or a record that does not decode
        return []
    return [str(a) for a in addrs if "/p2p-circuit" in str(a) or not is_unhelpful_addr(a)]


def relay_of(conn: INetConn) -> str | None:
    """The relay's peer ID for a relayed connection (from ``/p2p/R/p2p-circuit/...``)."""
    for addr in conn.get_transport_addresses():
        text = str(addr)
        if "/p2p-circuit" in text:
            parts = text.split("/p2p-circuit", 1)[0].split("/")
            if len(parts) >= 2 and parts[-2] == "p2p":
                return parts[-1]
    return None


def live_connection(host: IHost, peer_id: ID, kind: str, relay: str | None = None) -> INetConn | None:
    """A live connection to ``peer_id`` of ``kind`` ('tcp', 'quic', 'relay'; through ``relay``)."""
    for conn in host.get_network().get_connections(peer_id):
        if conn.is_closed or connection_transport(conn) != kind:
            continue
        if relay is None or relay_of(conn) == relay:
            return conn
    return None


async def dial_direct(host: IHost, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr]) -> INetConn:
    """A new direct connection to ``peer_id`` at the first of ``addrs`` that answers.

    Each address is tried once, in turn; callers bound the whole with their own
    deadline. Raises :class:`NoRouteError` with every address's error."""
    if not addrs:
        raise NoRouteError(f"no address known for peer {peer_id}")
    errors = []
    for addr in addrs:
        try:
            return await host.get_network().dial_addr(addr, peer_id)
        except Exception as exc:  # the swarm raises several types for a failed dial
            cause = exc.__cause__ or exc.__context__
            errors.append(f"{addr}: {exc}" + (f" ({cause})" if cause and str(cause) not in str(exc) else ""))
    raise NoRouteError("; ".join(errors))
