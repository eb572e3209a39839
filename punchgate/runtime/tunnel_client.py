"""The client side of a tunnel: a local TCP listener whose every connection becomes a stream.

For each accepted local connection: find a peer for the service (a fixed peer for
``--tunnel``, a provider for ``--tunnel-by-name``), open ``/punchgate/tunnel/1.0.0`` on a
TCP connection to it, ask for the service, and on acceptance pipe bytes both ways. A
refusal or any failure closes the local connection at once and says why in the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio
from libp2p.peer.id import ID

from punchgate.logs import get_logger
from punchgate.runtime.handshake import read_message
from punchgate.runtime.paths import Paths
from punchgate.runtime.pipe import PipeResult, pipe
from punchgate.runtime.providers import PeerFinder
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.specs import HostPort
from punchgate.state import events as ev
from punchgate.wire import PROTOCOL_ID, encode_request, parse_response

log = get_logger("punchgate.tunnel")

class TunnelClient:
    def __init__(
        self,
        paths: Paths,
        service: str,
        bind: HostPort,
        finder: PeerFinder,
        registry: SessionRegistry,
        post: Callable[[ev.Event], None],
    ) -> None:
        self.paths = paths
        self.service = service
        self.bind = bind
        self.finder = finder
        self.registry = registry
        self.post = post
        self.listeners: list[trio.SocketListener] = []

    async def open_listeners(self) -> None:
        """Bind the local port now, so that a taken port fails the start, not a later connection."""
        self.listeners = await trio.open_tcp_listeners(self.bind.port, host=self.bind.host)
        log.info("tunnel listening", bind=str(self.bind), service=self.service)

    async def serve(self, handler_nursery: trio.Nursery) -> None:
        await trio.serve_listeners(self._handle, self.listeners, handler_nursery=handler_nursery)

    async def _handle(self, local: trio.SocketStream) -> None:
        try:
            with self.registry.session():
                self.post(ev.TunnelSessionOpened(str(self.bind)))
                try:
                    await self._run_session(local)
                finally:
                    self.post(ev.TunnelSessionClosed(str(self.bind)))
        except RegistryClosed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await local.aclose()

    async def _run_session(self, local: trio.SocketStream) -> None:
        fields = {"service": self.service, "bind": str(self.bind)}
        started = time.monotonic()
        tried: set[ID] = set()
        errors: list[str] = []
        request = encode_request(self.service)
        # Two rounds: the known candidates, then (if all failed) a fresh lookup's new ones.
        # Nothing has been read from the local connection yet, so a provider that fails
        # or refuses (a stale record: it no longer exposes the service) costs nothing
        # but the time to ask the next one.
        for refresh in (False, True):
            candidates = [p for p in await self.finder.candidates(self.service, refresh) if p not in tried]
            for peer_id in candidates:
                tried.add(peer_id)
                try:
                    # The request rides with the protocol negotiation: one round trip.
                    stream, path, early = await self.paths.open_stream(peer_id, PROTOCOL_ID, request)
                except Exception as exc:  # dial, relay, negotiation and swarm errors of many types
                    errors.append(f"{peer_id}: {exc}")
                    self.finder.failed(self.service, peer_id)
                    continue
                peer = str(peer_id)
                refusal, early_bytes = await self._handshake(stream, early, peer, fields)
                if refusal is not None:
                    errors.append(f"{peer_id}: {refusal}")
                    self.finder.failed(self.service, peer_id)
                    continue
                await self._pipe(local, stream, early_bytes, peer, path, fields, started)
                return
        reason = "; ".join(errors) if errors else "no peer provides this service (will look again)"
        log.warning("client tunnel error", **fields, reason=reason)

    async def _handshake(self, stream, early: bytes, peer: str, fields: dict) -> tuple[str | None, bytes]:
        """Read the provider's answer: (None, bytes after it) if accepted, else (why, b"")."""
        try:
            message, early_bytes = await read_message(stream, already_read=early)
            response = parse_response(message)
        except Exception as exc:  # WireError, TooSlowError and stream errors alike
            reason = f"handshake: {type(exc).__name__} {exc}"
            log.warning("client tunnel error", **fields, peer=peer, reason=reason)
            await _reset(stream)
            return reason, b""
        if not response.accepted:
            log.warning("client tunnel rejected", **fields, peer=peer, reason=response.reason)
            await _reset(stream)
            return f"rejected: {response.reason}", b""
        return None, early_bytes

    async def _pipe(self, local, stream, early_bytes: bytes, peer: str, path: str, fields: dict, started: float) -> None:
        setup_ms = round((time.monotonic() - started) * 1000, 2)
        log.info("client tunnel opened", **fields, peer=peer, path=path, setup_ms=setup_ms)
        result = PipeResult()
        try:
            await pipe(local, stream, result, pending_to_local=early_bytes)
        finally:
            log.info(
                "client tunnel closed",
                **fields,
                peer=peer,
                path=path,
                bytes_to_remote=result.to_remote,
                bytes_from_remote=result.from_remote,
                duration_s=round(time.monotonic() - started, 3),
                error=result.error,
                interrupted=result.interrupted,
            )


async def _reset(stream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
