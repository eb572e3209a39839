"""Fuzzing, bounded in time: every decoder of outside input ends in a value or its one
clear error, never another exception, never a hang; and a live node fed fuzzed bytes on
each protocol a peer can reach keeps serving a good peer.

Decoders covered here: the tunnel handshake (``wire``), the control socket's requests,
the spec, config and environment parsers, multiaddrs as peers hand them over, the allow
file, the network key file.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import multiaddr
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID

from conftest import LOOPBACK_TCP, address_of, start_echo_server, start_node
from punchgate import specs
from punchgate.access import AllowError, parse_allow_spec
from punchgate.config import FLAGS, UsageError, parse_config
from punchgate.limits import parse_limit
from punchgate.netkey import HEADER, NetworkKeyError, decode
from punchgate.runtime import control
from punchgate.runtime.access_control import AllowFileError, read_allow_file
from punchgate.runtime.handshake import read_message
from punchgate.runtime.host import build_host, live_connection, transport_of
from punchgate.runtime.multistream import open_stream_on
from punchgate.runtime.reachability import PROTOCOL_ID as DIALBACK_PROTOCOL_ID
from punchgate.specs import ExposeSpec, HostPort, SpecError
from punchgate.state import addrs as state_addrs
from punchgate.wire import MAX_MESSAGE_SIZE, PROTOCOL_ID, FrameDecoder, WireError, encode_request, parse_request, parse_response

QUICK = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
PEER = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Bytes shaped like the protocol (a length, then JSON-ish text), and bytes that are not.
frames = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda body, lie, tail: struct.pack(">I", len(body) + lie if len(body) + lie >= 0 else 0) + body + tail,
        st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps({"service_name": v}).encode())),
        st.integers(-5, 5),
        st.binary(max_size=20),
    ),
)


# --- pure decoders ---------------------------------------------------------------------------


@QUICK
@given(frames, st.lists(st.integers(1, 64), max_size=8))
def test_tunnel_handshake_decoder(data, cuts):
    """Fed in any pieces: a message and the bytes after it, or WireError; nothing else."""
    decoder, got, offset = FrameDecoder(), None, 0
    pieces = []
    for cut in cuts:
        pieces.append(data[offset : offset + cut])
        offset += cut
    pieces.append(data[offset:])
    fed = b""
    try:
        for piece in pieces:
            fed += piece
            decoder.feed(piece)
            got = decoder.message()
            if got is not None:
                break
        if got is not None:
            message, rest = got
            assert isinstance(message, dict) and fed.endswith(rest)  # what followed, none lost
            try:
                assert parse_request(message).service_name
            except WireError:
                pass
    except WireError as exc:
        assert str(exc)
    if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > MAX_MESSAGE_SIZE:
        assert got is None  # refused on the length alone: the body is never awaited


@QUICK
@given(json_values)
def test_request_and_response_parsers(value):
    message = value if isinstance(value, dict) else {"service_name": value, "accepted": value, "reason": value}
    for parse in (parse_request, parse_response):
        try:
            parse(message)
        except WireError:
            pass


control_requests = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["op", "x", ""]), st.one_of(st.sampled_from(["status", "ping", "nope"]), json_values),
                    max_size=3).map(lambda v: json.dumps(v).encode()),
)


@QUICK
@given(control_requests)
def test_control_socket_requests(request):
    """Every request line gets one JSON object back: the status, {"ok": true}, or an error."""
    status = {"peer_id": "x"}
    reply = control.answer(request, lambda: status)
    assert reply is status or reply == {"ok": True} or set(reply) == {"error"}
    json.dumps(reply)


SPEC_PARSERS = [
    specs.parse_expose, specs.parse_tunnel, specs.parse_tunnel_by_name, specs.parse_listen_addr,
    specs.parse_bootstrap_addr, specs.parse_host_port, specs.parse_interval, specs.parse_peer_id,
    specs.parse_service_name, parse_allow_spec, parse_limit,
]
spec_texts = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["ssh", "=", ":", "@", "[", "]", "::1", "127.0.0.1", "22", "/ip4/", "/tcp/", "/p2p/",
                              PEER, ",", "*", "quic-v1", "/udp/", "0", "99999", "-", "é"]), max_size=10).map("".join),
)


@settings(max_examples=200, deadline=1000)
@given(st.sampled_from(SPEC_PARSERS), spec_texts)
def test_spec_parsers(parse, text):
    try:
        parse(text)
    except SpecError as exc:  # AllowError and LimitError are SpecErrors too
        assert str(exc) and "\n" not in str(exc)


flag_names = st.sampled_from([f.name for f in FLAGS] + ["--no-mdns", "--bogus", "-x", "--"])
env_names = st.sampled_from([f.env for f in FLAGS] + ["PUNCHGATE_LOG", "PUNCHGATE_NO_MDNS", "HOME"])


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.one_of(flag_names, spec_texts), max_size=6), st.dictionaries(env_names, spec_texts, max_size=4))
def test_config_from_any_flags_and_environment(argv, env):
    """A Config, or one line that names the flag; argparse's own usage errors exit 2."""
    try:
        parse_config(argv, env)
    except UsageError as exc:
        assert "\n" not in str(exc) and "example:" in str(exc)
    except SystemExit as exc:
        assert exc.code == 2


