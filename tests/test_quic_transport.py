"""punchgate's QUIC transport on its own: identity, flow control, half-close, reset, a vanished peer.

Two transports in one process on loopback, real UDP sockets, no swarm: what the swarm
and the tunnels rely on, checked at the level of connections and streams. The tunnel
tests over QUIC are in tests/test_reliability.py (parametrized over the transport).
"""

from __future__ import annotations

import datetime
import hashlib
import os

import multiaddr
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
from libp2p.transport.exceptions import OpenConnectionError

from punchgate.transports.quic import connection as quic_connection
from punchgate.transports.quic.certificate import (
    EXTENSION_OID,
    CertificateError,
    make_certificate,
    peer_id_of,
)
from punchgate.transports.quic.transport import QuicTransport

MIB = 1024 * 1024
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")


class Pair:
    """A listening transport (``server``) and a dialing one (``client``), connected."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.client_keys, self.server_keys = create_new_key_pair(), create_new_key_pair()
        self.client = QuicTransport(self.client_keys.private_key)
        self.server = QuicTransport(self.server_keys.private_key)
        for transport in (self.client, self.server):
            transport.set_background_nursery(nursery)
        self.accepted: trio.MemorySendChannel
        self.accepted, self.incoming = trio.open_memory_channel(10)

    async def listen(self) -> multiaddr.Multiaddr:
        async def take(conn) -> None:
            await self.accepted.send(conn)

        self.listener = self.server.create_listener(take)
        await self.listener.listen(LOOPBACK)
        return self.listener.get_addrs()[0]

    def server_id(self) -> ID:
        return ID.from_pubkey(self.server_keys.public_key)

    async def connect(self):
        addr = await self.listen()
        client_conn = await self.client.dial(addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{self.server_id()}")))
        server_conn = await self.incoming.receive()
        return client_conn, server_conn


async def read_all(stream, limit: int = 64 * MIB) -> bytes:
    data = bytearray()
    try:
        while len(data) <= limit:
            data += await stream.read(MIB)
    except MuxedStreamEOF:
        pass
    return bytes(data)


# -- identity: libp2p's TLS certificate ------------------------------------------------


def test_a_certificate_proves_its_host_key():
    keys = create_new_key_pair()
    certificate, _ = make_certificate(keys.private_key)
    assert peer_id_of(certificate) == ID.from_pubkey(keys.public_key)


def test_a_certificate_whose_host_signature_is_for_another_key_is_refused():
    """The extension of one certificate moved into another (same host key, other
    certificate key): the signature covers the first key, so the second proves nothing."""
    keys = create_new_key_pair()
    donor, _ = make_certificate(keys.private_key)
    extension = donor.extensions.get_extension_for_oid(EXTENSION_OID).value
    thief_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([])
    forged = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(thief_key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(extension, critical=True).sign(thief_key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="does not verify"):
        peer_id_of(forged)


def test_a_certificate_without_the_extension_or_out_of_date_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([])
    plain = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="0 libp2p extensions"):
        peer_id_of(plain)
    certificate, _ = make_certificate(create_new_key_pair().private_key)
    with pytest.raises(CertificateError, match="not valid now"):
        peer_id_of(certificate, now=now + datetime.timedelta(days=365 * 200))


async def test_both_ends_learn_each_others_peer_id():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            pair = Pair(nursery)
            client_conn, server_conn = await pair.connect()
            assert client_conn.peer_id == pair.server_id()
            assert server_conn.peer_id == ID.from_pubkey(pair.client_keys.public_key)
            nursery.cancel_scope.cancel()


async def test_dialing_the_wrong_peer_id_fails_and_leaves_nothing_behind():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            pair = Pair(nursery)
            addr = await pair.listen()
            someone_else = ID.from_pubkey(create_new_key_pair().public_key)
            with pytest.raises(OpenConnectionError, match="not " + str(someone_else)):
                await pair.client.dial(addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{someone_else}")))
            with trio.move_on_after(0.5):
                await pair.incoming.receive()
                pytest.fail("the server handed over a connection the client refused")
            nursery.cancel_scope.cancel()


# -- streams: flow control, half-close, reset ---------------------------------------------


async def test_a_reader_that_stops_holds_the_writer_with_bounded_buffers():
    """Credit follows reads: with the reader stopped, the writer gets at most the stream's
    window plus its own send buffer through, then waits; nothing is lost once reading resumes."""
    payload = os.urandom(64 * MIB)
    chunk = 256 * 1024
    written = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            client_conn, server_conn = await Pair(nursery).connect()
            stream = await client_conn.open_stream()

            async def write() -> None:
                nonlocal written
                for i in range(0, len(payload), chunk):
                    await stream.write(payload[i : i + chunk])
                    written += chunk
                await stream.close_write()

            nursery.start_soon(write)
            peer_stream = await server_conn.accept_stream()
            first = await peer_stream.read(chunk)
            previous = -1
            while previous != written:  # wait for the writer to stop (it must, well before 64 MiB)
                previous = written
                await trio.sleep(0.3)
            held = written
            buffered = peer_stream.buffered
            rest = await read_all(peer_stream)
            nursery.cancel_scope.cancel()
    bound = quic_connection.STREAM_WINDOW + quic_connection.SEND_BUFFER + 2 * chunk
    assert held < bound, (held, bound)
    assert buffered <= quic_connection.STREAM_WINDOW, buffered
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(payload).digest()


async def test_half_close_either_way_keeps_the_other_direction():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client_conn, server_conn = await Pair(nursery).connect()
            stream = await client_conn.open_stream()
            await stream.write(b"request")
            await stream.close_write()
            peer_stream = await server_conn.accept_stream()
            assert await read_all(peer_stream) == b"request"
            with pytest.raises(MuxedStreamEOF):
                await peer_stream.read(10)
            await peer_stream.write(b"answer after the client's EOF")
            await peer_stream.close_write()
            assert await read_all(stream) == b"answer after the client's EOF"
            # and the other way round: the server ends first, the client keeps sending
            stream = await client_conn.open_stream()
            await stream.write(b"hi")
            peer_stream = await server_conn.accept_stream()
            await peer_stream.close_write()
            assert await read_all(stream) == b""
            await stream.write(b"still talking")
            await stream.close_write()
            assert await read_all(peer_stream) == b"hi" + b"still talking"
            nursery.cancel_scope.cancel()


async def test_a_reset_ends_both_directions_on_both_ends():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client_conn, server_conn = await Pair(nursery).connect()
            stream = await client_conn.open_stream()
            await stream.write(b"x")
            peer_stream = await server_conn.accept_stream()
            assert await peer_stream.read(1) == b"x"
            await stream.reset()
            with pytest.raises(MuxedStreamReset):
                while True:
                    await peer_stream.read(10)
            with pytest.raises(MuxedStreamReset):
                for _ in range(100):
                    await peer_stream.write(b"y" * 1000)
            with pytest.raises(MuxedStreamReset):
                await stream.write(b"z")
            nursery.cancel_scope.cancel()


async def test_a_peer_gone_without_goodbye_ends_the_connection_within_seconds(monkeypatch):
    """The server's socket closes with no CONNECTION_CLOSE (a killed process): the client's
    next keep-alive meets ICMP port unreachable, and its open stream fails soon after."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pair = Pair(nursery)
            client_conn, server_conn = await pair.connect()
            stream = await client_conn.open_stream()
            await stream.write(b"hello")
            await server_conn.accept_stream()
            endpoint = pair.listener.endpoint
            monkeypatch.setattr(endpoint, "close", lambda: None)  # no goodbye on the way out
            for conn in list(endpoint.connections):
                conn.terminate("killed")  # forget it here, tell nobody
            endpoint.sock.close()
            gone_at = trio.current_time()
            with pytest.raises(MuxedStreamReset):
                await stream.read(10)
            took = trio.current_time() - gone_at
            assert client_conn.is_closed and "unreachable" in (client_conn.error or ""), client_conn.error
            assert took < quic_connection.KEEP_ALIVE + 2, took
            nursery.cancel_scope.cancel()


