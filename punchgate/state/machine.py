"""``transition(state, event) -> (state, commands)``: the whole behaviour of a node.

Each event type has one handler below; handlers touch only the dimensions the event is
about. Timers are not kept here: a command that should happen later carries a
``delay`` and the runtime waits before executing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from punchgate.state import events as ev
from punchgate.state.commands import (
    CheckReachability,
    CloseTunnelSessions,
    DropRelay,
    SetDhtMode,
    Command,
    DialBootstrap,
    JoinDht,
    PublishServices,
    ReserveRelay,
    StartTunnelListeners,
    StopHost,
    StopTunnelListeners,
)
from punchgate.state.model import NatStatus, NodeState, Phase, RelayState, RelayStatus

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
RECONNECT_DELAY = 1.0
RECHECK_DELAY = 30.0

Result = tuple[NodeState, list[Command]]


def backoff(failures: int) -> float:
    """Delay before retry number ``failures`` (1, 2, 4, … seconds, capped)."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_BASE * 2 ** min(failures - 1, 16), BACKOFF_CAP)


def transition(state: NodeState, event: ev.Event) -> Result:
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"can't handle event type {type(event).__name__} in phase {state.phase.value}")
    if state.phase is Phase.SHUTTING_DOWN and not isinstance(event, ev.ShutdownRequested):
        # Keep the books straight while shutting down, but start nothing new.
        new_state, _ = handler(state, event)
        return replace(new_state, phase=Phase.SHUTTING_DOWN), []
    return handler(state, event)


def _become_ready(state: NodeState) -> Result:
    commands: list[Command] = []
    if state.services:
        commands.append(PublishServices(state.services))
    return replace(state, phase=Phase.READY), commands


def _relay_commands(state: NodeState) -> Result:
    """Ask a connected bootstrap peer for a relay slot when we are private and have none."""
    if state.nat is not NatStatus.PRIVATE or state.relay.status is not RelayStatus.IDLE:
        return state, []
    relay = next((b for b in state.bootstrap if b.connected), None)
    if relay is None:
        return state, []
    delay = backoff(state.relay.failures)
    new_relay = replace(state.relay, status=RelayStatus.RESERVING, relay_peer_id=relay.peer_id)
    return replace(state, relay=new_relay), [ReserveRelay(relay.peer_id, delay)]


def _on_listeners_ready(state: NodeState, event: ev.ListenersReady) -> Result:
    if state.phase is not Phase.STARTING:
        return state, []
    # With bootstrap peers we are probably behind NAT until a dial-back says otherwise:
    # only use the DHT meanwhile, so nobody is sent to an address that may not work.
    commands: list[Command] = [SetDhtMode(server=not state.bootstrap), StartTunnelListeners()]
    if state.bootstrap:
        commands += [DialBootstrap(b.peer_id, 0.0) for b in state.bootstrap]
        return replace(state, phase=Phase.JOINING), commands
    state, more = _become_ready(state)
    return state, commands + more


def _on_bootstrap_connected(state: NodeState, event: ev.BootstrapConnected) -> Result:
    peer = state.bootstrap_peer(event.peer_id)
    if peer is None:
        return state, []
    state = state.with_bootstrap(replace(peer, connected=True, failures=0))
    commands: list[Command] = [JoinDht(peer.peer_id)]
    if state.phase is Phase.JOINING:
        state, more = _become_ready(state)
        commands += more
    if state.nat is NatStatus.UNKNOWN and not state.nat_checking:
        state = replace(state, nat_checking=True)
        commands.append(CheckReachability(peer.peer_id, 0.0))
    state, relay_commands = _relay_commands(state)
    return state, commands + relay_commands


def _on_bootstrap_failed(state: NodeState, event: ev.BootstrapFailed) -> Result:
    peer = state.bootstrap_peer(event.peer_id)
    if peer is None:
        return state, []
    peer = replace(peer, connected=False, failures=peer.failures + 1)
    state = state.with_bootstrap(peer)
    commands: list[Command] = [DialBootstrap(peer.peer_id, backoff(peer.failures))]
    if state.phase is Phase.JOINING and all(b.failures > 0 for b in state.bootstrap):
        # Every bootstrap peer failed once: work with what we have, keep retrying.
        state, more = _become_ready(state)
        commands += more
    return state, commands


