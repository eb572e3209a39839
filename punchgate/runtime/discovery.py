"""Finding services and peers: a Kademlia DHT on every node, plus mDNS on the LAN.

Each exposed service NAME is announced as a DHT provider record under the key
derived from ``/punchgate/svc/NAME``: the sha2-256 multihash of that string. Decision:
a multihash, not the raw string the Rust original uses (``RecordKey::new``), because
go- and js-libp2p DHT servers read provider keys as CIDs and refuse anything else (a
sha2-256 multihash is a CIDv0); rust-libp2p and py-libp2p take any bytes. A node that
exposes services also announces itself under ``/punchgate/peer/<its peer ID>`` (same
derivation), so that a client given only a peer ID
(``--tunnel PEER:SERVICE``) can learn how to reach it from any DHT, even one whose
servers do not keep client-mode peers in their routing tables. Records carry the
addresses our ``AddressBook`` advertises: a circuit address for a node behind NAT,
never a wildcard or (for a networked node) a loopback one.

Look-ups always ask the network (``ServerOnlyKadDHT.find_providers_fresh``): the
library's own answer comes from a local cache that outlives the records it copied.

mDNS (``runtime/mdns.py``) finds peers on the same network; each peer found is
connected to and added to the DHT's routing table, so names resolve on a LAN with no
bootstrap peer at all.
"""

from __future__ import annotations

import hashlib

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.kad_dht import ServerOnlyKadDHT
from punchgate.logs import get_logger

SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"  # multihash code 0x12 (sha2-256), 32-byte digest
LOOKUP_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 30.0
IDENTIFY_WAIT = 5.0  # how long join() waits for identify to tell whether a peer serves the DHT

log = get_logger("punchgate.discovery")


def dht_key(text: str) -> str:
    """The DHT key for ``text``: its sha2-256 multihash (a CIDv0), hex as the library takes it."""
    return (SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(text.encode()).digest()).hex()


def service_key(name: str) -> str:
    return dht_key(f"/punchgate/svc/{name}")


def peer_key(peer_id: ID | str) -> str:
    return dht_key(f"/punchgate/peer/{peer_id}")


class Discovery:
    """Owns the node's KadDHT; publishes and looks up service names and peers."""

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

    async def publish(self, key: str) -> bool:
        with trio.move_on_after(PUBLISH_TIMEOUT):
            return bool(await self.dht.provide(key))
        return False

    async def providers(self, key: str) -> list[PeerInfo]:
        """Who provides ``key`` now, other than us, each once (asking the network)."""
        found: list[PeerInfo] = []
        with trio.move_on_after(LOOKUP_TIMEOUT):
            found = await self.dht.find_providers_fresh(key)
        unique: dict[ID, PeerInfo] = {}
        for info in found:
            if info.peer_id != self.host.get_id():
                unique.setdefault(info.peer_id, info)
        return list(unique.values())

    async def find(self, name: str) -> list[PeerInfo]:
        return await self.providers(service_key(name))

    async def peer_addrs(self, peer_id: ID) -> list[str]:
        """``peer_id``'s addresses as it last announced them (its record under ``peer_key``)."""
        for info in await self.providers(peer_key(peer_id)):
            if info.peer_id == peer_id:
                return [str(a) for a in info.addrs]
        return []
