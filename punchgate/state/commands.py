"""Commands: what the machine asks the runtime to do. Plain data; the runtime executes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DialBootstrap:
    """Connect to a bootstrap peer after ``delay`` seconds; report success or failure."""

    peer_id: str
    delay: float


@dataclass(frozen=True)
class JoinDht:
    """Connect to ``peer_id`` if need be and add it to the DHT routing table."""

    peer_id: str


@dataclass(frozen=True)
class CheckReachability:
    """Ask ``peer_id`` to dial us back on a fresh connection, after ``delay`` seconds."""

    peer_id: str
    delay: float


@dataclass(frozen=True)
class SetDhtMode:
    """Serve the DHT to others (``server``) or only use it (``client``)."""

    server: bool


@dataclass(frozen=True)
class DropRelay:
    """Stop renewing and advertising the reservation held on ``relay_peer_id``."""

    relay_peer_id: str


@dataclass(frozen=True)
class StartTunnelListeners:
    """Begin accepting local client connections on every configured tunnel."""


@dataclass(frozen=True)
class PublishServices:
    names: tuple[str, ...]


@dataclass(frozen=True)
class ReserveRelay:
    relay_peer_id: str
    delay: float


@dataclass(frozen=True)
class StopTunnelListeners:
    """Stop accepting new local client connections."""


@dataclass(frozen=True)
class CloseTunnelSessions:
    """Finish open tunnel sessions, waiting at most ``grace`` seconds, then cut them."""

    grace: float


@dataclass(frozen=True)
class StopHost:
    """Close the libp2p host and end the run."""


Command = (
    DialBootstrap
    | JoinDht
    | CheckReachability
    | SetDhtMode
    | DropRelay
    | StartTunnelListeners
    | PublishServices
    | ReserveRelay
    | StopTunnelListeners
    | CloseTunnelSessions
    | StopHost
)