def _on_peer_connected(state: NodeState, event: ev.PeerConnected) -> Result:
    return replace(state, connected_peers=state.connected_peers | {event.peer_id}), []


def _on_peer_disconnected(state: NodeState, event: ev.PeerDisconnected) -> Result:
    state = replace(state, connected_peers=state.connected_peers - {event.peer_id})
    peer = state.bootstrap_peer(event.peer_id)
    if peer is None or not peer.connected:
        return state, []
    state = state.with_bootstrap(replace(peer, connected=False))
    commands: list[Command] = [DialBootstrap(peer.peer_id, RECONNECT_DELAY)]
    if state.relay.relay_peer_id == peer.peer_id:
        state = replace(state, relay=RelayState())
        commands.append(DropRelay(peer.peer_id))
        state, more = _relay_commands(state)  # another connected bootstrap peer may serve
        commands += more
    return state, commands


def _on_peer_discovered(state: NodeState, event: ev.PeerDiscovered) -> Result:
    if event.peer_id in state.connected_peers:
        return state, []
    return state, [JoinDht(event.peer_id)]


def _republish(state: NodeState, event: ev.AddressesChanged | ev.RepublishDue) -> Result:
    if state.phase is Phase.READY and state.services:
        return state, [PublishServices(state.services)]
    return state, []


def _on_nat_status(state: NodeState, event: ev.NatStatusObserved) -> Result:
    state = replace(state, nat=event.status, nat_checking=False)
    if event.status is NatStatus.UNKNOWN:
        # The check itself failed: ask again later, if someone is there to ask.
        peer = next((b for b in state.bootstrap if b.connected), None)
        if peer is None:
            return state, []
        return replace(state, nat_checking=True), [CheckReachability(peer.peer_id, RECHECK_DELAY)]
    commands: list[Command] = [SetDhtMode(server=event.status is NatStatus.PUBLIC)]
    state, more = _relay_commands(state)
    return state, commands + more


def _on_relay_reserved(state: NodeState, event: ev.RelayReserved) -> Result:
    relay = RelayState(RelayStatus.RESERVED, event.relay_peer_id, failures=0)
    return replace(state, relay=relay), []


def _on_relay_failed(state: NodeState, event: ev.RelayReservationFailed) -> Result:
    if state.relay.relay_peer_id != event.relay_peer_id:
        return state, []
    state = replace(state, relay=RelayState(failures=state.relay.failures + 1))
    return _relay_commands(state)


def _on_relay_lost(state: NodeState, event: ev.RelayReservationLost) -> Result:
    if state.relay.relay_peer_id != event.relay_peer_id:
        return state, []
    return _relay_commands(replace(state, relay=RelayState()))


def _on_session_opened(state: NodeState, event: ev.TunnelSessionOpened) -> Result:
    return state.with_session_delta(event.bind, +1), []


def _on_session_closed(state: NodeState, event: ev.TunnelSessionClosed) -> Result:
    return state.with_session_delta(event.bind, -1), []


def _on_shutdown(state: NodeState, event: ev.ShutdownRequested) -> Result:
    if state.phase is Phase.SHUTTING_DOWN:
        # Asked again: stop waiting for open sessions.
        return state, [CloseTunnelSessions(0.0), StopHost()]
    commands: list[Command] = [
        StopTunnelListeners(),
        CloseTunnelSessions(state.shutdown_grace),
        StopHost(),
    ]
    return replace(state, phase=Phase.SHUTTING_DOWN), commands


_HANDLERS: dict[type, Callable[[NodeState, Any], Result]] = {
    ev.ListenersReady: _on_listeners_ready,
    ev.BootstrapConnected: _on_bootstrap_connected,
    ev.BootstrapFailed: _on_bootstrap_failed,
    ev.PeerConnected: _on_peer_connected,
    ev.PeerDisconnected: _on_peer_disconnected,
    ev.PeerDiscovered: _on_peer_discovered,
    ev.RepublishDue: _republish,
    ev.AddressesChanged: _republish,
    ev.NatStatusObserved: _on_nat_status,
    ev.RelayReserved: _on_relay_reserved,
    ev.RelayReservationFailed: _on_relay_failed,
    ev.RelayReservationLost: _on_relay_lost,
    ev.TunnelSessionOpened: _on_session_opened,
    ev.TunnelSessionClosed: _on_session_closed,
    ev.ShutdownRequested: _on_shutdown,
}
