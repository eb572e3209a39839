"""The pure state machine: concrete scenarios and hypothesis-checked laws.

The machine is driven with plain calls and made-up times; nothing here touches a
socket or a clock.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from punchgate.state import KnownPeer, Limit, NatStatus, NodeState, Phase, RelayStatus, SessionPhase, backoff, next_wakeup, transition
from punchgate.state import commands as cmd
from punchgate.state import events as ev
from punchgate.state.machine import (
    BOOTSTRAP_BACKOFF,
    DIRECT_DIAL_TIMEOUT,
    MAP_BACKOFF,
    MAP_UNUSABLE_RETRY,
    PUNCH_WAIT,
    RELAYED_DIAL_TIMEOUT,
)
from punchgate.state.model import MapStatus, PunchStatus

BOOT = ("boot1", "boot2")
PROVIDER = "prov"
CIRCUIT = f"/ip4/100.64.0.10/tcp/4001/p2p/boot1/p2p-circuit/p2p/{PROVIDER}"
DIRECT_ADDR = "/ip4/198.51.100.7/tcp/4001"
QUIC_ADDR = "/ip4/198.51.100.7/udp/4001/quic-v1"
SMALL = Limit(120, 128 * 1024)  # what go- and js-libp2p relays allow by default
BIG = Limit(7200, 8 << 30)  # ours


class Run:
    """A machine under test: feed events at times, keep every command."""

    def __init__(self, state: NodeState, now: float = 0.0) -> None:
        self.state = state
        self.now = now
        self.log: list[cmd.Command] = []

    def __call__(self, event: ev.Event, after: float = 0.0) -> list[cmd.Command]:
        self.now += after
        self.state, commands = transition(self.state, event, self.now)
        self.log += commands
        return commands

    def until(self, when: float) -> list[cmd.Command]:
        """Wake the machine at every wake-up time up to ``when`` (as the runtime does)."""
        out: list[cmd.Command] = []
        while (wake := next_wakeup(self.state, self.now)) is not None and wake <= when:
            out += self(ev.Tick(), wake - self.now)
        self.now = max(self.now, when)
        return out

    def one(self, kind, commands=None):
        found = [c for c in (self.log if commands is None else commands) if isinstance(c, kind)]
        assert len(found) == 1, (kind.__name__, found)
        return found[0]

    def last(self, kind):
        found = [c for c in self.log if isinstance(c, kind)]
        assert found, f"no {kind.__name__} in {self.log}"
        return found[-1]


def joined(services=(), bootstrap=BOOT[:1], **settings) -> Run:
    """A node that listens and has reached its first bootstrap peer."""
    run = Run(NodeState.initial(bootstrap, services, **settings))
    run(ev.ListenersReady(("/ip4/10.0.0.2/tcp/4001",)))
    if bootstrap:
        dial = run.one(cmd.DialBootstrap)
        run(ev.ConnectionOpened(dial.peer_id))
        run(ev.BootstrapConnected(dial.peer_id, dial.attempt), 0.05)
    return run


# --- scenarios: the node ------------------------------------------------------------


def test_node_without_bootstrap_is_ready_once_listening_and_publishes():
    run = Run(NodeState.initial((), ("ssh",)))
    commands = run(ev.ListenersReady(("a",)))
    assert run.state.phase is Phase.READY
    assert commands[:3] == [cmd.SetDhtMode(True), cmd.Advertise(direct=True, relay=None), cmd.StartTunnelListeners()]
    assert isinstance(commands[3], cmd.PublishServices) and commands[3].names == ("ssh",)


def test_joining_until_a_bootstrap_peer_answers_then_check_reserve_and_publish():
    run = Run(NodeState.initial(BOOT, ("ssh",)))
    commands = run(ev.ListenersReady(("a",)))
    assert run.state.phase is Phase.JOINING
    assert commands[:3] == [cmd.SetDhtMode(False), cmd.Advertise(direct=False, relay=None), cmd.StartTunnelListeners()]
    dials = [c for c in commands if isinstance(c, cmd.DialBootstrap)]
    assert [d.peer_id for d in dials] == list(BOOT)
    assert not any(isinstance(c, cmd.PublishServices) for c in commands)  # no address worth publishing
    run(ev.ConnectionOpened("boot2"))
    commands = run(ev.BootstrapConnected("boot2", dials[1].attempt), 0.1)
    assert run.state.phase is Phase.READY
    kinds = [type(c) for c in commands]
    # Joined: the DHT, a check of our reachability, and at once a relay slot (we may be private).
    assert kinds == [cmd.JoinDht, cmd.Remember, cmd.CheckReachability, cmd.ReserveRelay]
    assert run.one(cmd.Remember, commands) == cmd.Remember("boot2", None, (), bootstrap=True)
    reserve = run.one(cmd.ReserveRelay)
    commands = run(ev.RelayReserved("boot2", reserve.attempt, 3600, BIG), 0.05)
    assert cmd.Advertise(direct=False, relay="boot2") in commands
    assert any(isinstance(c, cmd.PublishServices) for c in commands)  # a circuit address: publish


def test_all_bootstrap_failed_once_means_ready_and_redialling_with_backoff():
    run = Run(NodeState.initial(BOOT, ()))
    dials = {d.peer_id: d for d in run(ev.ListenersReady(("a",))) if isinstance(d, cmd.DialBootstrap)}
    run(ev.BootstrapFailed("boot1", dials["boot1"].attempt, "refused"), 0.1)
    assert run.state.phase is Phase.JOINING
    run(ev.BootstrapFailed("boot2", dials["boot2"].attempt, "refused"))
    assert run.state.phase is Phase.READY
    redials = run.until(run.now + backoff(1))
    assert sorted(d.peer_id for d in redials if isinstance(d, cmd.DialBootstrap)) == list(BOOT)


def test_backoff_doubles_and_caps():
    assert [backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert backoff(100) == BOOTSTRAP_BACKOFF[1]


def test_a_dial_that_never_answers_ends_at_its_deadline_and_is_retried():
    run = Run(NodeState.initial(BOOT[:1], ()))
    dial = run.one(cmd.DialBootstrap, run(ev.ListenersReady(("a",))))
    out = run.until(100)
    assert cmd.Cancel(dial.attempt) in out
    assert sum(isinstance(c, cmd.DialBootstrap) for c in out) >= 5  # 10 s each, then 0.5 ... 10 s apart


def test_lost_bootstrap_peer_is_redialled_and_its_relay_slot_given_up_and_asked_again():
    run = joined()
    reserve = run.one(cmd.ReserveRelay)
    run(ev.RelayReserved("boot1", reserve.attempt, 3600, BIG))
    assert run.state.relay.status is RelayStatus.RESERVED
    commands = run(ev.ConnectionClosed("boot1"), 1)
    assert cmd.Advertise(direct=False, relay=None) in commands
    assert run.state.relay.status is RelayStatus.IDLE
    redial = run.one(cmd.DialBootstrap, run.until(run.now + 1))
    run(ev.ConnectionOpened("boot1"))
    commands = run(ev.BootstrapConnected("boot1", redial.attempt), 0.1)
    assert any(isinstance(c, cmd.ReserveRelay) for c in commands)


def test_a_restarted_dht_server_gets_our_records_again():
    run = joined(services=("ssh",))
    run(ev.RelayReserved("boot1", run.one(cmd.ReserveRelay).attempt, 3600, BIG))
    publish = run.last(cmd.PublishServices)
    run(ev.PublishDone(publish.attempt, True), 0.1)
    commands = run(ev.DhtJoined("boot1"), 5)
    assert any(isinstance(c, cmd.PublishServices) for c in commands)


def test_reservation_is_renewed_before_it_expires_and_lost_when_renewal_fails():
    run = joined()
    run(ev.RelayReserved("boot1", run.one(cmd.ReserveRelay).attempt, 3600, BIG))
    start = run.now
    assert not any(isinstance(c, cmd.ReserveRelay) for c in run.until(start + 3299))
    renew = run.one(cmd.ReserveRelay, run.until(start + 3301))
    commands = run(ev.RelayReservationFailed("boot1", renew.attempt, "no slot"))
    assert cmd.Advertise(direct=False, relay=None) in commands
    assert any(isinstance(c, cmd.Note) and c.event == "relay reservation lost" for c in commands)


def test_public_node_drops_its_slot_and_advertises_its_own_addresses():
    run = joined(services=("ssh",))
    check = run.one(cmd.CheckReachability)
    commands = run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback", True))
    assert cmd.SetDhtMode(True) in commands and cmd.Advertise(direct=True, relay=None) in commands
    assert any(isinstance(c, cmd.Cancel) for c in commands)  # the reservation under way is dropped
    assert run.state.relay.status is RelayStatus.IDLE
    assert any(isinstance(c, cmd.PublishServices) for c in commands)


def test_a_peer_that_cannot_check_is_not_asked_again_and_we_stay_reserved():
    """A js-libp2p or go-libp2p bootstrap node speaks neither of our checks' protocols
    in some set-ups: we stay 'unknown' and keep our relay slot (the original's rule)."""
    run = joined(services=("ssh",))
    check = run.one(cmd.CheckReachability)
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.UNKNOWN, "none", reason="na"))
    assert run.state.nat.unable == frozenset({"boot1"})
    later = run.until(run.now + 600)
    assert not any(isinstance(c, cmd.CheckReachability) for c in later)
    # A slot is asked for whatever the check says (here the relay never answers: again and again).
    assert sum(isinstance(c, cmd.ReserveRelay) for c in later) >= 3


