"""The node's state: a product of small, independent dimensions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


class Phase(Enum):
    STARTING = "starting"  # host not yet listening
    JOINING = "joining"  # listening, dialing bootstrap peers, none reached yet
    READY = "ready"  # reached a bootstrap peer, or needs none, or every one failed once
    SHUTTING_DOWN = "shutting_down"


class NatStatus(Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class RelayStatus(Enum):
    IDLE = "idle"  # no reservation and none asked for
    RESERVING = "reserving"  # a reservation was asked for (perhaps after a delay)
    RESERVED = "reserved"


@dataclass(frozen=True)
class RelayState:
    status: RelayStatus = RelayStatus.IDLE
    relay_peer_id: str | None = None
    failures: int = 0


@dataclass(frozen=True)
class BootstrapPeer:
    peer_id: str
    connected: bool = False
    failures: int = 0


@dataclass(frozen=True)
class NodeState:
    phase: Phase = Phase.STARTING
    nat: NatStatus = NatStatus.UNKNOWN
    nat_checking: bool = False  # a dial-back request is under way
    relay: RelayState = field(default_factory=RelayState)
    bootstrap: tuple[BootstrapPeer, ...] = ()
    # Open local client connections per tunnel bind address, as sorted (bind, count) pairs.
    sessions: tuple[tuple[str, int], ...] = ()
    services: tuple[str, ...] = ()
    connected_peers: frozenset[str] = frozenset()
    shutdown_grace: float = 3.0

    @classmethod
    def initial(
        cls, bootstrap_peer_ids: tuple[str, ...], services: tuple[str, ...], shutdown_grace: float = 3.0
    ) -> NodeState:
        unique = tuple(dict.fromkeys(bootstrap_peer_ids))
        return cls(
            bootstrap=tuple(BootstrapPeer(p) for p in unique),
            services=services,
            shutdown_grace=shutdown_grace,
        )

    def bootstrap_peer(self, peer_id: str) -> BootstrapPeer | None:
        return next((b for b in self.bootstrap if b.peer_id == peer_id), None)

    def with_bootstrap(self, peer: BootstrapPeer) -> NodeState:
        return replace(
            self, bootstrap=tuple(peer if b.peer_id == peer.peer_id else b for b in self.bootstrap)
        )

    def session_count(self, bind: str) -> int:
        return dict(self.sessions).get(bind, 0)

    def with_session_delta(self, bind: str, delta: int) -> NodeState:
        counts = dict(self.sessions)
        counts[bind] = max(0, counts.get(bind, 0) + delta)
        return replace(self, sessions=tuple(sorted((k, v) for k, v in counts.items() if v)))
