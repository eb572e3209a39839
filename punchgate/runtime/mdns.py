"""Finding peers on the LAN with mDNS (py-libp2p's zeroconf-based discovery).

Decision: we run py-libp2p's ``MDNSDiscovery`` ourselves instead of passing
``enable_mDNS=True`` to the host. The host calls its blocking ``start()`` (zeroconf
probes and announces for ~1.5 s) on the trio thread inside ``host.run``, freezing the
whole node; here registration and unregistration run in a worker thread, after the
host listens (so the announced addresses are real) and bounded at shutdown.

Discoveries arrive on a zeroconf thread through the process-wide ``peerDiscovery``
handler list; we hop back into our trio run and skip our own announcements.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import create_mdns_discovery
from libp2p.peer.peerinfo import PeerInfo

from punchgate.logs import get_logger

CLEANUP_INTERVAL = 60.0
ENTRY_MAX_AGE = 240
STOP_TIMEOUT = 2.0

log = get_logger("punchgate.discovery")


class MdnsDiscovery:
    def __init__(self, host: IHost, on_peer: Callable[[PeerInfo], None]) -> None:
        self.host = host
        self.on_peer = on_peer
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        peerDiscovery.register_peer_discovered_handler(self._discovered)
        mdns = None
        try:
            try:
                mdns = await trio.to_thread.run_sync(
                    lambda: create_mdns_discovery(self.host.get_network(), host=self.host)
                )
                await trio.to_thread.run_sync(mdns.broadcaster.register)
            except OSError as exc:  # port 5353 held by a responder that does not share it, no multicast...
                log.warning("mdns unavailable", reason=f"{exc.strerror or exc}; LAN discovery is off")
                task_status.started()
                return
            log.info("mdns announcing", service=mdns.service_name)
            task_status.started()
            while True:
                await trio.sleep(CLEANUP_INTERVAL)
                mdns.listener.cleanup_stale_entries(max_age=ENTRY_MAX_AGE)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(self._discovered)
            if mdns is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                    await trio.to_thread.run_sync(_stop, mdns, abandon_on_cancel=True)

    def _discovered(self, info: PeerInfo) -> None:
        # The handler list is process-wide: in a process with several hosts, skip our own.
        if info.peer_id == self.host.get_id() or self._token is None:
            return
        try:
            trio.from_thread.run_sync(self.on_peer, info, trio_token=self._token)
        except trio.RunFinishedError:
            pass  # our trio run has ended
        except RuntimeError:
            self.on_peer(info)  # called on a trio thread after all


def _stop(mdns) -> None:
    mdns.broadcaster.unregister()
    mdns.listener.stop()
    mdns.zeroconf.close()
