"""Identify's answer names the address we see the asking peer at, on the connection it asked on.

Defect (py-libp2p 0.8.1, ``libp2p/identity/identify/identify.py``,
``identify_handler_for`` ~188-210): the observed address is built from the stream's
``(ip, port)`` as ``/ip4/<ip>/tcp/<port>`` whatever the transport
(``_remote_address_to_multiaddr`` ~63-82), so a peer that asked over QUIC learns a TCP
address that does not exist; and ``_prefer_circuit_addr`` replaces it with a circuit
address whenever the peer has *any* relayed connection to us, so a peer that asked on
the direct connection a hole punch just made learns the relay's circuit instead.

:func:`identify_handler` answers with the library's own message
(``_mk_identify_protobuf``: listen addresses, protocols, signed peer record) and the
observed address of the stream's own connection: ``/udp/<port>/quic-v1`` on QUIC, the
circuit address on a relayed connection, ``/tcp/<port>`` on TCP. It is installed in
place of the library's handler for ``/ipfs/id/1.0.0`` (``runtime/host.py``).
"""

from __future__ import annotations

import multiaddr
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import StreamHandlerFn
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.utils.varint import encode_uvarint

from punchgate.transports.quic.connection import QuicConn, quic_multiaddr


def observed_address(stream: INetStream) -> multiaddr.Multiaddr | None:
    """The address we see the peer at, on the connection ``stream`` runs on."""
    conn = stream.muxed_conn
    if isinstance(conn, QuicConn):
        ip, port = conn.get_remote_address()
        return quic_multiaddr(ip, port)
    if conn.get_connection_type() is ConnectionType.RELAYED:
        for addr in conn.get_transport_addresses():
            if "/p2p-circuit" in str(addr):
                return addr
        return None
    remote = stream.get_remote_address()
    if remote is None:
        return None
    ip, port = remote
    if ip.lower().startswith("::ffff:"):
        ip = ip[7:]
    family = "ip6" if ":" in ip else "ip4"
    return multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")


def identify_handler(host: IHost) -> StreamHandlerFn:
    async def handle(stream: INetStream) -> None:
        try:
            message = _mk_identify_protobuf(host, observed_address(stream)).SerializeToString()
            await stream.write(encode_uvarint(len(message)) + message)
            await stream.close()
        except Exception:  # the asker went away: nothing to tell anyone
            try:
                await stream.reset()
            except Exception:
                pass

    return handle
