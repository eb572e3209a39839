"""The pure state machine: concrete scenarios and hypothesis-checked laws."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from punchgate.state import NatStatus, NodeState, Phase, RelayStatus, backoff, transition
from punchgate.state import commands as cmd
from punchgate.state import events as ev
from punchgate.state.machine import BACKOFF_CAP

BOOT = ("boot1", "boot2")
PEERS = st.sampled_from(["boot1", "boot2", "other1", "other2"])
BINDS = st.sampled_from(["127.0.0.1:2222", "127.0.0.1:3333"])

events = st.one_of(
    st.builds(ev.ListenersReady, st.just(("/ip4/127.0.0.1/tcp/1",))),
    st.builds(ev.BootstrapConnected, PEERS),
    st.builds(ev.BootstrapFailed, PEERS, st.just("refused")),
    st.builds(ev.PeerConnected, PEERS),
    st.builds(ev.PeerDisconnected, PEERS),
    st.builds(ev.AddressesChanged, st.just(("/ip4/192.0.2.1/tcp/1",))),
    st.builds(ev.PeerDiscovered, PEERS, st.just("mdns")),
    st.builds(ev.RepublishDue),
    st.builds(ev.NatStatusObserved, st.sampled_from(list(NatStatus))),
    st.builds(ev.RelayReserved, PEERS),
    st.builds(ev.RelayReservationFailed, PEERS, st.just("no slot")),
    st.builds(ev.RelayReservationLost, PEERS),
    st.builds(ev.TunnelSessionOpened, BINDS),
    st.builds(ev.TunnelSessionClosed, BINDS),
    st.builds(ev.ShutdownRequested, st.just("test")),
)
initial_states = st.builds(
    NodeState.initial,
    st.sampled_from([(), ("boot1",), BOOT]),
    st.sampled_from([(), ("ssh",), ("ssh", "web")]),
)


@st.composite
def reachable_states(draw):
    """A state reached from an initial one by a random sequence of events."""
    state = draw(initial_states)
    for event in draw(st.lists(events, max_size=25)):
        state, _ = transition(state, event)
    return state


def run(state, *evs):
    out = []
    for event in evs:
        state, commands = transition(state, event)
        out.append(commands)
    return state, out


# --- scenarios ---------------------------------------------------------------


def test_node_without_bootstrap_is_ready_once_listening_and_publishes():
    state, (commands,) = run(NodeState.initial((), ("ssh",)), ev.ListenersReady(("a",)))
    assert state.phase is Phase.READY
    assert commands == [cmd.SetDhtMode(True), cmd.StartTunnelListeners(), cmd.PublishServices(("ssh",))]


def test_joining_until_a_bootstrap_peer_answers():
    state, outs = run(NodeState.initial(BOOT, ("ssh",)), ev.ListenersReady(("a",)))
    assert state.phase is Phase.JOINING
    assert outs[0] == [
        cmd.SetDhtMode(False),
        cmd.StartTunnelListeners(),
        cmd.DialBootstrap("boot1", 0.0),
        cmd.DialBootstrap("boot2", 0.0),
    ]
    state, (commands,) = run(state, ev.BootstrapConnected("boot2"))
    assert state.phase is Phase.READY
    assert commands == [cmd.JoinDht("boot2"), cmd.PublishServices(("ssh",)), cmd.CheckReachability("boot2", 0.0)]
    state, (commands,) = run(state, ev.BootstrapConnected("boot1"))
    assert commands == [cmd.JoinDht("boot1")]  # one reachability check at a time


def test_all_bootstrap_failed_once_means_ready_and_retrying_with_backoff():
    state, _ = run(NodeState.initial(BOOT, ("ssh",)), ev.ListenersReady(("a",)))
    state, (first,) = run(state, ev.BootstrapFailed("boot1", "x"))
    assert state.phase is Phase.JOINING and first == [cmd.DialBootstrap("boot1", 1.0)]
    state, (second,) = run(state, ev.BootstrapFailed("boot2", "x"))
    assert state.phase is Phase.READY
    assert second == [cmd.DialBootstrap("boot2", 1.0), cmd.PublishServices(("ssh",))]
    state, (third,) = run(state, ev.BootstrapFailed("boot1", "x"))
    assert third == [cmd.DialBootstrap("boot1", 2.0)]


def test_backoff_doubles_and_caps():
    assert [backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff(100) == BACKOFF_CAP


def test_lost_bootstrap_peer_is_redialed_and_its_relay_slot_forgotten():
    state, _ = run(
        NodeState.initial(BOOT, ()),
        ev.ListenersReady(("a",)),
        ev.BootstrapConnected("boot1"),
        ev.NatStatusObserved(NatStatus.PRIVATE),
        ev.RelayReserved("boot1"),
    )
    assert state.relay.status is RelayStatus.RESERVED
    state, (commands,) = run(state, ev.PeerDisconnected("boot1"))
    assert commands == [cmd.DialBootstrap("boot1", 1.0), cmd.DropRelay("boot1")]
    assert state.relay.status is RelayStatus.IDLE
    state, (commands,) = run(state, ev.BootstrapConnected("boot1"))
    assert commands == [cmd.JoinDht("boot1"), cmd.ReserveRelay("boot1", 0.0)]


def test_private_node_reserves_a_relay_slot_and_retries_after_refusal():
    state, outs = run(
        NodeState.initial(BOOT, ()),
        ev.ListenersReady(("a",)),
        ev.BootstrapConnected("boot1"),
        ev.NatStatusObserved(NatStatus.PRIVATE),
    )
    assert outs[-1] == [cmd.SetDhtMode(False), cmd.ReserveRelay("boot1", 0.0)]
    state, (commands,) = run(state, ev.RelayReservationFailed("boot1", "no slot"))
    assert commands == [cmd.ReserveRelay("boot1", 1.0)]


def test_discovered_peers_join_the_dht_unless_already_connected():
    state, (commands,) = run(NodeState.initial((), ()), ev.PeerDiscovered("other1", "mdns"))
    assert commands == [cmd.JoinDht("other1")]
    state, (_, commands) = run(state, ev.PeerConnected("other1"), ev.PeerDiscovered("other1", "mdns"))
    assert commands == []


def test_republish_timer_publishes_only_when_ready():
    state = NodeState.initial(BOOT, ("ssh",))
    _, (commands,) = run(state, ev.RepublishDue())
    assert commands == []
    state, _ = run(state, ev.ListenersReady(("a",)), ev.BootstrapConnected("boot1"))
    _, (commands,) = run(state, ev.RepublishDue())
    assert commands == [cmd.PublishServices(("ssh",))]


def test_reachability_decides_dht_mode_and_failed_checks_are_retried():
    state, _ = run(NodeState.initial(BOOT, ()), ev.ListenersReady(("a",)), ev.BootstrapConnected("boot1"))
    assert state.nat_checking
    public, (commands,) = run(state, ev.NatStatusObserved(NatStatus.PUBLIC))
    assert commands == [cmd.SetDhtMode(True)] and public.relay.status is RelayStatus.IDLE
    unknown, (commands,) = run(state, ev.NatStatusObserved(NatStatus.UNKNOWN))
    assert commands == [cmd.CheckReachability("boot1", 30.0)] and unknown.nat_checking


def test_second_shutdown_request_stops_waiting():
    state, (first, second) = run(NodeState.initial((), ()), ev.ShutdownRequested("a"), ev.ShutdownRequested("b"))
    assert first == [cmd.StopTunnelListeners(), cmd.CloseTunnelSessions(3.0), cmd.StopHost()]
    assert second == [cmd.CloseTunnelSessions(0.0), cmd.StopHost()]


# --- laws --------------------------------------------------------------------


@given(reachable_states())
def test_shutdown_is_reachable_from_every_state(state):
    new, commands = transition(state, ev.ShutdownRequested("signal"))
    assert new.phase is Phase.SHUTTING_DOWN
    assert commands and isinstance(commands[-1], cmd.StopHost)


@given(reachable_states(), st.lists(events, max_size=20))
def test_shutting_down_is_never_left_and_starts_nothing(state, evs):
    state, _ = transition(state, ev.ShutdownRequested("signal"))
    for event in evs:
        state, commands = transition(state, event)
        assert state.phase is Phase.SHUTTING_DOWN
        assert all(isinstance(c, (cmd.CloseTunnelSessions, cmd.StopHost)) for c in commands)


@given(reachable_states(), events)
def test_services_are_published_exactly_when_becoming_ready(state, event):
    new, commands = transition(state, event)
    published = any(isinstance(c, cmd.PublishServices) for c in commands)
    became_ready = state.phase is not Phase.READY and new.phase is Phase.READY
    republish = isinstance(event, (ev.AddressesChanged, ev.RepublishDue)) and state.phase is Phase.READY
    assert published == (bool(state.services) and (became_ready or republish))


@given(reachable_states(), st.one_of(
    st.builds(ev.PeerConnected, st.sampled_from(["other1", "other2"])),
    st.builds(ev.PeerDisconnected, st.sampled_from(["other1", "other2"])),
    st.builds(ev.TunnelSessionOpened, BINDS),
    st.builds(ev.TunnelSessionClosed, BINDS),
))
def test_peer_and_session_events_leave_phase_nat_relay_alone(state, event):
    new, commands = transition(state, event)
    assert (new.phase, new.nat, new.relay, new.bootstrap) == (state.phase, state.nat, state.relay, state.bootstrap)
    assert commands == []


@given(reachable_states(), st.builds(ev.NatStatusObserved, st.sampled_from(list(NatStatus))))
def test_nat_observations_never_change_phase_tunnels_or_services(state, event):
    new, _ = transition(state, event)
    assert (new.phase, new.sessions, new.services) == (state.phase, state.sessions, state.services)


@given(reachable_states(), events)
def test_commands_are_well_formed(state, event):
    _, commands = transition(state, event)
    known = {b.peer_id for b in state.bootstrap}
    for c in commands:
        if isinstance(c, cmd.JoinDht):
            assert c.peer_id in known or isinstance(event, ev.PeerDiscovered)
        if isinstance(c, (cmd.DialBootstrap, cmd.ReserveRelay, cmd.CheckReachability)):
            peer = c.relay_peer_id if isinstance(c, cmd.ReserveRelay) else c.peer_id
            assert peer in known
            assert 0 <= c.delay <= BACKOFF_CAP


@settings(max_examples=200)
@given(initial_states, st.lists(events, max_size=40))
def test_session_counts_match_opens_minus_closes_and_never_go_negative(state, evs):
    expected: dict[str, int] = {}
    for event in evs:
        state, _ = transition(state, event)
        if isinstance(event, ev.TunnelSessionOpened):
            expected[event.bind] = expected.get(event.bind, 0) + 1
        elif isinstance(event, ev.TunnelSessionClosed):
            expected[event.bind] = max(0, expected.get(event.bind, 0) - 1)
        for bind in ("127.0.0.1:2222", "127.0.0.1:3333"):
            assert state.session_count(bind) == expected.get(bind, 0) >= 0


@given(reachable_states(), events)
def test_transition_is_deterministic(state, event):
    assert transition(state, event) == transition(replace(state), event)