# -- inbound caps: the host's limits, shared with TCP -------------------------------------


async def test_inbound_caps_refuse_a_peer_over_its_count_until_a_slot_frees():
    """With room for one connection per IP, a second dial from the same IP gets no
    connection (its Initial packets are dropped) until the first one closes; then a
    dial succeeds again. A peer that starts a handshake and stops is ended at the
    deadline, and its slot comes back."""
    from punchgate.limits import ConnectionAdmission

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            pair = Pair(nursery)
            admission = ConnectionAdmission(total=10, per_ip=1)
            pair.server.admission = admission
            pair.server.handshake_timeout = 1.0
            client_conn, server_conn = await pair.connect()
            assert admission.by_ip == {"127.0.0.1": 1}
            second = QuicTransport(create_new_key_pair().private_key)
            second.set_background_nursery(nursery)
            target = pair.listener.get_addrs()[0].encapsulate(multiaddr.Multiaddr(f"/p2p/{pair.server_id()}"))
            with trio.move_on_after(1.5) as waited:
                await second.dial(target)
            assert waited.cancelled_caught, "a dial over the per-IP cap got a connection"
            endpoint = pair.listener.endpoint
            assert endpoint.refused > 0
            await client_conn.close()
            with trio.fail_after(10):
                while admission.by_ip:  # the server's side drains, then frees the slot
                    await trio.sleep(0.05)
            third = await second.dial(target)
            assert third.established and (await pair.incoming.receive()).established

            # A handshake that never finishes: one Initial packet, then silence.
            await third.close()
            with trio.fail_after(10):
                while admission.by_ip:
                    await trio.sleep(0.05)
            engine = quic_connection.Engine(configuration=pair.client.make_configuration(True))
            engine.connect(endpoint.local_address, now=trio.current_time())
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as ghost:
                await ghost.bind(("127.0.0.1", 0))  # open, never read: no ICMP tells the server
                for data, _ in engine.datagrams_to_send(now=trio.current_time()):
                    await ghost.sendto(data, endpoint.local_address)
                with trio.fail_after(10):
                    while endpoint.timed_out == 0:
                        await trio.sleep(0.05)
                    while admission.by_ip:
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
