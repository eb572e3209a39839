"""Opening a tunnel stream on a chosen connection, negotiated in one round trip.

The swarm's ``new_stream`` picks a connection itself; a tunnel must use the one
the state machine chose (direct or relayed), so we open the
stream on it and speak multistream-select ourselves, pipelined: the header, the
protocol id and the protocol's first message leave in one write.
"""

from __future__ import annotations

import trio
from libp2p.abc import INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
from libp2p.utils.varint import encode_delim

NEGOTIATE_TIMEOUT = 10


async def open_stream_on(conn: INetConn, protocol: str, request: bytes = b"") -> tuple[INetStream, bytes]:
    """Open a stream for ``protocol`` on this very connection (not one the swarm picks).

    Negotiation is pipelined ("lazy" multistream-select for one protocol): the
    multistream header, the protocol id and ``request`` (the protocol's first
    message, if any) go out in one write; then the peer's two answers are read,
    its header and the echo of ``protocol``. A peer that answers step by step
    sees the same bytes in the same order as from a client that waits, so this
    is wire-compatible; it only saves the round trip a client would spend
    waiting for the header. Returns the stream and any bytes the peer sent after
    its answers (they belong to ``protocol``). If the peer refuses ``protocol``
    (``na``) the stream is reset and ``MultiselectClientError`` raised; the
    request it never saw as such then makes it drop the stream.
    """
    stream = await conn.new_stream()
    try:
        with trio.move_on_after(NEGOTIATE_TIMEOUT) as scope:
            await stream.write(_NEGOTIATION_HEADER + encode_delim(protocol.encode()) + request)
            answers, rest = await _read_multistream_messages(stream, 2)
        if scope.cancelled_caught:
            raise MultiselectClientError(f"no multistream-select answer within {NEGOTIATE_TIMEOUT}s")
        if answers[0] != MULTISELECT_PROTOCOL_ID.encode():
            raise MultiselectClientError(f"peer does not speak {MULTISELECT_PROTOCOL_ID}: {answers[0]!r}")
        if answers[1] != protocol.encode():
            if answers[1] == PROTOCOL_NOT_FOUND_MSG.encode():
                raise MultiselectClientError(f"protocol not supported: {protocol}")
            raise MultiselectClientError(f"unrecognized answer to {protocol}: {answers[1]!r}")
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    stream.set_protocol(TProtocol(protocol))
    return stream, rest


_NEGOTIATION_HEADER = encode_delim(MULTISELECT_PROTOCOL_ID.encode())
_MAX_MULTISTREAM_MESSAGE = 64 * 1024


async def _read_multistream_messages(stream: INetStream, count: int) -> tuple[list[bytes], bytes]:
    """Read ``count`` multistream-select messages (uvarint length, text, newline);
    return their texts and the bytes that followed them."""
    buffer = b""
    messages: list[bytes] = []
    while True:
        while len(messages) < count:
            parsed = _split_message(buffer)
            if parsed is None:
                break
            message, buffer = parsed
            messages.append(message)
        if len(messages) == count:
            return messages, buffer
        try:
            data = await stream.read(4096)
        except StreamEOF:
            data = b""
        if not data:
            raise MultiselectClientError("stream ended during multistream-select")
        buffer += data


def _split_message(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first complete message in ``buffer`` (without its newline) and the rest, or None."""
    length = shift = 0
    for index, byte in enumerate(buffer[:10]):  # noqa: B007 - index is read after the loop
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        if len(buffer) >= 10:
            raise MultiselectClientError("malformed multistream-select length")
        return None  # the length itself is still incomplete
    if length > _MAX_MULTISTREAM_MESSAGE:
        raise MultiselectClientError(f"multistream-select message of {length} B")
    start = index + 1
    if len(buffer) < start + length:
        return None
    body = buffer[start : start + length]
    if not body.endswith(b"\n"):
        raise MultiselectClientError(f"multistream-select message without newline: {body[:80]!r}")
    return body[:-1], buffer[start + length :]
