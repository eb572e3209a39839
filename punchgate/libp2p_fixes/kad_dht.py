"""The DHT as shipped answers look-ups from stale caches and admits client-mode peers.

Defects (``libp2p/kad_dht/``):

* ``kad_dht.py`` ~632, ``_do_handle_stream``: every peer that opens a DHT stream is
  added to the routing table with ``skip_server_mode_check=True`` ("they MUST support
  KAD server mode"), but clients open DHT streams too. A node behind NAT (client mode)
  then sits in the public nodes' tables; they hand it out as a "closer peer", and
  look-ups wait out 10 s dial timeouts on its unreachable LAN address, twice per
  look-up (measured: ``find_providers`` 20 s instead of 0.03 s in the NAT lab). Also,
  when identify has not run yet, the library's check lets any peer in.
* ``provider_store.py`` ~370, ``find_providers``: the local provider store is read
  first and, when it holds anything, the network is never asked; and every provider a
  network look-up finds is written into that local store, where it stays for 48 hours
  (``PROVIDER_RECORD_EXPIRATION_INTERVAL``). A client that once learnt a provider's
  record (say, with the LAN addresses it had before it knew it was behind NAT) gets
  that record back in 0.1 ms for two days, however often the provider republishes.
* the same 48 hours on a DHT server: a provider that is gone for good is handed out
  for two days.
* ``peer_routing.py`` ~196, ``find_closest_peers_network``: with fewer than a few peers
  in the routing table it asks every connected peer and then every peer in the
  peerstore, dialling peers that serve no DHT (a provider we are opening a tunnel to:
  its second connection raced ours and the swarm closed one, under a live stream).

Fix: :class:`ServerOnlyKadDHT` admits a peer to the routing table only if identify
has shown that it serves the DHT protocol, and its provider store is a
:class:`FreshProviderStore`: records held for others expire after
:data:`RECORD_TTL`, and :meth:`FreshProviderStore.find_providers_fresh` always asks the
network (DHT servers only: our routing table's, then the closer servers they name),
caches nothing it learns, and adds only the records others published to us.
Used by ``runtime/discovery.py``.
"""

from __future__ import annotations

import time

import trio
from libp2p.kad_dht.common import ALPHA, QUERY_TIMEOUT
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

RECORD_TTL = 3600.0  # providers republish every 5 minutes by default (--republish-interval)


class FreshProviderStore(ProviderStore):
    def get_providers(self, key: bytes) -> list[PeerInfo]:
        records = self.providers.get(key)
        if records:
            cutoff = time.time() - RECORD_TTL
            for peer in [p for p, record in records.items() if record.timestamp < cutoff]:
                del records[peer]
            if not records:
                del self.providers[key]
        return super().get_providers(key)

    async def find_providers_fresh(self, key: bytes, count: int = 20) -> list[PeerInfo]:
        """Providers of ``key`` as the network knows them now (records held here included)."""
        found: dict[ID, PeerInfo] = {info.peer_id: info for info in self.get_providers(key)}
        if self.peer_routing is None:
            return list(found.values())[:count]
        # Only DHT servers are asked: our routing table's, then the closer ones they name.
        # (The library's look-up falls back to every connected peer and the whole
        # peerstore when the table is nearly empty, dialling peers that are not DHT
        # servers, such as the provider a tunnel is being opened to: a second connection
        # racing ours, one of which the swarm then closes under its streams.)
        candidates = list(self.peer_routing.routing_table.find_local_closest_peers(key, count))
        asked: set[ID] = {self.local_peer_id}
        while candidates and len(found) < count:
            batch = [p for p in candidates[:ALPHA] if p not in asked]
            candidates = candidates[ALPHA:]
            closer: list[ID] = []

            async def ask(peer: ID, closer: list[ID] = closer) -> None:
                asked.add(peer)
                with trio.move_on_after(QUERY_TIMEOUT):
                    try:
                        providers, more = await self._get_providers_from_peer_with_closers(peer, key)
                    except Exception:  # an unreachable or misbehaving DHT peer: ask the others
                        return
                    for info in providers:
                        known = found.get(info.peer_id)
                        if known is None or (not known.addrs and info.addrs):
                            found[info.peer_id] = info
                    closer.extend(more)

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            fresh = [p for p in dict.fromkeys(closer) if p not in asked and p not in candidates]
            if fresh:
                candidates = sort_peer_ids_by_distance(key, candidates + fresh)
        return list(found.values())[:count]


class ServerOnlyKadDHT(KadDHT):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        old = self.provider_store
        self.provider_store = FreshProviderStore(host=old.host, peer_routing=old.peer_routing)

    def serves_dht(self, peer_id: ID) -> bool:
        peerstore = self.host.get_peerstore()
        try:
            protocols = peerstore.get_protocols(peer_id) or []
        except Exception:  # peer unknown to the peerstore
            return False
        return str(KAD_PROTOCOL_ID) in protocols

    async def add_peer(self, peer_id: ID | PeerInfo, *, skip_server_mode_check: bool = False) -> bool:
        pid = peer_id.peer_id if isinstance(peer_id, PeerInfo) else peer_id
        if not self.serves_dht(pid):
            return False
        return await super().add_peer(pid, skip_server_mode_check=True)

    async def find_providers_fresh(self, key: str, count: int = 20) -> list[PeerInfo]:
        """``key`` as ``provide`` takes it (here always a multihash in hex)."""
        store = self.provider_store
        assert isinstance(store, FreshProviderStore)
        return await store.find_providers_fresh(bytes.fromhex(key), count)
