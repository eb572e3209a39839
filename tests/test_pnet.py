"""punchgate.libp2p_fixes.pnet: the private-network protector, against the spec, libsodium and real hosts.

The spec (libp2p/specs pnet/Private-Networks-PSK-V1.md): each side sends a random
24-byte nonce first, then XORs everything it sends with the XSalsa20 keystream under
(key, nonce). libsodium (through PyNaCl's secretbox, XSalsa20-Poly1305) is the
independent reference for the keystream. The js-libp2p side of the story is in
tests/test_js_interop.py.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial

import multiaddr
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.pnet.psk_conn import PskConn
from nacl.bindings import crypto_secretbox

from punchgate.libp2p_fixes.pnet import NONCE_SIZE, PnetConnection, xsalsa20
from punchgate.limits import Limits
from punchgate.runtime.host import build_host
from punchgate.runtime.multistream import open_stream_on
from punchgate.runtime.relay import Relays

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
ECHO = TProtocol("/punchgate-test/pnet-echo/1")
FAST_HANDSHAKE = Limits(handshake_timeout=3.0)


def libsodium_keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """XSalsa20 keystream bytes 32 .. 32+length, from libsodium: secretbox encrypts the
    message with the keystream after the first 32 bytes (which key its MAC)."""
    box = crypto_secretbox(bytes(length), nonce, key)
    return box[16:]


class MemoryRaw:
    """One end of an in-memory connection with the raw-connection read/write calls."""

    def __init__(self, stream, initiator: bool, chunk: int | None = None) -> None:
        self.stream, self.is_initiator, self.chunk = stream, initiator, chunk

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read(self, n: int | None = None) -> bytes:
        limit = n or 65536
        return await self.stream.receive_some(min(limit, self.chunk) if self.chunk else limit)

    async def close(self) -> None:
        await self.stream.aclose()


async def wire_of(make_conn, key: bytes, message: bytes) -> bytes:
    """The bytes a protected writer puts on the wire for 32 zero bytes, then ``message``."""
    ours, theirs = trio.testing.memory_stream_pair()
    conn = make_conn(MemoryRaw(ours, True), key)
    await conn.write(bytes(32))
    await conn.write(message)
    await ours.aclose()
    wire = bytearray()
    while data := await theirs.receive_some(65536):
        wire += data
    return bytes(wire)


# --- the cipher and the wire format ------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=24, max_size=24), st.integers(1, 3000))
def test_xsalsa20_matches_libsodium(key, nonce, length):
    ours = xsalsa20(key, nonce).encrypt(bytes(32 + length))[32:]
    assert ours == libsodium_keystream(key, nonce, length)


async def test_our_protector_writes_what_the_spec_says():
    key, message = os.urandom(32), os.urandom(5000)
    wire = await wire_of(PnetConnection, key, message)
    assert len(wire) == NONCE_SIZE + 32 + len(message)
    nonce, body = wire[:NONCE_SIZE], wire[NONCE_SIZE + 32 :]
    assert bytes(a ^ b for a, b in zip(body, libsodium_keystream(key, nonce, len(message)))) == message
    assert await wire_of(PnetConnection, key, message) != wire  # a fresh nonce each time


async def test_the_library_protector_as_shipped_is_not_the_spec():
    """py-libp2p 0.8.1's PskConn sends an 8-byte nonce and plain Salsa20: a reader that
    follows the spec (go-libp2p, js-libp2p) gets garbage."""
    key, message = os.urandom(32), b"/multistream/1.0.0\n" * 100
    wire = await wire_of(lambda raw, k: PskConn(raw, k.hex()), key, message)
    assert len(wire) == 8 + 32 + len(message)  # 8, not 24, bytes of nonce
    nonce, body = wire[:NONCE_SIZE], wire[NONCE_SIZE + 32 :]
    decrypted = bytes(a ^ b for a, b in zip(body, libsodium_keystream(key, nonce, len(body))))
    assert decrypted != message[: len(decrypted)]


@pytest.mark.parametrize("chunk", [1, 5, 23, 24, 25, None])
async def test_reader_takes_the_nonce_however_it_is_split(chunk):
    key, message = os.urandom(32), os.urandom(3000)
    a, b = trio.testing.memory_stream_pair()
    writer = PnetConnection(MemoryRaw(a, True), key)
    reader = PnetConnection(MemoryRaw(b, False, chunk), key)
    await writer.write(message)
    await a.aclose()
    received = bytearray()
    while data := await reader.read(1000):
        received += data
    assert received == message


async def test_eof_before_a_whole_nonce_is_eof():
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"\x01" * 10)
    await a.aclose()
    assert await PnetConnection(MemoryRaw(b, False), os.urandom(32)).read(100) == b""


# --- real hosts ----------------------------------------------------------------------------


async def echo(stream) -> None:
    try:
        while True:
            await stream.write(await stream.read(65536))
    except StreamEOF:
        await stream.close()


async def echo_through(host, peer: ID, payload: bytes) -> bytes:
    stream = await host.new_stream(peer, [ECHO])
    received = bytearray()

    async def send() -> None:
        for i in range(0, len(payload), 65536):
            await stream.write(payload[i : i + 65536])
        await stream.close_write()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            while True:
                received += await stream.read(65536)
        except StreamEOF:
            pass
    return bytes(received)


def host_with(key: bytes | None):
    return build_host(create_new_key_pair(), [LOOPBACK], network_key=key, limits=FAST_HANDSHAKE)


async def connects(a, b, timeout: float = 8.0, addrs=None) -> bool:
    """Whether ``a`` gets a working connection to ``b`` (a failure or no answer is False)."""
    with trio.move_on_after(timeout):
        try:
            await a.connect(PeerInfo(b.get_id(), addrs or b.get_addrs()))
        except Exception:  # noqa: BLE001 - every failure to connect is the answer
            return False
        return await echo_through(a, b.get_id(), b"ping") == b"ping"
    return False


async def test_same_key_connects_other_key_or_none_never_does():
    key = os.urandom(32)
    hosts = {name: host_with(k) for name, k in [("a", key), ("b", key), ("other", os.urandom(32)), ("open", None)]}
    async with (
        hosts["a"].run(listen_addrs=[LOOPBACK]),
        hosts["b"].run(listen_addrs=[LOOPBACK]),
        hosts["other"].run(listen_addrs=[LOOPBACK]),
        hosts["open"].run(listen_addrs=[LOOPBACK]),
    ):
        for host in hosts.values():
            host.set_stream_handler(ECHO, echo)
        payload = os.urandom(3 << 20)
        assert await connects(hosts["a"], hosts["b"])
        assert hashlib.sha256(await echo_through(hosts["a"], hosts["b"].get_id(), payload)).digest() == hashlib.sha256(
            payload
        ).digest()
        outcomes: dict[str, bool] = {}

        async def attempt(dialer: str, listener: str) -> None:
            outcomes[f"{dialer} -> {listener}"] = await connects(hosts[dialer], hosts[listener])

        async with trio.open_nursery() as nursery:  # at once: each waits for a handshake deadline
            for outsider in ("other", "open"):
                nursery.start_soon(attempt, outsider, "b")
                nursery.start_soon(attempt, "b", outsider)
        assert outcomes == dict.fromkeys(outcomes, False) and len(outcomes) == 4, outcomes
        assert not hosts["b"].get_network().get_connections(hosts["other"].get_id())
        assert not hosts["b"].get_network().get_connections(hosts["open"].get_id())


async def test_relayed_connections_are_protected_too():
    """R relays between A and B, all three with the key: the relayed connection A dials
    (outbound) and B accepts (inbound) both wear the protector, so they agree. (As
    shipped, the library protects only the inbound end of a relayed connection.)"""
    key = os.urandom(32)
    r, a, b = host_with(key), host_with(key), host_with(key)
    async with r.run(listen_addrs=[LOOPBACK]), a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
        async with trio.open_nursery() as nursery:
            relays = {}
            for name, host in (("r", r), ("a", a), ("b", b)):
                relays[name] = Relays(host)
                await nursery.start(relays[name].run)
            b.set_stream_handler(ECHO, echo)
            with trio.fail_after(20):
                await b.connect(PeerInfo(r.get_id(), r.get_addrs()))
                await relays["b"].reserve(r.get_id())
                conn, _ = await relays["a"].dial_through(r.get_id(), list(r.get_addrs()), b.get_id())
                stream, early = await open_stream_on(conn, str(ECHO), b"relayed and private")
                received = bytearray(early)
                await stream.close_write()
                try:
                    while True:
                        received += await stream.read(65536)
                except StreamEOF:
                    pass
            assert bytes(received) == b"relayed and private"
            nursery.cancel_scope.cancel()


# --- on the wire -------------------------------------------------------------------------


async def recording_forwarder(nursery, target_port: int, capture: dict) -> int:
    """A TCP forwarder to 127.0.0.1:target_port that records each direction's bytes and
    sets ``capture["done"]`` when a connection it forwarded has ended both ways."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def pump(src, dst, into: bytearray) -> None:
        try:
            while data := await src.receive_some(65536):
                into += data
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with client, server, trio.open_nursery() as inner:
            inner.start_soon(pump, client, server, capture["out"])
            inner.start_soon(pump, server, client, capture["in"])
        capture["done"].set()

    nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
    return listeners[0].socket.getsockname()[1]


