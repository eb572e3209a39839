"""Traffic counters for ``punchgate status``: one :class:`SessionStats` per exposed
service and per tunnel bind address.

A session registers its :class:`~punchgate.runtime.pipe.PipeResult` for as long as it
pipes (:meth:`SessionStats.track`); ``pipe`` updates that result's byte counts as data
flows, so a snapshot adds the live sessions' running totals to what closed sessions
carried. Only plain attribute reads: no locks, no awaits, cheap on the data path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from punchgate.runtime.pipe import PipeResult


@dataclass
class _Live:
    result: PipeResult
    started: float
    peer: str | None
    path: str | None


@dataclass
class SessionStats:
    opened: int = 0  # sessions ever started
    closed_to_remote: int = 0  # bytes carried by sessions that have ended
    closed_from_remote: int = 0
    last_peer: str | None = None
    last_path: str | None = None
    _live: dict[int, _Live] = field(default_factory=dict)

    @contextmanager
    def track(self, result: PipeResult, peer: str | None = None, path: str | None = None) -> Iterator[None]:
        key = id(result)
        self._live[key] = _Live(result, time.monotonic(), peer, path)
        self.opened += 1
        self.last_peer, self.last_path = peer, path
        try:
            yield
        finally:
            del self._live[key]
            self.closed_to_remote += result.to_remote
            self.closed_from_remote += result.from_remote

    def snapshot(self) -> dict:
        """Open sessions, bytes both ways (ended + live), age of the oldest, paths and peers in use."""
        now = time.monotonic()
        live = list(self._live.values())
        return {
            "connections": len(live),
            "total_connections": self.opened,
            "bytes_to_remote": self.closed_to_remote + sum(s.result.to_remote for s in live),
            "bytes_from_remote": self.closed_from_remote + sum(s.result.from_remote for s in live),
            "oldest_age_s": round(now - min(s.started for s in live), 1) if live else None,
            "paths": sorted({s.path for s in live if s.path}) or ([self.last_path] if self.last_path else []),
            "peers": sorted({s.peer for s in live if s.peer}) or ([self.last_peer] if self.last_peer else []),
        }
