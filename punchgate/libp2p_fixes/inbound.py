"""Inbound connections: admitted per IP and in total, handshakes bounded, slots given back.

Defect (py-libp2p 0.8.1, ``libp2p/network/swarm.py``, ``Swarm._handle_inbound_connection``
~1947-2000 and ``_do_handle_inbound_connection`` ~2001-2060): every accepted connection
takes a slot of ``_inbound_limiter`` (``max_connections - min_connections``, 250 by
default) and, once its upgrade succeeds, waits for ``self.manager.wait_finished()``:
the end of the *swarm*, not of the connection. The slot and the handler task are held
until the node stops, so after 250 inbound connections in a node's life (peers that
connected and left, or one peer connecting 250 times) every new inbound connection is
closed at once, for good. There is no cap per remote IP.

Adjustment: :func:`guard_inbound` replaces that method on one host's swarm (an instance
attribute; the listener looks it up per connection) with :meth:`InboundGate.handle`:

* admission before any byte is read (:class:`punchgate.limits.ConnectionAdmission`):
  at most ``inbound_conns`` in all and ``inbound_conns_per_ip`` from one IP address;
  beyond that the socket is closed at once (there is no protocol yet to carry a reason);
* the security and muxer upgrade (the library's ``upgrade_inbound_raw_conn``, or
  ``add_conn`` for QUIC, which arrives upgraded) must finish within
  ``handshake_timeout`` seconds, else the connection is closed;
* the slot is held until *that connection* closes (``SwarmConn.event_closed``).

It also sets the cap on inbound streams per connection of every connection the host
upgrades, either direction (``FlowYamux.max_inbound_streams``, from
``inbound_streams_per_conn``), right after the muxer is built and before it reads.

The library listens with a backlog of 128 (``libp2p/transport/tcp/tcp.py`` ~96): in a
burst of connections the kernel drops the rest before our gate can see (and close)
them, and they linger half-open on the other side. :func:`raise_backlog`, called once
the host listens, asks for :data:`LISTEN_BACKLOG` (the kernel caps it at somaxconn).

Refusals and timeouts are logged at most once per 10 s per kind, with the count of
those not logged in between.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import IHost, IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection

from punchgate.limits import ConnectionAdmission, Limits, LogThrottle
from punchgate.logs import get_logger
from punchgate.transports.yamux import FlowYamux

log = get_logger("punchgate.limits")
CLOSE_TIMEOUT = 2.0
LISTEN_BACKLOG = 4096


class InboundGate:
    def __init__(self, swarm: Any, limits: Limits) -> None:
        self.swarm = swarm
        self.admission = ConnectionAdmission(limits.inbound_conns, limits.inbound_conns_per_ip)
        self.timeout = limits.handshake_timeout
        self.throttle = LogThrottle()
        self.refused = 0  # connections closed at accept, over a cap
        self.timed_out = 0  # connections closed for a handshake past its deadline
        self.failed = 0  # handshakes that failed (garbage, wrong key, wrong protocol)

    async def handle(self, read_write_closer: Any, maddr: Any) -> None:
        ip = _remote_ip(read_write_closer)
        reason = self.admission.admit(ip)
        if reason is not None:
            self.refused += 1
            self._note("inbound connection refused", "warning", ip=ip, reason=reason)
            await _close(read_write_closer)
            return
        try:
            conn = await self._upgrade(read_write_closer, maddr, ip)
            if conn is not None:
                await conn.event_closed.wait()
        finally:
            self.admission.release(ip)

    async def _upgrade(self, read_write_closer: Any, maddr: Any, ip: str) -> Any:
        """The registered ``SwarmConn``, or None when the handshake failed or timed out."""
        try:
            with trio.fail_after(self.timeout):
                if isinstance(read_write_closer, IMuxedConn):  # QUIC: secured and muxed already
                    return await self.swarm.add_conn(read_write_closer, direction="inbound")
                muxed = await self.swarm.upgrade_inbound_raw_conn(RawConnection(read_write_closer, False), maddr)
        except trio.TooSlowError:
            self.timed_out += 1
            self._note("inbound handshake timed out", "warning", ip=ip, timeout_s=self.timeout)
            await _close(read_write_closer)
            return None
        except Exception as exc:  # a failed handshake of any kind ends here
            self.failed += 1
            self._note("inbound handshake failed", "info", ip=ip, reason=f"{type(exc).__name__}: {exc}")
            await _close(read_write_closer)
            return None
        for conn in self.swarm.connections.get(muxed.peer_id, ()):
            if conn.muxed_conn is muxed:
                return conn
        return None  # closed already

    def _note(self, event: str, level: str, **fields: Any) -> None:
        held_back = self.throttle.allow(event, trio.current_time())
        if held_back is not None:
            getattr(log, level)(event, **fields, not_logged_since=held_back)


def _remote_ip(read_write_closer: Any) -> str:
    try:
        remote = read_write_closer.get_remote_address()
    except Exception:  # a socket already gone has no address
        remote = None
    return str(remote[0]) if remote else "unknown"


async def _close(read_write_closer: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await read_write_closer.close()
        except Exception:  # closed either way
            pass


def guard_inbound(host: IHost, limits: Limits) -> InboundGate:
    """Admit ``host``'s inbound connections through an :class:`InboundGate`, and cap the
    streams a peer may open on each of its connections."""
    swarm = host.get_network()
    gate = InboundGate(swarm, limits)
    swarm._handle_inbound_connection = gate.handle  # type: ignore[attr-defined]
    swarm.inbound_gate = gate  # type: ignore[attr-defined]
    upgrader = swarm.upgrader  # type: ignore[attr-defined]
    upgrade_connection = upgrader.upgrade_connection
    cap = limits.inbound_streams_per_conn

    async def capped_upgrade_connection(conn: Any, peer_id: Any) -> Any:
        muxed = await upgrade_connection(conn, peer_id)
        if isinstance(muxed, FlowYamux):
            muxed.max_inbound_streams = cap
        return muxed

    upgrader.upgrade_connection = capped_upgrade_connection
    return gate


def raise_backlog(host: IHost, backlog: int = LISTEN_BACKLOG) -> None:
    """Give every TCP listening socket of a running ``host`` a longer accept queue."""
    for listener in list(getattr(host.get_network(), "listeners", {}).values()):
        for socket_listener in getattr(listener, "listeners", ()):
            sock = getattr(socket_listener, "socket", None)
            if sock is not None:
                sock.listen(backlog)  # on a listening socket: only the queue length changes
