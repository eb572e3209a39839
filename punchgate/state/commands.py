"""Commands: what the machine asks the runtime to do. Plain data; the runtime executes them.

A command that starts work whose end the machine waits for carries an ``attempt`` ID;
the runtime reports the outcome with the same ID, and :class:`Cancel` stops it when the
machine gave up on it (its deadline passed). Nothing here waits: when something must
happen later, the machine keeps the time in its state and acts when woken then.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- the node ---------------------------------------------------------------------


@dataclass(frozen=True)
class DialBootstrap:
    """Connect to a bootstrap peer; report ``BootstrapConnected`` or ``BootstrapFailed``."""

    peer_id: str
    attempt: int


@dataclass(frozen=True)
class JoinDht:
    """Connect to ``peer_id`` if need be and add it to the DHT routing table (``DhtJoined``)."""

    peer_id: str


@dataclass(frozen=True)
class CheckReachability:
    """Ask ``peer_id`` whether it can reach us (``ReachabilityChecked``): at the address it
    sees us at, on ``ports`` (our router's mapped ports), or on our listen ports if none."""

    peer_id: str
    attempt: int
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class SetDhtMode:
    """Serve the DHT to others (``server``) or only use it (``client``)."""

    server: bool


@dataclass(frozen=True)
class ReserveRelay:
    """Reserve (or renew) a slot on ``relay_peer_id`` (``RelayReserved`` or ``RelayReservationFailed``)."""

    relay_peer_id: str
    attempt: int


@dataclass(frozen=True)
class Advertise:
    """Which of our addresses to tell others (identify, DHT records).

    ``direct``: our own transport addresses (we are reachable, or nobody can know);
    ``relay``: the circuit addresses through this relay (we hold a slot there);
    ``mapped``: the addresses our router forwards to us (a dial-back got through them)."""

    direct: bool
    relay: str | None
    mapped: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapPorts:
    """Ask our router (NAT-PMP, then UPnP IGD) to forward a public port to each TCP listen
    port, or to extend the lease (``PortsMapped`` or ``PortMappingFailed``)."""

    attempt: int


@dataclass(frozen=True)
class UnmapPorts:
    """Remove the mappings our router holds for us (shutdown, or a mapping that does not
    work); bounded in time, nothing is reported."""


@dataclass(frozen=True)
class PublishServices:
    """Announce ``names`` (and our peer record) in the DHT; report ``PublishDone``."""

    names: tuple[str, ...]
    attempt: int


@dataclass(frozen=True)
class StartTunnelListeners:
    """Begin accepting local client connections on every configured tunnel."""


@dataclass(frozen=True)
class StopTunnelListeners:
    """Stop accepting new local client connections."""


@dataclass(frozen=True)
class CloseTunnelSessions:
    """Ask every open tunnel session to finish now; report ``SessionsDrained`` when none is left."""


@dataclass(frozen=True)
class StopHost:
    """Close the libp2p host and end the run."""


# --- the tunnel dimension -----------------------------------------------------------


@dataclass(frozen=True)
class LookupService:
    """Find the providers of ``service`` in the DHT, asking the network (no cache)."""

    service: str
    attempt: int


@dataclass(frozen=True)
class LookupPeer:
    """Find ``peer_id``'s current addresses, asking the network and the peer (no cache)."""

    peer_id: str
    attempt: int


@dataclass(frozen=True)
class DialDirect:
    """Open a new direct connection to ``peer_id`` at one of ``addrs``."""

    peer_id: str
    attempt: int
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class DialRelayed:
    """Open a relayed connection to ``peer_id`` through ``relay`` (reached at ``relay_addrs``
    if not connected already); report the relay's limit with the result."""

    peer_id: str
    attempt: int
    relay: str
    relay_addrs: tuple[str, ...]


@dataclass(frozen=True)
class HolePunch:
    """Try DCUtR with ``peer_id`` over our relayed connection (``PunchFinished``)."""

    peer_id: str
    attempt: int


@dataclass(frozen=True)
class OpenStream:
    """Open a tunnel stream for ``session`` to ``peer_id`` on the direct connection of
    ``transport`` ("tcp" or "quic"; ``relay`` None) or the one through ``relay``, and ask
    for ``service``."""

    session: int
    attempt: int
    peer_id: str
    service: str
    relay: str | None
    transport: str = "tcp"


@dataclass(frozen=True)
class StartPipe:
    """Join the session's local connection to the stream its attempt opened."""

    session: int
    attempt: int


@dataclass(frozen=True)
class DiscardStream:
    """A stream was accepted for a session that no longer wants it: reset it."""

    attempt: int


@dataclass(frozen=True)
class CloseSession:
    """Close the session's local connection now; ``event`` and ``reason`` go to the log."""

    session: int
    event: str  # "client tunnel error" or "client tunnel rejected"
    reason: str


@dataclass(frozen=True)
class CloseConnection:
    """Close our connection to ``peer_id`` (direct of ``transport``, or the one through
    ``relay``): it let a stream time out, so it is broken even if the library has not noticed."""

    peer_id: str
    relay: str | None
    transport: str = "tcp"


@dataclass(frozen=True)
class Cancel:
    """Stop the work of ``attempt``: the machine no longer waits for it."""

    attempt: int


@dataclass(frozen=True)
class Remember:
    """``peer_id`` worked just now: keep it for the next run (``punchgate/memory.py``), with
    ``addrs`` (none given: the addresses we reached it at), and ``service`` if it served one."""

    peer_id: str
    service: str | None
    addrs: tuple[str, ...]
    bootstrap: bool


@dataclass(frozen=True)
class Note:
    """A decision worth a log line (``event`` with ``fields``), e.g. a punch skipped and why."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


Command = (
    DialBootstrap
    | JoinDht
    | CheckReachability
    | SetDhtMode
    | ReserveRelay
    | Advertise
    | MapPorts
    | UnmapPorts
    | PublishServices
    | StartTunnelListeners
    | StopTunnelListeners
    | CloseTunnelSessions
    | StopHost
    | LookupService
    | LookupPeer
    | DialDirect
    | DialRelayed
    | HolePunch
    | OpenStream
    | StartPipe
    | DiscardStream
    | CloseSession
    | CloseConnection
    | Cancel
    | Remember
    | Note
)
