"""The serving side of ``/punchgate/tunnel/1.0.0``: streams in, exposed TCP services out.

Each stream passes three gates, in this order:

1. **limits** (``punchgate/limits.py`` :class:`StreamAdmission`), before a byte is read:
   tunnel streams of one peer at once and per second, and tunnel sessions in all. Over
   a cap the stream is answered with a refusal that names the cap and closed.
2. **the request**, within the handshake deadline (10 s): a malformed, oversized,
   truncated or late one is refused.
3. **access** (``punchgate/access.py`` :func:`decide`): a peer not allowed to open the
   name is told ``not allowed``, whether or not the name exists; an allowed peer asking
   for a name not exposed is told ``unknown service 'NAME'``.

Refusals are logged (``tunnel rejected``, naming peer, service and the full reason) at
most once per 10 s for the same peer, service and kind of refusal, with the count of
those not logged. A refused stream is closed once the peer has read the answer and
closed its side; a peer that keeps sending instead (whatever it sends is discarded,
never buffered) is reset after 1 MiB or 2 s. When the allowlist changes, tunnels open by peers who may no longer
open their service are closed (``tunnel revoked``).
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from punchgate.access import AccessPolicy, decide
from punchgate.limits import Limits, LogThrottle, StreamAdmission
from punchgate.logs import get_logger
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.handshake import read_message
from punchgate.runtime.pipe import PipeResult, pipe
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.runtime.udp import DatagramResult, DatagramStats, open_service_socket, serve_datagrams
from punchgate.specs import HostPort
from punchgate.wire import TunnelResponse, WireError, encode_response, parse_request

CONNECT_TIMEOUT = 10.0
REFUSAL_GRACE = 2.0  # for the refusal to go out and the peer to close its side
DRAIN_LIMIT = 1 << 20  # bytes a refused peer may still send before its stream is reset

log = get_logger("punchgate.tunnel")


class TunnelService:
    """Answers tunnel requests for the services given with ``--expose``."""

    def __init__(
        self,
        services: dict[str, HostPort],
        registry: SessionRegistry,
        policy: AccessPolicy | None = None,
        limits: Limits | None = None,
        transports: dict[str, str] | None = None,  # name -> "udp" for UDP services; TCP otherwise
        udp_idle: float = 60.0,
    ) -> None:
        self.services = services
        self.registry = registry
        self.transports = {name: (transports or {}).get(name, "tcp") for name in services}
        self.udp_idle = udp_idle
        self.policy = policy or AccessPolicy.open()
        limits = limits or Limits()
        self.admission = StreamAdmission(
            limits.tunnel_streams_per_peer, limits.tunnel_stream_rate, limits.tunnel_stream_burst, limits.tunnel_sessions
        )
        self.throttle = LogThrottle()
        self.accepted = 0  # tunnel requests accepted so far
        self.stats: dict[str, SessionStats] = {  # for `punchgate status`
            name: DatagramStats() if self.transports[name] == "udp" else SessionStats() for name in services
        }
        self.refused = 0  # tunnel streams refused, for any reason
        self._live: dict[trio.CancelScope, tuple[str, str]] = {}  # open tunnels: (peer, service)

    def set_policy(self, policy: AccessPolicy) -> None:
        """A new allowlist: from now on it decides, and open tunnels it forbids are closed."""
        self.policy = policy
        for scope, (peer, service) in list(self._live.items()):
            if not policy.permits(peer, service):
                log.warning("tunnel revoked", peer=peer, service=service, reason="peer no longer allowed")
                scope.cancel()

    async def handle_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        reason = self.admission.admit(peer, trio.current_time())
        if reason is not None:
            await self._refuse(stream, peer, None, reason)
            return
        try:
            with self.registry.session() as scope:
                await self._serve(stream, peer, scope)
        except RegistryClosed:
            await self._refuse(stream, peer, None, "node is shutting down")
        finally:
            self.admission.release(peer)

    async def _serve(self, stream: INetStream, peer: str, scope: trio.CancelScope) -> None:
        try:
            message, early_bytes = await read_message(stream)
            request = parse_request(message)
            service = request.service_name
        except (WireError, trio.TooSlowError) as exc:
            reason = "no request in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            await self._refuse(stream, peer, None, f"bad request: {reason}")
            return
        except Exception as exc:  # the stream broke before the request arrived
            self._note("tunnel rejected", peer, None, "stream error", reason=f"stream error: {type(exc).__name__}")
            await _reset(stream)
            return

        log.debug("tunnel request", peer=peer, service=service)  # accepted/rejected follow
        decision = decide(self.policy, peer, service, self.services)
        if not decision.allowed:
            await self._refuse(stream, peer, service, decision.reason or "refused", decision.detail)
            return
        target = self.services[service]
        if request.transport != self.transports[service]:
            offered, asked = self.transports[service].upper(), request.transport.upper()
            await self._refuse(stream, peer, service, f"service {service!r} is {offered} here, not {asked}")
            return
        if request.transport == "udp":
            await self._serve_udp(stream, peer, service, target, early_bytes, scope)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                local = await trio.open_tcp_stream(target.host, target.port)
        except (OSError, trio.TooSlowError) as exc:
            await self._refuse(stream, peer, service, f"service {service!r} at {target} unreachable: {exc or 'timeout'}")
            return

        started = trio.current_time()
        try:
            await stream.write(encode_response(TunnelResponse(True)))
        except Exception as exc:
            log.warning("tunnel rejected", peer=peer, service=service, reason=f"stream error: {exc}")
            await local.aclose()
            await _reset(stream)
            return
        self.accepted += 1
        log.info("tunnel accepted", peer=peer, service=service, target=str(target))
        # A client may start sending before our answer: those bytes go to the service first.
        result = PipeResult()
        self._live[scope] = (peer, service)
        try:
            with self.stats[service].track(result, peer=peer):
                await pipe(local, stream, result, pending_to_local=early_bytes)
        finally:
            del self._live[scope]
            log.info(
                "tunnel closed",
                peer=peer,
                service=service,
                bytes_to_service=result.from_remote,
                bytes_from_service=result.to_remote,
                duration_s=round(trio.current_time() - started, 3),
                error=result.error,
                interrupted=result.interrupted,
            )

    async def _serve_udp(
        self, stream: INetStream, peer: str, service: str, target: HostPort, early: bytes, scope: trio.CancelScope
    ) -> None:
        try:
            sock = await open_service_socket(target)
        except OSError as exc:
            await self._refuse(stream, peer, service, f"service {service!r} at {target}/udp unreachable: {exc}")
            return
        started = trio.current_time()
        try:
            await stream.write(encode_response(TunnelResponse(True, transport="udp")))
        except Exception as exc:
            log.warning("tunnel rejected", peer=peer, service=service, reason=f"stream error: {exc}")
            sock.close()
            await _reset(stream)
            return
        self.accepted += 1
        log.info("tunnel accepted", peer=peer, service=service, target=f"{target}/udp", transport="udp")
        result = DatagramResult()
        self._live[scope] = (peer, service)
        try:
            with self.stats[service].track(result, peer=peer):
                await serve_datagrams(sock, stream, result, self.udp_idle, early)
        finally:
            del self._live[scope]
            log.info(
                "tunnel closed",
                peer=peer,
                service=service,
                transport="udp",
                bytes_to_service=result.from_remote,
                bytes_from_service=result.to_remote,
                datagrams_to_service=result.datagrams_from_remote,
                datagrams_from_service=result.datagrams_to_remote,
                dropped=result.dropped,
                idle=result.idle,
                duration_s=round(trio.current_time() - started, 3),
                error=result.error,
                interrupted=result.interrupted,
            )


    async def _refuse(
        self, stream: INetStream, peer: str, service: str | None, reason: str, detail: str | None = None
    ) -> None:
        self.refused += 1
        kind = reason.split(":", 1)[0]
        extra = {"detail": detail} if detail and detail != reason else {}
        self._note("tunnel rejected", peer, service, kind, reason=reason, **extra)
        try:
            with trio.move_on_after(REFUSAL_GRACE):
                await stream.write(encode_response(TunnelResponse(False, reason)))
                await stream.close()
                if await _drained(stream):
                    return  # the peer read the answer and closed its side: the stream is gone
        except Exception:
            pass
        await _reset(stream)  # the peer kept sending (or keeps the stream open): drop it

    def _note(self, event: str, peer: str, service: str | None, kind: str, **fields: Any) -> None:
        """A warning, at most once per 10 s for one peer, service and kind of refusal."""
        held_back = self.throttle.allow(f"{peer} {service} {kind}", trio.current_time())
        if held_back is not None:
            extra = {"not_logged_since": held_back} if held_back else {}
            log.warning(event, peer=peer, service=service, **fields, **extra)


async def _drained(stream: INetStream) -> bool:
    """Discard what the peer still sends on a refused stream: True once it closes its
    side, False after :data:`DRAIN_LIMIT` bytes. (Unread, those bytes would stay
    buffered, up to the muxer's 16 MiB window per stream, until the connection ends.)"""
    discarded = 0
    while discarded < DRAIN_LIMIT:
        try:
            discarded += len(await stream.read(65536))
        except StreamEOF:
            return True
    return False


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