def test_a_second_shutdown_request_skips_the_grace_wait():
    run = joined()
    assert run(ev.ShutdownRequested("SIGTERM")) == [cmd.StopTunnelListeners(), cmd.CloseTunnelSessions()]
    assert run(ev.ShutdownRequested("SIGTERM"), 0.1) == [cmd.StopHost()]


def test_shutdown_ends_when_sessions_drain_or_when_the_grace_period_is_over():
    run = joined()
    run(ev.ShutdownRequested("SIGINT"))
    assert run(ev.SessionsDrained(), 0.2) == [cmd.StopHost()]
    run = joined(shutdown_grace=3.0)
    run(ev.ShutdownRequested("SIGINT"))
    assert run.until(run.now + 2.9) == []
    assert run.until(run.now + 0.2) == [cmd.StopHost()]


# --- scenarios: tunnels ---------------------------------------------------------------


def test_by_name_through_a_relay_then_direct_after_the_punch():
    run = joined()
    run(ev.SessionStarted(1, "echo"), 1)
    lookup = run.last(cmd.LookupService)
    run(ev.ProvidersFound("echo", lookup.attempt, (ev.PeerRecord(PROVIDER, (CIRCUIT,)),)), 0.01)
    dial = run.last(cmd.DialRelayed)
    assert (dial.peer_id, dial.relay, dial.relay_addrs) == (PROVIDER, "boot1", ("/ip4/100.64.0.10/tcp/4001",))
    run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
    run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", BIG))
    punch = run.one(cmd.HolePunch)
    assert not any(isinstance(c, cmd.OpenStream) for c in run.log)  # a punch is under way: wait a moment
    run(ev.ConnectionOpened(PROVIDER, "tcp"), 0.3)
    opened = run.last(cmd.OpenStream)
    assert opened.relay is None and opened.session == 1  # the direct connection
    run(ev.PunchFinished(PROVIDER, punch.attempt, True))
    assert run(ev.StreamAccepted(1, opened.attempt)) == [
        cmd.StartPipe(1, opened.attempt), cmd.Remember(PROVIDER, "echo", (CIRCUIT.split("/p2p/" + PROVIDER)[0],), False)
    ]
    assert run.state.sessions[1].phase is SessionPhase.OPEN


def test_on_an_unlimited_relay_a_session_waits_for_a_punch_at_most_a_moment():
    run = joined()
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)  # nothing known of the peer: through our own relay, blind
    assert dial.relay == "boot1"
    run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
    run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", BIG))
    start = run.now
    while not any(isinstance(c, cmd.OpenStream) for c in run.log) and run.now < start + 10:
        run(ev.Tick(), next_wakeup(run.state, run.now) - run.now)
    opened = run.one(cmd.OpenStream)
    assert opened.relay == "boot1"
    assert run.state.sessions[1].path == "relayed"
    assert PUNCH_WAIT - 0.1 <= run.now - start <= PUNCH_WAIT + 0.1  # the punch got its moment, no more


