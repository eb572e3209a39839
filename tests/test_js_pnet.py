"""Private networks against a real js-libp2p node with ``@libp2p/pnet`` (``tests/js/node.mjs --psk``).

The same key file (made by ``punchgate network-key new``) is read by both; connections
work both ways with it, and fail both ways with another key or none.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from conftest import address_of, start_echo_server, start_node
from punchgate.devtools.jsnode import JsNode, JsNodeUnavailable, ensure_installed
from punchgate.limits import Limits
from punchgate.netkey import create, load
from punchgate.runtime.host import build_host
from punchgate.specs import ExposeSpec, HostPort

TEST_TIMEOUT = 60
LOOPBACK = Multiaddr("/ip4/127.0.0.1/tcp/0")


@pytest.fixture(scope="module", autouse=True)
def _js_installed():
    try:
        ensure_installed()
    except JsNodeUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the js-libp2p interop tests: {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def js_nodes():
    started: list[JsNode] = []

    def start(*flags: str) -> JsNode:
        node = JsNode(*flags)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


async def in_thread(function, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


async def dials(key: bytes | None, addr: str, timeout: float = 6.0) -> bool:
    """Whether a punchgate host holding ``key`` (or none) connects to ``addr``."""
    host = build_host(create_new_key_pair(), [LOOPBACK], network_key=key, limits=Limits(handshake_timeout=3))
    async with host.run(listen_addrs=[LOOPBACK]):
        with trio.move_on_after(timeout):
            try:
                await host.connect(info_from_p2p_addr(Multiaddr(addr)))
            except Exception:  # noqa: BLE001 - any failure is the answer
                return False
            return True
    return False


@pytest.mark.slow
async def test_punchgate_and_js_share_a_private_network_and_keep_outsiders_out(tmp_path, js_nodes):
    key_file, other_file = tmp_path / "network.key", tmp_path / "other.key"
    key, other = create(key_file), create(other_file)
    assert load(key_file) == key
    js = await in_thread(js_nodes, "--psk", str(key_file))
    js_addr = await in_thread(lambda: js.tcp_addr)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo_port = await start_echo_server(nursery)
            node = await start_node(
                nursery,
                network_key=key_file,
                bootstrap=(Multiaddr(js_addr),),
                expose=(ExposeSpec("echo", HostPort("127.0.0.1", echo_port)),),
            )
            ours, our_addr = str(node.peer_id), str(address_of(node))
            # punchgate -> js, with the key: the bootstrap connection (identify, DHT) works.
            opened = await in_thread(js.wait_event, "connection opened", 15, peer=ours)
            assert opened["direction"] == "inbound"
            assert node.host.get_network().get_connections(ID.from_base58(js.peer_id))

            # js -> punchgate, with the key: ping and a 1 MiB tunnel, sha256 checked.
            member = await in_thread(
                js_nodes, "--psk", str(key_file), "--dial", our_addr, "--ping", "--tunnel", "echo"
            )
            assert (await in_thread(member.wait_event, "ping", 20))["ok"] is True
            tunnel = await in_thread(member.wait_event, "tunnel", 20)
            assert tunnel["accepted"] and tunnel["received_sha256"] == tunnel["sent_sha256"], tunnel
            assert tunnel["received_bytes"] == 1 << 20
            assert await in_thread(member.wait) == 0

            # js without the key, or with another, cannot reach punchgate...
            outsiders = [
                await in_thread(js_nodes, *flags, "--dial", our_addr, "--ping", "--timeout", "4")
                for flags in ([], ["--psk", str(other_file)])
            ]
            for outsider in outsiders:
                assert (await in_thread(outsider.wait_event, "dial", 20))["ok"] is False
                assert await in_thread(outsider.wait) == 1
            # ...and punchgate without the key, or with another, cannot reach js.
            assert not await dials(None, js_addr)
            assert not await dials(other, js_addr)
            assert await dials(key, js_addr)  # the same check passes with the key
            peers = {str(p) for p in node.host.get_network().get_connections_map()}
            assert not peers & {o.peer_id for o in outsiders}
            nursery.cancel_scope.cancel()
    await in_thread(js.output)
    js_peers = {e["peer"] for e in js.events if e["event"] == "connection opened"}
    assert ours in js_peers and len(js_peers) == 2  # punchgate, and the member-key host above
