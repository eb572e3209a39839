"""punchgate.libp2p_fixes.relay_hop: the relay's circuit data path, over real hosts on loopback.

Each scenario runs a relay R (the hop protocol under test), a provider B holding a
reservation on R, and dialers reaching B only through R. Scenarios that show a
defect run against both our ``RelayHop`` and the library's ``CircuitV2Protocol``
as shipped (in this process: the fix is a subclass, nothing is rebound) and assert
that the shipped one misbehaves.

Two kinds of circuit: real relayed connections (``Relays.dial_through``, Noise and
Yamux end to end through R, as tunnels use them), and raw circuits, where the
dialer and B speak HOP/STOP themselves and then use the two circuit streams as they
are, so that half-close, reset and stalls reach R exactly as sent.
"""

from __future__ import annotations

import contextlib
import hashlib
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import CircuitV2Protocol, RelayLimits
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.relay_hop import RelayHop
from punchgate.runtime.host import build_host
from punchgate.runtime.multistream import open_stream_on
from punchgate.runtime.relay import RELAY_LIMITS, Relays
from punchgate.state import Limit

MiB = 1 << 20
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
CHUNK = 256 * 1024
ECHO = TProtocol("/punchgate-test/relay-echo/1")
SETUP_TIMEOUT = 20
SCENARIO_TIMEOUT = 60  # a whole scenario: mesh up, run, mesh down
WRITE_TIMEOUT = 15  # the shipped relay's per-write deadline (CircuitV2Protocol.write_timeout)
IDLE_GIVE_UP = 3.0  # a stalled circuit's reader concludes nothing more will come
GIVE_UP = 4.0  # a small exchange that has not ended by then never will (as shipped)


def pattern(total: int, salt: str = "") -> bytes:
    block = hashlib.shake_256(f"{salt}{total}".encode()).digest(MiB)
    return (block * (total // MiB + 1))[:total]


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_until_eof(stream, into: bytearray, progress: trio.Event | None = None, at: int = 0) -> None:
    try:
        while True:
            into += await stream.read(CHUNK)
            if progress is not None and len(into) >= at:
                progress.set()
    except StreamEOF:
        pass


async def write_all(stream, payload: bytes) -> None:
    for offset in range(0, len(payload), CHUNK):
        await stream.write(payload[offset : offset + CHUNK])


# ---------------------------------------------------------------------------
# The mesh: relay R, provider B with a reservation on R, dialers.


@dataclass
class Mesh:
    stack: AsyncExitStack  # everything below is entered here, and left in reverse
    relay: object = None  # the hop protocol under test, on R
    r: object = None
    b: object = None
    b_relays: Relays | None = None
    b_circuits: trio.MemoryReceiveChannel | None = None  # B's end of each raw circuit
    circuits_ended: list = field(default_factory=list)  # R's CONNECT handlers that returned
    circuit_ended: trio.Event = field(default_factory=trio.Event)

    async def wait_circuits_ended(self, count: int) -> None:
        while len(self.circuits_ended) < count:
            await self.circuit_ended.wait()

    async def host(self):
        host = build_host(create_new_key_pair(), [LOOPBACK])
        await self.stack.enter_async_context(host.run(listen_addrs=[LOOPBACK]))
        return host

    async def start(self, service) -> None:
        """Run ``service`` (a ``task_status`` function) until the mesh is left."""
        nursery = await self.stack.enter_async_context(trio.open_nursery())
        self.stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(service)

    async def relays_on(self, host) -> Relays:
        relays = Relays(host)
        await self.start(relays.run)
        with trio.fail_after(SETUP_TIMEOUT):
            await host.connect(PeerInfo(self.r.get_id(), self.r.get_addrs()))
        return relays

    async def dialer(self):
        """A host connected to R only, with the relay transport to dial through it."""
        host = await self.host()
        return host, await self.relays_on(host)

    async def raw_circuit(self, dialer, b_side: trio.MemoryReceiveChannel):
        """A CONNECT through R to B on a bare hop stream; returns (dialer's, B's) circuit streams."""
        stream = await dialer.new_stream(self.r.get_id(), [HOP])
        await write_delimited_msg(
            stream, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=self.b.get_id().to_bytes()))
        )
        answer = await read_delimited_msg(stream, HopMessage)
        assert answer.status == to_proto_status(StatusCode.OK), answer
        return stream, await b_side.receive()


