"""The node's state: a product of small, independent dimensions, all immutable.

Times are numbers on the runtime's one clock (trio's), handed to the machine with
every event; a dimension that must act later keeps the time at which it must act
(``dial_at``, ``retry_at``, ``deadline``), and :func:`punchgate.state.machine.next_wakeup`
tells the runtime when to wake the machine next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")

EMPTY: Mapping[Any, Any] = MappingProxyType({})


def put(mapping: Mapping[K, V], key: K, value: V) -> Mapping[K, V]:
    """A copy of ``mapping`` with ``key`` set (the original is never changed)."""
    copy = dict(mapping)
    copy[key] = value
    return MappingProxyType(copy)


def drop(mapping: Mapping[K, V], key: K) -> Mapping[K, V]:
    if key not in mapping:
        return mapping
    copy = dict(mapping)
    del copy[key]
    return MappingProxyType(copy)


class Phase(Enum):
    STARTING = "starting"  # host not yet listening
    JOINING = "joining"  # listening, dialing bootstrap peers, none reached yet
    READY = "ready"  # reached a bootstrap peer, or needs none, or every one failed once
    SHUTTING_DOWN = "shutting_down"


class NatStatus(Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True)
class Nat:
    """What we know about our own reachability."""

    status: NatStatus = NatStatus.UNKNOWN
    learnt_by: str | None = None  # "dialback", "autonat", or None while unknown
    checker: str | None = None  # the peer asked, while a check is under way
    attempt: int | None = None
    deadline: float | None = None
    check_at: float | None = None  # when to check next (None: when a checker appears)
    # Our NAT keeps our port (a hole punch can work), maps it at random (it cannot), or unknown.
    port_preserving: bool | None = None
    # Peers that could not check us (they speak neither protocol, or refused).
    unable: frozenset[str] = frozenset()


class RelayStatus(Enum):
    IDLE = "idle"  # no reservation and none asked for
    RESERVING = "reserving"  # a reservation was asked for
    RESERVED = "reserved"


@dataclass(frozen=True)
class Limit:
    """A relay's limit on each relayed connection (0 means none)."""

    duration_s: int = 0
    data_bytes: int = 0

    # Below these, a relayed connection cannot be trusted with a tunnel: its streams
    # would be cut when the limit is reached (go-libp2p and js-libp2p relays default to
    # 2 minutes and 128 KiB).
    TUNNEL_MIN_DURATION = 3600
    TUNNEL_MIN_DATA = 1 << 30

    @property
    def restricts_tunnels(self) -> bool:
        short = 0 < self.duration_s < self.TUNNEL_MIN_DURATION
        small = 0 < self.data_bytes < self.TUNNEL_MIN_DATA
        return short or small

    def describe(self) -> str:
        parts = []
        if self.duration_s:
            parts.append(f"{self.duration_s} s" if self.duration_s < 120 else f"{self.duration_s // 60} min")
        if self.data_bytes:
            parts.append(_size(self.data_bytes))
        return " and ".join(parts) or "no limit"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class RelaySlot:
    """Our own reservation on a relay, so that others can reach us through it."""

    status: RelayStatus = RelayStatus.IDLE
    relay_peer_id: str | None = None
    failures: int = 0
    retry_at: float = 0.0  # no new reservation attempt before this
    renew_at: float | None = None  # while RESERVED: when to renew
    renewing: bool = False
    limit: Limit | None = None  # what the relay announced
    attempt: int | None = None  # a reservation (or renewal) under way
    deadline: float | None = None


class MapStatus(Enum):
    IDLE = "idle"  # not asked for yet
    MAPPING = "mapping"  # a gateway was asked (NAT-PMP, then UPnP)
    MAPPED = "mapped"  # a gateway granted it: forwarded to our listen ports until the lease ends
    FAILED = "failed"  # no gateway, refused, lost or useless: not asked again before ``retry_at``


@dataclass(frozen=True)
class PortMap:
    """Our router forwarding a public port to our listen port (NAT-PMP or UPnP IGD).

    The mapped address is advertised only while ``confirmed``: a dial-back reached us at it.
    A router that grants a mapping but lets nothing through is found out by that check."""

    status: MapStatus = MapStatus.IDLE
    attempt: int | None = None  # a MapPorts (first mapping or renewal) under way
    deadline: float | None = None
    method: str | None = None  # "natpmp" or "upnp", once mapped
    external: tuple[str, ...] = ()  # while MAPPED: /ip4/<external IP>/tcp/<external port>
    ports: tuple[int, ...] = ()  # the external ports, for the dial-back
    renew_at: float | None = None  # while MAPPED: when to ask again (before the lease ends)
    expires_at: float | None = None  # while MAPPED: when the lease ends (None: permanent)
    confirmed: bool = False  # a dial-back reached us at ``external``
    checker: str | None = None  # the peer asked to dial ``external``, while it does
    check: int | None = None  # that check's attempt
    check_deadline: float | None = None
    check_at: float | None = None  # when to check (again); None: as soon as a peer can
    failures: int = 0  # consecutive failed attempts
    retry_at: float = 0.0  # no new MapPorts before this (FAILED)


