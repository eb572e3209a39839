"""``transition(state, event, now) -> (state, commands)``: the whole behaviour of a node.

Two steps per event:

1. the event's handler (one per event type, chosen by ``match``) records what happened
   in the dimensions it is about, and ignores results whose attempt is stale;
2. :func:`_advance` then makes every decision that depends on the state and the time:
   it ends work whose deadline passed, dials bootstrap peers that are due, asks for a
   reachability check or a relay slot, publishes, and moves each tunnel session on.

So a decision never depends on which event woke the machine, only on what is known
and what time it is; :func:`next_wakeup` tells the runtime when the next time-driven
decision falls due.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import assert_never

from punchgate.state import events as ev
from punchgate.state.addrs import classify
from punchgate.state.commands import (
    Advertise,
    Cancel,
    CheckReachability,
    CloseConnection,
    CloseSession,
    CloseTunnelSessions,
    Command,
    DialBootstrap,
    DialDirect,
    DialRelayed,
    DiscardStream,
    HolePunch,
    JoinDht,
    LookupPeer,
    LookupService,
    MapPorts,
    Note,
    OpenStream,
    PublishServices,
    Remember,
    ReserveRelay,
    SetDhtMode,
    StartPipe,
    StartTunnelListeners,
    StopHost,
    StopTunnelListeners,
    UnmapPorts,
)
from punchgate.state.model import (
    Dial,
    Link,
    MapStatus,
    Name,
    NatStatus,
    NodeState,
    Phase,
    PortMap,
    Publication,
    Punch,
    PunchStatus,
    Relayed,
    RelaySlot,
    RelayStatus,
    Session,
    SessionPhase,
    Shutdown,
    drop,
    put,
)

# --- timing (seconds); see docs/ARCHITECTURE.md for the reasons -----------------------
BOOTSTRAP_BACKOFF = (0.5, 10.0)  # first retry, cap: a restarted bootstrap node is found again quickly
RECONNECT_DELAY = 0.5  # a lost bootstrap peer is dialled again after this
BOOTSTRAP_DIAL_TIMEOUT = 10.0
CHECK_TIMEOUT = 25.0  # a reachability check (dial-back or AutoNAT) answers within this
RECHECK_AFTER_ERROR = 30.0
RECHECK_INTERVAL = 600.0  # networks change: check again every 10 minutes
RESERVE_TIMEOUT = 15.0
RELAY_BACKOFF = (1.0, 30.0)
RENEW_MARGIN = 300.0  # renew a reservation this long before it expires (or half-way)
PUBLISH_TIMEOUT = 45.0
PUBLISH_RETRY = 5.0
LOOKUP_TIMEOUT = 10.0
LOOKUP_BACKOFF = (0.25, 2.0)  # spacing of look-ups for a name nobody provides (yet)
PROVIDERS_FRESH = 60.0  # older provider lists are looked up again in the background
PEER_LOOKUP_TIMEOUT = 10.0
PEER_LOOKUP_INTERVAL = 2.0  # at most one fresh look-up of a peer per this
DIRECT_DIAL_TIMEOUT = 5.0
RELAYED_DIAL_TIMEOUT = 10.0
LINK_BACKOFF = (0.25, 1.0)  # after every known path to a peer failed (cheap: a relay answers at once)
PUNCH_TIMEOUT = 20.0
PUNCH_RETRY_AFTER = 300.0
PUNCH_WAIT = 3.0  # a session on an unlimited relay waits this long for a punch in progress
STREAM_TIMEOUT = 15.0  # opening a tunnel stream and reading the answer (the provider takes up to 10 s to reach its service)
SESSION_BACKOFF = (0.5, 4.0)  # between rounds over all candidates of a session
MAX_ERRORS = 4  # errors kept per session for the final log line
MAP_TIMEOUT = 12.0  # asking the router: NAT-PMP (~2 s when nothing answers), then UPnP discovery and requests
MAP_BACKOFF = (30.0, 600.0)  # after no gateway answered or it refused (a laptop moves to another network)
MAP_UNUSABLE_RETRY = 1800.0  # a mapping no dial-back got through (a lying router): not asked again for this long
MAP_PERMANENT_REFRESH = 1800.0  # a permanent mapping is asked for again this often (the router may have rebooted)

Result = tuple[NodeState, list[Command]]

DIRECT = "direct"


def backoff(failures: int, schedule: tuple[float, float] = BOOTSTRAP_BACKOFF) -> float:
    """Delay before retry number ``failures``: first, 2x first, 4x first ... capped."""
    first, cap = schedule
    if failures <= 0:
        return 0.0
    return min(first * 2 ** min(failures - 1, 16), cap)


def relay_path(relay: str) -> str:
    return f"relay:{relay}"


def transition(state: NodeState, event: ev.Event, now: float) -> Result:
    if state.phase is Phase.SHUTTING_DOWN:
        return _while_shutting_down(state, event, now)
    state, commands = _handle(state, event, now)
    state, more = _advance(state, now)
    return state, commands + more


def next_wakeup(state: NodeState, now: float) -> float | None:
    """The earliest time after ``now`` at which a decision falls due (None: none is pending)."""
    times: list[float | None] = []
    if state.phase is Phase.SHUTTING_DOWN:
        times.append(state.shutdown.deadline)
    else:
        for b in state.bootstrap:
            times += [b.deadline, None if b.connected or b.dialing else b.dial_at]
        times += [state.nat.deadline, state.nat.check_at]
        relay = state.relay
        times += [relay.deadline, relay.retry_at if relay.status is RelayStatus.IDLE else None, relay.renew_at]
        pm = state.portmap
        times += [pm.deadline, pm.check_deadline, pm.expires_at]
        if pm.attempt is None:
            times.append(pm.renew_at if pm.status is MapStatus.MAPPED else pm.retry_at)
        if pm.status is MapStatus.MAPPED and pm.check is None:
            times.append(pm.check_at)
        times += [state.publication.deadline, state.publication.due_at]
        for name in state.names.values():
            times += [name.lookup_deadline, name.next_lookup_at]
        for link in state.links.values():
            times += [link.dial.deadline if link.dial else None, link.lookup_deadline, link.punch.deadline]
            times += [link.retry_at, link.punch.retry_at]
            if link.relayed_since is not None:
                times.append(link.relayed_since + PUNCH_WAIT)
            if link.looked_up_at is not None:
                times.append(link.looked_up_at + PEER_LOOKUP_INTERVAL)
        for session in state.sessions.values():
            if session.phase not in (SessionPhase.OPEN, SessionPhase.CLOSED):
                times += [session.deadline, session.attempt_deadline, session.retry_at]
    future = [t for t in times if t is not None and t > now]
    return min(future) if future else None


# --- step 1: what happened ------------------------------------------------------------


def _handle(state: NodeState, event: ev.Event, now: float) -> Result:
    match event:
        case ev.ListenersReady():
            return _on_listeners_ready(state, now)
        case ev.Tick():
            return state, []
        case ev.BootstrapConnected():
            return _on_bootstrap_connected(state, event)
        case ev.BootstrapFailed():
            return _on_bootstrap_failed(state, event, now)
        case ev.DhtJoined():
            return replace(state, publication=replace(state.publication, dirty=True)), []
        case ev.PeerDiscovered():
            return _on_peer_discovered(state, event, now)
        case ev.ConnectionOpened():
            return _on_connection_opened(state, event, now)
        case ev.ConnectionClosed():
            return _on_connection_closed(state, event, now)
        case ev.ReachabilityChecked():
            if state.portmap.check is not None and state.portmap.check == event.attempt:
                return _on_mapping_checked(state, event, now)
            return _on_reachability(state, event, now)
        case ev.PortMappingObserved():
            if state.nat.attempt != event.attempt:
                return state, []
            return replace(state, nat=replace(state.nat, port_preserving=event.port_preserving)), []
        case ev.PortsMapped():
            return _on_ports_mapped(state, event, now)
        case ev.PortMappingFailed():
            if state.portmap.attempt != event.attempt:
                return state, []
            return _mapping_failed(state, event.reason, now)
        case ev.RelayReserved():
            return _on_relay_reserved(state, event, now)
        case ev.RelayReservationFailed():
            return _on_relay_failed(state, event, now)
        case ev.PublishDone():
            return _on_publish_done(state, event, now)
        case ev.ShutdownRequested():
            return _on_shutdown(state, now)
        case ev.SessionsDrained():
            return state, []
        case ev.SessionStarted():
            return _on_session_started(state, event, now)
        case ev.SessionEnded():
            return _on_session_ended(state, event)
        case ev.ProvidersFound():
            return _on_providers_found(state, event, now)
        case ev.LookupFailed():
            return _on_lookup_failed(state, event, now)
        case ev.PeerLookedUp():
            return _on_peer_looked_up(state, event, now)
        case ev.DialSucceeded():
            return _on_dial_succeeded(state, event, now)
        case ev.DialFailed():
            return _on_dial_failed(state, event, now)
        case ev.PunchFinished():
            return _on_punch_finished(state, event, now)
        case ev.StreamAccepted():
            return _on_stream_accepted(state, event)
        case ev.StreamRefused():
            return _on_stream_refused(state, event, now)
        case ev.StreamFailed():
            return _on_stream_failed(state, event, now)
        case _:
            assert_never(event)


def _advertise(state: NodeState) -> Advertise:
    relay = state.relay.relay_peer_id if state.relay.status is RelayStatus.RESERVED else None
    mapped = state.portmap.external if state.portmap.confirmed else ()
    # While our router forwards for us, a check of our own port may have got through the
    # router too (a gateway that ignored the port we asked for): then our interface
    # addresses (LAN ones) are not what was reached, the mapped address is.
    direct = not state.bootstrap or (state.nat.status is NatStatus.PUBLIC and not mapped)
    return Advertise(direct=direct, relay=relay, mapped=mapped)


def _on_listeners_ready(state: NodeState, now: float) -> Result:
    if state.phase is not Phase.STARTING:
        return state, []
    # With bootstrap peers we are probably behind NAT until a check says otherwise: only
    # use the DHT meanwhile, and advertise no address we have no reason to think works.
    commands: list[Command] = [SetDhtMode(server=not state.bootstrap), _advertise(state), StartTunnelListeners()]
    if state.bootstrap:
        state = replace(state, bootstrap=tuple(replace(b, dial_at=now) for b in state.bootstrap))
        return replace(state, phase=Phase.JOINING), commands
    return replace(state, phase=Phase.READY), commands


def _on_bootstrap_connected(state: NodeState, event: ev.BootstrapConnected) -> Result:
    peer = state.bootstrap_peer(event.peer_id)
    if peer is None or peer.attempt != event.attempt:
        return state, []
    state = state.with_bootstrap(replace(peer, connected=True, failures=0, attempt=None, deadline=None, dial_at=None))
    if state.phase is Phase.JOINING:
        state = replace(state, phase=Phase.READY)
    return state, [JoinDht(peer.peer_id), Remember(peer.peer_id, None, (), bootstrap=True)]


def _bootstrap_failed(state: NodeState, peer_id: str, now: float) -> NodeState:
    peer = state.bootstrap_peer(peer_id)
    assert peer is not None
    failures = peer.failures + 1
    peer = replace(peer, connected=False, attempt=None, deadline=None, failures=failures, dial_at=now + backoff(failures))
    state = state.with_bootstrap(peer)
    if state.phase is Phase.JOINING and all(b.failures > 0 for b in state.bootstrap):
        state = replace(state, phase=Phase.READY)  # work with what we have, keep retrying
    return state


def _on_bootstrap_failed(state: NodeState, event: ev.BootstrapFailed, now: float) -> Result:
    peer = state.bootstrap_peer(event.peer_id)
    if peer is None or peer.attempt != event.attempt:
        return state, []
    return _bootstrap_failed(state, event.peer_id, now), []


def _on_peer_discovered(state: NodeState, event: ev.PeerDiscovered, now: float) -> Result:
    if event.addrs:
        state = _learn_addrs(state, event.peer_id, event.addrs, now)
    if event.peer_id in state.connected_peers:
        return state, []
    return state, [JoinDht(event.peer_id)]


def _on_connection_opened(state: NodeState, event: ev.ConnectionOpened, now: float) -> Result:
    link = state.link(event.peer_id)
    if event.transport == "relay" and event.relay is not None:
        old = link.relayed.get(event.relay, Relayed())
        link = replace(
            link,
            relayed=put(link.relayed, event.relay, replace(old, count=old.count + 1)),
            relayed_since=link.relayed_since if link.relayed_since is not None else now,
        )
    elif event.transport == "tcp":
        link = replace(link, direct=link.direct + 1)
    elif event.transport == "quic":
        link = replace(link, quic=link.quic + 1)
    commands: list[Command] = []
    if link.direct_path is not None and link.punch.status is PunchStatus.RUNNING:
        # The punch made its connection: whatever the library still does, we are done.
        assert link.punch.attempt is not None
        commands += [Cancel(link.punch.attempt), _punch_note(link, now, "direct")]
        link = replace(link, punch=Punch())
    state = state.with_link(link)
    return replace(state, connected_peers=state.connected_peers | {event.peer_id}), commands


def _on_connection_closed(state: NodeState, event: ev.ConnectionClosed, now: float) -> Result:
    link = state.link(event.peer_id)
    if event.transport == "relay" and event.relay is not None:
        old = link.relayed.get(event.relay)
        if old is not None:
            relayed = drop(link.relayed, event.relay) if old.count <= 1 else put(
                link.relayed, event.relay, replace(old, count=old.count - 1)
            )
            link = replace(link, relayed=relayed, relayed_since=link.relayed_since if relayed else None)
    elif event.transport == "tcp":
        link = replace(link, direct=max(0, link.direct - 1))
    elif event.transport == "quic":
        link = replace(link, quic=max(0, link.quic - 1))
    commands: list[Command] = []
    if link.punch.status is PunchStatus.RUNNING and not any(r.count for r in link.relayed.values()):
        # A punch is coordinated over the relayed connection, which is gone.
        assert link.punch.attempt is not None
        commands.append(Cancel(link.punch.attempt))
        link = replace(link, punch=Punch())
    if not link.connected and link.punch.status is PunchStatus.FAILED:
        # Every connection is gone: the peer stopped, moved or restarted, and a punch that
        # failed against it says nothing of its next instance (a new process, a new NAT
        # mapping): the next relayed connection may punch at once.
        link = replace(link, punch=Punch())
    state = _store_link(state, link)
    if link.connected:
        return state, commands
    state, more = _peer_gone(state, event.peer_id, now)
    return state, commands + more


def _peer_gone(state: NodeState, peer_id: str, now: float) -> Result:
    """No connection to ``peer_id`` is left."""
    state = replace(state, connected_peers=state.connected_peers - {peer_id})
    commands: list[Command] = []
    peer = state.bootstrap_peer(peer_id)
    if peer is not None and peer.connected:
        state = state.with_bootstrap(replace(peer, connected=False, dial_at=now + RECONNECT_DELAY))
    if state.relay.relay_peer_id == peer_id and state.relay.status is not RelayStatus.IDLE:
        was_reserved = state.relay.status is RelayStatus.RESERVED
        if state.relay.attempt is not None:
            commands.append(Cancel(state.relay.attempt))
        state = replace(state, relay=RelaySlot(failures=state.relay.failures, retry_at=now))
        if was_reserved:
            commands += _addresses_changed(state)
            commands.append(Note("relay reservation lost", (("relay", peer_id), ("reason", "disconnected")), "warning"))
            state = replace(state, publication=replace(state.publication, dirty=True))
    if state.nat.checker == peer_id and state.nat.attempt is not None:
        commands.append(Cancel(state.nat.attempt))
        state = replace(state, nat=replace(state.nat, checker=None, attempt=None, deadline=None, check_at=now))
    pm = state.portmap
    if pm.checker == peer_id and pm.check is not None:
        commands.append(Cancel(pm.check))
        state = replace(state, portmap=replace(pm, checker=None, check=None, check_deadline=None, check_at=now))
    return state, commands


def _addresses_changed(state: NodeState) -> list[Command]:
    return [_advertise(state)]


def _on_reachability(state: NodeState, event: ev.ReachabilityChecked, now: float) -> Result:
    nat = state.nat
    if nat.attempt != event.attempt:
        return state, []
    nat = replace(nat, checker=None, attempt=None, deadline=None)
    if event.status is NatStatus.UNKNOWN:
        if event.method == "none":  # this peer cannot check anyone: ask another, never it again
            nat = replace(nat, unable=nat.unable | {event.checker}, check_at=now)
        else:
            nat = replace(nat, check_at=now + RECHECK_AFTER_ERROR)
        return replace(state, nat=nat), []
    port_preserving = nat.port_preserving if event.port_preserving is None else event.port_preserving
    changed = event.status is not state.nat.status
    nat = replace(nat, status=event.status, learnt_by=event.method, port_preserving=port_preserving,
                  check_at=now + RECHECK_INTERVAL)
    state = replace(state, nat=nat)
    if not changed:
        return state, []
    return _reachability_changed(state)


def _reachability_changed(state: NodeState) -> Result:
    """Whether we can be reached, or at which addresses, changed (a check, or our mapping)."""
    commands: list[Command] = [SetDhtMode(server=state.reachable)]
    if state.reachable and state.relay.status is not RelayStatus.IDLE:
        # Reachable: the slot is not needed (nobody needs a circuit to reach us).
        if state.relay.attempt is not None:
            commands.append(Cancel(state.relay.attempt))
        state = replace(state, relay=RelaySlot())
    commands += _addresses_changed(state)
    return replace(state, publication=replace(state.publication, dirty=True)), commands


# --- port mapping: what happened ------------------------------------------------------


def _on_ports_mapped(state: NodeState, event: ev.PortsMapped, now: float) -> Result:
    pm = state.portmap
    if pm.attempt != event.attempt:
        return state, []
    external = tuple(f"/ip4/{event.external_ip}/tcp/{port}" for port in event.ports)
    lease = event.lease_s
    # Asked again half-way through the lease (RFC 6886 3.7), so one lost answer costs nothing.
    renew_in = lease / 2 if lease > 0 else MAP_PERMANENT_REFRESH
    same = pm.status is MapStatus.MAPPED and external == pm.external
    new = replace(
        pm, status=MapStatus.MAPPED, attempt=None, deadline=None, method=event.method, external=external,
        ports=event.ports, renew_at=now + renew_in, expires_at=now + lease if lease > 0 else None, failures=0,
    )
    commands: list[Command] = []
    if not same:
        # Another address than the one checked (or the first): unknown until a dial-back gets through.
        if pm.check is not None:
            commands.append(Cancel(pm.check))
        new = replace(new, confirmed=False, checker=None, check=None, check_deadline=None, check_at=None)
    state = replace(state, portmap=new)
    if pm.confirmed and not same:
        state, more = _reachability_changed(state)
        commands += more
    return state, commands


def _mapping_failed(state: NodeState, reason: str, now: float) -> Result:
    """The mapping (or its renewal) failed: no gateway answered, it refused, or no answer in time."""
    pm = state.portmap
    failures = pm.failures + 1
    commands: list[Command] = [Cancel(pm.check)] if pm.check is not None else []
    state = replace(state, portmap=PortMap(MapStatus.FAILED, failures=failures,
                                           retry_at=now + backoff(failures, MAP_BACKOFF)))
    if pm.status is MapStatus.MAPPED:  # a renewal: the router no longer forwards for us
        commands.append(Note("port mapping lost", (("addresses", pm.external), ("reason", reason)), "warning"))
        if pm.confirmed:
            state, more = _reachability_changed(state)
            commands += more
    elif failures == 1:  # said once; retried quietly (a network without a gateway stays so)
        commands.append(Note("port mapping unavailable", (("reason", reason),)))
    return state, commands


def _on_mapping_checked(state: NodeState, event: ev.ReachabilityChecked, now: float) -> Result:
    """A dial-back to our mapped address ended."""
    pm = replace(state.portmap, checker=None, check=None, check_deadline=None)
    if event.status is NatStatus.UNKNOWN:  # the peer could not tell: later, or another peer at once
        if event.method == "none":
            state = replace(state, nat=replace(state.nat, unable=state.nat.unable | {event.checker}))
        pm = replace(pm, check_at=now if event.method == "none" else now + RECHECK_AFTER_ERROR)
        return replace(state, portmap=pm), []
    if event.status is NatStatus.PUBLIC:
        state = replace(state, portmap=replace(pm, confirmed=True, check_at=now + RECHECK_INTERVAL))
        return _reachability_changed(state) if not pm.confirmed else (state, [])
    # Granted, yet nothing gets through: a router that lies. Withdraw it, remove it, and do
    # not ask again for a long while (it would say yes again).
    commands: list[Command] = [Cancel(pm.attempt)] if pm.attempt is not None else []
    commands += [
        Note("port mapping unusable", (
            ("addresses", pm.external), ("method", pm.method), ("checked_by", event.checker),
            ("reason", "the router granted the mapping but a dial-back to it did not get through"),
            ("retry_in_s", MAP_UNUSABLE_RETRY),
        ), "warning"),
        UnmapPorts(),
    ]
    state = replace(state, portmap=PortMap(MapStatus.FAILED, failures=pm.failures + 1,
                                           retry_at=now + MAP_UNUSABLE_RETRY))
    if pm.confirmed:
        state, more = _reachability_changed(state)
        commands += more
    return state, commands


def _on_relay_reserved(state: NodeState, event: ev.RelayReserved, now: float) -> Result:
    slot = state.relay
    if slot.attempt != event.attempt or slot.relay_peer_id != event.relay_peer_id:
        return state, []
    newly = slot.status is not RelayStatus.RESERVED
    renew_in = max(1.0, event.expires_in - RENEW_MARGIN, event.expires_in / 2)
    slot = replace(
        slot, status=RelayStatus.RESERVED, failures=0, attempt=None, deadline=None, renewing=False,
        renew_at=now + renew_in, limit=event.limit,
    )
    state = replace(state, relay=slot)
    if not newly:
        return state, []
    return replace(state, publication=replace(state.publication, dirty=True)), _addresses_changed(state)


def _on_relay_failed(state: NodeState, event: ev.RelayReservationFailed, now: float) -> Result:
    slot = state.relay
    if slot.attempt != event.attempt or slot.relay_peer_id != event.relay_peer_id:
        return state, []
    return _relay_failed(state, event.error, now)


def _relay_failed(state: NodeState, error: str, now: float) -> Result:
    slot = state.relay
    failures = slot.failures + 1
    lost = slot.status is RelayStatus.RESERVED
    state = replace(state, relay=RelaySlot(failures=failures, retry_at=now + backoff(failures, RELAY_BACKOFF),
                                           relay_peer_id=slot.relay_peer_id))
    if not lost:
        return state, []
    state = replace(state, publication=replace(state.publication, dirty=True))
    note = Note("relay reservation lost", (("relay", slot.relay_peer_id), ("reason", error)), "warning")
    return state, [*_addresses_changed(state), note]


def _on_publish_done(state: NodeState, event: ev.PublishDone, now: float) -> Result:
    pub = state.publication
    if pub.attempt != event.attempt:
        return state, []
    due = now + (state.settings.republish_interval if event.ok else PUBLISH_RETRY)
    return replace(state, publication=replace(pub, attempt=None, deadline=None, due_at=due)), []


def _on_shutdown(state: NodeState, now: float) -> Result:
    commands: list[Command] = [StopTunnelListeners(), CloseTunnelSessions()]
    pm = state.portmap
    if pm.status in (MapStatus.MAPPING, MapStatus.MAPPED):
        # Leave no forwarding behind on the router (one being asked for may exist already).
        commands += [*([Cancel(pm.attempt)] if pm.attempt is not None else []), UnmapPorts()]
    state = replace(state, phase=Phase.SHUTTING_DOWN, shutdown=Shutdown(deadline=now + state.settings.shutdown_grace),
                    portmap=replace(pm, attempt=None, deadline=None))
    return state, commands


def _while_shutting_down(state: NodeState, event: ev.Event, now: float) -> Result:
    """Shutting down: keep the books, start nothing new, stop when drained or late."""
    match event:
        case ev.ShutdownRequested() | ev.SessionsDrained():
            # Asked again: stop waiting for open sessions. Or nothing is left to wait for.
            return replace(state, shutdown=Shutdown()), [StopHost()]
        case ev.Tick():
            deadline = state.shutdown.deadline
            if deadline is not None and now >= deadline:
                return replace(state, shutdown=Shutdown()), [StopHost()]
            return state, []
        case _:
            pass
    new_state, commands = _handle(state, event, now)
    # Streams accepted for nobody are reset; nothing else is started.
    return replace(new_state, phase=Phase.SHUTTING_DOWN), [c for c in commands if isinstance(c, DiscardStream)]


# --- the tunnel dimension: what happened -------------------------------------------


def _on_session_started(state: NodeState, event: ev.SessionStarted, now: float) -> Result:
    if event.session in state.sessions:
        return state, []
    session = Session(
        id=event.session, service=event.service, fixed_peer=event.fixed_peer, started_at=now,
        deadline=now + state.settings.connect_timeout,
    )
    state = state.with_session(session)
    if event.fixed_peer is None and event.service not in state.names:
        state = state.with_name(Name(event.service))
    return state, []


def _on_session_ended(state: NodeState, event: ev.SessionEnded) -> Result:
    session = state.sessions.get(event.session)
    if session is None:
        return state, []
    commands: list[Command] = []
    if session.phase is SessionPhase.OPENING and session.attempt is not None:
        commands.append(Cancel(session.attempt))
    state = replace(state, sessions=drop(state.sessions, event.session))
    if session.peer is not None:
        state = _store_link(state, state.link(session.peer))
    return state, commands


def _learn_addrs(state: NodeState, peer_id: str, addrs: tuple[str, ...], now: float) -> NodeState:
    """Fresh addresses for a peer: everything may be tried again, at once."""
    direct, relays = classify(addrs)
    link = state.link(peer_id)
    if not direct and not relays:
        return state
    changed = (direct, relays) != (link.direct_addrs, link.relays)
    link = replace(link, direct_addrs=direct, relays=relays, addrs_at=now)
    if changed:
        link = replace(link, failed_paths=frozenset(), retry_at=now)
    return state.with_link(link)


def _on_providers_found(state: NodeState, event: ev.ProvidersFound, now: float) -> Result:
    name = state.names.get(event.service)
    if name is None or name.lookup != event.attempt:
        return state, []
    for record in event.providers:
        state = _learn_addrs(state, record.peer_id, record.addrs, now)
    peers = tuple(dict.fromkeys(r.peer_id for r in event.providers))
    empty = 0 if peers else name.empty + 1
    name = replace(name, providers=peers, found_at=now, lookup=None, lookup_deadline=None, empty=empty,
                   next_lookup_at=now + backoff(empty, LOOKUP_BACKOFF))
    state = state.with_name(name)
    # A new answer starts a new round for the connections waiting on this name.
    for session in state.sessions.values():
        if session.fixed_peer is None and session.service == event.service and session.phase is SessionPhase.RESOLVING:
            state = state.with_session(replace(session, tried=frozenset(), retry_at=None))
    return state, []


def _on_lookup_failed(state: NodeState, event: ev.LookupFailed, now: float) -> Result:
    name = state.names.get(event.service)
    if name is None or name.lookup != event.attempt:
        return state, []
    empty = name.empty + 1
    name = replace(name, lookup=None, lookup_deadline=None, empty=empty, next_lookup_at=now + backoff(empty, LOOKUP_BACKOFF))
    state = state.with_name(name)
    return _session_errors(state, lambda s: s.fixed_peer is None and s.service == event.service,
                           f"look-up of {event.service!r}: {event.reason}"), []


def _on_peer_looked_up(state: NodeState, event: ev.PeerLookedUp, now: float) -> Result:
    link = state.link(event.peer_id)
    if link.lookup != event.attempt:
        return state, []
    state = state.with_link(replace(link, lookup=None, lookup_deadline=None, looked_up_at=now))
    return _learn_addrs(state, event.peer_id, event.addrs, now), []


def _on_dial_succeeded(state: NodeState, event: ev.DialSucceeded, now: float) -> Result:
    link = state.link(event.peer_id)
    if link.dial is None or link.dial.attempt != event.attempt:
        return state, []
    # The runtime reports a connection (ConnectionOpened) before the dial that made it.
    if event.relay is not None:
        old = link.relayed.get(event.relay)
        if old is None or old.count == 0:
            return _dial_failed(state, link, "the relayed connection closed as soon as it was made", now), []
        link = replace(link, relayed=put(link.relayed, event.relay, replace(old, limit=event.limit)))
    elif link.direct_path is None:
        return _dial_failed(state, link, "the connection closed as soon as it was made", now), []
    link = replace(link, dial=None, failures=0, retry_at=now, last_error=None)
    return state.with_link(link), []


def _on_dial_failed(state: NodeState, event: ev.DialFailed, now: float) -> Result:
    link = state.link(event.peer_id)
    if link.dial is None or link.dial.attempt != event.attempt:
        return state, []
    return _dial_failed(state, link, event.reason, now), []


def _dial_failed(state: NodeState, link: Link, reason: str, now: float) -> NodeState:
    assert link.dial is not None
    path = link.dial.path
    failures = link.failures + 1
    link = replace(link, dial=None, failed_paths=link.failed_paths | {path}, failures=failures, last_error=reason)
    # The next known path is tried at once; once all have failed, after a backoff.
    if _next_path(state, link) is None:
        link = replace(link, retry_at=now + backoff(failures, LINK_BACKOFF))
    state = state.with_link(link)
    where = "directly" if path == DIRECT else f"through relay {path.removeprefix('relay:')}"
    return _session_errors(state, lambda s: s.peer == link.peer, f"{link.peer} {where}: {reason}")


def _on_punch_finished(state: NodeState, event: ev.PunchFinished, now: float) -> Result:
    link = state.link(event.peer_id)
    if link.punch.attempt != event.attempt or link.punch.status is not PunchStatus.RUNNING:
        return state, []
    if event.direct:
        return state.with_link(replace(link, punch=Punch())), [_punch_note(link, now, "direct")]
    reason = event.reason or "no direct connection"
    punch = Punch(PunchStatus.FAILED, retry_at=now + PUNCH_RETRY_AFTER, reason=reason)
    return state.with_link(replace(link, punch=punch)), [_punch_note(link, now, "failed", reason)]


def _punch_note(link: Link, now: float, outcome: str, reason: str | None = None) -> Note:
    """The ``hole punch`` log event for the punch running on ``link``."""
    assert link.punch.deadline is not None
    took = now - (link.punch.deadline - PUNCH_TIMEOUT)
    fields: tuple[tuple[str, object], ...] = (
        ("peer", link.peer), ("outcome", outcome), ("duration_ms", round(took * 1000, 1)),
    )
    if outcome != "direct":
        fields += (("reason", reason), ("fallback", "relayed"))
    return Note("hole punch", fields)


def _on_stream_accepted(state: NodeState, event: ev.StreamAccepted) -> Result:
    session = state.sessions.get(event.session)
    if session is None or session.attempt != event.attempt or session.phase is not SessionPhase.OPENING:
        return state, [DiscardStream(event.attempt)]
    session = replace(session, phase=SessionPhase.OPEN, attempt_deadline=None)
    assert session.peer is not None
    link = state.link(session.peer)
    circuits = tuple(f"{addr}/p2p/{relay}/p2p-circuit" for relay, addrs in link.relays for addr in addrs)
    remember = Remember(session.peer, session.service, (*link.direct_addrs, *circuits), bootstrap=False)
    return state.with_session(session), [StartPipe(session.id, event.attempt), remember]


def _opening(state: NodeState, session_id: int, attempt: int) -> Session | None:
    session = state.sessions.get(session_id)
    if session is None or session.attempt != attempt or session.phase is not SessionPhase.OPENING:
        return None
    return session


def _on_stream_refused(state: NodeState, event: ev.StreamRefused, now: float) -> Result:
    session = _opening(state, event.session, event.attempt)
    if session is None:
        return state, []
    assert session.peer is not None
    error = f"{session.peer}: rejected: {event.reason}"
    session = _back_to_resolving(replace(session, refused=session.refused | {session.peer}), error)
    if session.fixed_peer is not None:
        # The one peer we may use said no: asking again would get the same answer.
        return _close(state, session, "client tunnel rejected", event.reason)
    return state.with_session(session), []


def _on_stream_failed(state: NodeState, event: ev.StreamFailed, now: float) -> Result:
    session = _opening(state, event.session, event.attempt)
    if session is None:
        return state, []
    assert session.peer is not None
    stalled = CloseConnection(session.peer, session.via, session.transport or "tcp")
    commands: list[Command] = [stalled] if event.stalled else []
    session = _back_to_resolving(replace(session, tried=session.tried | {session.peer}), f"{session.peer}: {event.reason}")
    return state.with_session(session), commands


def _back_to_resolving(session: Session, error: str) -> Session:
    return replace(
        session, phase=SessionPhase.RESOLVING, peer=None, attempt=None, attempt_deadline=None, path=None, via=None,
        transport=None, waiting_since=None, errors=(*session.errors, error)[-MAX_ERRORS:],
    )


def _session_errors(state: NodeState, which: Callable[[Session], bool], error: str) -> NodeState:
    for session in state.sessions.values():
        if session.phase is not SessionPhase.OPEN and which(session):
            state = state.with_session(replace(session, errors=(*session.errors, error)[-MAX_ERRORS:]))
    return state


def _close(state: NodeState, session: Session, event: str, reason: str) -> Result:
    commands: list[Command] = [CloseSession(session.id, event, reason)]
    if session.phase is SessionPhase.OPENING and session.attempt is not None:
        commands.insert(0, Cancel(session.attempt))
    session = replace(session, phase=SessionPhase.CLOSED, attempt=None, attempt_deadline=None, retry_at=None)
    return state.with_session(session), commands


def _store_link(state: NodeState, link: Link) -> NodeState:
    """Keep a link while it is worth something; forget links of peers we have no business with."""
    idle = not link.connected and not link.busy and link.punch.status is PunchStatus.IDLE
    wanted = any(s.peer == link.peer or s.fixed_peer == link.peer for s in state.sessions.values())
    if idle and not wanted and not link.direct_addrs and not link.relays:
        return replace(state, links=drop(state.links, link.peer))
    return state.with_link(link)


# --- step 2: decisions ---------------------------------------------------------------


def _advance(state: NodeState, now: float) -> Result:
    commands: list[Command] = []
    steps = (_expire, _advance_bootstrap, _advance_nat, _advance_portmap, _advance_relay, _advance_publication,
             _advance_sessions)
    for step in steps:
        state, more = step(state, now)
        commands += more
    return state, commands


def _expire(state: NodeState, now: float) -> Result:
    """End every piece of work whose deadline has passed, as a failure with a reason."""
    commands: list[Command] = []
    for b in state.bootstrap:
        if b.attempt is not None and b.deadline is not None and now >= b.deadline:
            commands.append(Cancel(b.attempt))
            state = _bootstrap_failed(state, b.peer_id, now)
    nat = state.nat
    if nat.attempt is not None and nat.deadline is not None and now >= nat.deadline:
        commands.append(Cancel(nat.attempt))
        state = replace(state, nat=replace(nat, checker=None, attempt=None, deadline=None, check_at=now + RECHECK_AFTER_ERROR))
    slot = state.relay
    if slot.attempt is not None and slot.deadline is not None and now >= slot.deadline:
        commands.append(Cancel(slot.attempt))
        state, more = _relay_failed(state, "timed out", now)
        commands += more
    pm = state.portmap
    if pm.attempt is not None and pm.deadline is not None and now >= pm.deadline:
        commands.append(Cancel(pm.attempt))
        state, more = _mapping_failed(state, f"no answer within {MAP_TIMEOUT:g} s", now)
        commands += more
    pm = state.portmap
    if pm.status is MapStatus.MAPPED and pm.expires_at is not None and now >= pm.expires_at:
        if pm.attempt is not None:
            commands.append(Cancel(pm.attempt))
        state, more = _mapping_failed(state, "the lease ended before it was renewed", now)
        commands += more
    pm = state.portmap
    if pm.check is not None and pm.check_deadline is not None and now >= pm.check_deadline:
        commands.append(Cancel(pm.check))
        state = replace(state, portmap=replace(pm, checker=None, check=None, check_deadline=None,
                                               check_at=now + RECHECK_AFTER_ERROR))
    pub = state.publication
    if pub.attempt is not None and pub.deadline is not None and now >= pub.deadline:
        commands.append(Cancel(pub.attempt))
        state = replace(state, publication=replace(pub, attempt=None, deadline=None, due_at=now + PUBLISH_RETRY))
    for name in state.names.values():
        if name.lookup is not None and name.lookup_deadline is not None and now >= name.lookup_deadline:
            commands.append(Cancel(name.lookup))
            state, _ = _on_lookup_failed(state, ev.LookupFailed(name.service, name.lookup, "timed out"), now)
    for link in state.links.values():
        if link.dial is not None and now >= link.dial.deadline:
            commands.append(Cancel(link.dial.attempt))
            state = _dial_failed(state, link, "timed out", now)
            link = state.link(link.peer)
        if link.lookup is not None and link.lookup_deadline is not None and now >= link.lookup_deadline:
            commands.append(Cancel(link.lookup))
            link = replace(link, lookup=None, lookup_deadline=None, looked_up_at=now)
            state = state.with_link(link)
        punch = link.punch
        if punch.status is PunchStatus.RUNNING and punch.deadline is not None and now >= punch.deadline:
            assert punch.attempt is not None
            reason = f"no direct connection within {PUNCH_TIMEOUT:.0f} s"
            commands += [Cancel(punch.attempt), _punch_note(link, now, "failed", reason)]
            failed = Punch(PunchStatus.FAILED, retry_at=now + PUNCH_RETRY_AFTER, reason=reason)
            state = state.with_link(replace(link, punch=failed))
    for session in state.sessions.values():
        if session.phase in (SessionPhase.OPEN, SessionPhase.CLOSED):
            continue
        if now >= session.deadline:
            reason = f"no tunnel to {session.target!r} within {state.settings.connect_timeout:g} s"
            if session.errors:
                reason += ": " + "; ".join(session.errors)
            elif session.fixed_peer is None and not state.names.get(session.service, Name(session.service)).providers:
                reason += ": no peer provides this service"
            state, more = _close(state, session, "client tunnel error", reason)
            commands += more
        elif (
            session.phase is SessionPhase.OPENING
            and session.attempt_deadline is not None
            and now >= session.attempt_deadline
        ):
            assert session.attempt is not None
            commands.append(Cancel(session.attempt))
            state, more = _on_stream_failed(state, ev.StreamFailed(session.id, session.attempt, "timed out", True), now)
            commands += more
    return state, commands


def _advance_bootstrap(state: NodeState, now: float) -> Result:
    commands: list[Command] = []
    for b in state.bootstrap:
        if not b.connected and not b.dialing and b.dial_at is not None and now >= b.dial_at:
            state, attempt = state.mint()
            state = state.with_bootstrap(replace(b, attempt=attempt, deadline=now + BOOTSTRAP_DIAL_TIMEOUT, dial_at=None))
            commands.append(DialBootstrap(b.peer_id, attempt))
    return state, commands


def _advance_nat(state: NodeState, now: float) -> Result:
    nat = state.nat
    if nat.checker is not None or (nat.check_at is not None and now < nat.check_at):
        return state, []
    if nat.status is not NatStatus.UNKNOWN and nat.check_at is None:
        return state, []
    checkers = [p for p in state.connected_bootstrap() if p not in nat.unable]
    if not checkers:
        return state, []
    state, attempt = state.mint()
    nat = replace(nat, checker=checkers[0], attempt=attempt, deadline=now + CHECK_TIMEOUT, check_at=None)
    return replace(state, nat=nat), [CheckReachability(checkers[0], attempt)]


def _advance_relay(state: NodeState, now: float) -> Result:
    slot = state.relay
    if not state.assumes_private:
        return state, []
    if slot.status is RelayStatus.IDLE:
        relays = state.connected_bootstrap()
        if not relays or now < slot.retry_at:
            return state, []
        relay = relays[slot.failures % len(relays)]  # after a refusal, ask the next one
        state, attempt = state.mint()
        slot = replace(slot, status=RelayStatus.RESERVING, relay_peer_id=relay, attempt=attempt,
                       deadline=now + RESERVE_TIMEOUT)
        return replace(state, relay=slot), [ReserveRelay(relay, attempt)]
    if slot.status is RelayStatus.RESERVED and not slot.renewing and slot.renew_at is not None and now >= slot.renew_at:
        relay_id = slot.relay_peer_id
        assert relay_id is not None
        state, attempt = state.mint()
        slot = replace(slot, renewing=True, attempt=attempt, deadline=now + RESERVE_TIMEOUT)
        return replace(state, relay=slot), [ReserveRelay(relay_id, attempt)]
    return state, []


def _advance_portmap(state: NodeState, now: float) -> Result:
    """Map (or renew) when due; have a mapped address checked by a dial-back before it is
    advertised, and again every RECHECK_INTERVAL. Only with bootstrap peers: without them
    nobody could check a mapping (and such a node advertises its own addresses anyway)."""
    if not state.settings.port_mapping or not state.bootstrap or state.phase not in (Phase.JOINING, Phase.READY):
        return state, []
    pm = state.portmap
    commands: list[Command] = []
    if pm.attempt is None:
        renew = pm.status is MapStatus.MAPPED and pm.renew_at is not None and now >= pm.renew_at
        if renew or (pm.status in (MapStatus.IDLE, MapStatus.FAILED) and now >= pm.retry_at):
            state, attempt = state.mint()
            status = MapStatus.MAPPED if renew else MapStatus.MAPPING
            pm = replace(pm, status=status, attempt=attempt, deadline=now + MAP_TIMEOUT)
            commands.append(MapPorts(attempt))
    if pm.status is MapStatus.MAPPED and pm.check is None and (pm.check_at is None or now >= pm.check_at):
        checkers = [p for p in state.connected_bootstrap() if p not in state.nat.unable]
        if checkers:
            state, attempt = state.mint()
            pm = replace(pm, checker=checkers[0], check=attempt, check_deadline=now + CHECK_TIMEOUT, check_at=None)
            commands.append(CheckReachability(checkers[0], attempt, pm.ports))
    return replace(state, portmap=pm), commands


def _may_publish(state: NodeState) -> bool:
    """Records carry addresses that should work: ours when we are reachable (or have no
    one to ask), our mapped address once a dial-back got through it, a circuit address
    when we hold a relay slot; nothing before that."""
    if state.phase is not Phase.READY or not state.services:
        return False
    return not state.bootstrap or state.reachable or state.relay.status is RelayStatus.RESERVED


def _advance_publication(state: NodeState, now: float) -> Result:
    pub = state.publication
    if pub.running or not _may_publish(state):
        return state, []
    if not pub.dirty and (pub.due_at is None or now < pub.due_at):
        return state, []
    state, attempt = state.mint()
    pub = Publication(attempt=attempt, deadline=now + PUBLISH_TIMEOUT, dirty=False, due_at=None)
    return replace(state, publication=pub), [PublishServices(state.services, attempt)]


# --- the tunnel dimension: decisions ------------------------------------------------


def _advance_sessions(state: NodeState, now: float) -> Result:
    commands: list[Command] = []
    for session_id in sorted(state.sessions):
        session = state.sessions[session_id]
        if session.phase is SessionPhase.RESOLVING:
            state, more = _resolve(state, session, now)
            commands += more
            session = state.sessions[session_id]
        if session.phase is SessionPhase.CONNECTING:
            state, more = _connect(state, session, now)
            commands += more
    state, more = _refresh_names(state, now)
    return state, commands + more


def _candidates(state: NodeState, session: Session) -> list[str]:
    if session.fixed_peer is not None:
        peers: tuple[str, ...] = (session.fixed_peer,)
        start = 0
    else:
        name = state.names.get(session.service, Name(session.service))
        peers, start = name.providers, name.cursor
    if peers:
        start %= len(peers)
        peers = peers[start:] + peers[:start]
    return [p for p in peers if p not in session.tried and p not in session.refused]


def _resolve(state: NodeState, session: Session, now: float) -> Result:
    if session.retry_at is not None:
        if now < session.retry_at:
            return state, []
        session = replace(session, retry_at=None, tried=frozenset(), rounds=session.rounds + 1)
        state = state.with_session(session)
    candidates = _candidates(state, session)
    if candidates:
        peer = candidates[0]
        if session.fixed_peer is None:
            name = state.names[session.service]
            state = state.with_name(replace(name, cursor=name.cursor + 1))
        session = replace(session, phase=SessionPhase.CONNECTING, peer=peer, waiting_since=now)
        return state.with_session(session), []
    if session.fixed_peer is not None:
        # The one peer failed this round: try it again after a pause.
        return state.with_session(replace(session, retry_at=now + backoff(session.rounds + 1, SESSION_BACKOFF))), []
    name = state.names.get(session.service, Name(session.service))
    looked_up_since = name.found_at is not None and name.found_at > session.started_at
    if name.providers and set(name.providers) <= session.refused and looked_up_since:
        # Every provider, freshly looked up, said no.
        reason = "; ".join(session.errors) or "every provider refused"
        return _close(state, session, "client tunnel rejected", reason)
    if session.tried:
        # Everything known failed this round: pause, and look again meanwhile.
        session = replace(session, retry_at=now + backoff(session.rounds + 1, SESSION_BACKOFF))
        state = state.with_session(session)
    return _lookup_name(state, session.service, now)


def _lookup_name(state: NodeState, service: str, now: float) -> Result:
    name = state.names.get(service, Name(service))
    if name.lookup is not None or now < name.next_lookup_at:
        return state, []
    state, attempt = state.mint()
    name = replace(name, lookup=attempt, lookup_deadline=now + LOOKUP_TIMEOUT)
    return state.with_name(name), [LookupService(service, attempt)]


def _refresh_names(state: NodeState, now: float) -> Result:
    """A name in use whose providers were found long ago is looked up again, in the background."""
    commands: list[Command] = []
    for name in list(state.names.values()):
        in_use = any(s.fixed_peer is None and s.service == name.service and s.phase is not SessionPhase.CLOSED
                     for s in state.sessions.values())
        if not in_use:
            if name.lookup is None and not name.providers:
                state = replace(state, names=drop(state.names, name.service))
            continue
        known_only = name.found_at is None and bool(name.providers)  # remembered from an earlier run
        if known_only or (name.found_at is not None and now - name.found_at >= PROVIDERS_FRESH):
            state, more = _lookup_name(state, name.service, now)
            commands += more
    return state, commands


def _connect(state: NodeState, session: Session, now: float) -> Result:
    assert session.peer is not None
    link = state.link(session.peer)
    use, reason = _path_for(state, link, now)
    if use is not None:
        state, attempt = state.mint()
        transport = link.direct_path if use == DIRECT else None
        relay = None if use == DIRECT else use
        session = replace(
            session, phase=SessionPhase.OPENING, attempt=attempt, attempt_deadline=min(now + STREAM_TIMEOUT, session.deadline),
            path="direct" if relay is None else "relayed", via=relay, transport=transport,
        )
        command = OpenStream(session.id, attempt, link.peer, session.service, relay, transport or "tcp")
        return state.with_session(session), [command]
    if reason is not None:
        session = replace(session, errors=(*session.errors, f"{link.peer}: {reason}")[-MAX_ERRORS:])
        if session.fixed_peer is not None or not _other_candidates(state, session):
            return _close(state, session, "client tunnel error", reason)
        return state.with_session(_back_to_resolving(replace(session, tried=session.tried | {link.peer}), reason)), []
    if session.fixed_peer is None and _stuck(state, link, now) and _other_candidates(state, session):
        # Every known path to this provider failed; another provider may do better.
        session = replace(session, tried=session.tried | {link.peer})
        return state.with_session(_back_to_resolving(session, f"{link.peer}: {link.last_error}")), []
    return _progress_link(state, link, now)


def _other_candidates(state: NodeState, session: Session) -> bool:
    return any(p != session.peer for p in _candidates(state, session))


def _stuck(state: NodeState, link: Link, now: float) -> bool:
    return not link.connected and link.dial is None and link.failures > 0 and now < link.retry_at


def _punch_viable(state: NodeState, link: Link, now: float) -> tuple[bool, str | None]:
    if state.nat.port_preserving is False:
        return False, "our NAT maps ports at random, so a hole punch cannot work"
    punch = link.punch
    if punch.status is PunchStatus.FAILED and punch.retry_at is not None and now < punch.retry_at:
        return False, f"hole punch failed: {punch.reason}"
    return True, None


def _path_for(state: NodeState, link: Link, now: float) -> tuple[str | None, str | None]:
    """(the path a stream should take now, None) or (None, why none ever will) or (None, None): wait.

    DIRECT means the link's direct connection (:attr:`Link.direct_path`: TCP if one is up, else QUIC)."""
    if link.direct_path is not None:
        return DIRECT, None
    # A relayed connection we are still dialling has not told us its limit yet.
    dialling = link.dial.path if link.dial is not None else None
    relays = [(relay, r.limit) for relay, r in link.relayed.items() if r.count > 0 and dialling != relay_path(relay)]
    if not relays:
        return None, None
    viable, why_not = _punch_viable(state, link, now)
    unlimited = [relay for relay, limit in relays if limit is None or not limit.restricts_tunnels]
    if unlimited:
        since = link.relayed_since if link.relayed_since is not None else now
        if viable and now < since + PUNCH_WAIT:
            return None, None  # a direct connection may be moments away
        return unlimited[0], None
    if viable:
        return None, None  # a limited relay carries no tunnel: wait for the punch
    relay, limit = relays[0]
    assert limit is not None
    return None, (
        f"relay {relay} limits each relayed connection to {limit.describe()}, too little for a tunnel,"
        f" and no direct connection could be made ({why_not})"
    )


