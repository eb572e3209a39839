"""Adjustments to py-libp2p 0.8.1 outside the transports, one module per defect.

Each module's docstring names the defect and the library file and lines it addresses.
The data path (Noise, Yamux, streams, QUIC) is ``punchgate.transports``; what is left
here adjusts the protocols and services around it:

- ``auto_connector`` -- the swarm dials peers from the peerstore on its own (150 of
  them with the low watermark at 0: its target is the watermarks' midpoint).
  ``OffAutoConnector`` never starts. Bound to ``swarm.AutoConnector`` by ``install()``.
- ``kad_dht`` -- the DHT admits client-mode peers to its routing table, so lookups stall
  on unreachable peers; ``find_providers`` answers from a 48-hour cache.
  ``ServerOnlyKadDHT`` and ``FreshProviderStore`` (used by discovery).
- ``dcutr`` -- hole punching dials hopeless addresses first, can hang when QUIC
  addresses are known, sprays from the wrong socket, offers TCP addresses only, and
  closes relayed connections under live streams. ``BoundedDCUtR`` (used by the
  hole-punch runtime).
- ``autonat`` -- the AutoNAT server's dial-back reuses the connection the request came
  on. ``FreshDialAutoNAT`` (used by reachability).
- ``relay_hop`` -- the circuit relay's data path: the end of one circuit closes the
  streams of another circuit to the same peer, a 15 s write deadline tears circuits
  down under back-pressure, 64 KiB reads, a half-close ends both directions.
  ``RelayHop`` (used by the relay runtime).

``install()`` applies the data path (``punchgate.transports.install``) and the one
rebinding made here; it never edits library source, is idempotent, and must run before
the first host is built. The wire protocols are unchanged, so adjusted nodes
interoperate with any other libp2p implementation.
"""

from __future__ import annotations

from punchgate import transports
from punchgate.libp2p_fixes import auto_connector

_installed = False


def install() -> None:
    """Apply every adjustment once; later calls do nothing."""
    global _installed
    if _installed:
        return
    transports.install()
    auto_connector.install()
    _installed = True


def installed() -> bool:
    """Whether ``install()`` has run in this process."""
    return _installed
