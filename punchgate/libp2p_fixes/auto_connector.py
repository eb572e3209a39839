"""The swarm dials peers on its own, and no setting turns that off.

Defect (``libp2p/network/auto_connector.py`` ~262, ``AutoConnector.maybe_connect``): every
30 s (every 10 s below ``min_connections``, and at every disconnect) the swarm dials
peers from the peerstore until it has the midpoint of its low and high watermarks:
150 connections with the low watermark at 0. It dials the old addresses of restarted
peers, circuit addresses, DHT peers; it raced our own dial to a provider that had just
restarted, and the swarm then closed one of the two connections under a live tunnel
stream. Whom to dial, and when, is our state machine's decision.

Fix: :class:`OffAutoConnector` never starts, so it neither runs its periodic task nor
answers disconnects. Bound to ``swarm.AutoConnector``.
"""

from __future__ import annotations

from libp2p.network import swarm as swarm_module
from libp2p.network.auto_connector import AutoConnector


class OffAutoConnector(AutoConnector):
    async def start(self) -> None:
        return  # stays stopped: maybe_connect() returns at once when not started


def install() -> None:
    swarm_module.AutoConnector = OffAutoConnector  # type: ignore[misc]  # the rebinding this module exists for
