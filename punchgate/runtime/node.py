"""The node's event loop: translate -> transition -> execute.

Everything that happens (a listener coming up, a dial's result, a connection opening,
a signal, a local client connecting) is posted as an event to one channel. The loop
takes each event, runs the pure transition with the time on trio's clock, and executes
the commands it returns; when no event comes before the machine's next wake-up time
(:func:`punchgate.state.next_wakeup`), it posts a ``Tick``. No decision is taken here:
the runtime translates and executes.

Work that takes time (dials, look-ups, punches, reservations, publications, opening a
tunnel stream) runs as a task per command, under its own cancel scope filed by the
command's attempt ID, and reports back with an event carrying that ID; ``Cancel``
cancels it when the machine gave up on it. Every task catches its own failures and
reports them as events: a task never takes the node down.

Ownership: :meth:`Node.run` owns the host (``host.run``) and one nursery holding every
task the node starts: the signal watcher, pinger, work tasks, tunnel listeners and
their connection handlers. When the loop ends it cancels that nursery, then the host
closes. Streams the library hands to our protocol handlers run in the library's tasks;
each registers with the :class:`SessionRegistry` so shutdown can reach it.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from punchgate import memory, netkey
from punchgate.config import Config
from punchgate.libp2p_fixes.inbound import raise_backlog
from punchgate.logs import get_logger
from punchgate.runtime.access_control import AccessControl
from punchgate.runtime.addresses import AddressBook
from punchgate.runtime.connect import ConnectEntry
from punchgate.runtime.control import ControlServer, ControlSocketInUse
from punchgate.runtime.discovery import Discovery, peer_key, service_key
from punchgate.runtime.handshake import read_message
from punchgate.runtime.holepunch import HolePuncher
from punchgate.runtime.host import (
    NoRouteError,
    build_host,
    check_ports_free,
    connection_transport,
    dial_direct,
    known_addrs,
    listen_addrs_for,
    live_connection,
    own_record_addrs,
    relay_of,
)
from punchgate.runtime.mdns import MdnsDiscovery
from punchgate.runtime.multistream import open_stream_on
from punchgate.runtime.pinger import Pinger
from punchgate.runtime.portmap import LEASE, PortMapper, PortMappingError, mappable_ports
from punchgate.runtime.proxy import ProxyServer
from punchgate.runtime.reachability import PROTOCOL_ID as DIALBACK_PROTOCOL_ID
from punchgate.runtime.reachability import PROTOCOL_V1 as DIALBACK_PROTOCOL_V1
from punchgate.runtime.reachability import DialbackServer, check
from punchgate.runtime.relay import Relays
from punchgate.runtime.sessions import SessionRegistry
from punchgate.runtime.snapshot import node_status
from punchgate.runtime.tunnel_client import Opened, SessionTable, TunnelClient
from punchgate.runtime.tunnel_service import TunnelService
from punchgate.runtime.udp import UdpTunnelClient
from punchgate.state import KnownPeer, NodeState, Phase, next_wakeup, transition
from punchgate.state import commands as cmd
from punchgate.state import events as ev
from punchgate.state.model import NatStatus
from punchgate.userdirs import default_control_socket
from punchgate.wire import PROTOCOL_ID, TunnelResponse, encode_request, parse_response

log = get_logger("punchgate.node")

PEERSTORE_TTL = 365 * 24 * 3600  # addresses given by the user do not expire
LEARNT_TTL = 600  # addresses learnt from records and identify are hints
CLOSE_TIMEOUT = 3.0  # closing our connections at shutdown
UNMAP_TIMEOUT = 3.0  # removing our port mapping from the router (at shutdown too)
MEMORY_INTERVAL = 2.0  # the memory of peers is written at most this often


class Node:
    def __init__(self, config: Config, key_pair: KeyPair) -> None:
        self.config = config
        self.address_book = AddressBook()
        # Access control (README "Access control"); each raises a one-line error if unusable.
        self.network_key = netkey.load(config.network_key) if config.network_key else None
        self.listen, self.dropped_listen = listen_addrs_for(config.listen, self.network_key is not None)
        if not self.listen:
            raise netkey.NetworkKeyError(
                "with --network-key the node listens on TCP only (QUIC cannot carry the protector): add a TCP --listen"
            )
        self.access = AccessControl(config.allow, config.allow_file, [s.name for s in config.expose])
        self.host: IHost = build_host(
            key_pair, self.listen, self.address_book, network_key=self.network_key, limits=config.limits
        )
        self.peer_id = self.host.get_id()
        self.registry = SessionRegistry()
        self.sessions = SessionTable()
        self.bootstrap_addrs = _group_by_peer(config.bootstrap)
        self.memory_path = memory.path_for(config.identity)
        self.memory, warning = memory.load(self.memory_path, str(self.peer_id))
        if warning is not None:
            log.warning("peer memory set aside", reason=warning)
        configured = tuple(self.bootstrap_addrs)
        for known in self.memory.peers.values():  # bootstrap peers that answered before
            if known.bootstrap and known.peer_id not in self.bootstrap_addrs and known.addrs:
                self.bootstrap_addrs[known.peer_id] = [multiaddr.Multiaddr(a) for a in known.addrs]
        self.state = NodeState.initial(
            configured,
            tuple(s.name for s in config.expose),
            shutdown_grace=config.shutdown_grace,
            republish_interval=config.republish_interval,
            connect_timeout=config.connect_timeout,
            known=tuple(KnownPeer(k.peer_id, k.addrs, k.services, k.bootstrap) for k in self.memory.peers.values()),
            # A node for this machine only (loopback) has nothing a router could forward to.
            port_mapping=config.port_mapping and bool(mappable_ports(config.listen)),
        )
        self._memory_dirty = trio.Event()
        self._events_in, self._events_out = trio.open_memory_channel[ev.Event](math.inf)
        self._nursery: trio.Nursery | None = None
        self._work: dict[int, trio.CancelScope] = {}  # attempt ID -> the scope of its task
        self._opened: dict[int, Opened] = {}  # accepted tunnel streams not yet handed over
        self._stopped = False
        self._listener_scope = trio.CancelScope()  # cancelled to stop accepting tunnel clients
        self.service = TunnelService(
            {s.name: s.target for s in config.expose},
            self.registry,
            self.access.policy,
            config.limits,
            transports={s.name: s.transport for s in config.expose},
            udp_idle=config.udp_idle,
        )
        self.access.subscribers.append(self.service.set_policy)
        self.discovery = Discovery(self.host)
        self.relays = Relays(self.host, config.limits)
        self.puncher = HolePuncher(self.host)
        self.dialback = DialbackServer(self.host)
        self.port_mapper = PortMapper(seed=str(self.peer_id))
        self.clients: list[TunnelClient | UdpTunnelClient | ProxyServer] = [
            UdpTunnelClient(service, bind, peer, self.sessions, self.registry, self.post, config.udp_idle)
            if transport == "udp"
            else TunnelClient(service, bind, peer, self.sessions, self.registry, self.post)
            for service, bind, peer, transport in [
                *((t.service, t.bind, t.peer_id, t.transport) for t in config.tunnels),
                *((t.service, t.bind, None, t.transport) for t in config.tunnels_by_name),
            ]
        ]
        if config.proxy is not None:
            self.clients.append(ProxyServer(config.proxy, self.sessions, self.registry, self.post))
        self.connects = ConnectEntry(self.sessions, self.registry, self.post)  # `punchgate connect`
        self.started_at = time.time()
        self.ready = trio.Event()  # set when the phase first becomes READY (used by tests)
        self.pinger = Pinger(self.host)
        self.relay_expires: dict[str, float] = {}  # relay -> when our reservation ends (Unix time)
        self.control = (
            ControlServer(config.control_socket, self.status, self.connects.handle) if config.control_socket else None
        )

    def status(self) -> dict:
        """The node's live status as a plain dict (fields: docs/ARCHITECTURE.md, "Control socket")."""
        return node_status(self)

    def post(self, event: ev.Event) -> None:
        """Hand an event to the loop; callable from any task of this trio run."""
        try:
            self._events_in.send_nowait(event)
        except trio.ClosedResourceError:
            pass  # the loop has ended; nothing listens any more

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        check_ports_free(self.listen)
        for client in self.clients:
            await client.open_listeners()
        self._bind_control_socket()
        peerstore = self.host.get_peerstore()
        for peer_id, addrs in self.bootstrap_addrs.items():
            peerstore.add_addrs(ID.from_base58(peer_id), addrs, PEERSTORE_TTL)
        try:
            async with self.host.run(listen_addrs=list(self.listen)), trio.open_nursery() as nursery:
                self._nursery = nursery
                self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self.service.handle_stream)
                self.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), self.dialback.handle_stream)
                self.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_V1), self.dialback.handle_stream_v1)
                self.host.get_network().register_notifee(_ConnectionEvents(self.post))
                raise_backlog(self.host)  # bursts of connections reach our admission, not a full queue
                await nursery.start(self.discovery.run)
                await nursery.start(self.relays.run)
                await nursery.start(self.puncher.run)
                if self.config.mdns:
                    nursery.start_soon(MdnsDiscovery(self.host, self._on_mdns_peer).run)
                await nursery.start(self._watch_signals)  # before anyone can see us ready
                self._log_access()
                await nursery.start(self.access.run)  # the allow file's watcher
                nursery.start_soon(self.pinger.run)
                nursery.start_soon(self._keep_memory)
                if self.control is not None:
                    await nursery.start(self.control.serve)
                me = multiaddr.Multiaddr(f"/p2p/{self.peer_id}")
                addresses = tuple(str(a.encapsulate(me)) for a in self.host.get_transport_addrs())
                for address in addresses:
                    log.info("listening on", address=address)
                self.post(ev.ListenersReady(addresses))
                task_status.started(self)
                try:
                    await self._loop()
                finally:
                    nursery.cancel_scope.cancel()
                    await self._close_connections()
        finally:
            self._events_in.close()
            for client in self.clients:
                for listener in client.listeners:
                    await listener.aclose()
            if self.control is not None:
                self.control.remove()
        log.info("stopped", peer_id=str(self.peer_id))

    async def _keep_memory(self) -> None:
        """Write the memory of peers when it changed, at most every MEMORY_INTERVAL s, and
        once more at the end."""
        try:
            while True:
                await self._memory_dirty.wait()
                self._memory_dirty = trio.Event()
                await self._save_memory()
                await trio.sleep(MEMORY_INTERVAL)
        finally:
            if self._memory_dirty.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._save_memory()

    async def _save_memory(self) -> None:
        try:
            await trio.to_thread.run_sync(memory.save, self.memory_path, self.memory)
        except OSError as exc:
            log.warning("peer memory not saved", path=str(self.memory_path), reason=exc.strerror or str(exc))
    def _log_access(self) -> None:
        """Say how the node is guarded: private network, allowlist warnings, limits."""
        if self.network_key is not None:
            log.info(
                "private network",
                fingerprint=netkey.fingerprint(self.network_key),
                transports=["tcp"],
                quic="off: QUIC connections cannot carry the private-network protector",
                dropped_listen=[str(a) for a in self.dropped_listen],
            )
        self.access.log_summary()
        log.info("limits", **self.config.limits.describe())

    async def _close_connections(self) -> None:
        """Close every connection before the host stops, even when we are being cancelled.

        py-libp2p's swarm closes its connections when its service stops, but without a
        shield: stopped by cancellation (our parent's scope, a test's), the first close
        is cancelled and the sockets stay open until garbage collection, so peers keep a
        connection (and every relayed connection through it) to a node that is gone."""
        network = self.host.get_network()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            for conns in list(network.get_connections_map().values()):
                for conn in list(conns):
                    try:
                        await conn.close()
                    except Exception:  # already closing or broken: it is gone either way
                        pass

    async def _loop(self) -> None:
        while not self._stopped:
            wake = next_wakeup(self.state, trio.current_time())
            event: ev.Event = ev.Tick()
            with trio.move_on_at(math.inf if wake is None else wake):
                event = await self._events_out.receive()
            self._step(event)

    def _step(self, event: ev.Event) -> None:
        old = self.state
        self.state, commands = transition(old, event, trio.current_time())
        if old.phase is not self.state.phase:
            log.info("phase transition", from_phase=old.phase.value, to_phase=self.state.phase.value)
            if self.state.phase is Phase.READY:
                self.ready.set()
        if commands or not isinstance(event, ev.Tick):
            log.debug("state step", state_event=repr(event), commands=[repr(c) for c in commands])
        if old.nat.status is not self.state.nat.status:
            log.info("nat status", status=self.state.nat.status.value, learnt_by=self.state.nat.learnt_by)
        for command in commands:
            try:
                self._execute(command)
            except Exception as exc:  # a bug in our own code: say so, keep the node up
                log.error("internal error", command=repr(command), error=repr(exc))

    # --- executing commands -------------------------------------------------------------

    def _spawn(self, attempt: int, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``work`` as the task of ``attempt``, cancellable by ``Cancel(attempt)``."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._work[attempt] = scope

        async def task() -> None:
            try:
                with scope:
                    await work(*args)
            except Exception as exc:  # a bug in our own code: say so, keep the node up
                log.error("internal error", work=getattr(work, "__name__", str(work)), error=repr(exc))
            finally:
                self._work.pop(attempt, None)

        self._nursery.start_soon(task)

    def _execute(self, command: cmd.Command) -> None:
        assert self._nursery is not None
        match command:
            case cmd.DialBootstrap(peer_id=peer_id, attempt=attempt):
                self._spawn(attempt, self._dial_bootstrap, peer_id, attempt)
            case cmd.JoinDht(peer_id=peer_id):
                self._nursery.start_soon(self._join_dht, peer_id)
            case cmd.CheckReachability(peer_id=peer_id, attempt=attempt, ports=ports):
                self._spawn(attempt, self._check_reachability, peer_id, attempt, ports)
            case cmd.SetDhtMode(server=server):
                self._nursery.start_soon(self.discovery.set_mode, server)
            case cmd.ReserveRelay(relay_peer_id=relay, attempt=attempt):
                self._spawn(attempt, self._reserve, relay, attempt)
            case cmd.Advertise(direct=direct, relay=relay, mapped=mapped):
                self.address_book.direct = direct
                self.address_book.relay_addrs = self.relays.circuit_addrs(ID.from_base58(relay)) if relay else []
                self.address_book.mapped_addrs = [multiaddr.Multiaddr(a) for a in mapped]
                log.info("advertising", addresses=[str(a) for a in self.host.get_addrs()])
                # Tell connected peers at once (identify push), as the spec says a peer should.
                self._nursery.start_soon(self.host._push_identify_to_all_peers)  # type: ignore[attr-defined]
            case cmd.MapPorts(attempt=attempt):
                self._spawn(attempt, self._map_ports, attempt)
            case cmd.UnmapPorts():
                self._nursery.start_soon(self._unmap_ports)
            case cmd.PublishServices(names=names, attempt=attempt):
                self._spawn(attempt, self._publish, names, attempt)
            case cmd.StartTunnelListeners():
                self._nursery.start_soon(self._serve_tunnels, self._nursery)
            case cmd.StopTunnelListeners():
                self._listener_scope.cancel()
            case cmd.CloseTunnelSessions():
                self._nursery.start_soon(self._close_sessions)
            case cmd.StopHost():
                self._stopped = True
            case cmd.LookupService(service=service, attempt=attempt):
                self._spawn(attempt, self._lookup_service, service, attempt)
            case cmd.LookupPeer(peer_id=peer_id, attempt=attempt):
                self._spawn(attempt, self._lookup_peer, peer_id, attempt)
            case cmd.DialDirect(peer_id=peer_id, attempt=attempt, addrs=addrs):
                self._spawn(attempt, self._dial_direct, peer_id, attempt, addrs)
            case cmd.DialRelayed(peer_id=peer_id, attempt=attempt, relay=relay, relay_addrs=relay_addrs):
                self._spawn(attempt, self._dial_relayed, peer_id, attempt, relay, relay_addrs)
            case cmd.HolePunch(peer_id=peer_id, attempt=attempt):
                self._spawn(attempt, self._hole_punch, peer_id, attempt)
            case cmd.OpenStream():
                self._spawn(command.attempt, self._open_stream, command)
            case cmd.StartPipe(session=session_id, attempt=attempt):
                opened = self._opened.pop(attempt, None)
                session = self.sessions.get(session_id)
                if opened is not None and (session is None or not session.deliver(opened)):
                    self._nursery.start_soon(_reset, opened.stream)
            case cmd.DiscardStream(attempt=attempt):
                opened = self._opened.pop(attempt, None)
                if opened is not None:
                    self._nursery.start_soon(_reset, opened.stream)
            case cmd.CloseSession(session=session_id, event=event, reason=reason):
                session = self.sessions.get(session_id)
                if session is not None:
                    session.refuse(event, reason)
            case cmd.CloseConnection(peer_id=peer_id, relay=relay, transport=transport):
                conn = live_connection(self.host, ID.from_base58(peer_id), transport if relay is None else "relay", relay)
                if conn is not None:
                    log.warning("closing a stalled connection", peer=peer_id, relay=relay)
                    self._nursery.start_soon(conn.close)
            case cmd.Cancel(attempt=attempt):
                scope = self._work.pop(attempt, None)
                if scope is not None:
                    scope.cancel()
            case cmd.Remember(peer_id=peer_id, service=service, addrs=addrs, bootstrap=bootstrap):
                if bootstrap and not addrs:
                    addrs = tuple(str(a) for a in self.bootstrap_addrs.get(peer_id, ()))
                else:  # and what the peer itself last said (its signed record: identify, DHT answers)
                    addrs = (*addrs, *own_record_addrs(self.host, ID.from_base58(peer_id)))
                self.memory = self.memory.remember(peer_id, addrs, service, bootstrap, time.time())
                self._memory_dirty.set()
            case cmd.Note(event=event, fields=fields, level=level):
                getattr(log, level)(event, **dict(fields))
            case _:
                assert_never(command)

    # --- the work behind commands (each reports back with an event) ---------------------

    async def _serve_tunnels(self, handler_nursery: trio.Nursery) -> None:
        with self._listener_scope:
            async with trio.open_nursery() as nursery:
                for client in self.clients:
                    nursery.start_soon(client.serve, handler_nursery)

    async def _close_sessions(self) -> None:
        open_sessions = len(self.registry)
        await self.registry.close_all(math.inf)
        log.info("tunnels closed", sessions=open_sessions)
        self.post(ev.SessionsDrained())

    async def _dial_bootstrap(self, peer_id: str, attempt: int) -> None:
        pid = ID.from_base58(peer_id)
        if live_connection(self.host, pid, "tcp") is None and live_connection(self.host, pid, "quic") is None:
            try:
                await dial_direct(self.host, pid, self.bootstrap_addrs[peer_id])
            except Exception as exc:  # every dial error means "not reached"
                reason = str(exc) if isinstance(exc, NoRouteError) else f"{type(exc).__name__}: {exc}"
                log.warning("bootstrap dial failed", peer=peer_id, reason=reason)
                self.post(ev.BootstrapFailed(peer_id, attempt, reason))
                return
        log.info("bootstrap connected", peer=peer_id)
        self.post(ev.BootstrapConnected(peer_id, attempt))

    async def _join_dht(self, peer_id: str) -> None:
        pid = ID.from_base58(peer_id)
        try:
            with trio.fail_after(10):
                if not self.host.get_network().get_connections(pid):
                    await dial_direct(self.host, pid, known_addrs(self.host, pid))
                size = await self.discovery.join(pid)
        except Exception as exc:  # unreachable peer, DHT errors
            log.info("dht join failed", peer=peer_id, reason=f"{type(exc).__name__}: {exc}")
            return
        log.info("dht joined", peer=peer_id, routing_table_size=size)
        self.post(ev.DhtJoined(peer_id))

    async def _check_reachability(self, peer_id: str, attempt: int, ports: tuple[int, ...] = ()) -> None:
        started = trio.current_time()
        try:
            verdict = await check(
                self.host,
                ID.from_base58(peer_id),
                lambda keeps: self.post(ev.PortMappingObserved(peer_id, attempt, keeps)),
                list(ports) or None,
            )
            status, method, details, keeps = verdict.status, verdict.method, verdict.details, verdict.port_preserving
        except Exception as exc:  # the helper vanished or answered nonsense
            status, method, details, keeps = NatStatus.UNKNOWN, "error", {"error": f"{type(exc).__name__}: {exc}"}, None
        log.info(
            "port mapping checked" if ports else "reachability",  # the mapped ports, or our own
            status=status.value,
            method=method,
            checked_by=peer_id,
            observed=details.get("observed") or details.get("dialed"),
            local=details.get("local"),
            port_preserving=keeps,
            error=details.get("error") or details.get("text") or None,
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        self.post(ev.ReachabilityChecked(peer_id, attempt, status, method, keeps, details.get("error")))

    async def _map_ports(self, attempt: int) -> None:
        started = trio.current_time()
        renewal = self.port_mapper.mapping is not None
        ports = mappable_ports(self.host.get_transport_addrs())
        try:
            mapping = await self.port_mapper.map(ports, LEASE)
        except PortMappingError as exc:  # the machine says so (once) and decides when to ask again
            log.debug("port mapping failed", reason=str(exc), duration_ms=round((trio.current_time() - started) * 1000, 1))
            self.post(ev.PortMappingFailed(attempt, str(exc)))
            return
        external = tuple(mapping.ports[port] for port in ports)
        log.info(
            "port mapping renewed" if renewal else "port mapped",
            method=mapping.method,
            gateway=mapping.gateway,
            addresses=[f"/ip4/{mapping.external_ip}/tcp/{port}" for port in external],
            listen_ports=ports,
            lease_s=mapping.lease,
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        self.post(ev.PortsMapped(attempt, mapping.method, mapping.external_ip, external, float(mapping.lease)))

    async def _unmap_ports(self) -> None:
        """Remove our mapping from the router; shielded, so that it ends (within UNMAP_TIMEOUT)
        even when the node is stopping: a forwarding left behind would outlive us."""
        with trio.CancelScope(shield=True), trio.move_on_after(UNMAP_TIMEOUT) as bounded:
            try:
                removed = await self.port_mapper.unmap()
            except Exception as exc:  # the router went away meanwhile: its lease ends it
                log.warning("port mapping not removed", reason=f"{type(exc).__name__}: {exc}")
                return
        if bounded.cancelled_caught:
            log.warning("port mapping not removed", reason=f"no answer within {UNMAP_TIMEOUT:g} s")
        elif removed is not None:
            log.info("port mapping removed", method=removed.method,
                     addresses=[f"/ip4/{removed.external_ip}/tcp/{p}" for p in removed.ports.values()])

    async def _reserve(self, relay: str, attempt: int) -> None:
        started = trio.current_time()
        renewal = self.state.relay.renewing
        try:
            expires_in, limit = await self.relays.reserve(ID.from_base58(relay))
        except Exception as exc:  # stream, protocol or refusal
            reason = str(exc) or type(exc).__name__
            log.warning("relay reservation renewal failed" if renewal else "relay reservation failed", relay=relay, reason=reason)
            self.post(ev.RelayReservationFailed(relay, attempt, reason))
            return
        log.info(
            "relay reservation renewed" if renewal else "relay reservation accepted",
            relay=relay,
            expires_in_s=int(expires_in),
            limit=limit.describe() if limit else None,
            addresses=[str(a) for a in self.relays.circuit_addrs(ID.from_base58(relay))],
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        self.relay_expires[relay] = time.time() + expires_in
        self.post(ev.RelayReserved(relay, attempt, expires_in, limit))

    async def _publish(self, names: tuple[str, ...], attempt: int) -> None:
        ok = True
        addresses = [str(a) for a in self.host.get_addrs()]
        for name, key in [*((n, service_key(n)) for n in names), (None, peer_key(self.peer_id))]:
            started = trio.current_time()
            published = await self.discovery.publish(key)
            ok = ok and published
            if name is not None:
                log.info(
                    "service published" if published else "service publication failed",
                    service=name,
                    key=key,
                    addresses=addresses,
                    duration_ms=round((trio.current_time() - started) * 1000, 1),
                )
        self.post(ev.PublishDone(attempt, ok))

    async def _lookup_service(self, service: str, attempt: int) -> None:
        started = trio.current_time()
        try:
            found = await self.discovery.find(service)
        except Exception as exc:  # DHT errors
            self.post(ev.LookupFailed(service, attempt, f"{type(exc).__name__}: {exc}"))
            return
        records = tuple(ev.PeerRecord(str(info.peer_id), tuple(str(a) for a in info.addrs)) for info in found)
        self._remember_addrs(found)
        log.info(
            "service resolved",
            service=service,
            providers=[r.peer_id for r in records],
            addresses={r.peer_id: list(r.addrs) for r in records},
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        self.post(ev.ProvidersFound(service, attempt, records))

    async def _lookup_peer(self, peer_id: str, attempt: int) -> None:
        pid = ID.from_base58(peer_id)
        addrs: list[str] = []
        try:
            addrs = await self.discovery.peer_addrs(pid)
        except Exception as exc:  # DHT errors: report what we have (nothing)
            log.debug("peer look-up failed", peer=peer_id, reason=f"{type(exc).__name__}: {exc}")
        log.info("peer looked up", peer=peer_id, addresses=addrs)
        self.post(ev.PeerLookedUp(peer_id, attempt, tuple(addrs)))

    async def _dial_direct(self, peer_id: str, attempt: int, addrs: tuple[str, ...]) -> None:
        try:
            await dial_direct(self.host, ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in addrs])
        except Exception as exc:  # dial errors of many types
            self.post(ev.DialFailed(peer_id, attempt, str(exc) if isinstance(exc, NoRouteError) else f"{type(exc).__name__}: {exc}"))
            return
        self.post(ev.DialSucceeded(peer_id, attempt))

    async def _dial_relayed(self, peer_id: str, attempt: int, relay: str, relay_addrs: tuple[str, ...]) -> None:
        started = trio.current_time()
        try:
            _, limit = await self.relays.dial_through(
                ID.from_base58(relay), [multiaddr.Multiaddr(a) for a in relay_addrs], ID.from_base58(peer_id)
            )
        except Exception as exc:  # relay unreachable, refused, no reservation, upgrade failure
            self.post(ev.DialFailed(peer_id, attempt, str(exc) or type(exc).__name__))
            return
        log.info(
            "relay connected",
            peer=peer_id,
            relay=relay,
            limit=limit.describe() if limit else None,
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        self.post(ev.DialSucceeded(peer_id, attempt, relay, limit))

    async def _hole_punch(self, peer_id: str, attempt: int) -> None:
        direct, reason = await self.puncher.punch(ID.from_base58(peer_id))
        self.post(ev.PunchFinished(peer_id, attempt, direct, reason))  # the machine logs the outcome

    async def _open_stream(self, command: cmd.OpenStream) -> None:
        session, attempt, peer = command.session, command.attempt, command.peer_id
        pid = ID.from_base58(peer)
        if command.relay is None:
            conn = live_connection(self.host, pid, command.transport)
        else:
            conn = live_connection(self.host, pid, "relay", command.relay)
        if conn is None:
            self.post(ev.StreamFailed(session, attempt, "the connection closed"))
            return
        stream: INetStream | None = None
        waiting = self.sessions.get(session)
        carries = waiting.transport if waiting is not None else "tcp"  # what the tunnel carries: TCP or UDP
        try:
            # The request rides with the protocol negotiation: one round trip.
            stream, early = await open_stream_on(conn, PROTOCOL_ID, encode_request(command.service, carries))
            message, rest = await read_message(stream, already_read=early)
            response = parse_response(message)
            if response.accepted and carries == "udp" and response.transport != "udp":
                # A provider that predates UDP ignores the field and would take datagrams as TCP bytes.
                response = TunnelResponse(False, f"the provider does not serve UDP (older punchgate): {command.service!r}")
        except Exception as exc:  # negotiation, stream and wire errors alike
            if stream is not None:
                await _reset(stream)
            stalled = isinstance(exc, trio.TooSlowError) or "no multistream-select answer" in str(exc)
            self.post(ev.StreamFailed(session, attempt, f"{type(exc).__name__}: {exc}", stalled))
            return
        if not response.accepted:
            await _reset(stream)
            log.info("provider refused", peer=peer, service=command.service, reason=response.reason)
            self.post(ev.StreamRefused(session, attempt, response.reason or "refused"))
            return
        path = "direct" if command.relay is None else "relayed"
        transport = command.transport if command.relay is None else "relay"
        self._opened[attempt] = Opened(stream, rest, peer, path, command.relay, transport)
        self.post(ev.StreamAccepted(session, attempt))

    def _remember_addrs(self, found: list[PeerInfo]) -> None:
        """Addresses from records go to the peerstore too (identify, DCUtR read it), as hints."""
        peerstore = self.host.get_peerstore()
        for info in found:
            if info.addrs:
                peerstore.add_addrs(info.peer_id, info.addrs, LEARNT_TTL)

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        log.info("peer discovered", peer=str(info.peer_id), source="mdns", addresses=[str(a) for a in info.addrs])
        self.post(ev.PeerDiscovered(str(info.peer_id), "mdns", tuple(str(a) for a in info.addrs)))

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("shutdown requested", signal=name)
                self.post(ev.ShutdownRequested(name))

    def _bind_control_socket(self) -> None:
        """Create the control socket before the host starts (a bad explicit path: exit 1). The
        default path held by another live node (a second node of the same user) is not an
        error: this node then runs without one and says so."""
        if self.control is None:
            return
        try:
            self.control.bind()
        except ControlSocketInUse as exc:
            if self.control.path != default_control_socket({}):
                raise
            log.info("no control socket", reason=str(exc.strerror), fix="start it with --control-socket PATH")
            self.control = None

    def request_shutdown(self, reason: str = "requested") -> None:
        self.post(ev.ShutdownRequested(reason))


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


def _group_by_peer(addrs: tuple[multiaddr.Multiaddr, ...]) -> dict[str, list[multiaddr.Multiaddr]]:
    """Bootstrap addresses by peer ID, each without its trailing /p2p part."""
    grouped: dict[str, list[multiaddr.Multiaddr]] = {}
    for addr in addrs:
        peer_id = addr.value_for_protocol("p2p")
        grouped.setdefault(peer_id, []).append(addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}")))
    return grouped


class _ConnectionEvents(INotifee):
    """Turns the swarm's connection notifications into log lines and events.

    ``connected`` is called (and posts) before the dial that made the connection
    returns, so the machine always hears of a connection before its dial's result."""

    def __init__(self, post: Callable[[ev.Event], None]) -> None:
        self.post = post

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        transport = connection_transport(conn)
        relay = relay_of(conn) if transport == "relay" else None
        self.post(ev.ConnectionOpened(str(peer), transport, relay))
        addrs = [str(a) for a in conn.get_transport_addresses()]
        log.info("connection opened", peer=str(peer), transport=transport, addresses=addrs)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        transport = connection_transport(conn)
        relay = relay_of(conn) if transport == "relay" else None
        self.post(ev.ConnectionClosed(str(peer), transport, relay))
        log.info("connection closed", peer=str(peer), transport=transport)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass
