"""Events: things that happened, as the runtime reports them to the machine.

Results of work the machine asked for carry the ``attempt`` ID of the command that
asked; a result whose attempt is no longer the current one is stale and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from punchgate.state.model import Limit, NatStatus

# --- the node ---------------------------------------------------------------------


@dataclass(frozen=True)
class ListenersReady:
    """The host listens; ``addresses`` are what it listens on."""

    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Tick:
    """Time passed (the wake-up time from ``next_wakeup`` arrived); nothing else happened."""


@dataclass(frozen=True)
class BootstrapConnected:
    peer_id: str
    attempt: int


@dataclass(frozen=True)
class BootstrapFailed:
    peer_id: str
    attempt: int
    error: str


@dataclass(frozen=True)
class DhtJoined:
    """``peer_id`` (a DHT server) is in our routing table."""

    peer_id: str


@dataclass(frozen=True)
class PeerDiscovered:
    """A peer was found on the LAN (mDNS); ``addrs`` are what it announced."""

    peer_id: str
    source: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConnectionOpened:
    """A connection to ``peer_id`` is up: ``transport`` is "tcp", "quic" or "relay"
    (then ``relay`` is the relay's peer ID)."""

    peer_id: str
    transport: str = "tcp"
    relay: str | None = None


@dataclass(frozen=True)
class ConnectionClosed:
    """A connection ended; fields as for :class:`ConnectionOpened`."""

    peer_id: str
    transport: str = "tcp"
    relay: str | None = None


@dataclass(frozen=True)
class ReachabilityChecked:
    """A check of our reachability ended (``status`` UNKNOWN: ``checker`` could not tell)."""

    checker: str
    attempt: int
    status: NatStatus
    method: str  # "dialback" or "autonat"; "none" when the peer speaks neither
    port_preserving: bool | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PortMappingObserved:
    """During a check: whether our NAT keeps our port (``checker`` saw it at once)."""

    checker: str
    attempt: int
    port_preserving: bool


@dataclass(frozen=True)
class PortsMapped:
    """A gateway forwards ``external_ip`` at ``ports`` (one per TCP listen port) to us, for
    ``lease_s`` seconds (0: until removed); ``method`` is "natpmp" or "upnp"."""

    attempt: int
    method: str
    external_ip: str
    ports: tuple[int, ...]
    lease_s: float


@dataclass(frozen=True)
class PortMappingFailed:
    """No gateway answered, or it refused; ``reason`` says which, for the log."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class RelayReserved:
    relay_peer_id: str
    attempt: int
    expires_in: float  # seconds
    limit: Limit | None = None


@dataclass(frozen=True)
class RelayReservationFailed:
    relay_peer_id: str
    attempt: int
    error: str


@dataclass(frozen=True)
class PublishDone:
    attempt: int
    ok: bool


@dataclass(frozen=True)
class ShutdownRequested:
    reason: str


@dataclass(frozen=True)
class SessionsDrained:
    """Every tunnel session (client and service side) has ended after a shutdown request."""


# --- the tunnel dimension -----------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted:
    """A local client connection was accepted on a tunnel listener."""

    session: int
    service: str
    fixed_peer: str | None = None


@dataclass(frozen=True)
class SessionEnded:
    """A session's local connection is closed (after its bytes flowed, or not)."""

    session: int


@dataclass(frozen=True)
class PeerRecord:
    """A peer and the addresses a look-up gave for it (multiaddr strings)."""

    peer_id: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvidersFound:
    service: str
    attempt: int
    providers: tuple[PeerRecord, ...]


@dataclass(frozen=True)
class LookupFailed:
    service: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PeerLookedUp:
    """A fresh look-up of one peer's addresses ended (``addrs`` empty: nothing found)."""

    peer_id: str
    attempt: int
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class DialSucceeded:
    peer_id: str
    attempt: int
    relay: str | None = None  # through this relay
    limit: Limit | None = None  # the relay's limit on the connection, if it announced one


@dataclass(frozen=True)
class DialFailed:
    peer_id: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PunchFinished:
    peer_id: str
    attempt: int
    direct: bool
    reason: str | None = None


@dataclass(frozen=True)
class StreamAccepted:
    """The provider accepted the tunnel request of ``session`` (stream attempt ``attempt``)."""

    session: int
    attempt: int


@dataclass(frozen=True)
class StreamRefused:
    """The provider answered no (unknown service, not allowed, service down...)."""

    session: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class StreamFailed:
    """The stream could not be opened or broke before an answer (``stalled``: the peer did
    not answer in time, so the connection itself is suspect)."""

    session: int
    attempt: int
    reason: str
    stalled: bool = False


Event = (
    ListenersReady
    | Tick
    | BootstrapConnected
    | BootstrapFailed
    | DhtJoined
    | PeerDiscovered
    | ConnectionOpened
    | ConnectionClosed
    | ReachabilityChecked
    | PortMappingObserved
    | PortsMapped
    | PortMappingFailed
    | RelayReserved
    | RelayReservationFailed
    | PublishDone
    | ShutdownRequested
    | SessionsDrained
    | SessionStarted
    | SessionEnded
    | ProvidersFound
    | LookupFailed
    | PeerLookedUp
    | DialSucceeded
    | DialFailed
    | PunchFinished
    | StreamAccepted
    | StreamRefused
    | StreamFailed
)