@QUICK
@given(st.binary(max_size=80))
def test_multiaddr_bytes_from_peers(raw):
    """Addresses arrive as bytes (identify, provider records): the library's decoder either
    refuses them or gives a Multiaddr that our code reads without failing."""
    try:
        addr = multiaddr.Multiaddr(raw)
        text = str(addr)
    except Exception:  # noqa: BLE001 - the library's decoder refusing is fine; we never see it
        return
    transport_of(addr)
    specs.without_peer_id(addr)
    state_addrs.classify((text,))


addr_texts = st.lists(
    st.sampled_from(["", "/", "ip4", "1.2.3.4", "tcp", "4001", "p2p", PEER, "p2p-circuit", "udp", "quic-v1",
                     "ip6", "::1", "dns", "x", "/p2p-circuit"]),
    max_size=12,
).map("/".join)


@QUICK
@given(st.lists(st.one_of(addr_texts, st.text(max_size=40)), max_size=6))
def test_address_strings_in_the_state_machine(addresses):
    direct, relays = state_addrs.classify(tuple(addresses))
    assert all(state_addrs.direct_transport(a) is not None for a in direct)
    for addr in addresses:
        state_addrs.without_p2p(addr)
        state_addrs.circuit_relay(addr)


@settings(max_examples=150, deadline=1000)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.lists(st.sampled_from([f"ssh {PEER}", "# c", "", "web *", "a b c", "x\x00y", "\ufeffssh *"]),
                          max_size=5).map(lambda lines: "\n".join(lines).encode())))
def test_allow_files_from_disk(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "allow"
        path.write_bytes(content)
        try:
            rules, _ = read_allow_file(path)
        except AllowFileError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            return
    assert all(rules.values())


@QUICK
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda enc, key, extra: f"{HEADER}\n{enc}\n{key}{extra}".encode(),
              st.sampled_from(["/base16/", "/base64/", "/bin/", ""]),
              st.one_of(st.text(alphabet="0123456789abcdefABCDEF", max_size=70), st.text(max_size=70)),
              st.sampled_from(["", "\n", "\n\n", "\nmore"])),
))
def test_network_key_files(content):
    try:
        assert len(decode(content)) == 32
    except NetworkKeyError as exc:
        assert "\n" not in str(exc)


def test_allow_spec_errors_are_allow_errors():
    assert issubclass(AllowError, SpecError)


# --- a live node ---------------------------------------------------------------------------


LIVE = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


