"""The node's behaviour as a pure Mealy machine: ``(state, event, now) -> (state, commands)``.

Theory of operation
-------------------
Nothing in this package performs I/O or knows that trio or libp2p exist. The runtime
(``punchgate.runtime``) turns what happens on the network into :mod:`events`, calls
:func:`transition` with the time on its one clock, executes the :mod:`commands` it gets
back, and wakes the machine with a ``Tick`` at :func:`next_wakeup`. Tests drive the
machine with plain function calls and made-up times.

The state (:class:`NodeState`) is a product of dimensions:

* **phase** - STARTING -> JOINING -> READY -> SHUTTING_DOWN. A node with no bootstrap
  peers is READY once it listens; one with bootstrap peers when one of them answers, or
  when each has failed once (it keeps redialling, 0.5 s ... 10 s apart).
  SHUTTING_DOWN is reachable from every phase and never left; it ends with ``StopHost``
  when every session has drained, when the grace period ends, or at a second request.
* **NAT** - UNKNOWN / PUBLIC / PRIVATE, how it was learnt (our dial-back, or AutoNAT),
  and whether our NAT keeps ports. Connected bootstrap peers are asked in turn; one that
  cannot check (it speaks neither protocol) is not asked again.
* **port mapping** - with bootstrap peers, our router is asked to forward a public port
  (IDLE / MAPPING / MAPPED / FAILED), renewed half-way through its lease, removed at
  shutdown; the mapped address is advertised only once a dial-back got through it (a
  router that grants and forwards nothing is found out that way). Reachable = PUBLIC or
  a confirmed mapping: that is what drops the relay slot and makes us a DHT server.
* **relay slot** - a node that is private, or that joined through bootstrap peers and
  does not know yet, holds a reservation on one of them (IDLE / RESERVING / RESERVED),
  renews it before it expires, and reserves again when it is lost.
* **publication** - services are announced when there is an address worth announcing:
  ours if we are reachable (or have nobody to ask), a circuit address once a slot is
  held; again at once whenever that changes or a DHT server (re)joins, and periodically.
* **tunnels** - each local client connection is a :class:`Session` (RESOLVING ->
  CONNECTING -> OPENING -> OPEN, or CLOSED with a reason). Sessions choose peers among a
  name's providers (:class:`Name`, looked up in the network, never from a cache) or a
  fixed peer, and wait on that peer's :class:`Link`: its addresses (hints with a time),
  its connections, the one dial in flight, the hole punch. A session rides the direct
  connection (TCP if one is up, else QUIC); else an unlimited relayed one (after giving
  a punch under way a moment);
  a relay whose limit is too small for a tunnel is used only to punch through.

Every piece of work the machine asks for has an attempt ID and a deadline kept in the
state; a result with an old attempt ID is ignored, and work whose deadline passes is
ended as a failure (and cancelled in the runtime). Times are data: handlers and
decisions read ``now``, never a clock.
"""

from punchgate.state import commands, events
from punchgate.state.machine import backoff, next_wakeup, transition
from punchgate.state.model import (
    BootstrapPeer,
    KnownPeer,
    Limit,
    Link,
    MapStatus,
    NatStatus,
    NodeState,
    Phase,
    PortMap,
    RelaySlot,
    RelayStatus,
    Session,
    SessionPhase,
)

__all__ = [
    "BootstrapPeer",
    "KnownPeer",
    "Limit",
    "Link",
    "MapStatus",
    "NatStatus",
    "NodeState",
    "Phase",
    "PortMap",
    "RelaySlot",
    "RelayStatus",
    "Session",
    "SessionPhase",
    "backoff",
    "commands",
    "events",
    "next_wakeup",
    "transition",
]