def test_a_failed_punch_holds_back_the_next_one_unless_the_peer_went_away_in_between():
    """A punch that failed is not tried again for PUNCH_RETRY_AFTER, but a peer whose
    every connection ended (it stopped or restarted: a new process, a new NAT mapping)
    is punched again as soon as a session reaches it through the relay."""

    def punched_then_failed(run) -> None:
        run(ev.SessionStarted(1, "x", PROVIDER))
        dial = run.last(cmd.DialRelayed)
        run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
        run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", BIG))
        punch = run.one(cmd.HolePunch)
        run(ev.PunchFinished(PROVIDER, punch.attempt, False, "DCUtR gave up"), 0.1)
        assert run.state.link(PROVIDER).punch.status is PunchStatus.FAILED

    def second_session_punches(run) -> bool:
        run(ev.SessionStarted(2, "x", PROVIDER), 1)
        for dial in [c for c in run.log if isinstance(c, cmd.DialRelayed)][1:]:
            run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
            run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", BIG))
        return sum(isinstance(c, cmd.HolePunch) for c in run.log) == 2

    still_there = joined()
    punched_then_failed(still_there)
    assert not second_session_punches(still_there)

    restarted = joined()
    punched_then_failed(restarted)
    restarted(ev.ConnectionClosed(PROVIDER, "relay", "boot1"), 0.5)  # the peer stopped
    assert restarted.state.link(PROVIDER).punch.status is PunchStatus.IDLE
    assert second_session_punches(restarted)


def test_a_limited_relay_never_carries_a_tunnel_and_the_session_is_closed_naming_the_limit():
    run = joined()
    check = run.one(cmd.CheckReachability)
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PRIVATE, "dialback", port_preserving=True))
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)
    run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
    run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", SMALL))
    punch = run.one(cmd.HolePunch)
    assert not any(isinstance(c, cmd.OpenStream) for c in run.until(run.now + 5))  # waits for the punch
    commands = run(ev.PunchFinished(PROVIDER, punch.attempt, False, "timed out"), 1)
    close = run.one(cmd.CloseSession, commands)
    assert close.event == "client tunnel error" and "2 min and 128 KiB" in close.reason and "boot1" in close.reason
    assert not any(isinstance(c, cmd.OpenStream) for c in run.log)


def test_a_symmetric_nat_skips_the_punch_and_says_why_once():
    run = joined()
    check = run.one(cmd.CheckReachability)
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PRIVATE, "dialback", port_preserving=False))
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)
    run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"), 0.05)
    run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", BIG))
    note = run.one(cmd.Note)
    assert note.event == "hole punch" and dict(note.fields)["outcome"] == "skipped"
    assert run.one(cmd.OpenStream).relay == "boot1"  # at once: no punch to wait for
    assert not any(isinstance(c, cmd.HolePunch) for c in run.log)
    assert not [c for c in run(ev.SessionStarted(2, "x", PROVIDER), 1) if isinstance(c, cmd.Note)]  # said once


def test_a_failed_direct_dial_is_followed_by_a_relay_attempt_and_a_fresh_look_up():
    run = joined()
    run(ev.SessionStarted(1, "echo"), 1)
    lookup = run.last(cmd.LookupService)
    run(ev.ProvidersFound("echo", lookup.attempt, (ev.PeerRecord(PROVIDER, (DIRECT_ADDR,)),)))
    direct = run.last(cmd.DialDirect)
    assert direct.addrs == (DIRECT_ADDR,)
    commands = run(ev.DialFailed(PROVIDER, direct.attempt, "connection refused"), 0.2)
    relayed = run.one(cmd.DialRelayed, commands)
    assert relayed.relay == "boot1"
    assert run.one(cmd.LookupPeer, commands).peer_id == PROVIDER  # its addresses may be stale


def test_a_dial_timeout_is_a_failure_with_a_reason():
    run = joined()
    run(ev.SessionStarted(1, "echo"), 1)
    run(ev.ProvidersFound("echo", run.last(cmd.LookupService).attempt, (ev.PeerRecord(PROVIDER, (DIRECT_ADDR,)),)))
    direct = run.last(cmd.DialDirect)
    out = run.until(run.now + DIRECT_DIAL_TIMEOUT)
    assert cmd.Cancel(direct.attempt) in out
    assert any(isinstance(c, cmd.DialRelayed) for c in out)
    assert "timed out" in run.state.sessions[1].errors[-1]


def test_a_provider_restarted_on_another_port_is_found_again():
    """Its record changes; the fresh look-up after the failed dial brings the new address."""
    run = joined()
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)
    run(ev.DialFailed(PROVIDER, dial.attempt, "relay refused the connection: NO_RESERVATION"), 0.1)
    lookup = run.last(cmd.LookupPeer)
    new = "/ip4/198.51.100.7/tcp/4002"
    run(ev.PeerLookedUp(PROVIDER, lookup.attempt, (new,)), 0.1)
    assert run.last(cmd.DialDirect).addrs == (new,)


def test_a_session_for_a_name_nobody_provides_is_closed_at_its_deadline_with_the_reason():
    run = joined(connect_timeout=5.0)
    answered: set[int] = set()
    run(ev.SessionStarted(1, "nobody"))
    while run.now < 6:
        for c in [c for c in run.log if isinstance(c, cmd.LookupService) and c.attempt not in answered]:
            answered.add(c.attempt)
            run(ev.ProvidersFound("nobody", c.attempt, ()), 0.01)
        run.until(run.now + 0.1)
    lookups = len(answered)
    close = run.last(cmd.CloseSession)
    assert close.event == "client tunnel error" and "no peer provides this service" in close.reason
    assert 3 <= lookups <= 20  # looked up again and again, spaced out


def test_a_refusal_of_a_fixed_peer_closes_the_session_at_once():
    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "tcp"))
    run(ev.SessionStarted(1, "ssh", PROVIDER))
    opened = run.last(cmd.OpenStream)
    commands = run(ev.StreamRefused(1, opened.attempt, "not allowed"), 0.01)
    assert commands == [cmd.CloseSession(1, "client tunnel rejected", "not allowed")]


def test_refused_by_name_asks_the_next_provider():
    run = joined()
    for peer in ("p1", "p2"):
        run(ev.ConnectionOpened(peer, "tcp"))
    run(ev.SessionStarted(1, "echo"))
    run(ev.ProvidersFound("echo", run.last(cmd.LookupService).attempt, (ev.PeerRecord("p1"), ev.PeerRecord("p2"))))
    first = run.last(cmd.OpenStream)
    second = run.one(cmd.OpenStream, run(ev.StreamRefused(1, first.attempt, "unknown service")))
    assert {first.peer_id, second.peer_id} == {"p1", "p2"}


def test_a_stalled_stream_drops_its_connection():
    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "tcp"))
    run(ev.SessionStarted(1, "x", PROVIDER))
    opened = run.last(cmd.OpenStream)
    out = run.until(run.now + 20)
    assert cmd.CloseConnection(PROVIDER, None) in out and cmd.Cancel(opened.attempt) in out


def test_a_direct_quic_connection_carries_streams_when_no_tcp_one_is_up():
    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "quic"))
    run(ev.SessionStarted(1, "x", PROVIDER))
    opened = run.last(cmd.OpenStream)
    assert (opened.relay, opened.transport) == (None, "quic")
    assert run.state.sessions[1].path == "direct"
    out = run.until(run.now + 20)  # and a stall drops that connection, not a TCP one
    assert cmd.CloseConnection(PROVIDER, None, "quic") in out


def test_with_both_direct_connections_up_streams_ride_tcp():
    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "quic"))
    run(ev.ConnectionOpened(PROVIDER, "tcp"))
    run(ev.SessionStarted(1, "x", PROVIDER))
    assert run.last(cmd.OpenStream).transport == "tcp"
    run(ev.ConnectionClosed(PROVIDER, "tcp"))
    run(ev.SessionStarted(2, "x", PROVIDER))
    assert run.last(cmd.OpenStream).transport == "quic"


def test_a_punch_that_makes_a_quic_connection_ends_and_the_session_rides_it():
    run = joined()
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)
    run(ev.ConnectionOpened(PROVIDER, "relay", "boot1"))
    run(ev.DialSucceeded(PROVIDER, dial.attempt, "boot1", SMALL))
    punch = run.one(cmd.HolePunch)
    out = run(ev.ConnectionOpened(PROVIDER, "quic"), 0.2)
    assert cmd.Cancel(punch.attempt) in out
    assert any(isinstance(c, cmd.Note) and dict(c.fields)["outcome"] == "direct" for c in out)
    opened = run.one(cmd.OpenStream, out)
    assert (opened.relay, opened.transport) == (None, "quic")


def test_direct_dials_try_tcp_addresses_before_quic_ones():
    run = joined(bootstrap=())  # no relay of ours to try first: a look-up, then a direct dial
    run(ev.SessionStarted(1, "x", PROVIDER))
    lookup = run.last(cmd.LookupPeer)
    run(ev.PeerLookedUp(PROVIDER, lookup.attempt, (QUIC_ADDR, DIRECT_ADDR, "/ip4/198.51.100.7/tcp/4001/ws")))
    assert run.last(cmd.DialDirect).addrs == (DIRECT_ADDR, QUIC_ADDR)


def test_stale_results_change_nothing():
    run = joined()
    run(ev.SessionStarted(1, "x", PROVIDER))
    dial = run.last(cmd.DialRelayed)
    before = run.state
    for stale in (
        ev.DialFailed(PROVIDER, dial.attempt + 100, "old"),
        ev.DialSucceeded(PROVIDER, dial.attempt - 1),
        ev.PunchFinished(PROVIDER, 999, True),
        ev.StreamRefused(1, 999, "old"),
    ):
        assert run(stale) == [] and run.state == before


def test_an_accepted_stream_for_a_session_that_is_gone_is_reset():
    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "tcp"))
    run(ev.SessionStarted(1, "x", PROVIDER))
    opened = run.last(cmd.OpenStream)
    assert run(ev.SessionEnded(1)) == [cmd.Cancel(opened.attempt)]
    assert run(ev.StreamAccepted(1, opened.attempt)) == [cmd.DiscardStream(opened.attempt)]


# --- laws ----------------------------------------------------------------------------

PEERS = st.sampled_from(["boot1", "boot2", "p1", "p2"])
RELAYS = st.sampled_from(["boot1", "boot2"])
ATTEMPTS = st.integers(min_value=1, max_value=40)
SERVICES = st.sampled_from(["echo", "ssh"])
LIMITS = st.sampled_from([None, SMALL, BIG])
ADDRS = st.sampled_from([(), (DIRECT_ADDR,), (QUIC_ADDR,), (CIRCUIT,), (DIRECT_ADDR, CIRCUIT), (QUIC_ADDR, DIRECT_ADDR)])

events = st.one_of(
    st.just(ev.ListenersReady(("/ip4/10.0.0.2/tcp/4001",))),
    st.just(ev.Tick()),
    st.builds(ev.BootstrapConnected, PEERS, ATTEMPTS),
    st.builds(ev.BootstrapFailed, PEERS, ATTEMPTS, st.just("refused")),
    st.builds(ev.DhtJoined, PEERS),
    st.builds(ev.PeerDiscovered, PEERS, st.just("mdns"), ADDRS),
    st.builds(ev.ConnectionOpened, PEERS, st.sampled_from(["tcp", "quic"])),
    st.builds(ev.ConnectionOpened, PEERS, st.just("relay"), RELAYS),
    st.builds(ev.ConnectionClosed, PEERS, st.sampled_from(["tcp", "quic"])),
    st.builds(ev.ConnectionClosed, PEERS, st.just("relay"), RELAYS),
    st.builds(ev.ReachabilityChecked, PEERS, ATTEMPTS, st.sampled_from(list(NatStatus)),
              st.sampled_from(["dialback", "autonat", "none"]), st.sampled_from([None, True, False])),
    st.builds(ev.PortMappingObserved, PEERS, ATTEMPTS, st.booleans()),
    st.builds(ev.PortsMapped, ATTEMPTS, st.sampled_from(["natpmp", "upnp"]), st.just("203.0.113.9"),
              st.sampled_from([(40001,), (40002,)]), st.sampled_from([0.0, 60.0, 3600.0])),
    st.builds(ev.PortMappingFailed, ATTEMPTS, st.just("no gateway")),
    st.builds(ev.RelayReserved, RELAYS, ATTEMPTS, st.sampled_from([60.0, 3600.0]), LIMITS),
    st.builds(ev.RelayReservationFailed, RELAYS, ATTEMPTS, st.just("no")),
    st.builds(ev.PublishDone, ATTEMPTS, st.booleans()),
    st.builds(ev.SessionStarted, st.integers(1, 6), SERVICES, st.sampled_from([None, "p1", "p2"])),
    st.builds(ev.SessionEnded, st.integers(1, 6)),
    st.builds(ev.ProvidersFound, SERVICES, ATTEMPTS, st.lists(st.builds(ev.PeerRecord, PEERS, ADDRS), max_size=2).map(tuple)),
    st.builds(ev.LookupFailed, SERVICES, ATTEMPTS, st.just("dht")),
    st.builds(ev.PeerLookedUp, PEERS, ATTEMPTS, ADDRS),
    st.builds(ev.DialSucceeded, PEERS, ATTEMPTS, st.sampled_from([None, "boot1", "boot2"]), LIMITS),
    st.builds(ev.DialFailed, PEERS, ATTEMPTS, st.just("refused")),
    st.builds(ev.PunchFinished, PEERS, ATTEMPTS, st.booleans()),
    st.builds(ev.StreamAccepted, st.integers(1, 6), ATTEMPTS),
    st.builds(ev.StreamRefused, st.integers(1, 6), ATTEMPTS, st.just("unknown service")),
    st.builds(ev.StreamFailed, st.integers(1, 6), ATTEMPTS, st.just("reset"), st.booleans()),
)
steps = st.lists(st.tuples(events, st.floats(min_value=0, max_value=20)), max_size=40)
initial_states = st.builds(
    NodeState.initial, st.sampled_from([(), ("boot1",), BOOT]), st.sampled_from([(), ("ssh",), ("ssh", "echo")]),
    port_mapping=st.booleans(),
)
SHUTDOWN_KINDS = (cmd.StopTunnelListeners, cmd.CloseTunnelSessions, cmd.StopHost, cmd.DiscardStream)


def pending(state: NodeState) -> list[tuple[int, float]]:
    """(attempt, deadline) of every piece of work the machine waits for."""
    work = [(b.attempt, b.deadline) for b in state.bootstrap if b.attempt is not None]
    work += [(x.attempt, x.deadline) for x in (state.nat, state.relay, state.publication) if x.attempt is not None]
    pm = state.portmap
    work += [(a, d) for a, d in ((pm.attempt, pm.deadline), (pm.check, pm.check_deadline)) if a is not None]
    work += [(n.lookup, n.lookup_deadline) for n in state.names.values() if n.lookup is not None]
    for link in state.links.values():
        if link.dial is not None:
            work.append((link.dial.attempt, link.dial.deadline))
        if link.lookup is not None:
            work.append((link.lookup, link.lookup_deadline))
        if link.punch.status is PunchStatus.RUNNING:
            work.append((link.punch.attempt, link.punch.deadline))
    for s in state.sessions.values():
        if s.phase is SessionPhase.OPENING:
            work.append((s.attempt, s.attempt_deadline))
    return work


def drive(state: NodeState, sequence):
    """Yield (old state, event, now, new state, commands) along a random run, waking the
    machine at its wake-up times in between as the runtime does."""
    now = 0.0
    for event, gap in sequence:
        target = now + gap
        while (wake := next_wakeup(state, now)) is not None and wake <= target:
            new, commands = transition(state, ev.Tick(), wake)
            yield state, ev.Tick(), wake, new, commands
            state, now = new, wake
        now = target
        new, commands = transition(state, event, now)
        yield state, event, now, new, commands
        state = new


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_every_attempt_and_every_session_ends_within_its_deadline(state, sequence):
    for _, _, now, new, _ in drive(state, sequence):
        wake = next_wakeup(new, now)
        for attempt, deadline in pending(new):
            assert deadline is not None and deadline > now, (attempt, deadline, now)
            assert wake is not None and wake <= deadline  # the machine is woken by then
        for s in new.sessions.values():
            if s.phase not in (SessionPhase.OPEN, SessionPhase.CLOSED):
                assert s.deadline > now and wake is not None and wake <= s.deadline


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_no_peer_is_dialled_twice_at_once_and_no_work_is_started_twice(state, sequence):
    for old, _, _, new, commands in drive(state, sequence):
        dials = [c for c in commands if isinstance(c, (cmd.DialDirect, cmd.DialRelayed))]
        assert len({c.peer_id for c in dials}) == len(dials)
        for c in dials:
            assert new.links[c.peer_id].dial is not None and new.links[c.peer_id].dial.attempt == c.attempt
            before = old.links.get(c.peer_id)
            assert before is None or before.dial is None or any(
                isinstance(x, cmd.Cancel) and x.attempt == before.dial.attempt for x in commands
            ) or before.dial.attempt != new.links[c.peer_id].dial.attempt
        boots = [c.peer_id for c in commands if isinstance(c, cmd.DialBootstrap)]
        assert len(set(boots)) == len(boots) and set(boots) <= {b.peer_id for b in new.bootstrap}
        attempts = [getattr(c, "attempt") for c in commands if hasattr(c, "attempt") and not isinstance(
            c, (cmd.Cancel, cmd.StartPipe, cmd.DiscardStream))]
        assert len(set(attempts)) == len(attempts)
        assert all(a >= old.next_attempt for a in attempts)  # fresh IDs, never reused


@settings(max_examples=300, deadline=None)
@given(initial_states, steps, events)
def test_a_stale_result_is_ignored(state, sequence, stale):
    now = 0.0
    for _, _, now, new, _ in drive(state, sequence):
        state = new
    attempt = getattr(stale, "attempt", None)
    if attempt is None or attempt in {a for a, _ in pending(state)} or isinstance(stale, (ev.StreamAccepted,)):
        return
    if isinstance(stale, ev.ReachabilityChecked) and attempt in (state.nat.attempt, state.portmap.check):
        return
    after_stale = transition(state, stale, now)
    after_tick = transition(state, ev.Tick(), now)
    assert after_stale == after_tick


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_tunnels_never_ride_a_limited_relay_and_sessions_end_once(state, sequence):
    decided: set[int] = set()  # sessions told to pipe or to close
    for _, event, _, new, commands in drive(state, sequence):
        if isinstance(event, ev.SessionEnded):
            decided.discard(event.session)  # its ID may start a new session later
        for c in commands:
            if isinstance(c, cmd.OpenStream) and c.relay is not None:
                limit = new.links[c.peer_id].relayed[c.relay].limit
                assert limit is None or not limit.restricts_tunnels
            if isinstance(c, (cmd.CloseSession, cmd.StartPipe)):
                assert c.session not in decided
                decided.add(c.session)


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_a_direct_stream_rides_a_live_direct_connection_tcp_first(state, sequence):
    """A stream for a direct path names the transport of a live direct connection to the
    peer: TCP whenever one is up, QUIC only when it is the one direct connection there is."""
    for _, _, _, new, commands in drive(state, sequence):
        for c in commands:
            if isinstance(c, cmd.OpenStream) and c.relay is None:
                link = new.links[c.peer_id]
                assert c.transport == ("tcp" if link.direct > 0 else "quic")
                assert (link.direct if c.transport == "tcp" else link.quic) > 0


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_services_are_published_only_with_an_address_worth_publishing(state, sequence):
    for _, _, _, new, commands in drive(state, sequence):
        if any(isinstance(c, cmd.PublishServices) for c in commands):
            assert new.phase is Phase.READY and new.services
            assert not new.bootstrap or new.reachable or new.relay.status is RelayStatus.RESERVED


@settings(max_examples=300, deadline=None)
@given(initial_states, steps)
def test_shutdown_is_reachable_from_anywhere_absorbing_and_a_second_request_stops_at_once(state, sequence):
    now = 0.0
    for _, _, now, new, _ in drive(state, sequence):
        state = new
    if state.phase is Phase.SHUTTING_DOWN:
        return
    pm = state.portmap
    unmap: list[cmd.Command] = [] if pm.status not in (MapStatus.MAPPING, MapStatus.MAPPED) else (
        [cmd.Cancel(pm.attempt)] if pm.attempt is not None else []) + [cmd.UnmapPorts()]
    state, commands = transition(state, ev.ShutdownRequested("test"), now)
    assert state.phase is Phase.SHUTTING_DOWN
    assert commands == [cmd.StopTunnelListeners(), cmd.CloseTunnelSessions(), *unmap]
    for _, _, _, new, more in drive(state, sequence):
        assert new.phase is Phase.SHUTTING_DOWN
        assert all(isinstance(c, SHUTDOWN_KINDS) for c in more), more
    assert transition(state, ev.ShutdownRequested("again"), now + 0.01)[1] == [cmd.StopHost()]


@settings(max_examples=200, deadline=None)
@given(initial_states, steps)
def test_transitions_are_deterministic(state, sequence):
    first = [(new, commands) for *_, new, commands in drive(state, sequence)]
    second = [(new, commands) for *_, new, commands in drive(state, sequence)]
    assert first == second


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(DIRECT_ADDR,), (DIRECT_ADDR, CIRCUIT)]), st.floats(0, 5), st.booleans())
def test_law_a_failed_direct_dial_leads_to_a_relay_attempt(addrs, gap, timeout):
    """Whatever the peer's record said, once its direct address failed (refused or
    silent), the next dial goes through a relay."""
    run = joined()
    run(ev.SessionStarted(1, "echo"), gap)
    run(ev.ProvidersFound("echo", run.last(cmd.LookupService).attempt, (ev.PeerRecord(PROVIDER, addrs),)))
    while not any(isinstance(c, cmd.DialDirect) for c in run.log):
        dial = run.last(cmd.DialRelayed)
        run(ev.DialFailed(PROVIDER, dial.attempt, "no reservation"), 0.1)
    direct = run.last(cmd.DialDirect)
    relays_before = sum(isinstance(c, cmd.DialRelayed) for c in run.log)
    if timeout:
        run.until(run.now + DIRECT_DIAL_TIMEOUT + RELAYED_DIAL_TIMEOUT)
    else:
        run(ev.DialFailed(PROVIDER, direct.attempt, "refused"), 0.1)
        run.until(run.now + 5)
    assert sum(isinstance(c, cmd.DialRelayed) for c in run.log) > relays_before


def test_a_lookup_result_for_a_name_teaches_the_link_its_addresses():
    run = joined()
    run(ev.SessionStarted(1, "echo"))
    run(ev.ProvidersFound("echo", run.last(cmd.LookupService).attempt, (ev.PeerRecord(PROVIDER, (CIRCUIT, DIRECT_ADDR)),)))
    link = run.state.links[PROVIDER]
    assert link.direct_addrs == (DIRECT_ADDR,) and link.relays == (("boot1", ("/ip4/100.64.0.10/tcp/4001",)),)
    assert replace(link, addrs_at=None).addrs_at is None


def test_peers_known_from_an_earlier_run_are_tried_without_a_look_up():
    known = (
        KnownPeer(PROVIDER, (DIRECT_ADDR,), ("echo",)),
        KnownPeer("oldboot", ("/ip4/198.51.100.9/tcp/4001",), (), bootstrap=True),
    )
    run = Run(NodeState.initial(BOOT[:1], (), known=known))
    dials = run(ev.ListenersReady(("a",)))
    assert {d.peer_id for d in dials if isinstance(d, cmd.DialBootstrap)} == {"boot1", "oldboot"}
    commands = run(ev.SessionStarted(1, "echo"), 0.1)
    assert run.one(cmd.DialDirect, commands).addrs == (DIRECT_ADDR,)  # at once, from memory
    assert any(isinstance(c, cmd.LookupService) for c in commands)  # and the network asked meanwhile


