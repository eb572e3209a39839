"""The node's behaviour as a pure Mealy machine: ``(state, event) -> (state, commands)``.

Theory of operation
-------------------
Nothing in this package performs I/O or knows that trio or libp2p exist. The runtime
(``punchgate.runtime``) turns what happens on the network into :mod:`events`, calls
:func:`transition`, and executes the :mod:`commands` it gets back. Tests drive the
machine with plain function calls.

The state (:class:`NodeState`) is a product of independent dimensions:

* **phase** - STARTING -> JOINING -> READY -> SHUTTING_DOWN. A node with no bootstrap
  peers goes from STARTING straight to READY once it listens. A node with bootstrap
  peers is READY when one of them answers, or when every one has failed once (it then
  keeps retrying with capped exponential backoff and works with what it has).
  SHUTTING_DOWN is reachable from every phase and never left.
* **NAT status** - UNKNOWN / PUBLIC / PRIVATE. The first bootstrap peer reached is
  asked to dial us back; PUBLIC makes us a DHT server, PRIVATE keeps us a DHT client
  and asks for a relay slot. A node with no bootstrap peers serves the DHT from the
  start; one with bootstrap peers only uses it until it knows it is reachable.
* **relay** - IDLE / RESERVING / RESERVED: a private node asks a connected bootstrap
  peer for a relay slot and asks again when the slot is lost or refused.
* **tunnels** - open local client sessions per tunnel bind address; shutdown closes
  them within a grace period.
* bookkeeping: bootstrap peers (connected, failures) and connected peers.

Exposed services are published exactly when the node becomes READY, and again while
READY when the republish timer fires or its reachable addresses change. Every bootstrap
peer reached and every peer discovered (mDNS) is joined to the DHT. Delays are data: a command that must wait
(a retry, a backoff) carries its ``delay`` and the runtime does the waiting.
"""

from punchgate.state import commands, events
from punchgate.state.machine import backoff, transition
from punchgate.state.model import BootstrapPeer, NatStatus, NodeState, Phase, RelayState, RelayStatus

__all__ = [
    "BootstrapPeer",
    "NatStatus",
    "NodeState",
    "Phase",
    "RelayState",
    "RelayStatus",
    "backoff",
    "commands",
    "events",
    "transition",
]
