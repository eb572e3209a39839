"""Open-file limit: descriptors are a resource the caps in ``limits.py`` protect.

A node holds a descriptor per connection and two per tunnel session (the stream's
connection is shared; the local socket is not). With the usual soft limit of 1,024 an
attacker would exhaust descriptors (``EMFILE``: nobody new is accepted) long before
``tunnel_sessions`` (4,096) is reached. So at start the soft limit is raised to the hard
one (at most :data:`WANTED`), as Go programs do on their own, and a warning says when
even that stays below what the caps allow. Called once by :func:`punchgate.cli.run`.
"""

from __future__ import annotations

import resource

from punchgate.limits import Limits

WANTED = 65536
SPARE = 256  # listeners, the DHT, mDNS, logs, libraries


def raise_open_files_limit(wanted: int = WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE toward ``wanted`` (never past the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def descriptors_needed(limits: Limits) -> int:
    """Descriptors the node may hold with every cap reached."""
    return limits.inbound_conns + 2 * limits.tunnel_sessions + SPARE
