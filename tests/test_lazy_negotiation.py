"""``open_stream_on``'s pipelined multistream-select against the library as shipped.

The server here is py-libp2p 0.8.1 without punchgate's adjustments, in another
process (``tests/test_libp2p_fixes.py echo-server``): it answers multistream-select
step by step, as any peer that does not know about pipelining does.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from punchgate import libp2p_fixes
from punchgate.runtime.multistream import _split_message, open_stream_on
from tests.test_libp2p_fixes import PROTO, unpatched_server

TIMEOUT = 30


@pytest.fixture(autouse=True)
def fixes_installed():
    libp2p_fixes.install()
    yield


@asynccontextmanager
async def connection_to_unpatched_server():
    async with unpatched_server() as (host, peer):
        yield host.get_network().get_connections(peer)[0]


async def read_exactly(stream, n: int, already: bytes = b"") -> bytes:
    data = already
    while len(data) < n:
        data += await stream.read(n - len(data))
    return data


async def test_pipelined_request_reaches_an_unpatched_peer():
    with trio.fail_after(TIMEOUT):
        async with connection_to_unpatched_server() as conn:
            for _ in range(3):
                stream, early = await open_stream_on(conn, str(PROTO), b"first message")
                assert stream.get_protocol() == PROTO
                # The echo of the request may arrive with the answers or after them.
                assert await read_exactly(stream, 13, early) == b"first message"
                await stream.write(b"more")
                assert await read_exactly(stream, 4) == b"more"
                await stream.close_write()
                with pytest.raises(StreamEOF):
                    await stream.read(1)


async def test_refused_protocol_raises_and_leaves_the_connection_usable():
    with trio.fail_after(TIMEOUT):
        async with connection_to_unpatched_server() as conn:
            with pytest.raises(MultiselectClientError, match="not supported"):
                await open_stream_on(conn, "/punchgate-test/nobody-speaks-this/1", b"request")
            stream, early = await open_stream_on(conn, str(PROTO))
            assert early == b""
            await stream.write(b"still here")
            assert await read_exactly(stream, 10) == b"still here"


def test_split_message_waits_for_whole_messages():
    whole = b"\x13/multistream/1.0.0\n" + b"\x05/abc\n" + b"rest"
    assert _split_message(whole[:0]) is None
    assert _split_message(whole[:5]) is None
    first, rest = _split_message(whole)
    assert first == b"/multistream/1.0.0"
    assert _split_message(rest) == (b"/abc", b"rest")
    with pytest.raises(MultiselectClientError):
        _split_message(b"\x03ab!")  # no newline
    with pytest.raises(MultiselectClientError):
        _split_message(b"\xff\xff\x7f")  # over 64 KiB
