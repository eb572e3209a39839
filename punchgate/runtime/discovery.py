"""Finding services by name: a Kademlia DHT on every node, plus mDNS on the LAN.

Each exposed service NAME is announced as a DHT provider record under the key
``/punchgate/svc/NAME`` (the raw bytes of that string, as the Rust original's
``RecordKey::new`` does). Provider records carry the addresses our ``AddressBook``
advertises, so they never hold wildcard or (for a networked node) loopback addresses.

mDNS (``runtime/mdns.py``) finds peers on the same network; each peer found is
connected to and added to the DHT's routing table, so names resolve on a LAN with no
bootstrap peer at all.
"""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.kad_dht import ServerOnlyKadDHT
from punchgate.logs import get_logger
from punchgate.runtime.host import PEERSTORE_TTL

LOOKUP_TIMEOUT = 15.0
PUBLISH_TIMEOUT = 30.0
IDENTIFY_WAIT = 5.0  # how long join() waits for identify to tell whether a peer serves the DHT

log = get_logger("punchgate.discovery")


def service_key(name: str) -> str:
    return f"/punchgate/svc/{name}"


class Discovery:
    """Owns the node's KadDHT; publishes and looks up service names."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.dht = ServerOnlyKadDHT(host, DHTMode.CLIENT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht):
            task_status.started()
            await trio.sleep_forever()

    async def set_mode(self, server: bool) -> None:
        mode = DHTMode.SERVER if server else DHTMode.CLIENT
        if self.dht.mode != mode:
            await self.dht.switch_mode(mode)
            log.info("dht mode", mode=mode.name.lower())

    async def join(self, peer_id: ID) -> int:
        """Add a connected DHT server to the routing table and refresh it; returns the table size."""
        with trio.move_on_after(IDENTIFY_WAIT):
            while not self.dht.serves_dht(peer_id):  # identify has not answered yet
                await trio.sleep(0.05)
        await self.dht.add_peer(peer_id)
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await self.dht.refresh_routing_table()
        return self.dht.get_routing_table_size()

    async def publish(self, name: str) -> bool:
        with trio.move_on_after(PUBLISH_TIMEOUT):
            return bool(await self.dht.provide(service_key(name)))
        return False

    async def find(self, name: str) -> list[PeerInfo]:
        """Providers of ``name`` other than us, each once; their addresses go to the peerstore."""
        providers: list[PeerInfo] = []
        with trio.move_on_after(LOOKUP_TIMEOUT):
            providers = await self.dht.find_providers(service_key(name))
        unique: dict[ID, PeerInfo] = {}
        for info in providers:
            if info.peer_id == self.host.get_id():
                continue
            if info.addrs:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEERSTORE_TTL)
            unique.setdefault(info.peer_id, info)
        return list(unique.values())