async def test_a_live_node_fed_fuzzed_bytes_on_every_protocol_keeps_serving():
    """Fuzzed bytes on the tunnel, dial-back and relay-hop protocols, raw on the TCP
    listener before any handshake, and on the control socket; after every one, the good
    peer's tunnel still works (and the control socket still answers).
    (Input that stops short without ending is the slow-handshake attack of
    tests/test_hostile.py: here each input ends, so each is judged at once.)"""
    with trio.fail_after(120), tempfile.TemporaryDirectory(prefix="pgfz-") as socket_dir:  # short path
        async with trio.open_nursery() as nursery:
            echo = HostPort("127.0.0.1", await start_echo_server(nursery))
            control_socket = Path(socket_dir) / "control.sock"
            node = await start_node(nursery, expose=(ExposeSpec("echo", echo),), control_socket=control_socket)
            port = int(address_of(node).value_for_protocol("tcp"))
            fuzzer, good = (build_host(create_new_key_pair(), [LOOPBACK_TCP]) for _ in range(2))
            await nursery.start(_run, fuzzer)
            await nursery.start(_run, good)
            for host in (fuzzer, good):
                await host.connect(PeerInfo(node.peer_id, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
            served = []

            async def good_peer_served() -> None:
                conn = live_connection(good, node.peer_id, "tcp")
                stream, early = await open_stream_on(conn, PROTOCOL_ID, encode_request("echo"))
                message, rest = await read_message(stream, already_read=early)
                assert parse_response(message).accepted
                await stream.write(b"still here")
                got = bytearray(rest)
                while len(got) < 10:
                    got += await stream.read(10 - len(got))
                assert bytes(got) == b"still here"
                await stream.reset()
                served.append(True)

            async def on_protocol(protocol: str, data: bytes) -> None:
                conn = live_connection(fuzzer, node.peer_id, "tcp")
                assert conn is not None, "the node dropped the fuzzer's connection"
                with trio.move_on_after(12):  # (bytes that stop short meet the node's deadlines)
                    try:
                        stream, _ = await open_stream_on(conn, protocol, data)
                        await stream.close_write()  # the end of the input, so it is judged now
                        while True:
                            await stream.read(65536)
                    except Exception:  # noqa: BLE001 - refused, reset, closed: all fine
                        pass
                await good_peer_served()

            async def raw(data: bytes) -> None:
                with trio.move_on_after(12):
                    sock = trio.socket.socket()
                    with sock:
                        await sock.connect(("127.0.0.1", port))
                        try:
                            await sock.send(data)
                            sock.shutdown(trio.socket.SHUT_WR)
                            while await sock.recv(65536):
                                pass
                        except OSError:
                            pass
                await good_peer_served()

            async def on_control_socket(data: bytes) -> None:
                with trio.move_on_after(12):
                    stream = await trio.open_unix_socket(str(control_socket))
                    async with stream:
                        try:
                            await stream.send_all(data)
                            await stream.send_eof()
                            while await stream.receive_some(65536):
                                pass
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                ping = await trio.open_unix_socket(str(control_socket))
                async with ping:
                    await ping.send_all(b'{"op": "ping"}\n')
                    assert json.loads(await ping.receive_some(1000)) == {"ok": True}  # still answering
                await good_peer_served()

            protocols = st.sampled_from([PROTOCOL_ID, DIALBACK_PROTOCOL_ID, str(HOP_PROTOCOL_ID)])

            @LIVE
            @given(protocols, frames)
            def fuzz_protocols(protocol, data):
                trio.from_thread.run(on_protocol, protocol, data)

            @LIVE
            @given(st.one_of(st.binary(max_size=300), frames))
            def fuzz_listener(data):
                trio.from_thread.run(raw, data)

            @LIVE
            @given(st.one_of(control_requests, st.binary(min_size=4097, max_size=9000)))
            def fuzz_control_socket(data):
                trio.from_thread.run(on_control_socket, data)

            await trio.to_thread.run_sync(fuzz_protocols)
            await trio.to_thread.run_sync(fuzz_listener)
            await trio.to_thread.run_sync(fuzz_control_socket)
            assert len(served) >= 3 * LIVE.max_examples
            nursery.cancel_scope.cancel()


async def _run(host, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[LOOPBACK_TCP]):
        task_status.started()
        await trio.sleep_forever()


