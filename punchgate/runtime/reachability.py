"""Is this node reachable from outside? A dial-back on a fresh connection says.

py-libp2p's AutoNAT answers PUBLIC for anything: its dial-back goes through
``host.connect()``, which returns the connection that already exists. Ours,
``/punchgate/dialback/1.0.0``:

1. the client sends the TCP ports it listens on (framed like the tunnel protocol);
2. the server takes the client's IP from its own side of the connection (never a
   claimed one) and dials ``/ip4/<ip>/tcp/<port>`` with ``swarm.dial_addr``, which
   always opens a new connection, authenticated by Noise as the same peer;
3. it answers ``{"reachable": bool, "observed": "ip:port"}`` and closes only the new
   connection.

Behind a NAT with a stateful firewall the dial-back is dropped, so the answer is
"not reachable" after :data:`DIALBACK_TIMEOUT`. The answer also carries the address
the helper sees; comparing its port with our end of the connection tells whether our
NAT keeps ports (a hole punch needs that) or maps them at random (symmetric NAT). Servers refuse requests over relayed
connections and answer each peer at most once per :data:`MIN_INTERVAL`.
"""

from __future__ import annotations

import ipaddress
import time

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID

from punchgate.logs import get_logger
from punchgate.runtime.handshake import read_message
from punchgate.specs import transport_of
from punchgate.state.model import NatStatus
from punchgate.wire import WireError, encode

PROTOCOL_ID = "/punchgate/dialback/1.0.0"
DIALBACK_TIMEOUT = 3.0
REQUEST_TIMEOUT = 15.0
MIN_INTERVAL = 10.0
MAX_PORTS = 4

log = get_logger("punchgate.reachability")


class DialbackServer:
    """Answers dial-back requests from connected peers."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._last_answered: dict[ID, float] = {}

    async def handle_stream(self, stream: INetStream) -> None:
        try:
            answer = await self._answer(stream)
            await stream.write(encode(answer))
            await stream.close()
        except Exception:  # a broken or malicious requester: drop the stream
            try:
                await stream.reset()
            except Exception:
                pass

    async def _answer(self, stream: INetStream) -> dict:
        peer = stream.muxed_conn.peer_id
        if stream.muxed_conn.get_connection_type() is ConnectionType.RELAYED:
            return {"error": "dial-back is not offered over relayed connections"}
        now = time.monotonic()
        if now - self._last_answered.get(peer, -MIN_INTERVAL) < MIN_INTERVAL:
            return {"error": "asked too often"}
        self._last_answered[peer] = now
        message, _ = await read_message(stream, REQUEST_TIMEOUT)
        ports = message.get("ports")
        if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise WireError("ports must be a list of port numbers")
        remote = stream.get_remote_address()
        if remote is None:
            return {"error": "cannot see your address"}
        ip = remote[0]
        family = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"
        observed = f"{ip}:{remote[1]}"
        for port in ports[:MAX_PORTS]:
            addr = multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")
            with trio.move_on_after(DIALBACK_TIMEOUT):
                try:
                    conn = await self.host.get_network().dial_addr(addr, peer)
                except Exception:  # refused, unreachable, wrong peer
                    continue
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await conn.close()
                return {"reachable": True, "observed": observed, "dialed": str(addr)}
        return {"reachable": False, "observed": observed}


async def check_reachability(host: IHost, server: ID) -> tuple[NatStatus, dict]:
    """Ask ``server`` to dial us back; PUBLIC if it could, PRIVATE if not."""
    ports = sorted(
        {int(a.value_for_protocol("tcp")) for a in host.get_transport_addrs() if transport_of(a) == "tcp"}
    )
    if not ports:
        return NatStatus.UNKNOWN, {"error": "no TCP listen address"}
    with trio.fail_after(REQUEST_TIMEOUT + DIALBACK_TIMEOUT * MAX_PORTS):
        stream = await host.new_stream(server, [TProtocol(PROTOCOL_ID)])
        local = _local_address(stream)
        try:
            await stream.write(encode({"ports": ports}))
            answer, _ = await read_message(stream, REQUEST_TIMEOUT + DIALBACK_TIMEOUT * MAX_PORTS)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
    if "error" in answer:
        return NatStatus.UNKNOWN, answer
    observed = str(answer.get("observed", ""))
    if local is not None and observed.rpartition(":")[2].isdigit():
        answer["local"] = f"{local[0]}:{local[1]}"
        answer["port_preserving"] = int(observed.rpartition(":")[2]) == local[1]
    return (NatStatus.PUBLIC if answer.get("reachable") is True else NatStatus.PRIVATE), answer


def _local_address(stream: INetStream) -> tuple[str, int] | None:
    """Our end of the TCP connection a stream runs on, when our Noise session can tell."""
    secured = getattr(stream.muxed_conn, "secured_conn", None)
    get_local = getattr(secured, "get_local_address", None)
    return get_local() if callable(get_local) else None