@asynccontextmanager
async def mesh(relay_class: type, limits: RelayLimits = RELAY_LIMITS, *, raw_b: bool = False):
    """R runs ``relay_class``; B holds a reservation on R. With ``raw_b`` B hands every
    circuit's STOP stream to ``m.b_circuits`` as it is instead of upgrading it."""
    async with AsyncExitStack() as stack:
        # (No cancel scope may span entries into the stack: callers bound the whole mesh.)
        m = Mesh(stack)
        m.r = await m.host()
        m.relay = relay_class(m.r, limits=limits, allow_hop=True)
        handle_connect = m.relay._handle_connect

        async def counted_handle_connect(stream, msg) -> None:  # instrumentation only
            try:
                await handle_connect(stream, msg)
            finally:
                m.circuits_ended.append(stream)
                m.circuit_ended.set()
                m.circuit_ended = trio.Event()

        m.relay._handle_connect = counted_handle_connect
        await stack.enter_async_context(background_trio_service(m.relay))
        with trio.fail_after(SETUP_TIMEOUT):
            await m.relay.event_started.wait()

        m.b = await m.host()
        m.b_relays = Relays(m.b)
        await m.start(m.b_relays.run)
        with trio.fail_after(SETUP_TIMEOUT):
            await m.b.connect(PeerInfo(m.r.get_id(), m.r.get_addrs()))
            expires_in, limit = await m.b_relays.reserve(m.r.get_id())
        assert expires_in > 60 and limit == Limit(limits.duration, limits.data), (expires_in, limit)
        if raw_b:
            send, m.b_circuits = trio.open_memory_channel(16)

            async def raw_stop(stream) -> None:
                await read_delimited_msg(stream, StopMessage)
                await write_delimited_msg(
                    stream, StopMessage(type=StopMessage.STATUS, status=to_proto_status(StatusCode.OK))
                )
                await send.send(stream)
                await trio.sleep_forever()  # the stream is the test's now (until B stops)

            m.b.set_stream_handler(STOP, raw_stop)
        yield m


RELAYS = [pytest.param(RelayHop, id="ours"), pytest.param(CircuitV2Protocol, id="shipped")]


# ---------------------------------------------------------------------------
# Defect 1: the end of one circuit closed another circuit to the same peer.


async def two_circuits_scenario(relay_class: type, end_first: str, total: int = 12 * MiB) -> dict:
    """C1 and C2 each have a relayed connection to B through R. C2 echoes ``total`` bytes
    through B; a third of the way in, C1's circuit ends (``end_first``: C1 closes its
    relayed connection, or C1 drops its connection to R as a restarting client does).
    Once R has finished C1's circuit, C2 sends the rest. Returns C2's outcome."""
    outcome: dict = {"error": None, "received": 0, "intact": False}
    payload = pattern(total, "c2")
    async with mesh(relay_class) as m:

        async def echo(stream) -> None:
            try:
                while True:
                    await stream.write(await stream.read(CHUNK))
            except StreamEOF:
                await stream.close_write()
            except Exception:  # noqa: BLE001 - the dialer sees how its stream ended
                return

        m.b.set_stream_handler(ECHO, echo)
        c1, c1_relays = await m.dialer()
        _, c2_relays = await m.dialer()
        with trio.fail_after(SETUP_TIMEOUT):
            conn1 = (await c1_relays.dial_through(m.r.get_id(), [], m.b.get_id()))[0]
            stream1, _ = await open_stream_on(conn1, ECHO)
            await stream1.write(b"ping")
            assert await stream1.read(4) == b"ping"  # circuit 1 carries data
            conn2 = (await c2_relays.dial_through(m.r.get_id(), [], m.b.get_id()))[0]
            stream2, _ = await open_stream_on(conn2, ECHO)
        assert len(m.circuits_ended) == 0

        received = bytearray()
        echoed_some = trio.Event()
        first_gone = trio.Event()

        async def c2_writer() -> None:
            third = total // 3
            await write_all(stream2, payload[:third])
            await echoed_some.wait()
            await first_gone.wait()
            await write_all(stream2, payload[third:])
            await stream2.close_write()

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(c2_writer)
                    nursery.start_soon(read_until_eof, stream2, received, echoed_some, MiB)
                    await echoed_some.wait()
                    if end_first == "close":
                        await conn1.close()
                    else:
                        await c1.get_network().close_peer(m.r.get_id())
                    await m.wait_circuits_ended(1)  # R's handler for circuit 1 returned
                    first_gone.set()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(exc)
        outcome["received"] = len(received)
        outcome["intact"] = digest(received) == digest(payload)
        outcome["circuits_ended"] = len(m.circuits_ended)
        outcome["active_relays_left"] = len(m.relay._active_relays)
    return outcome


