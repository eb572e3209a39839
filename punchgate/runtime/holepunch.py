"""Hole punching (DCUtR over TCP), one attempt at a time per peer, always bounded.

A tunnel that reaches its peer only through a relay asks :meth:`HolePuncher.attempt`
for a direct connection. The first request starts a punch in the background (at most
:data:`PUNCH_TIMEOUT` seconds); every request waits for it at most ``wait`` seconds,
so a tunnel never hangs on a punch. A failed punch is not retried for
:data:`RETRY_AFTER` seconds: meanwhile tunnels use the relay at once. When the
reachability check found that our own NAT maps ports at random (``futile_because``),
no punch is tried at all: DCUtR predicts our port as the one we listen on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.dcutr import BoundedDCUtR
from punchgate.logs import get_logger
from punchgate.runtime.host import live_connection

PUNCH_TIMEOUT = 25.0
RETRY_AFTER = 300.0
DIAL_TIMEOUT = 3  # per direct dial inside a punch

log = get_logger("punchgate.holepunch")


@dataclass
class _Attempt:
    done: trio.Event = field(default_factory=trio.Event)
    succeeded: bool = False
    finished_at: float = 0.0


class HolePuncher:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self.dcutr = BoundedDCUtR(host, dial_timeout=DIAL_TIMEOUT)
        self._attempts: dict[ID, _Attempt] = {}
        self._nursery: trio.Nursery | None = None
        self._skipped: set[ID] = set()
        self.futile_because: str | None = None  # set when a punch cannot work from here

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dcutr), trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def attempt(self, peer_id: ID, wait: float) -> bool:
        """Whether a direct TCP connection to ``peer_id`` exists after waiting at most ``wait`` s."""
        if live_connection(self.host, peer_id, "tcp") is not None:
            return True
        if self.futile_because is not None:
            if peer_id not in self._skipped:
                self._skipped.add(peer_id)
                log.info(
                    "hole punch", peer=str(peer_id), outcome="skipped", duration_ms=0.0,
                    reason=self.futile_because, fallback="relayed",
                )
            return False
        attempt = self._attempts.get(peer_id)
        stale = attempt is not None and attempt.done.is_set() and (
            attempt.succeeded or time.monotonic() - attempt.finished_at > RETRY_AFTER
        )
        if attempt is None or stale:
            attempt = _Attempt()
            self._attempts[peer_id] = attempt
            assert self._nursery is not None
            self._nursery.start_soon(self._punch, peer_id, attempt)
        with trio.move_on_after(wait):
            await attempt.done.wait()
        return live_connection(self.host, peer_id, "tcp") is not None

    async def _punch(self, peer_id: ID, attempt: _Attempt) -> None:
        started = time.monotonic()
        reason = None
        try:
            with trio.move_on_after(PUNCH_TIMEOUT) as scope:
                attempt.succeeded = bool(await self.dcutr.initiate_hole_punch(peer_id))
            if scope.cancelled_caught:
                reason = f"no direct connection within {PUNCH_TIMEOUT:.0f}s"
        except Exception as exc:  # protocol errors from the peer or the library
            reason = f"{type(exc).__name__}: {exc}"
        attempt.succeeded = attempt.succeeded and live_connection(self.host, peer_id, "tcp") is not None
        attempt.finished_at = time.monotonic()
        attempt.done.set()
        log.info(
            "hole punch",
            peer=str(peer_id),
            outcome="direct" if attempt.succeeded else "failed",
            duration_ms=round((attempt.finished_at - started) * 1000, 1),
            reason=reason if not attempt.succeeded else None,
            fallback=None if attempt.succeeded else "relayed",
        )
