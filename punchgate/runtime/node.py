"""The node's event loop: translate -> transition -> execute.

Everything that happens (a listener coming up, a dial's result, a connection opening,
a signal) is posted as an event to one channel. The loop takes each event, runs the
pure transition and executes the commands it returns. Commands that take time (dials)
run as tasks in the node's nursery and report back with new events; shutdown commands
run in order, inline.

Ownership: :meth:`Node.run` owns the host (``host.run``) and one nursery holding every
task the node starts: the signal watcher, pinger, dials, tunnel listeners and their
connection handlers. When the loop ends it cancels that nursery, then the host closes.
Streams the library hands to our protocol handler run in the library's tasks; each
registers with the :class:`SessionRegistry` so shutdown can reach it.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from punchgate.config import Config
from punchgate.logs import get_logger
from punchgate.runtime.host import (
    DIAL_TIMEOUT,
    PEERSTORE_TTL,
    build_host,
    check_ports_free,
    connection_transport,
)
from punchgate.runtime.pinger import Pinger
from punchgate.runtime.addresses import AddressBook
from punchgate.runtime.discovery import Discovery, service_key
from punchgate.runtime.mdns import MdnsDiscovery
from punchgate.runtime.holepunch import HolePuncher
from punchgate.runtime.paths import Paths
from punchgate.runtime.providers import FixedPeer, ProviderPool
from punchgate.runtime.reachability import PROTOCOL_ID as DIALBACK_PROTOCOL_ID
from punchgate.runtime.reachability import DialbackServer, check_reachability
from punchgate.runtime.relay import Relays
from punchgate.runtime.sessions import SessionRegistry
from punchgate.runtime.tunnel_client import TunnelClient
from punchgate.runtime.tunnel_service import TunnelService
from punchgate.state import NatStatus, NodeState, Phase, transition
from punchgate.state import commands as cmd
from punchgate.state import events as ev
from punchgate.wire import PROTOCOL_ID

log = get_logger("punchgate.node")


class Node:
    def __init__(self, config: Config, key_pair: KeyPair) -> None:
        self.config = config
        self.address_book = AddressBook()
        self.host: IHost = build_host(key_pair, config.listen, self.address_book)
        self.peer_id = self.host.get_id()
        self.registry = SessionRegistry()
        self.bootstrap_addrs = _group_by_peer(config.bootstrap)
        self.state = NodeState.initial(
            tuple(self.bootstrap_addrs), tuple(s.name for s in config.expose), config.shutdown_grace
        )
        self._events_in, self._events_out = trio.open_memory_channel[ev.Event](math.inf)
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()
        self._stopped = False
        self._listener_scope = trio.CancelScope()  # cancelled to stop accepting tunnel clients
        self.service = TunnelService({s.name: s.target for s in config.expose}, self.registry)
        self.discovery = Discovery(self.host)
        self.providers = ProviderPool(self._lookup_providers)
        self.relays = Relays(self.host, self.address_book, self.post)
        self.puncher = HolePuncher(self.host)
        self.dialback = DialbackServer(self.host)
        self.paths = Paths(self.host, self.relays, self.puncher, self._connected_bootstrap_peers)
        self.clients = [
            TunnelClient(self.paths, t.service, t.bind, FixedPeer(t.peer_id), self.registry, self.post)
            for t in config.tunnels
        ] + [
            TunnelClient(self.paths, t.service, t.bind, self.providers, self.registry, self.post)
            for t in config.tunnels_by_name
        ]
        self._publishing = False
        self._publish_again = False
        self.ready = trio.Event()  # set when the phase first becomes READY (used by tests)

    def post(self, event: ev.Event) -> None:
        """Hand an event to the loop; callable from any task of this trio run."""
        try:
            self._events_in.send_nowait(event)
        except trio.ClosedResourceError:
            pass  # the loop has ended; nothing listens any more

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        check_ports_free(self.config.listen)
        for client in self.clients:
            await client.open_listeners()
        for peer_id, addrs in self.bootstrap_addrs.items():
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), addrs, PEERSTORE_TTL)
        try:
            async with self.host.run(listen_addrs=list(self.config.listen)), trio.open_nursery() as nursery:
                self._nursery = nursery
                self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self.service.handle_stream)
                self.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), self.dialback.handle_stream)
                self.host.get_network().register_notifee(_ConnectionEvents(self.post))
                await nursery.start(self.discovery.run)
                await nursery.start(self.relays.run)
                await nursery.start(self.puncher.run)
                if self.config.mdns:
                    nursery.start_soon(MdnsDiscovery(self.host, self._on_mdns_peer).run)
                await nursery.start(self._watch_signals)  # before anyone can see us ready
                nursery.start_soon(Pinger(self.host).run)
                nursery.start_soon(self._republish_timer)
                addresses = tuple(str(a) for a in self.host.get_addrs())
                for address in addresses:
                    log.info("listening on", address=address)
                self.post(ev.ListenersReady(addresses))
                task_status.started(self)
                async for event in self._events_out:
                    await self._step(event)
                    if self._stopped:
                        break
                nursery.cancel_scope.cancel()
        finally:
            for client in self.clients:
                for listener in client.listeners:
                    await listener.aclose()
        log.info("stopped", peer_id=str(self.peer_id))

    async def _step(self, event: ev.Event) -> None:
        old = self.state
        self.state, commands = transition(old, event)
        if old.phase is not self.state.phase:
            log.info("phase transition", from_phase=old.phase.value, to_phase=self.state.phase.value)
            if self.state.phase is Phase.READY:
                self.ready.set()
        log.debug("state event", event_type=type(event).__name__, commands=[type(c).__name__ for c in commands])
        for command in commands:
            await self._execute(command)

    async def _execute(self, command: cmd.Command) -> None:
        assert self._nursery is not None
        match command:
            case cmd.DialBootstrap(peer_id=peer_id, delay=delay):
                if peer_id not in self._dialing:
                    self._dialing.add(peer_id)
                    self._nursery.start_soon(self._dial_bootstrap, peer_id, delay)
            case cmd.StartTunnelListeners():
                self._nursery.start_soon(self._serve_tunnels, self._nursery)
            case cmd.JoinDht(peer_id=peer_id):
                self._nursery.start_soon(self._join_dht, peer_id)
            case cmd.PublishServices(names=names):
                if self._publishing:
                    self._publish_again = True  # one run at a time; the latest request wins
                else:
                    self._publishing = True
                    self._nursery.start_soon(self._publish, names)
            case cmd.ReserveRelay(relay_peer_id=relay, delay=delay):
                self._nursery.start_soon(self._after, delay, self.relays.reserve, ID.from_base58(relay))
            case cmd.DropRelay(relay_peer_id=relay):
                self.relays.forget(ID.from_base58(relay))
                self.post(ev.AddressesChanged(tuple(str(a) for a in self.host.get_addrs())))
            case cmd.CheckReachability(peer_id=peer_id, delay=delay):
                self._nursery.start_soon(self._after, delay, self._check_reachability, peer_id)
            case cmd.SetDhtMode(server=server):
                self._nursery.start_soon(self.discovery.set_mode, server)
            case cmd.StopTunnelListeners():
                self._listener_scope.cancel()
            case cmd.CloseTunnelSessions(grace=grace):
                open_sessions = len(self.registry)
                await self.registry.close_all(grace)
                log.info("tunnels closed", sessions=open_sessions, left_open=len(self.registry))
            case cmd.StopHost():
                self._stopped = True

    async def _serve_tunnels(self, handler_nursery: trio.Nursery) -> None:
        with self._listener_scope:
            async with trio.open_nursery() as nursery:
                for client in self.clients:
                    nursery.start_soon(client.serve, handler_nursery)

    async def _dial_bootstrap(self, peer_id: str, delay: float) -> None:
        try:
            await trio.sleep(delay)
            pid = ID.from_base58(peer_id)
            with trio.fail_after(DIAL_TIMEOUT):
                await self.host.connect(PeerInfo(pid, self.bootstrap_addrs[peer_id]))
        except Exception as exc:  # dial errors come in many types; all mean "not reached"
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else f"{type(exc).__name__}: {exc}"
            log.warning("bootstrap dial failed", peer=peer_id, reason=reason, retry_in_s=None)
            self._dialing.discard(peer_id)
            self.post(ev.BootstrapFailed(peer_id, reason))
            return
        self._dialing.discard(peer_id)
        log.info("bootstrap connected", peer=peer_id)
        self.post(ev.BootstrapConnected(peer_id))

    @staticmethod
    async def _after(delay: float, function, *args) -> None:
        await trio.sleep(delay)
        await function(*args)

    async def _check_reachability(self, peer_id: str) -> None:
        started = trio.current_time()
        try:
            status, answer = await check_reachability(self.host, ID.from_base58(peer_id))
        except Exception as exc:  # the helper vanished or answered nonsense
            status, answer = NatStatus.UNKNOWN, {"error": f"{type(exc).__name__}: {exc}"}
        log.info(
            "reachability",
            status=status.value,
            checked_by=peer_id,
            observed=answer.get("observed"),
            local=answer.get("local"),
            port_preserving=answer.get("port_preserving"),
            error=answer.get("error"),
            duration_ms=round((trio.current_time() - started) * 1000, 1),
        )
        if status is NatStatus.PRIVATE and answer.get("port_preserving") is False:
            self.puncher.futile_because = (
                f"our NAT maps ports at random (local {answer['local']} seen as {answer['observed']}):"
                " a hole punch cannot work"
            )
        elif status is not NatStatus.UNKNOWN:
            self.puncher.futile_because = None
        self.post(ev.NatStatusObserved(status))

    def _connected_bootstrap_peers(self) -> list[ID]:
        return [ID.from_base58(b.peer_id) for b in self.state.bootstrap if b.connected]

    async def _join_dht(self, peer_id: str) -> None:
        pid = ID.from_base58(peer_id)
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                if not self.host.get_network().get_connections(pid):
                    await self.host.connect(PeerInfo(pid, self.host.get_peerstore().addrs(pid)))
            size = await self.discovery.join(pid)
        except Exception as exc:  # unreachable peer, DHT errors
            log.info("dht join failed", peer=peer_id, reason=f"{type(exc).__name__}: {exc}")
            return
        log.info("dht joined", peer=peer_id, routing_table_size=size)

    async def _publish(self, names: tuple[str, ...]) -> None:
        try:
            while True:
                self._publish_again = False
                for name in names:
                    started = trio.current_time()
                    ok = await self.discovery.publish(name)
                    log.info(
                        "service published" if ok else "service publication failed",
                        service=name,
                        key=service_key(name),
                        addresses=[str(a) for a in self.host.get_addrs()],
                        duration_ms=round((trio.current_time() - started) * 1000, 1),
                    )
                if not self._publish_again:
                    return
        finally:
            self._publishing = False

    async def _republish_timer(self) -> None:
        while True:
            await trio.sleep(self.config.republish_interval)
            self.post(ev.RepublishDue())

    async def _lookup_providers(self, service: str) -> list[ID]:
        return [info.peer_id for info in await self.discovery.find(service)]

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        log.info("peer discovered", peer=str(info.peer_id), source="mdns", addresses=[str(a) for a in info.addrs])
        self.post(ev.PeerDiscovered(str(info.peer_id), "mdns"))

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("shutdown requested", signal=name)
                self.post(ev.ShutdownRequested(name))

    def request_shutdown(self, reason: str = "requested") -> None:
        self.post(ev.ShutdownRequested(reason))


def _group_by_peer(addrs: tuple[multiaddr.Multiaddr, ...]) -> dict[str, list[multiaddr.Multiaddr]]:
    """Bootstrap addresses by peer ID, each without its trailing /p2p part."""
    grouped: dict[str, list[multiaddr.Multiaddr]] = {}
    for addr in addrs:
        peer_id = addr.value_for_protocol("p2p")
        grouped.setdefault(peer_id, []).append(addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}")))
    return grouped


class _ConnectionEvents(INotifee):
    """Turns the swarm's connection notifications into log lines and events."""

    def __init__(self, post: Callable[[ev.Event], None]) -> None:
        self.post = post

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        addrs = [str(a) for a in conn.get_transport_addresses()]
        log.info("connection opened", peer=str(peer), transport=connection_transport(conn), addresses=addrs)
        self.post(ev.PeerConnected(str(peer)))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        log.info("connection closed", peer=str(peer), transport=connection_transport(conn))
        if not network.get_connections(peer):
            self.post(ev.PeerDisconnected(str(peer)))

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass
