"""Events: things that happened, as the runtime reports them to the machine."""

from __future__ import annotations

from dataclasses import dataclass

from punchgate.state.model import NatStatus


@dataclass(frozen=True)
class ListenersReady:
    """The host listens; ``addresses`` are what it listens on."""

    addresses: tuple[str, ...]


@dataclass(frozen=True)
class BootstrapConnected:
    peer_id: str


@dataclass(frozen=True)
class BootstrapFailed:
    peer_id: str
    error: str


@dataclass(frozen=True)
class PeerConnected:
    peer_id: str


@dataclass(frozen=True)
class PeerDisconnected:
    peer_id: str


@dataclass(frozen=True)
class PeerDiscovered:
    """A peer was found on the LAN (mDNS) or by another discovery mechanism."""

    peer_id: str
    source: str


@dataclass(frozen=True)
class RepublishDue:
    """The periodic timer for re-announcing our services fired."""


@dataclass(frozen=True)
class AddressesChanged:
    """The set of addresses other peers can reach us at changed."""

    addresses: tuple[str, ...]


@dataclass(frozen=True)
class NatStatusObserved:
    status: NatStatus


@dataclass(frozen=True)
class RelayReserved:
    relay_peer_id: str


@dataclass(frozen=True)
class RelayReservationFailed:
    relay_peer_id: str
    error: str


@dataclass(frozen=True)
class RelayReservationLost:
    relay_peer_id: str


@dataclass(frozen=True)
class TunnelSessionOpened:
    """A local client connection on a tunnel listener (bound at ``bind``) started."""

    bind: str


@dataclass(frozen=True)
class TunnelSessionClosed:
    bind: str


@dataclass(frozen=True)
class ShutdownRequested:
    reason: str


Event = (
    ListenersReady
    | BootstrapConnected
    | BootstrapFailed
    | PeerConnected
    | PeerDisconnected
    | PeerDiscovered
    | RepublishDue
    | AddressesChanged
    | NatStatusObserved
    | RelayReserved
    | RelayReservationFailed
    | RelayReservationLost
    | TunnelSessionOpened
    | TunnelSessionClosed
    | ShutdownRequested
)
