"""Adjustments to py-libp2p 0.8.1 that punchgate depends on, applied by ``install()``.

Each adjustment lives in its own module, whose docstring names the defect and
the library file and lines it addresses. ``install()`` only rebinds library
names to our subclasses, in one place each; it never edits library source, is
idempotent, and must run before the first host is built. The wire protocols
(Noise, Yamux 1.0.0) are unchanged, so patched nodes interoperate with any
other libp2p implementation, including unpatched py-libp2p.

Defects fixed:

- ``yamux`` -- the 5-second reset. ``libp2p/stream_muxer/yamux/yamux.py``
  ``YamuxStream.write`` (~229-292) polls every 10 ms for send-window space and
  gives up after a hard-coded 5 s with an error surfaced as ``StreamReset``,
  while the peer's reader hangs. ``BackpressureYamuxStream`` waits on an event
  with no deadline (back-pressure blocks; callers bound it with their own
  cancel scopes) and is woken by window updates, peer FIN/RST, local
  close/reset and connection loss. Bound to ``yamux.YamuxStream``.
- ``yamux_flow`` -- Yamux throughput and latency (same file): frames one byte
  too big for a Noise message, a 256 KiB start window with an update per read,
  a per-frame lock/timeout/copy-heavy reader. ``FlowYamux`` sizes frames to one
  Noise message, announces a 16 MiB window at stream open and credits it every
  half window, writes in bounded 8-frame batches, and reads frame bodies as
  zero-copy views. Bound to ``muxer_multistream.Yamux``.
- ``noise`` -- Noise transport overhead (``libp2p/io/msgio.py``,
  ``libp2p/security/noise/io.py``, ``libp2p/security/secure_session.py``): two
  socket reads and several copies per message, one socket write per message.
  ``NoiseSession`` reads into a persistent buffer, decrypts from memoryviews and
  writes a batch of messages, encrypted in place, with one socket write. Bound
  to ``noise.patterns.SecureSession``.
- ``net_stream`` -- ``NetStream.read``/``write``
  (``libp2p/network/stream/net_stream.py``) acquire a ``trio.Lock`` (a scheduler
  pass) around a state check that has no await, on every call. ``LeanNetStream``
  checks without it. Bound to ``swarm_connection.NetStream``.
- ``host_addrs`` -- ``BasicHost.get_addrs`` turns a relay circuit address into
  the relay's socket labelled with our peer ID. Bound to ``BasicHost.get_addrs``.
- ``auto_connector`` -- the swarm dials peers from the peerstore on its own (150 of
  them with the low watermark at 0: its target is the watermarks' midpoint).
  ``OffAutoConnector`` never starts. Bound to ``swarm.AutoConnector``.
- ``kad_dht`` -- the DHT admits client-mode peers to its routing table, so
  lookups stall on unreachable peers. ``ServerOnlyKadDHT`` (used by discovery).
- ``dcutr`` -- hole punching dials hopeless addresses first, can hang when QUIC
  addresses are known, and closes relayed connections under live streams.
  ``BoundedDCUtR`` (used by the hole-punch runtime).
- ``relay_hop`` -- the circuit relay's data path
  (``libp2p/relay/circuit_v2/protocol.py`` ``CircuitV2Protocol._relay_data``):
  the end of one circuit closes the streams of another circuit to the same
  peer, a 15 s write deadline tears circuits down under back-pressure, 64 KiB
  reads, a half-close ends both directions. ``RelayHop`` (used by the relay
  runtime).
"""

from __future__ import annotations

from punchgate.libp2p_fixes import auto_connector, host_addrs, net_stream, noise, yamux, yamux_flow

_installed = False


def install() -> None:
    """Apply every adjustment once; later calls do nothing."""
    global _installed
    if _installed:
        return
    yamux.install()
    yamux_flow.install()
    noise.install()
    net_stream.install()
    host_addrs.install()
    auto_connector.install()
    _installed = True


def installed() -> bool:
    """Whether ``install()`` has run in this process."""
    return _installed
