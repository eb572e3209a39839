"""Periodic ping of every connected peer, logged as ``ping`` events with the round trip."""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.host.ping import PingService

from punchgate.logs import get_logger

PING_INTERVAL = 30.0
PING_TIMEOUT = 10.0

log = get_logger("punchgate.ping")


class Pinger:
    def __init__(self, host: IHost, interval: float = PING_INTERVAL) -> None:
        self.host = host
        self.interval = interval
        self.service = PingService(host)
        self.rtt_ms: dict[str, float] = {}  # last successful round trip per peer (for status)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            async with trio.open_nursery() as nursery:
                for peer_id in list(self.host.get_network().get_connections_map()):
                    nursery.start_soon(self._ping, peer_id)

    async def _ping(self, peer_id) -> None:
        started = trio.current_time()
        try:
            with trio.fail_after(PING_TIMEOUT):
                async for _ in self.service.ping_iter(peer_id, 1):
                    pass
        except Exception as exc:  # timeouts, resets, closed connections
            log.info("ping", peer=str(peer_id), ok=False, reason=type(exc).__name__)
            self.rtt_ms.pop(str(peer_id), None)
            return
        self.rtt_ms[str(peer_id)] = rtt = round((trio.current_time() - started) * 1000, 2)
        log.info("ping", peer=str(peer_id), ok=True, rtt_ms=rtt)