@dataclass(frozen=True)
class KnownPeer:
    """A peer remembered from an earlier run (``punchgate/memory.py``)."""

    peer_id: str
    addrs: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    bootstrap: bool = False  # it answered as a bootstrap peer


@dataclass(frozen=True)
class BootstrapPeer:
    peer_id: str
    connected: bool = False
    failures: int = 0
    dial_at: float | None = None  # when to dial next (None: not scheduled)
    attempt: int | None = None  # a dial under way
    deadline: float | None = None

    @property
    def dialing(self) -> bool:
        return self.attempt is not None


@dataclass(frozen=True)
class Publication:
    """Announcing our services in the DHT: one run at a time, the latest request wins."""

    attempt: int | None = None  # a run under way
    deadline: float | None = None
    dirty: bool = True  # something changed since the last run began: publish again
    due_at: float | None = None  # the next periodic republication

    @property
    def running(self) -> bool:
        return self.attempt is not None


# --- the tunnel dimension ------------------------------------------------------------


class SessionPhase(Enum):
    RESOLVING = "resolving"  # choosing a peer (waiting for providers, or for a retry)
    CONNECTING = "connecting"  # waiting for a usable connection to ``peer``
    OPENING = "opening"  # a tunnel stream is being opened and the request answered
    OPEN = "open"  # bytes flow; the machine only waits for the end
    CLOSED = "closed"  # told to close; waiting for the runtime to report the end


@dataclass(frozen=True)
class Session:
    """One local client connection on a tunnel listener."""

    id: int
    service: str
    fixed_peer: str | None  # --tunnel PEER:SERVICE; None for --tunnel-by-name
    started_at: float
    deadline: float  # the connection gets a stream by then, or is closed
    phase: SessionPhase = SessionPhase.RESOLVING
    peer: str | None = None
    attempt: int | None = None  # the stream attempt while OPENING
    attempt_deadline: float | None = None
    path: str | None = None  # "direct" or "relayed" once OPENING/OPEN
    via: str | None = None  # the relay's peer ID when relayed
    transport: str | None = None  # "tcp" or "quic" when direct
    tried: frozenset[str] = frozenset()  # peers that failed for this connection this round
    refused: frozenset[str] = frozenset()  # peers that said no: never asked again
    retry_at: float | None = None  # all candidates failed: start a new round then
    rounds: int = 0
    waiting_since: float | None = None  # CONNECTING: since when
    errors: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return self.fixed_peer or self.service


@dataclass(frozen=True)
class Name:
    """What we know of the providers of one service name."""

    service: str
    providers: tuple[str, ...] = ()
    found_at: float | None = None  # when the last lookup answered
    lookup: int | None = None  # the attempt under way
    lookup_deadline: float | None = None
    next_lookup_at: float = 0.0  # lookups are spaced out after empty answers
    empty: int = 0  # consecutive empty answers
    cursor: int = 0  # round robin over providers, one step per new connection


class PunchStatus(Enum):
    IDLE = "idle"
    RUNNING = "running"
    FAILED = "failed"  # not tried again before ``retry_at``


@dataclass(frozen=True)
class Punch:
    status: PunchStatus = PunchStatus.IDLE
    attempt: int | None = None
    deadline: float | None = None
    retry_at: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Dial:
    attempt: int
    path: str  # "direct" or "relay:<relay peer ID>"
    deadline: float


@dataclass(frozen=True)
class Relayed:
    """Live relayed connections to a peer through one relay."""

    count: int = 0
    limit: Limit | None = None  # the relay's limit, when it announced one to us


