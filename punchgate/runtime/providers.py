"""Which peers a tunnel client tries for a service: a fixed peer, or the providers of a name.

:class:`ProviderPool` keeps, per service name, the providers found by the last lookup.
New connections are spread over them round-robin; a provider that fails is dropped;
when none is left the name is looked up again (at most once per ``retry_interval``,
and only one lookup at a time per name), so a name nobody provides yet is retried on
later connections instead of given up on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
from libp2p.peer.id import ID

from punchgate.logs import get_logger

RETRY_INTERVAL = 2.0

log = get_logger("punchgate.discovery")


class PeerFinder(Protocol):
    async def candidates(self, service: str, refresh: bool = False) -> list[ID]:
        """Peers to try for ``service``, best first."""

    def failed(self, service: str, peer_id: ID) -> None:
        """``peer_id`` could not be reached for ``service``."""


class FixedPeer:
    """``--tunnel PEER_ID:SERVICE@BIND``: always the one peer."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = ID.from_base58(peer_id)

    async def candidates(self, service: str, refresh: bool = False) -> list[ID]:
        return [self.peer_id]

    def failed(self, service: str, peer_id: ID) -> None:
        pass


@dataclass
class _Entry:
    peers: list[ID] = field(default_factory=list)
    cursor: int = 0
    looked_up_at: float | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


class ProviderPool:
    """``--tunnel-by-name SERVICE@BIND``: round-robin over the providers of SERVICE."""

    def __init__(
        self, lookup: Callable[[str], Awaitable[list[ID]]], retry_interval: float = RETRY_INTERVAL
    ) -> None:
        self.lookup = lookup
        self.retry_interval = retry_interval
        self._entries: dict[str, _Entry] = {}

    async def candidates(self, service: str, refresh: bool = False) -> list[ID]:
        entry = self._entries.setdefault(service, _Entry())
        async with entry.lock:
            due = entry.looked_up_at is None or time.monotonic() - entry.looked_up_at >= self.retry_interval
            if (not entry.peers or refresh) and due:
                started = time.monotonic()
                entry.peers = list(dict.fromkeys(await self.lookup(service)))
                entry.looked_up_at = time.monotonic()
                log.info(
                    "service resolved",
                    service=service,
                    providers=[str(p) for p in entry.peers],
                    duration_ms=round((entry.looked_up_at - started) * 1000, 1),
                )
            if not entry.peers:
                return []
            start = entry.cursor % len(entry.peers)
            entry.cursor += 1
            return entry.peers[start:] + entry.peers[:start]

    def failed(self, service: str, peer_id: ID) -> None:
        entry = self._entries.get(service)
        if entry is not None and peer_id in entry.peers:
            entry.peers.remove(peer_id)