@pytest.mark.parametrize("end_first", ["close", "disconnect"])
async def test_circuit_ending_leaves_another_circuit_to_the_same_peer_intact(end_first):
    with trio.fail_after(SCENARIO_TIMEOUT):
        ours = await two_circuits_scenario(RelayHop, end_first)
    assert ours["error"] is None and ours["intact"], ours
    assert ours["circuits_ended"] == 1, ours  # only circuit 1 ended, before C2 finished
    # The library as shipped: circuit 1's end closes circuit 2's streams, which were
    # stored under the same destination peer; C2's echo is cut short.
    with trio.fail_after(SCENARIO_TIMEOUT):
        shipped = await two_circuits_scenario(CircuitV2Protocol, end_first)
    assert shipped["error"] is not None or not shipped["intact"], shipped


# ---------------------------------------------------------------------------
# Raw circuits: half-close, reset, back-pressure, limits.


async def half_close_scenario(relay_class: type) -> dict:
    """The dialer sends a request and half-closes; B answers after EOF and half-closes."""
    request, reply = pattern(3 * MiB, "request"), pattern(2 * MiB, "reply")
    outcome: dict = {"b_got": None, "dialer_got": None}
    async with mesh(relay_class, raw_b=True) as m:
        c, _ = await m.dialer()
        with trio.fail_after(SETUP_TIMEOUT):
            c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)

        async def b_side() -> None:
            got = bytearray()
            await read_until_eof(b_stream, got)
            outcome["b_got"] = digest(got)
            await write_all(b_stream, reply)
            await b_stream.close_write()

        async def c_side() -> None:
            await write_all(c_stream, request)
            await c_stream.close_write()
            got = bytearray()
            await read_until_eof(c_stream, got)
            outcome["dialer_got"] = digest(got)

        with trio.move_on_after(GIVE_UP):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b_side)
                nursery.start_soon(c_side)
            with trio.fail_after(5):
                await m.wait_circuits_ended(1)
        outcome["circuit_ended"] = len(m.circuits_ended) == 1
    outcome["ok"] = outcome["b_got"] == digest(request) and outcome["dialer_got"] == digest(reply)
    return outcome


@pytest.mark.parametrize("relay_class", RELAYS)
async def test_half_close_crosses_the_relay(relay_class):
    with trio.fail_after(SCENARIO_TIMEOUT):
        outcome = await half_close_scenario(relay_class)
    if relay_class is RelayHop:
        assert outcome["ok"] and outcome["circuit_ended"], outcome
    else:
        # Shipped: the dialer's EOF ends the circuit; B is never told, nothing comes back.
        assert not outcome["ok"], outcome


