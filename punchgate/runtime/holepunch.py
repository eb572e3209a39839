"""Hole punching: DCUtR over TCP and QUIC, one attempt when the state machine asks for one.

Whether and when to punch (a relayed connection and nothing better, our NAT keeping
ports, no recent failure) and how long to wait are the machine's decisions; this
module runs the library's DCUtR service (as ``BoundedDCUtR``: no hopeless "step 0"
dials, no hang with QUIC addresses, no relayed connection closed under live streams)
and reports whether a direct connection (TCP or QUIC) came of an attempt.
"""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.dcutr import BoundedDCUtR
from punchgate.runtime.host import live_connection

DIAL_TIMEOUT = 3  # per direct dial inside a punch


class HolePuncher:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self.dcutr = BoundedDCUtR(host, dial_timeout=DIAL_TIMEOUT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dcutr):
            task_status.started()
            await trio.sleep_forever()

    async def punch(self, peer_id: ID) -> tuple[bool, str | None]:
        """(a direct connection to ``peer_id`` exists afterwards, why not)."""
        reason = None
        try:
            ok = bool(await self.dcutr.initiate_hole_punch(peer_id))
            if not ok:
                reason = "DCUtR gave up"
        except Exception as exc:  # protocol errors from the peer or the library
            reason = f"{type(exc).__name__}: {exc}"
        if live_connection(self.host, peer_id, "tcp") or live_connection(self.host, peer_id, "quic"):
            return True, None
        return False, reason or "no direct connection"
