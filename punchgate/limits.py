"""Resource caps that hold against peers that misbehave on purpose: values and counters, no I/O.

Theory of operation
-------------------
Every way a remote peer can make the node spend memory, descriptors or time has a cap
(:class:`Limits`, defaults documented in the README's "Access control" section), checked
at the point where the cost would start:

* **connections** (:class:`ConnectionAdmission`) - at accept, before any handshake: at
  most ``inbound_conns`` inbound connections in total and ``inbound_conns_per_ip`` from
  one IP address, counted from accept until the connection closes; each must finish its
  security and muxer handshake within ``handshake_timeout`` seconds.
* **streams** - the muxer refuses (RST) inbound streams on a connection beyond
  ``inbound_streams_per_conn`` before anything else sees them; the tunnel protocol
  (:class:`StreamAdmission`) admits at most ``tunnel_streams_per_peer`` tunnel streams
  from one peer at once, at most ``tunnel_stream_rate`` new ones per second per peer
  (a token bucket holding ``tunnel_stream_burst``), and ``tunnel_sessions`` in all.
* **relay** - reservations in total and per IP, circuits per peer, bytes and seconds
  per circuit (``relay_*``).

Refusals are logged through :class:`LogThrottle`, at most one line per key per
interval with the count of refusals it did not print, so an attack cannot flood the log.

Time is data here: every method that needs the time takes ``now`` (seconds on any
monotonic clock), so the counters can be tested with plain calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from punchgate.specs import SpecError


@dataclass(frozen=True)
class Limits:
    # connections
    inbound_conns: int = 256  # inbound connections at once (in handshake or established)
    inbound_conns_per_ip: int = 32  # of those, from one IP address
    handshake_timeout: float = 10.0  # seconds from accept to a secured, multiplexed connection
    # streams
    inbound_streams_per_conn: int = 2048  # inbound streams open at once on one connection
    tunnel_streams_per_peer: int = 1024  # tunnel streams (sessions + handshakes) of one peer at once
    tunnel_stream_rate: float = 500.0  # new tunnel streams per second per peer, sustained
    tunnel_stream_burst: int = 2000  # ... and in a burst
    tunnel_sessions: int = 4096  # tunnel streams at once, all peers together
    # relay (serving)
    relay_reservations: int = 128  # peers holding a slot at once
    relay_reservations_per_ip: int = 8  # of those, connected from one IP address
    relay_circuits_per_peer: int = 128  # relayed connections to one reserved peer at once
    relay_circuit_bytes: int = 8 << 30  # bytes one circuit may carry, both ways together
    relay_circuit_seconds: int = 2 * 3600  # how long one circuit may last

    def describe(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


class LimitError(SpecError):
    """A ``NAME=VALUE`` limit setting is unusable."""


def parse_limit(text: str) -> tuple[str, int | float]:
    """``NAME=VALUE`` -> (name, value), for ``--limit``; values must be positive."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep:
        raise LimitError(f"{text!r} has no '=' (NAME=VALUE)")
    if name not in LIMIT_NAMES:
        raise LimitError(f"{name!r} is not a limit; limits: {', '.join(LIMIT_NAMES)}")
    kind = type(getattr(Limits(), name))
    try:
        number: int | float = kind(value.strip())
    except ValueError:
        raise LimitError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise LimitError(f"{name} must be positive, not {value!r}")
    return name, number


def with_settings(base: Limits, settings: list[tuple[str, int | float]]) -> Limits:
    changes: dict[str, Any] = dict(settings)  # each value has its field's type (parse_limit)
    return replace(base, **changes)


class ConnectionAdmission:
    """Counts inbound connections, in total and per IP, from accept until close."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total_cap = total
        self.per_ip_cap = per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Take a slot for a connection from ``ip``; or the reason it is refused."""
        if self.total >= self.total_cap:
            return f"too many inbound connections ({self.total_cap})"
        if self.by_ip.get(ip, 0) >= self.per_ip_cap:
            return f"too many inbound connections from {ip} ({self.per_ip_cap})"
        self.total += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        count = self.by_ip.get(ip, 0)
        if count <= 0:
            raise ValueError(f"no connection from {ip} to release")
        self.total -= 1
        if count == 1:
            del self.by_ip[ip]
        else:
            self.by_ip[ip] = count - 1


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` stored; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


TOO_MANY_STREAMS = "too many tunnel streams from this peer"
TOO_FAST = "too many new tunnel streams from this peer, slow down"
NODE_BUSY = "node busy: too many tunnel sessions"


class StreamAdmission:
    """Tunnel streams per peer (at once and per second) and sessions in all.

    A stream is admitted with :meth:`admit` when it arrives and released with
    :meth:`release` when it ends, whatever happened in between. Per-peer state is
    kept only for peers with streams open or a bucket not yet refilled, so a flood of
    identities cannot grow it without bound: at most ``sessions`` cap + peers seen in
    the last ``burst / rate`` seconds."""

    def __init__(self, per_peer: int, rate: float, burst: int, total: int) -> None:
        self.per_peer_cap = per_peer
        self.rate, self.burst = rate, burst
        self.total_cap = total
        self.total = 0
        self.open: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def admit(self, peer: str, now: float) -> str | None:
        """Take a slot for a new tunnel stream of ``peer``; or the reason (told to the peer)."""
        self._prune(now)
        bucket = self.buckets.get(peer)
        if bucket is None:
            bucket = self.buckets[peer] = TokenBucket(self.rate, self.burst, now)
        if not bucket.take(now):
            return TOO_FAST
        if self.open.get(peer, 0) >= self.per_peer_cap:
            return TOO_MANY_STREAMS
        if self.total >= self.total_cap:
            return NODE_BUSY
        self.open[peer] = self.open.get(peer, 0) + 1
        self.total += 1
        return None

    def release(self, peer: str) -> None:
        count = self.open.get(peer, 0)
        if count <= 0:
            raise ValueError(f"no tunnel stream of {peer} to release")
        self.total -= 1
        if count == 1:
            del self.open[peer]
        else:
            self.open[peer] = count - 1

    def _prune(self, now: float) -> None:
        """Forget buckets of peers with nothing open whose bucket is full again (cheap:
        runs only when there are many more buckets than open peers)."""
        if len(self.buckets) <= 2 * len(self.open) + 64:
            return
        for peer in [p for p, b in self.buckets.items() if p not in self.open and b.full(now)]:
            del self.buckets[peer]


class LogThrottle:
    """At most one log line per key per ``interval`` seconds; counts what it held back."""

    MAX_KEYS = 1024

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None: do not log. Else log now, mentioning the returned count of lines held back."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) >= self.MAX_KEYS and key not in self._last:
            self._forget(now)
        self._last[key] = now
        return self._held.pop(key, 0)

    def _forget(self, now: float) -> None:
        stale = [k for k, t in self._last.items() if now - t >= self.interval]
        if len(self._last) - len(stale) >= self.MAX_KEYS:  # all recent: drop the oldest half
            stale = sorted(self._last, key=self._last.__getitem__)[: self.MAX_KEYS // 2]
        for key in stale:
            del self._last[key]
            self._held.pop(key, None)
