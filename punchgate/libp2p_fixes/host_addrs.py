"""``BasicHost.get_addrs`` mangles relay circuit addresses.

Defect (``libp2p/host/basic_host.py`` ~530-539): to append ``/p2p/<our id>`` it first
removes "the address's own" ``/p2p`` part, but looks up the *first* ``/p2p`` value.
For ``/ip4/R/tcp/4001/p2p/<relay>/p2p-circuit`` that is the relay's ID, and
decapsulating it cuts the address back to ``/ip4/R/tcp/4001``: the result,
``/ip4/R/tcp/4001/p2p/<us>``, labels the relay's socket with our peer ID. Identify,
DHT provider records and DCUtR all read ``get_addrs()``, so a node behind NAT
advertised a wrong address instead of its circuit address.

Fix: :func:`get_addrs` does the same work but strips only a *trailing* ``/p2p/<id>``.
Bound to ``BasicHost.get_addrs``.
"""

from __future__ import annotations

import multiaddr
from libp2p.host.basic_host import BasicHost

from punchgate.specs import without_peer_id

_original_get_addrs = BasicHost.get_addrs


def get_addrs(self: BasicHost) -> list[multiaddr.Multiaddr]:
    own = multiaddr.Multiaddr(f"/p2p/{self.get_id()!s}")
    candidates = list(self.get_transport_addrs())
    manager = getattr(self, "_observed_addr_manager", None)
    if manager is not None:
        for observed in manager.addrs():
            if observed not in candidates:
                candidates.append(observed)
    factory = getattr(self, "_addrs_factory", None)
    addrs = list(factory(candidates)) if factory is not None else candidates
    return [without_peer_id(a).encapsulate(own) for a in addrs]


def install() -> None:
    BasicHost.get_addrs = get_addrs  # type: ignore[method-assign]