# --- port mapping ---------------------------------------------------------------------

MAPPED_IP = "203.0.113.9"
MAPPED = f"/ip4/{MAPPED_IP}/tcp/40001"


def mapping(services=("ssh",), lease=3600.0) -> tuple[Run, cmd.CheckReachability]:
    """A joined node whose router granted a mapping; returns the dial-back check of it."""
    run = joined(services=services, port_mapping=True)
    run(ev.PortsMapped(run.one(cmd.MapPorts).attempt, "natpmp", MAPPED_IP, (40001,), lease), 0.01)
    return run, next(c for c in run.log if isinstance(c, cmd.CheckReachability) and c.ports)


def test_a_mapped_address_is_advertised_once_a_dial_back_to_the_mapped_port_got_through():
    run = joined(services=("ssh",), port_mapping=True)
    mapper = run.one(cmd.MapPorts)
    assert run.state.portmap.status is MapStatus.MAPPING
    commands = run(ev.PortsMapped(mapper.attempt, "natpmp", MAPPED_IP, (40001,), 3600.0), 0.01)
    check = run.one(cmd.CheckReachability, [c for c in commands if isinstance(c, cmd.CheckReachability)])
    assert check.ports == (40001,)  # the checker dials the router's port, not our listen port
    assert not any(isinstance(c, cmd.Advertise) and c.mapped for c in run.log)  # not before the check
    commands = run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback"), 0.1)
    assert cmd.Advertise(direct=False, relay=None, mapped=(MAPPED,)) in commands
    assert cmd.SetDhtMode(True) in commands and any(isinstance(c, cmd.PublishServices) for c in commands)
    assert run.state.relay.status is RelayStatus.IDLE  # reachable: no relay slot, no circuit address
    assert run.state.reachable and run.state.nat.status is NatStatus.UNKNOWN  # our own addresses: still unknown
    # The check of our own addresses says private (symmetric NAT): the mapping keeps us reachable.
    nat_check = next(c for c in run.log if isinstance(c, cmd.CheckReachability) and not c.ports)
    run(ev.ReachabilityChecked("boot1", nat_check.attempt, NatStatus.PRIVATE, "dialback", False), 3)
    assert run.state.reachable and not any(isinstance(c, cmd.ReserveRelay) for c in run.until(run.now + 60))


def test_the_mapping_is_renewed_half_way_through_its_lease_and_lost_when_renewal_fails():
    run, check = mapping(lease=3600.0)
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback"))
    start = run.now
    assert not any(isinstance(c, cmd.MapPorts) for c in run.until(start + 1799))
    renew = run.one(cmd.MapPorts, run.until(start + 1801))
    run(ev.PortsMapped(renew.attempt, "natpmp", MAPPED_IP, (40001,), 3600.0), 0.01)
    assert run.state.portmap.confirmed  # the same address: no new check needed
    renew = run.one(cmd.MapPorts, run.until(run.now + 1801))
    commands = run(ev.PortMappingFailed(renew.attempt, "NAT-PMP: refused"), 0.01)
    assert cmd.Advertise(direct=False, relay=None, mapped=()) in commands
    assert any(isinstance(c, cmd.Note) and c.event == "port mapping lost" and c.level == "warning" for c in commands)
    assert any(isinstance(c, cmd.ReserveRelay) for c in commands)  # unreachable again: a slot


def test_a_router_that_grants_a_mapping_but_forwards_nothing_is_found_out():
    run, check = mapping()
    commands = run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PRIVATE, "dialback"), 3)
    note = run.one(cmd.Note, commands)
    assert note.event == "port mapping unusable" and note.level == "warning"
    assert cmd.UnmapPorts() in commands  # no use leaving it on the router
    later = run.until(run.now + MAP_UNUSABLE_RETRY - 1)
    assert not any(isinstance(c, cmd.MapPorts) for c in later)  # it would say yes again
    assert not any(isinstance(c, cmd.Advertise) and c.mapped for c in run.log)
    assert any(isinstance(c, cmd.MapPorts) for c in run.until(run.now + 2))


def test_a_router_that_stops_forwarding_is_found_out_at_the_next_check_and_the_address_withdrawn():
    run, check = mapping()
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback"))
    recheck = run.one(cmd.CheckReachability, [c for c in run.until(run.now + 601) if isinstance(c, cmd.CheckReachability)
                                              and c.ports])
    commands = run(ev.ReachabilityChecked("boot1", recheck.attempt, NatStatus.PRIVATE, "dialback"))
    assert cmd.Advertise(direct=False, relay=None, mapped=()) in commands and cmd.UnmapPorts() in commands
    assert any(isinstance(c, cmd.ReserveRelay) for c in commands)


def test_a_network_without_a_gateway_is_said_once_and_asked_again_rarely():
    run = joined(port_mapping=True)
    commands = run(ev.PortMappingFailed(run.one(cmd.MapPorts).attempt, "no port-mapping gateway answered"), 2)
    note = run.one(cmd.Note, commands)
    assert (note.event, note.level) == ("port mapping unavailable", "info")
    asked = [run.now]
    while len(asked) < 8:
        commands = run(ev.Tick(), next_wakeup(run.state, run.now) - run.now)
        for mapper in (c for c in commands if isinstance(c, cmd.MapPorts)):
            asked.append(run.now)
            assert not [c for c in run(ev.PortMappingFailed(mapper.attempt, "no gateway"), 2) if isinstance(c, cmd.Note)]
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert gaps[0] >= MAP_BACKOFF[0] - 1e-6 and gaps[-1] >= MAP_BACKOFF[1] - 1e-6 and all(g <= MAP_BACKOFF[1] + 3 for g in gaps)
    assert run.one(cmd.Note) is note


