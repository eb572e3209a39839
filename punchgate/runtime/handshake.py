"""Reading one tunnel-protocol message from a libp2p stream, with a deadline."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from punchgate.wire import MAX_MESSAGE_SIZE, FrameDecoder, WireError

HANDSHAKE_TIMEOUT = 10.0


async def read_message(
    stream: INetStream, timeout: float = HANDSHAKE_TIMEOUT, already_read: bytes = b""
) -> tuple[dict[str, Any], bytes]:
    """The first message on ``stream`` (after ``already_read``, bytes of it taken
    from the stream before) and any bytes that followed it.

    Raises :class:`WireError` for a malformed, oversized or truncated message and
    :class:`trio.TooSlowError` when it does not arrive within ``timeout`` seconds.
    """
    decoder = FrameDecoder()
    if already_read:
        decoder.feed(already_read)
        decoded = decoder.message()
        if decoded is not None:
            return decoded
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.read(MAX_MESSAGE_SIZE + 4)
            except StreamEOF:
                raise WireError("stream ended before a complete message") from None
            decoder.feed(data)
            decoded = decoder.message()
            if decoded is not None:
                return decoded