async def reset_scenario(relay_class: type) -> dict:
    """The dialer resets its circuit stream mid-transfer: B must be told."""
    outcome: dict = {"b_end": None}
    async with mesh(relay_class, raw_b=True) as m:
        c, _ = await m.dialer()
        with trio.fail_after(SETUP_TIMEOUT):
            c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)
        with trio.move_on_after(GIVE_UP):
            await c_stream.write(b"x" * 1000)
            assert await b_stream.read(1000)
            await c_stream.reset()
            try:
                while True:
                    await b_stream.read(CHUNK)
            except Exception as exc:  # noqa: BLE001 - reported
                outcome["b_end"] = type(exc).__name__
    return outcome


@pytest.mark.parametrize("relay_class", RELAYS)
async def test_reset_on_one_side_resets_the_other(relay_class):
    with trio.fail_after(SCENARIO_TIMEOUT):
        outcome = await reset_scenario(relay_class)
    if relay_class is RelayHop:
        assert outcome["b_end"] == StreamReset.__name__, outcome
    else:
        assert outcome["b_end"] is None, outcome  # shipped: B is never told, its read hangs


async def stall_scenario(relay_class: type, total: int = 48 * MiB, stall_after: int = MiB) -> dict:
    """B stops reading until R's write to B has been blocked for longer than the shipped
    write deadline (15 s), then reads on. Everything else is awaited, not slept."""
    payload = pattern(total, "stall")
    outcome: dict = {"b_received": 0, "b_eof": False, "intact": False, "blocked_s": None}
    async with mesh(relay_class, raw_b=True) as m:
        c, _ = await m.dialer()
        with trio.fail_after(SETUP_TIMEOUT):
            c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)
        # R's end of the circuit towards B: its send window is what blocks R's writes.
        (r_to_b,) = [
            s.muxed_stream
            for conn in m.r.get_network().get_connections(m.b.get_id())
            for s in conn.get_streams()
            if s.get_protocol() == STOP
        ]
        got = bytearray()

        async def b_side() -> None:
            while len(got) < stall_after:
                got.extend(await b_stream.read(CHUNK))
            with trio.fail_after(20):  # R fills B's window and blocks
                while r_to_b.send_window > 0:
                    await trio.sleep(0.05)
            blocked_at = trio.current_time()
            await trio.sleep(WRITE_TIMEOUT + 0.5)  # the stall itself
            outcome["blocked_s"] = trio.current_time() - blocked_at
            try:
                while True:
                    with trio.move_on_after(IDLE_GIVE_UP) as idle:
                        got.extend(await b_stream.read(CHUNK))
                    if idle.cancelled_caught:
                        return  # nothing more is coming (and no EOF either)
            except StreamEOF:
                outcome["b_eof"] = True

        async def c_side() -> None:
            await write_all(c_stream, payload)
            await c_stream.close_write()

        with trio.move_on_after(WRITE_TIMEOUT + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c_side)
                await b_side()
                nursery.cancel_scope.cancel()  # a dialer the relay gave up on is blocked
        outcome["b_received"] = len(got)
        outcome["intact"] = digest(got) == digest(payload)
    return outcome


@pytest.mark.slow
async def test_back_pressure_longer_than_15s_keeps_the_circuit():
    results: dict = {}

    async def run(name: str, relay_class: type) -> None:
        results[name] = await stall_scenario(relay_class)

    with trio.fail_after(SCENARIO_TIMEOUT + WRITE_TIMEOUT + 30):
        async with trio.open_nursery() as nursery:  # both at once: the stall is idle time
            nursery.start_soon(run, "ours", RelayHop)
            nursery.start_soon(run, "shipped", CircuitV2Protocol)
    ours, shipped = results["ours"], results["shipped"]
    assert ours["blocked_s"] > WRITE_TIMEOUT, ours
    assert ours["b_eof"] and ours["intact"], ours
    # Shipped: the write to B times out after 15 s and the circuit is torn down
    # (and B, never told, waits on what it got).
    assert shipped["blocked_s"] > WRITE_TIMEOUT, shipped
    assert not shipped["intact"] and shipped["b_received"] < len(pattern(48 * MiB, "stall")), shipped