def frames_parse_to_the_end(data: bytes) -> bool:
    """Whether ``data`` is multistream-select lines (varint length + text + newline) up to
    and including the one for Noise, then nothing but 2-byte-length-prefixed Noise
    messages, each one non-empty, exactly to the last byte."""
    i = 0
    while True:  # multistream: /multistream/1.0.0, then /noise
        length, shift = 0, 0
        while True:
            if i >= len(data):
                return False
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        line = data[i : i + length]
        i += length
        if not line.endswith(b"\n"):
            return False
        if line == b"/noise\n":
            break
    while i < len(data):
        if i + 2 > len(data):
            return False
        length = int.from_bytes(data[i : i + 2], "big")
        if length == 0:
            return False
        i += 2 + length
    return i == len(data)


@pytest.mark.parametrize("protected", [True, False])
async def test_every_byte_on_the_wire_goes_through_the_protector(protected):
    """Captured between two hosts: with a key, each direction is a 24-byte nonce and then
    ciphertext that, decrypted under the key, is multistream-select and Noise framing to
    the very last byte, a 4 MiB exchange included: the data path (``transports/noise.py``
    writes batches straight to the socket when it can) never skips the protector. Without
    a key the same framing is there in the clear (the check is not vacuous)."""
    key = os.urandom(32) if protected else None
    a, b = host_with(key), host_with(key)
    capture = {"out": bytearray(), "in": bytearray(), "done": trio.Event()}
    payload = os.urandom(4 << 20)
    async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]), trio.open_nursery() as nursery:
        b.set_stream_handler(ECHO, echo)
        port = await recording_forwarder(nursery, int(b.get_addrs()[0].value_for_protocol("tcp")), capture)
        with trio.fail_after(30):
            await a.connect(PeerInfo(b.get_id(), [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
            assert await echo_through(a, b.get_id(), payload) == payload
            for conn in a.get_network().get_connections(b.get_id()):
                await conn.close()
            await capture["done"].wait()  # every byte of the connection recorded
        nursery.cancel_scope.cancel()
    for direction in ("out", "in"):
        wire = bytes(capture[direction])
        assert len(wire) > len(payload)
        if protected:
            assert b"/multistream/1.0.0" not in wire and not frames_parse_to_the_end(wire)
            clear = bytes(a_ ^ k for a_, k in zip(wire[NONCE_SIZE:], xsalsa20(key, wire[:NONCE_SIZE]).encrypt(bytes(len(wire) - NONCE_SIZE))))
        else:
            clear = wire
        assert clear.startswith(b"\x13/multistream/1.0.0\n"), direction
        assert frames_parse_to_the_end(clear), direction
