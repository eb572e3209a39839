"""Allowlists on real nodes: who gets through, what refused peers are told, reloads, revocation, logs."""

from __future__ import annotations

import os
import signal
import socket
import time

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from conftest import LOOPBACK_TCP, address_of, exchange, free_port, sha256, start_echo_server, start_node
from punchgate.devtools.echo import EchoServer
from punchgate.devtools.processes import PunchgateProcess, identity_path
from punchgate.runtime.handshake import read_message
from punchgate.runtime.host import build_host, live_connection
from punchgate.runtime.multistream import open_stream_on
from punchgate.specs import ExposeSpec, HostPort, TunnelSpec
from punchgate.wire import PROTOCOL_ID, encode_request, parse_response

TEST_TIMEOUT = 60
RELOAD_TIMEOUT = 5  # the watcher polls every second


def peer_of(key_pair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


class Peer:
    """A bare host that speaks the tunnel protocol to a node by hand."""

    def __init__(self) -> None:
        self.key_pair = create_new_key_pair()
        self.id = peer_of(self.key_pair)
        self.host = build_host(self.key_pair, [LOOPBACK_TCP])

    async def connect(self, node) -> None:
        await self.host.connect(PeerInfo(node.peer_id, [address_of(node).decapsulate(multiaddr.Multiaddr(f"/p2p/{node.peer_id}"))]))

    async def ask(self, node, service: str):
        """(accepted, reason, stream) for a tunnel request for ``service``."""
        conn = live_connection(self.host, node.peer_id, "tcp")
        stream, early = await open_stream_on(conn, PROTOCOL_ID, encode_request(service))
        message, _ = await read_message(stream, already_read=early)
        response = parse_response(message)
        return response.accepted, response.reason, stream


async def echo_once(stream, payload: bytes) -> bytes:
    await stream.write(payload)
    received = bytearray()
    while len(received) < len(payload):
        received += await stream.read(len(payload) - len(received))
    return bytes(received)


async def until(predicate, timeout: float = RELOAD_TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - a counter, no event to wait on
            await trio.sleep(0.05)


async def test_listed_peers_get_through_and_everyone_else_hears_only_not_allowed():
    alice, mallory = Peer(), Peer()
    with trio.fail_after(TEST_TIMEOUT):
        async with alice.host.run(listen_addrs=[LOOPBACK_TCP]), mallory.host.run(listen_addrs=[LOOPBACK_TCP]):
            async with trio.open_nursery() as nursery:
                echo = HostPort("127.0.0.1", await start_echo_server(nursery))
                node = await start_node(
                    nursery,
                    expose=(ExposeSpec("echo", echo), ExposeSpec("db", echo)),
                    allow=(("echo", frozenset({alice.id})), ("ghost", frozenset({alice.id}))),
                )
                await alice.connect(node)
                await mallory.connect(node)
                accepted, _, stream = await alice.ask(node, "echo")
                assert accepted and await echo_once(stream, b"alice's bytes") == b"alice's bytes"
                answers = {
                    (who.id, name): (await who.ask(node, name))[:2]
                    for who in (alice, mallory)
                    for name in ("echo", "db", "ghost", "nothing")
                }
                assert answers == {
                    (alice.id, "echo"): (True, None),
                    (alice.id, "db"): (False, "not allowed"),  # exposed, but not to her
                    (alice.id, "ghost"): (False, "unknown service 'ghost'"),  # hers, but not exposed
                    (alice.id, "nothing"): (False, "not allowed"),
                    # Mallory cannot tell what exists: the same answer for all four.
                    (mallory.id, "echo"): (False, "not allowed"),
                    (mallory.id, "db"): (False, "not allowed"),
                    (mallory.id, "ghost"): (False, "not allowed"),
                    (mallory.id, "nothing"): (False, "not allowed"),
                }
                nursery.cancel_scope.cancel()


async def test_a_refused_client_closes_its_local_connection_at_once():
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = HostPort("127.0.0.1", await start_echo_server(nursery))
            allowed_key, refused_key = create_new_key_pair(), create_new_key_pair()
            provider = await start_node(
                nursery, expose=(ExposeSpec("echo", echo),), allow=(("echo", frozenset({peer_of(allowed_key)})),)
            )
            ports = {}
            for name, key in (("allowed", allowed_key), ("refused", refused_key)):
                ports[name] = free_port()
                await start_node(
                    nursery,
                    key_pair=key,
                    bootstrap=(address_of(provider),),
                    tunnels=(TunnelSpec(str(provider.peer_id), "echo", HostPort("127.0.0.1", ports[name])),),
                )
            payload = os.urandom(1 << 20)
            assert sha256(await exchange(ports["allowed"], payload)) == sha256(payload)
            started = trio.current_time()
            assert await exchange(ports["refused"], payload) == b""
            assert trio.current_time() - started < 5  # closed on the refusal, not by a timeout (30 s)
            assert provider.service.refused == 1 and provider.service.accepted == 1
            nursery.cancel_scope.cancel()


async def test_allow_file_reloads_keep_the_old_list_on_errors_and_revoke_removed_peers(tmp_path):
    alice, bob = Peer(), Peer()
    allow = tmp_path / "allow"
    allow.write_text(f"# echo for alice\necho {alice.id}\n")
    with trio.fail_after(TEST_TIMEOUT):
        async with alice.host.run(listen_addrs=[LOOPBACK_TCP]), bob.host.run(listen_addrs=[LOOPBACK_TCP]):
            async with trio.open_nursery() as nursery:
                echo = HostPort("127.0.0.1", await start_echo_server(nursery))
                node = await start_node(nursery, expose=(ExposeSpec("echo", echo),), allow_file=allow)
                await alice.connect(node)
                await bob.connect(node)
                assert (await bob.ask(node, "echo"))[:2] == (False, "not allowed")

                allow.write_text(f"echo {alice.id}\necho {bob.id}  # bob too\n")
                await until(lambda: node.access.reloads == 1)
                accepted, _, bobs_tunnel = await bob.ask(node, "echo")
                assert accepted and await echo_once(bobs_tunnel, b"in") == b"in"

                allow.write_text(f"echo {alice.id}\necho not-a-peer-id\n")  # broken: ignored
                await until(lambda: node.access.reload_failures == 1)
                assert node.access.reloads == 1
                assert await echo_once(bobs_tunnel, b"still in") == b"still in"  # old list in force

                allow.write_text(f"echo {alice.id}\n")  # bob removed: his open tunnel is closed
                await until(lambda: node.access.reloads == 2)
                with pytest.raises((StreamEOF, StreamReset)):
                    with trio.fail_after(5):
                        while True:
                            await bobs_tunnel.read(100)
                assert (await bob.ask(node, "echo"))[:2] == (False, "not allowed")
                assert (await alice.ask(node, "echo"))[0]
                nursery.cancel_scope.cancel()


# --- real processes: what the logs say ------------------------------------------------------


@pytest.mark.slow
def test_logs_refusals_on_both_sides_warns_about_open_services_and_reloads_on_sighup(tmp_path):
    allow = tmp_path / "allow"
    keys = {name: identity_path(tmp_path, name) for name in ("provider", "alice", "mallory", "open")}
    procs: list[PunchgateProcess] = []

    def start(*args: str) -> PunchgateProcess:
        procs.append(PunchgateProcess(*args, "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"))
        return procs[-1]

    try:
        with EchoServer() as echo:
            # Peer IDs first: each client starts once, is read, and stays up.
            ports = {"alice": free_port(), "mallory": free_port()}
            clients = {name: start("--identity", keys[name]) for name in ("alice", "mallory")}
            ids = {name: c.wait_event("punchgate starting")["peer_id"] for name, c in clients.items()}
            allow.write_text(f"echo {ids['alice']}\n")
            provider = start("--identity", keys["provider"], "--expose", f"echo=127.0.0.1:{echo.port}",
                             "--expose", f"web=127.0.0.1:{echo.port}", "--allow-file", str(allow), "--allow", "web=*")
            wide_open = start("--identity", keys["open"], "--expose", f"echo=127.0.0.1:{echo.port}")
            provider.wait_event("phase transition", to_phase="ready")
            assert provider.wait_event("service open to every peer")["service"] == "web"  # '*' in its list
            assert wide_open.wait_event("service open to every peer")["service"] == "echo"  # no list at all
            provider_id = provider.wait_event("punchgate starting")["peer_id"]
            for c in clients.values():
                c.terminate_and_wait(10)
            clients = {
                name: start("--identity", keys[name], "--bootstrap", provider.tcp_address(),
                            "--tunnel", f"{provider_id}:echo@127.0.0.1:{ports[name]}")
                for name in ("alice", "mallory")
            }
            for c in clients.values():
                c.wait_event("tunnel listening")
                c.wait_event("bootstrap connected")

            def exchange_sync(port: int, data: bytes) -> tuple[bytes, float]:
                """Send, half-close, read to the end: (bytes back, seconds until closed)."""
                started = time.monotonic()
                got = b""
                with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    try:
                        while chunk := s.recv(65536):
                            got += chunk
                    except ConnectionResetError:
                        pass  # closed with our bytes unread: a reset, closed all the same
                return got, time.monotonic() - started

            assert exchange_sync(ports["alice"], b"hello")[0] == b"hello"
            got, took = exchange_sync(ports["mallory"], b"hello")
            assert got == b"" and took < 5
            rejected = clients["mallory"].wait_event("client tunnel rejected")
            assert rejected["reason"] == "not allowed" and rejected["service"] == "echo"
            logged = provider.wait_event("tunnel rejected", peer=ids["mallory"])
            assert (logged["service"], logged["reason"]) == ("echo", "not allowed")

            # Swap alice for mallory in place: same size, same inode, old modification time, so
            # only SIGHUP can tell the node.
            before = os.stat(allow)
            with open(allow, "r+") as f:
                f.write(f"echo {ids['mallory']}\n")
            os.utime(allow, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert os.stat(allow)[1:7] == before[1:7] and os.stat(allow).st_mtime_ns == before.st_mtime_ns
            provider.proc.send_signal(signal.SIGHUP)
            assert provider.wait_event("allow file reloaded", 10, trigger="SIGHUP")["changes"] == 1
            change = provider.wait_event("allow list changed", 10)
            assert (change["added"], change["removed"]) == ([ids["mallory"]], [ids["alice"]])
            assert exchange_sync(ports["mallory"], b"now me")[0] == b"now me"
            assert provider.proc.poll() is None  # SIGHUP reloads, it does not stop the node
    finally:
        for proc in procs:
            proc.kill()


def test_an_unusable_allow_file_stops_the_start_in_one_line(tmp_path):
    from punchgate.runtime.access_control import AccessControl, AllowFileError

    with pytest.raises(AllowFileError, match="does not exist"):
        AccessControl((), tmp_path / "absent", ["echo"])
    bad = tmp_path / "allow"
    bad.write_text("echo *\necho nobody\n")
    with pytest.raises(AllowFileError, match="line 2: 'nobody' is not a peer ID"):
        AccessControl((), bad, ["echo"])
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(AllowFileError, match="not UTF-8"):
        AccessControl((), bad, ["echo"])