def small_limits(duration: int, data: int) -> RelayLimits:
    return RelayLimits(
        duration=duration, data=data, max_circuit_conns=8, max_reservations=8, reservation_ttl=3600
    )


async def test_data_limit_is_circuit_wide_and_resets_both_streams():
    limits = small_limits(duration=3600, data=MiB)
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with mesh(RelayHop, limits, raw_b=True) as m:
            c, _ = await m.dialer()
            with trio.fail_after(SETUP_TIMEOUT):
                c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)
            ends: dict = {}

            async def drain(name: str, stream) -> None:
                got = bytearray()
                try:
                    while True:
                        got += await stream.read(CHUNK)
                except Exception as exc:  # noqa: BLE001 - reported
                    ends[name] = (type(exc).__name__, len(got))

            with trio.fail_after(10):
                # 600 KiB each way: within the limit per direction, over it together.
                await c_stream.write(b"c" * (600 * 1024))
                got = bytearray()
                while len(got) < 600 * 1024:
                    got += await b_stream.read(CHUNK)
                await b_stream.write(b"b" * (600 * 1024))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain, "dialer", c_stream)
                    nursery.start_soon(drain, "b", b_stream)
        assert ends["dialer"][0] == StreamReset.__name__ and ends["b"][0] == StreamReset.__name__, ends
        # Reads that fit the remaining budget were relayed, the one over it was not: the
        # dialer got at most what was left of the 1 MiB, B only the limit status message.
        assert ends["dialer"][1] <= MiB - 600 * 1024, ends
        assert ends["b"][1] < 100, ends


async def test_duration_limit_ends_an_idle_circuit():
    limits = small_limits(duration=1, data=MiB)
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with mesh(RelayHop, limits, raw_b=True) as m:
            c, _ = await m.dialer()
            with trio.fail_after(SETUP_TIMEOUT):
                c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)
            with trio.fail_after(10):
                # Nothing is sent: the deadline alone ends the circuit. The dialer (the
                # hop side) gets the library's limit status, then both streams are reset.
                status = await read_delimited_msg(c_stream, HopMessage)
                assert status.status == to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)
                for stream in (c_stream, b_stream):
                    with pytest.raises(StreamReset):
                        while True:
                            await stream.read(CHUNK)
                await m.wait_circuits_ended(1)
        assert m.relay._active_relays == {}


async def data_limit_zero_scenario(relay_class: type) -> dict:
    """``data=0`` (no data limit): 100 KiB each way, then both sides half-close."""
    up, down = pattern(100 * 1024, "up"), pattern(100 * 1024, "down")
    outcome: dict = {"b_got": None, "dialer_got": None}
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with mesh(relay_class, small_limits(duration=3600, data=0), raw_b=True) as m:
            c, _ = await m.dialer()
            with trio.fail_after(SETUP_TIMEOUT):
                c_stream, b_stream = await m.raw_circuit(c, m.b_circuits)

            async def one_way(name: str, src, dst, payload: bytes) -> None:
                got = bytearray()
                with contextlib.suppress(Exception):  # a cut circuit: what arrived is compared
                    await write_all(src, payload)
                    await src.close_write()
                    await read_until_eof(dst, got)
                outcome[name] = got == payload

            with trio.move_on_after(GIVE_UP):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one_way, "b_got", c_stream, b_stream, up)
                    nursery.start_soon(one_way, "dialer_got", b_stream, c_stream, down)
    return outcome


@pytest.mark.parametrize("relay_class", RELAYS)
async def test_data_limit_zero_means_unlimited(relay_class):
    outcome = await data_limit_zero_scenario(relay_class)
    if relay_class is RelayHop:
        assert outcome == {"b_got": True, "dialer_got": True}, outcome
    else:
        # Shipped: no shared budget, so each direction charges the peer's reservation,
        # whose limit is that 0: the first bytes B sends end the circuit.
        assert outcome["dialer_got"] is not True, outcome
