"""Library adjustments for discovery and relaying, each shown to matter against the library as shipped."""

from __future__ import annotations

import multiaddr
import trio
from conftest import address_of, start_node
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.kad_dht import ServerOnlyKadDHT
from punchgate.runtime.addresses import AddressBook
from punchgate.runtime.host import build_host
from punchgate.runtime.reachability import check
from punchgate.state import NatStatus

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
RELAY = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"


async def test_get_addrs_keeps_circuit_addresses_whole():
    circuit = multiaddr.Multiaddr(f"/ip4/203.0.113.9/tcp/4001/p2p/{RELAY}/p2p-circuit")
    book = AddressBook()
    book.relay_addrs = [circuit]
    host = build_host(create_new_key_pair(), LOOPBACK, book)
    async with host.run(listen_addrs=LOOPBACK):
        me = f"/p2p/{host.get_id()}"
        fixed = [str(a) for a in host.get_addrs()]
        shipped = [str(a) for a in BasicHost.get_addrs(host)]  # the library's method, same host
    assert f"{circuit}{me}" in fixed
    assert f"/ip4/203.0.113.9/tcp/4001{me}" not in fixed
    # The library as shipped labels the relay's socket with our ID instead.
    assert f"{circuit}{me}" not in shipped and f"/ip4/203.0.113.9/tcp/4001{me}" in shipped


async def _dht_host(nursery, dht_class, mode):
    host = new_host(key_pair=create_new_key_pair(), listen_addrs=LOOPBACK)
    dht = dht_class(host, mode)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        async with host.run(listen_addrs=LOOPBACK), background_trio_service(dht):
            task_status.started()
            await trio.sleep_forever()

    await nursery.start(run)
    return host, dht


async def client_lands_in_server_table(server_class) -> bool:
    """A DHT client provides a key through a server; is the client now in the server's table?"""
    async with trio.open_nursery() as nursery:
        server, server_dht = await _dht_host(nursery, server_class, DHTMode.SERVER)
        client, client_dht = await _dht_host(nursery, KadDHT, DHTMode.CLIENT)
        await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
        with trio.fail_after(10):
            while not await client_dht.add_peer(server.get_id()):
                await trio.sleep(0.05)  # until identify shows the server's protocols
            await client_dht.provide("/punchgate/svc/x")
        found = server_dht.routing_table.peer_in_table(client.get_id())
        nursery.cancel_scope.cancel()
    return found


async def test_dht_server_does_not_admit_clients():
    with trio.fail_after(60):
        assert not await client_lands_in_server_table(ServerOnlyKadDHT)
        assert await client_lands_in_server_table(KadDHT)  # the defect, as shipped


async def test_dial_back_on_loopback_says_public():
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            helper = await start_node(nursery)
            asker = await start_node(nursery)
            await asker.host.connect(info_from_p2p_addr(address_of(helper)))
            verdict = await check(asker.host, helper.peer_id)
            answer = verdict.details
            assert verdict.status is NatStatus.PUBLIC and verdict.method == "dialback", verdict
            assert answer["observed"].startswith("127.0.0.1:")
            assert verdict.port_preserving is True  # no NAT between: the helper sees our own port
            assert answer["observed"] == answer["local"]
            nursery.cancel_scope.cancel()


async def test_the_hole_punch_spray_leaves_from_the_quic_listener_and_ends_by_itself(monkeypatch):
    """DCUtR's random UDP packets (the spraying side of a QUIC punch) must leave from the
    QUIC listener's port, the one the peer's dial will come back to, and end without
    being told to (the library's leave from a fresh socket and go on until an event is
    set that is never set when every round fails)."""
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    from punchgate.libp2p_fixes import dcutr
    from punchgate.libp2p_fixes.dcutr import BoundedDCUtR

    monkeypatch.setattr(dcutr, "SPRAY_SECONDS", 1.0)  # its bound, shortened for the test
    quic = [multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
    target = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await target.bind(("127.0.0.1", 0))
    aim = multiaddr.Multiaddr(f"/ip4/127.0.0.1/udp/{target.getsockname()[1]}/quic-v1")
    sources: dict[str, set[int]] = {"ours": set(), "shipped": set()}
    host = build_host(create_new_key_pair(), quic)
    with target, trio.fail_after(30):
        async with host.run(listen_addrs=quic), trio.open_nursery() as nursery:
            listen_port = int(host.get_transport_addrs()[0].value_for_protocol("udp"))
            kind = "ours"

            async def collect() -> None:
                while True:
                    _, (_, port) = await target.recvfrom(2048)
                    sources[kind].add(port)

            nursery.start_soon(collect)
            started = trio.current_time()
            await BoundedDCUtR(host)._spam_udp_for_hole_punch(aim, trio.Event())  # never set
            took = trio.current_time() - started
            kind = "shipped"
            with trio.move_on_after(1.0) as still_spraying:
                await DCUtRProtocol(host)._spam_udp_for_hole_punch(aim, trio.Event())
            nursery.cancel_scope.cancel()
    assert 1.0 <= took <= 2.0, took
    assert sources["ours"] == {listen_port}, (sources, listen_port)
    assert still_spraying.cancelled_caught  # the library's would have gone on
    assert sources["shipped"] and listen_port not in sources["shipped"], (sources, listen_port)


async def test_a_punch_towards_a_peer_the_peerstore_does_not_know_fails_cleanly():
    """A peer reached through ``/p2p-circuit/p2p/PEER`` (our own relay, no record of it
    yet) is not in the peerstore: clearing its direct addresses before the punch must not
    raise (it did: PeerStoreError, and the punch ended at once in a relayed tunnel)."""
    from libp2p.peer.id import ID

    from punchgate.libp2p_fixes.dcutr import BoundedDCUtR

    stranger = ID.from_pubkey(create_new_key_pair().public_key)
    host = build_host(create_new_key_pair(), [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    with trio.fail_after(20):
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            assert await BoundedDCUtR(host).initiate_hole_punch(stranger) is False
