"""Adjustments to py-libp2p 0.8.1 that punchgate depends on, applied by ``install()``.

Each adjustment lives in its own module, whose docstring names the defect and
the library file it addresses. ``install()`` rebinds library names to our
subclasses; it never edits library source and is safe to call more than once.
Call it before any host is built.

Defects fixed:

- ``yamux``: ``libp2p/stream_muxer/yamux/yamux.py`` ``YamuxStream.write`` polls
  every 10 ms for window space and gives up after a hard-coded 5 s, surfacing
  ``StreamReset`` locally while the peer's reader hangs. Replaced by a writer
  that waits on an event with no deadline (back-pressure blocks; callers bound
  it with their own cancel scopes); peer reset/close and connection loss still
  wake it.
"""

from __future__ import annotations

from punchgate.libp2p_fixes import noise, yamux, yamux_flow

_installed = False


def install() -> None:
    """Apply every adjustment once; later calls do nothing."""
    global _installed
    if _installed:
        return
    yamux.install()
    yamux_flow.install()
    noise.install()
    _installed = True


def installed() -> bool:
    """Whether ``install()`` has run in this process."""
    return _installed