def test_shutdown_removes_the_mapping_and_a_mapping_being_made():
    run, check = mapping()
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback"))
    assert run(ev.ShutdownRequested("SIGTERM"), 1) == [cmd.StopTunnelListeners(), cmd.CloseTunnelSessions(), cmd.UnmapPorts()]
    run = joined(port_mapping=True)
    mapper = run.one(cmd.MapPorts)
    assert run(ev.ShutdownRequested("SIGTERM"))[2:] == [cmd.Cancel(mapper.attempt), cmd.UnmapPorts()]


def test_no_port_mapping_when_turned_off_or_without_bootstrap_peers():
    for run in (joined(), joined(bootstrap=(), port_mapping=True)):
        run.until(run.now + 3600)
        assert not any(isinstance(c, (cmd.MapPorts, cmd.UnmapPorts)) for c in run.log)


def test_a_new_external_port_is_checked_again_before_it_is_advertised():
    run, check = mapping()
    run(ev.ReachabilityChecked("boot1", check.attempt, NatStatus.PUBLIC, "dialback"))
    renew = run.one(cmd.MapPorts, [c for c in run.until(run.now + 1801) if isinstance(c, cmd.MapPorts)])
    commands = run(ev.PortsMapped(renew.attempt, "natpmp", MAPPED_IP, (40002,), 3600.0))
    assert cmd.Advertise(direct=False, relay=None, mapped=()) in commands  # the old port is gone
    check = run.one(cmd.CheckReachability, [c for c in commands if isinstance(c, cmd.CheckReachability)])
    assert check.ports == (40002,)


# Mapping outcomes and checks, more often than among all events, most of them answering
# the work under way (attempt CURRENT: the mapping's or its check's attempt at that moment);
# from a node that listens and reached a bootstrap peer.
CURRENT = -1
GRANTED = st.builds(ev.PortsMapped, st.just(CURRENT), st.sampled_from(["natpmp", "upnp"]), st.just(MAPPED_IP),
                    st.sampled_from([(40001,), (40002,)]), st.sampled_from([0.0, 60.0, 3600.0]))
CHECKED = st.builds(ev.ReachabilityChecked, st.just("boot1"), st.just(CURRENT),
                    st.sampled_from([NatStatus.PUBLIC, NatStatus.PUBLIC, NatStatus.PUBLIC, NatStatus.PRIVATE,
                                     NatStatus.UNKNOWN]), st.sampled_from(["dialback", "dialback", "none"]))
REFUSED = st.builds(ev.PortMappingFailed, st.just(CURRENT), st.just("no gateway"))
PORTMAP_EVENTS = st.one_of(GRANTED, GRANTED, GRANTED, CHECKED, CHECKED, CHECKED, REFUSED)
GAPS = st.one_of(st.floats(0, 2), st.floats(0, 2), st.floats(0, 2), st.floats(0, 700))
MOSTLY_PORTMAP = st.integers(0, 3).flatmap(lambda i: events if i == 0 else PORTMAP_EVENTS)
portmap_steps = st.lists(st.tuples(MOSTLY_PORTMAP, GAPS), min_size=4, max_size=40)
portmap_states = st.builds(lambda services: joined(services, port_mapping=True).state, st.sampled_from([(), ("ssh",)]))


def drive_portmap(state: NodeState, sequence):
    """:func:`drive`, with CURRENT attempts made the current mapping's (or check's) at that moment."""
    def current(event, state: NodeState):
        if getattr(event, "attempt", None) != CURRENT:
            return event
        pm = state.portmap
        attempt = pm.check if isinstance(event, ev.ReachabilityChecked) else pm.attempt
        return replace(event, attempt=attempt if attempt is not None else 9999)

    now = 0.0
    for event, gap in sequence:
        target = now + gap
        while (wake := next_wakeup(state, now)) is not None and wake <= target:
            new, commands = transition(state, ev.Tick(), wake)
            yield state, ev.Tick(), wake, new, commands
            state, now = new, wake
        now = target
        event = current(event, state)
        new, commands = transition(state, event, now)
        yield state, event, now, new, commands
        state = new


@settings(max_examples=200, deadline=None)
@given(portmap_states, portmap_steps)
def test_law_a_mapped_address_is_advertised_only_after_a_dial_back_to_it_got_through(state, sequence):
    checked: set[tuple[str, ...]] = set()  # mapped addresses a dial-back reached, since they were granted
    for old, event, _, new, commands in drive_portmap(state, sequence):
        pm = old.portmap
        if isinstance(event, ev.ReachabilityChecked) and event.attempt == pm.check and event.status is NatStatus.PUBLIC:
            checked.add(pm.external)
        for c in commands:
            if isinstance(c, cmd.Advertise) and c.mapped:
                assert c.mapped in checked and new.portmap.confirmed and c.mapped == new.portmap.external
            if isinstance(c, cmd.CheckReachability) and c.ports:
                assert c.ports == new.portmap.ports  # the dial-back is asked for the mapped ports
        if new.portmap.external != pm.external:
            checked.discard(pm.external)


@settings(max_examples=200, deadline=None)
@given(portmap_states, portmap_steps)
def test_law_a_mapping_is_renewed_before_its_lease_ends_or_given_up(state, sequence):
    for _, _, now, new, _ in drive_portmap(state, sequence):
        pm = new.portmap
        if pm.status is MapStatus.MAPPED and pm.expires_at is not None:
            assert pm.expires_at > now  # never held past its lease
            assert pm.attempt is not None or (pm.renew_at is not None and pm.renew_at < pm.expires_at)
            wake = next_wakeup(new, now)
            assert wake is not None and wake <= (pm.renew_at if pm.attempt is None and pm.renew_at > now else pm.expires_at)


@settings(max_examples=200, deadline=None)
@given(portmap_states, portmap_steps)
def test_law_shutdown_removes_any_mapping_held_or_being_made(state, sequence):
    now = 0.0
    for _, _, now, new, _ in drive_portmap(state, sequence):
        state = new
    if state.phase is Phase.SHUTTING_DOWN:
        return
    _, commands = transition(state, ev.ShutdownRequested("test"), now)
    holds = state.portmap.status in (MapStatus.MAPPING, MapStatus.MAPPED)
    assert (cmd.UnmapPorts() in commands) == holds
    if state.portmap.attempt is not None:
        assert cmd.Cancel(state.portmap.attempt) in commands
