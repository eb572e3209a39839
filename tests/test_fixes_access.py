"""The library adjustments behind the caps, on real hosts in this process: each defect is
shown on py-libp2p 0.8.1 as shipped where it can run beside ours, then ours holding.

- ``libp2p_fixes/inbound.py``: inbound slots given back when a connection closes; caps
  in total and per IP; a handshake deadline.
- ``transports/yamux.py``: inbound streams per connection capped (RST beyond).
- ``libp2p_fixes/relay_hop.py``: reservations are the requester's own, end with its
  connection, and are capped per IP.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import CircuitV2Protocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.relay_hop import RelayHop
from punchgate.limits import Limits
from punchgate.runtime.host import build_host, live_connection
from punchgate.runtime.relay import relay_limits

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
TIMEOUT = 30


async def connect_and_leave(listener, times: int) -> list[bool]:
    """``times`` fresh hosts each connect to ``listener``, check the connection, close it."""
    results = []
    for _ in range(times):
        dialer = build_host(create_new_key_pair(), [LOOPBACK])
        async with dialer.run(listen_addrs=[LOOPBACK]):
            try:
                with trio.fail_after(5):
                    await dialer.connect(PeerInfo(listener.get_id(), listener.get_addrs()))
                ok = True
            except Exception:  # noqa: BLE001 - refused is the answer
                ok = False
            results.append(ok)
            for conn in list(dialer.get_network().get_connections()):
                await conn.close()
        # wait until the listener has seen the connection go (bounded)
        with trio.fail_after(5):
            while listener.get_network().get_connections():
                await trio.sleep(0.02)
    return results


async def test_inbound_slots_come_back_when_connections_close():
    # As shipped: 5 inbound slots (max 55 - min 50) held until the swarm stops.
    shipped = new_host(
        key_pair=create_new_key_pair(),
        listen_addrs=[LOOPBACK],
        connection_config=ConnectionConfig(max_connections=55, min_connections=50, low_watermark=50, high_watermark=55),
    )
    shipped.get_network().retry_config = RetryConfig(max_retries=0)
    ours = build_host(create_new_key_pair(), [LOOPBACK], limits=Limits(inbound_conns=5))
    with trio.fail_after(TIMEOUT * 2):
        async with shipped.run(listen_addrs=[LOOPBACK]):
            assert await connect_and_leave(shipped, 7) == [True] * 5 + [False] * 2  # refused for good
        async with ours.run(listen_addrs=[LOOPBACK]):
            assert await connect_and_leave(ours, 7) == [True] * 7
            assert ours.get_network().inbound_gate.admission.total == 0


async def test_inbound_caps_per_ip_and_in_total_and_the_handshake_deadline():
    host = build_host(create_new_key_pair(), [LOOPBACK], limits=Limits(inbound_conns=4, inbound_conns_per_ip=2, handshake_timeout=1))
    async with host.run(listen_addrs=[LOOPBACK]):
        port = int(host.get_addrs()[0].value_for_protocol("tcp"))
        gate = host.get_network().inbound_gate
        ended: dict[str, float] = {}

        async def silent(name: str, source: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            sock = trio.socket.socket()
            with sock:
                await sock.bind((source, 0))
                await sock.connect(("127.0.0.1", port))
                begun = trio.current_time()
                task_status.started()
                try:
                    while await sock.recv(100):
                        pass
                except OSError:
                    pass
                ended[name] = trio.current_time() - begun

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(3):  # 2 admitted from this address, the third refused
                    await nursery.start(silent, f"a{i}", "127.0.3.1")
                for i in range(3):  # 2 more from others: the total is 4; the last refused
                    await nursery.start(silent, f"b{i}", f"127.0.3.{2 + i}")
            while gate.admission.total:  # the last handlers are closing their sockets
                await trio.sleep(0.02)
        quick = sorted(name for name, took in ended.items() if took < 0.5)
        assert quick == ["a2", "b2"], ended  # refused at accept
        assert all(0.8 < took < 3 for name, took in ended.items() if name not in quick), ended  # the deadline
        assert (gate.refused, gate.timed_out) == (2, 4)


async def test_inbound_streams_beyond_the_cap_are_reset_before_anything_runs():
    listener = build_host(create_new_key_pair(), [LOOPBACK], limits=Limits(inbound_streams_per_conn=8))
    dialer = build_host(create_new_key_pair(), [LOOPBACK])
    async with listener.run(listen_addrs=[LOOPBACK]), dialer.run(listen_addrs=[LOOPBACK]):
        with trio.fail_after(TIMEOUT):
            await dialer.connect(PeerInfo(listener.get_id(), listener.get_addrs()))
            muxed = live_connection(dialer, listener.get_id(), "tcp").muxed_conn
            streams = [await muxed.open_stream() for _ in range(20)]  # SYNs only, never a protocol
            theirs = live_connection(listener, dialer.get_id(), "tcp").muxed_conn
            while theirs.refused_streams < 12:
                await trio.sleep(0.02)
            assert theirs.max_inbound_streams == 8 and theirs._inbound_streams() == 8
            reset = 0
            for stream in streams:
                with trio.move_on_after(0.5):
                    try:
                        await stream.read(1)
                    except Exception:  # noqa: BLE001 - reset (or EOF) is what we count
                        reset += 1
            assert reset == 12  # the eight under the cap are still open, negotiating


# --- relay reservations ---------------------------------------------------------------------


async def reserve(host, relay_id: ID, named: ID | None = None) -> str:
    stream = await host.new_stream(relay_id, [HOP])
    try:
        message = HopMessage(type=HopMessage.RESERVE)
        if named is not None:
            message.peer.CopyFrom(CircuitPeerId(id=named.to_bytes()))
        await write_delimited_msg(stream, message)
        return Status.Name((await read_delimited_msg(stream, HopMessage)).status)
    finally:
        await stream.close()


@pytest.mark.parametrize("relay_class", [RelayHop, CircuitV2Protocol], ids=["ours", "shipped"])
async def test_one_connection_cannot_reserve_for_made_up_peers(relay_class):
    limits = Limits(relay_reservations=5)
    relay = build_host(create_new_key_pair(), [LOOPBACK])
    hop = relay_class(relay, limits=relay_limits(limits), allow_hop=True)
    attacker, honest = build_host(create_new_key_pair(), [LOOPBACK]), build_host(create_new_key_pair(), [LOOPBACK])
    async with relay.run(listen_addrs=[LOOPBACK]), attacker.run(listen_addrs=[LOOPBACK]), honest.run(listen_addrs=[LOOPBACK]):
        async with background_trio_service(hop):
            with trio.fail_after(TIMEOUT):
                await hop.event_started.wait()
                for host in (attacker, honest):
                    await host.connect(PeerInfo(relay.get_id(), relay.get_addrs()))
                spoofed = [
                    await reserve(attacker, relay.get_id(), ID.from_pubkey(create_new_key_pair().public_key))
                    for _ in range(5)
                ]
                answer = await reserve(honest, relay.get_id())
    if relay_class is CircuitV2Protocol:
        # Each made-up peer got a slot (answered with an error, as it is not connected,
        # but kept until its TTL), so the honest peer finds the relay full.
        assert answer == "RESOURCE_LIMIT_EXCEEDED" and len(hop.resource_manager._reservations) == 5
    else:
        assert spoofed == ["OK"] * 5  # renewals of the attacker's own one slot
        assert answer == "OK"
        assert set(hop.resource_manager._reservations) == {attacker.get_id(), honest.get_id()}


async def test_reservations_are_capped_per_address_and_end_with_their_connection():
    relay = build_host(create_new_key_pair(), [LOOPBACK])
    hop = RelayHop(relay, limits=relay_limits(Limits(relay_reservations=3)), allow_hop=True, max_reservations_per_ip=2)
    peers = [build_host(create_new_key_pair(), [LOOPBACK]) for _ in range(4)]
    bare = relay.get_addrs  # (read once the relay listens)
    async with relay.run(listen_addrs=[LOOPBACK]), background_trio_service(hop):
        async with trio.open_nursery() as nursery:
            for peer in peers:
                await nursery.start(_run, peer)
            with trio.fail_after(TIMEOUT):
                await hop.event_started.wait()
                addr = bare()[0]
                answers = []
                for peer, source in zip(peers, ["127.0.4.1", "127.0.4.1", "127.0.4.1", "127.0.4.2"]):
                    await peer.get_network().dial_addr(addr, relay.get_id(), source=(source, 0))
                    answers.append(await reserve(peer, relay.get_id()))
                assert answers == ["OK", "OK", "RESOURCE_LIMIT_EXCEEDED", "OK"]  # per IP: 2
                late = build_host(create_new_key_pair(), [LOOPBACK])
                await nursery.start(_run, late)
                await late.get_network().dial_addr(addr, relay.get_id(), source=("127.0.4.3", 0))
                assert await reserve(late, relay.get_id()) == "RESOURCE_LIMIT_EXCEEDED"  # in all: 3
                for conn in list(peers[0].get_network().get_connections()):  # one holder leaves...
                    await conn.close()
                while relay.get_network().get_connections(peers[0].get_id()):
                    await trio.sleep(0.02)
                assert await reserve(late, relay.get_id()) == "OK"  # ...and its slot is free again
            nursery.cancel_scope.cancel()


async def _run(host, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[LOOPBACK]):
        task_status.started()
        await trio.sleep_forever()


@pytest.mark.parametrize("relay_class", [RelayHop, CircuitV2Protocol], ids=["ours", "shipped"])
async def test_hop_streams_do_not_outlive_their_requests(relay_class):
    """As shipped, every hop stream (a reservation, its renewals, a malformed request)
    stays registered on the relay until the connection ends."""
    relay = build_host(create_new_key_pair(), [LOOPBACK])
    hop = relay_class(relay, limits=relay_limits(Limits()), allow_hop=True)
    peer = build_host(create_new_key_pair(), [LOOPBACK])
    async with relay.run(listen_addrs=[LOOPBACK]), peer.run(listen_addrs=[LOOPBACK]), background_trio_service(hop):
        with trio.fail_after(TIMEOUT):
            await hop.event_started.wait()
            await peer.connect(PeerInfo(relay.get_id(), relay.get_addrs()))
            for _ in range(3):
                assert await reserve(peer, relay.get_id()) == "OK"
            theirs = live_connection(relay, peer.get_id(), "tcp").muxed_conn
            with trio.move_on_after(3):  # the library answers, then waits 0.5 s on EOF
                while theirs._inbound_streams():
                    await trio.sleep(0.05)
            left = theirs._inbound_streams()
    assert left == (3 if relay_class is CircuitV2Protocol else 0)