def _next_path(state: NodeState, link: Link) -> str | None:
    """The next way to try to reach the peer: its own relays, then its direct addresses,
    then our relays (a peer may hold a slot there without our knowing)."""
    paths = [relay_path(relay) for relay, _ in link.relays]
    if link.direct_addrs:
        paths.append(DIRECT)
    paths += [relay_path(relay) for relay in state.connected_bootstrap() if relay != link.peer]
    return next((p for p in dict.fromkeys(paths) if p not in link.failed_paths), None)


def _progress_link(state: NodeState, link: Link, now: float) -> Result:
    """Someone waits for ``link``: punch, dial or look up, whichever is due."""
    commands: list[Command] = []
    if link.direct_path is not None:
        return state, []
    if link.relayed:
        viable, why_not = _punch_viable(state, link, now)
        if link.punch.status is not PunchStatus.RUNNING and any(r.count for r in link.relayed.values()):
            if viable:
                state, attempt = state.mint()
                punch = Punch(PunchStatus.RUNNING, attempt=attempt, deadline=now + PUNCH_TIMEOUT)
                state = state.with_link(replace(link, punch=punch))
                return state, [HolePunch(link.peer, attempt)]
            if link.punch.status is PunchStatus.IDLE:
                # Not worth trying (our NAT is symmetric): say so once, remember for a while.
                punch = Punch(PunchStatus.FAILED, retry_at=now + PUNCH_RETRY_AFTER, reason=why_not)
                state = state.with_link(replace(link, punch=punch))
                note = Note("hole punch", (("peer", link.peer), ("outcome", "skipped"), ("reason", why_not),
                                           ("fallback", "relayed")))
                return state, [note]
        if any(r.count for r in link.relayed.values()):
            return state, []
    if link.dial is None and now >= link.retry_at:
        path = _next_path(state, link)
        if path is None and link.failed_paths:
            link = replace(link, failed_paths=frozenset())  # a new round over every known path
            path = _next_path(state, link)
        if path is not None:
            state, attempt = state.mint()
            timeout = DIRECT_DIAL_TIMEOUT if path == DIRECT else RELAYED_DIAL_TIMEOUT
            link = replace(link, dial=Dial(attempt, path, now + timeout))
            state = state.with_link(link)
            if path == DIRECT:
                commands.append(DialDirect(link.peer, attempt, link.direct_addrs))
            else:
                relay = path.removeprefix("relay:")
                relay_addrs = dict(link.relays).get(relay, ())
                commands.append(DialRelayed(link.peer, attempt, relay, relay_addrs))
    # Addresses are hints: when they failed us or we have none, ask the network again.
    lookup_due = link.looked_up_at is None or now >= link.looked_up_at + PEER_LOOKUP_INTERVAL
    if link.lookup is None and lookup_due and (link.failed_paths or _next_path(state, link) is None):
        state, attempt = state.mint()
        link = replace(state.link(link.peer), lookup=attempt, lookup_deadline=now + PEER_LOOKUP_TIMEOUT)
        state = state.with_link(link)
        commands.append(LookupPeer(link.peer, attempt))
    return state, commands
