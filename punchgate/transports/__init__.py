"""How tunnel bytes cross the network: punchgate's TCP and QUIC data paths, as one component.

Theory of operation
-------------------
A tunnel stream is a libp2p stream (``NetStream``) on one of two kinds of connection:

* **TCP**: Noise (``noise.NoiseSession``) secures a TCP socket, Yamux (``yamux.FlowYamux``)
  multiplexes streams over it. Both are py-libp2p's protocols on the wire; we replace
  the library's session, muxer and stream classes with ours (``adjusted``), because as
  shipped they reset a stream whose reader pauses for 5 s and move ~90 MB/s.
* **QUIC** (``quic/``): our own transport on aioquic, secured by libp2p's TLS 1.3 and
  multiplexed by QUIC streams. py-libp2p's QUIC is not used at all (it loses data, kills
  idle streams, dials from a fresh socket and moves 1-5 MB/s).

Both follow the same rules, so a tunnel behaves the same whichever it rides:

1. **Credit follows reads.** A receiver grants its peer room for ``RECEIVE_WINDOW`` unread
   bytes per stream and gives credit back only for bytes the application has *read*, in
   steps of ``CREDIT_STEP`` (half a window: one WINDOW_UPDATE or MAX_STREAM_DATA per
   8 MiB read, not one per read). A reader that stops therefore stops its writer after
   one window, with bounded memory at both ends, and nothing is ever dropped. (QUIC adds
   a connection-wide window of two stream windows.)
2. **A writer waits for room; nothing gives up on its own.** Writes block while the
   peer's window is used up (Yamux) or while a send buffer is unacknowledged (QUIC);
   only the caller's cancel scope bounds the wait.
3. **One writer per connection.** On TCP one sender task per Yamux connection is the
   only writer of its Noise session: streams queue batches of at most ``WRITE_BATCH``
   frames, control frames are queued without waiting, so the frame reader never blocks
   on a write (two ends whose readers wait for their writers deadlock) and a cancelled
   writer never cuts a Noise message in half. On QUIC one task per connection does
   aioquic's sending, for everything the streams queued in a scheduling round.
4. **One Yamux frame is one Noise message.** A DATA frame carries at most
   ``FRAME_PAYLOAD`` bytes, so header and payload fill exactly one Noise message
   (``NOISE_PLAINTEXT``); a batch of ``WRITE_BATCH`` frames (``BATCH_BYTES``) goes out
   in one socket write. The tunnel pipe (``runtime/pipe.py``) and the relay
   (``libp2p_fixes/relay_hop.py``) read ``BATCH_BYTES`` at a time, so one read fills
   one sender batch.

``adjusted()`` puts our TCP classes in place of the library's for the duration of a
``with`` block and restores what it replaced; ``install()`` does it for the rest of the
process (``runtime/host.py`` calls it before building a host); ``as_shipped()`` gives
back the library's own classes for a block, so a test can run the library as shipped
and ours side by side in one process. All three check that the library is the version
the adjustments were written against.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

NOISE_PLAINTEXT = 65_519  # py-libp2p's Noise plaintext limit: 65,535 minus the 16-byte tag
YAMUX_HEADER = 12
FRAME_PAYLOAD = NOISE_PLAINTEXT - YAMUX_HEADER  # 65,507: header + payload = one Noise message
WRITE_BATCH = 8  # Yamux frames a stream hands the sender at once (one socket write)
BATCH_BYTES = WRITE_BATCH * FRAME_PAYLOAD  # 524,056: what the pipe and the relay read at a time
RECEIVE_WINDOW = 16 * 1024 * 1024  # unread bytes a stream may hold, TCP and QUIC alike
CREDIT_STEP = RECEIVE_WINDOW // 2  # credit goes back to the peer in steps this large

LIBRARY = "libp2p"
LIBRARY_VERSION = "0.8.1"  # the py-libp2p our TCP classes replace parts of (pinned in pyproject.toml)

_process_wide = ExitStack()
_installed = False


class UnsupportedLibrary(RuntimeError):
    """The installed py-libp2p is not the version the adjustments were written for."""


def check_library() -> None:
    found = importlib.metadata.version(LIBRARY)
    if found != LIBRARY_VERSION:
        raise UnsupportedLibrary(
            f"punchgate's transports adjust py-libp2p {LIBRARY_VERSION}, found {found}: "
            f"install libp2p=={LIBRARY_VERSION} (pip install 'libp2p=={LIBRARY_VERSION}')"
        )


def _bindings() -> list[tuple[Any, str, Any]]:
    """(library module, name, our replacement) for every name we rebind."""
    from libp2p.network.connection import swarm_connection
    from libp2p.security.noise import patterns
    from libp2p.stream_muxer import muxer_multistream

    from punchgate.transports.net_stream import LeanNetStream
    from punchgate.transports.noise import NoiseSession
    from punchgate.transports.yamux import yamux_for

    return [
        (patterns, "SecureSession", NoiseSession),  # the Noise handshake hands over to it
        (muxer_multistream, "Yamux", yamux_for),  # muxer negotiation builds a Yamux by this name
        (swarm_connection, "NetStream", LeanNetStream),  # connections wrap their streams in it
    ]


@contextmanager
def _rebound(pick_ours: bool) -> Iterator[None]:
    check_library()
    from punchgate.transports import net_stream, noise, yamux

    originals = {"SecureSession": noise.LIBRARY_SESSION, "Yamux": yamux.LIBRARY_YAMUX, "NetStream": net_stream.LIBRARY_NET_STREAM}
    saved = []
    for module, name, ours in _bindings():
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, ours if pick_ours else originals[name])
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def adjusted() -> Any:
    """``with adjusted():`` py-libp2p's TCP data path is ours inside the block."""
    return _rebound(True)


def as_shipped() -> Any:
    """``with as_shipped():`` py-libp2p's own TCP data path inside the block, installed or not."""
    return _rebound(False)


def install() -> None:
    """Adjust py-libp2p for the rest of the process (idempotent)."""
    global _installed
    if not _installed:
        _process_wide.enter_context(adjusted())
        _installed = True


def installed() -> bool:
    return _installed