@dataclass(frozen=True)
class Link:
    """Everything about reaching one peer: its addresses, connections, dials, punches."""

    peer: str
    direct_addrs: tuple[str, ...] = ()  # dialable TCP and QUIC addresses (no /p2p part), TCP first
    relays: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (relay ID, relay's addresses) from circuit addresses
    addrs_at: float | None = None  # when the addresses were last learnt
    direct: int = 0  # live direct TCP connections (tunnel streams ride these first)
    quic: int = 0  # live direct QUIC connections (tunnel streams ride these when no TCP one is up)
    relayed: Mapping[str, Relayed] = field(default_factory=lambda: EMPTY)  # by relay ID
    relayed_since: float | None = None  # since when a relayed connection has been up
    dial: Dial | None = None
    failed_paths: frozenset[str] = frozenset()  # paths that failed since the addresses were learnt
    failures: int = 0  # consecutive failed dials
    retry_at: float = 0.0  # no dial before this
    lookup: int | None = None  # a fresh look-up of this peer's addresses under way
    lookup_deadline: float | None = None
    looked_up_at: float | None = None
    punch: Punch = field(default_factory=Punch)
    last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.direct > 0 or self.quic > 0 or any(r.count > 0 for r in self.relayed.values())

    @property
    def direct_path(self) -> str | None:
        """The direct connection a stream should ride: TCP if one is up, else QUIC, else None."""
        if self.direct > 0:
            return "tcp"
        if self.quic > 0:
            return "quic"
        return None

    @property
    def busy(self) -> bool:
        """Work for this peer is under way (a dial, a look-up, a punch)."""
        return self.dial is not None or self.lookup is not None or self.punch.status is PunchStatus.RUNNING


@dataclass(frozen=True)
class Shutdown:
    deadline: float | None = None  # grace period end


@dataclass(frozen=True)
class Settings:
    """Fixed for the node's life (from the configuration)."""

    services: tuple[str, ...] = ()
    shutdown_grace: float = 3.0
    republish_interval: float = 300.0
    connect_timeout: float = 30.0
    port_mapping: bool = False  # ask our router to forward a public port (--no-port-mapping: off)


@dataclass(frozen=True)
class NodeState:
    phase: Phase = Phase.STARTING
    settings: Settings = field(default_factory=Settings)
    nat: Nat = field(default_factory=Nat)
    relay: RelaySlot = field(default_factory=RelaySlot)
    portmap: PortMap = field(default_factory=PortMap)
    bootstrap: tuple[BootstrapPeer, ...] = ()
    publication: Publication = field(default_factory=Publication)
    connected_peers: frozenset[str] = frozenset()
    sessions: Mapping[int, Session] = field(default_factory=lambda: EMPTY)
    names: Mapping[str, Name] = field(default_factory=lambda: EMPTY)
    links: Mapping[str, Link] = field(default_factory=lambda: EMPTY)
    shutdown: Shutdown = field(default_factory=Shutdown)
    next_attempt: int = 1  # attempt IDs are minted here, never reused

    @classmethod
    def initial(
        cls,
        bootstrap_peer_ids: tuple[str, ...],
        services: tuple[str, ...],
        shutdown_grace: float = 3.0,
        republish_interval: float = 300.0,
        connect_timeout: float = 30.0,
        known: tuple[KnownPeer, ...] = (),
        port_mapping: bool = False,
    ) -> NodeState:
        """The state at start. ``known`` peers (from an earlier run) are tried alongside the
        configured ones: bootstrap peers that answered are dialled too, and providers are
        candidates for their services (addresses as hints) until a look-up says more."""
        from punchgate.state.addrs import classify

        unique = tuple(dict.fromkeys([*bootstrap_peer_ids, *(k.peer_id for k in known if k.bootstrap)]))
        names: dict[str, Name] = {}
        links: dict[str, Link] = {}
        for peer in known:
            direct, relays = classify(peer.addrs)
            if direct or relays:
                links[peer.peer_id] = Link(peer.peer_id, direct_addrs=direct, relays=relays)
            for service in peer.services:
                if service not in services:
                    old = names.get(service, Name(service))
                    names[service] = replace(old, providers=(*old.providers, peer.peer_id))
        return cls(
            bootstrap=tuple(BootstrapPeer(p) for p in unique),
            settings=Settings(services, shutdown_grace, republish_interval, connect_timeout, port_mapping),
            names=MappingProxyType(names),
            links=MappingProxyType(links),
        )

    # --- small queries ---
    @property
    def services(self) -> tuple[str, ...]:
        return self.settings.services

    def bootstrap_peer(self, peer_id: str) -> BootstrapPeer | None:
        return next((b for b in self.bootstrap if b.peer_id == peer_id), None)

    def with_bootstrap(self, peer: BootstrapPeer) -> NodeState:
        return replace(self, bootstrap=tuple(peer if b.peer_id == peer.peer_id else b for b in self.bootstrap))

    def connected_bootstrap(self) -> tuple[str, ...]:
        return tuple(b.peer_id for b in self.bootstrap if b.connected)

    def link(self, peer: str) -> Link:
        return self.links.get(peer) or Link(peer)

    def with_link(self, link: Link) -> NodeState:
        return replace(self, links=put(self.links, link.peer, link))

    def with_session(self, session: Session) -> NodeState:
        return replace(self, sessions=put(self.sessions, session.id, session))

    def with_name(self, name: Name) -> NodeState:
        return replace(self, names=put(self.names, name.service, name))

    def mint(self) -> tuple[NodeState, int]:
        """A fresh attempt ID."""
        return replace(self, next_attempt=self.next_attempt + 1), self.next_attempt

    def sessions_on(self, service_or_peer: str) -> int:
        return sum(1 for s in self.sessions.values() if s.target == service_or_peer)

    @property
    def reachable(self) -> bool:
        """A check reached us: at our own addresses, or at the address our router maps to us."""
        return self.nat.status is NatStatus.PUBLIC or self.portmap.confirmed

    @property
    def assumes_private(self) -> bool:
        """Treat ourselves as unreachable: known private, or not known and joined through others.

        A node with bootstrap peers reserves a relay slot until a check says it is
        reachable, so that it can be reached even when nobody can check it."""
        if self.reachable:
            return False
        return self.nat.status is NatStatus.PRIVATE or (self.nat.status is NatStatus.UNKNOWN and bool(self.bootstrap))
