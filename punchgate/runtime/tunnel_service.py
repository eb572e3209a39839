"""The serving side of ``/punchgate/tunnel/1.0.0``: streams in, exposed TCP services out."""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

from punchgate.logs import get_logger
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.handshake import read_message
from punchgate.runtime.pipe import PipeResult, pipe
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.runtime.udp import DatagramResult, DatagramStats, open_service_socket, serve_datagrams
from punchgate.specs import HostPort
from punchgate.wire import TunnelResponse, WireError, encode_response, parse_request

CONNECT_TIMEOUT = 10.0

log = get_logger("punchgate.tunnel")


class TunnelService:
    """Answers tunnel requests for the services given with ``--expose``."""

    def __init__(
        self,
        services: dict[str, HostPort],
        registry: SessionRegistry,
        transports: dict[str, str] | None = None,  # name -> "udp" for UDP services; TCP otherwise
        udp_idle: float = 60.0,
    ) -> None:
        self.services = services
        self.registry = registry
        self.transports = {name: (transports or {}).get(name, "tcp") for name in services}
        self.udp_idle = udp_idle
        self.accepted = 0  # tunnel requests accepted so far
        self.stats: dict[str, SessionStats] = {  # for `punchgate status`
            name: DatagramStats() if self.transports[name] == "udp" else SessionStats() for name in services
        }

    async def handle_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with self.registry.session():
                await self._serve(stream, peer)
        except RegistryClosed:
            await _refuse(stream, peer, None, "node is shutting down")

    async def _serve(self, stream: INetStream, peer: str) -> None:
        try:
            message, early_bytes = await read_message(stream)
            request = parse_request(message)
            service = request.service_name
        except (WireError, trio.TooSlowError) as exc:
            reason = "no request in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            await _refuse(stream, peer, None, f"bad request: {reason}")
            return
        except Exception as exc:  # the stream broke before the request arrived
            log.warning("tunnel rejected", peer=peer, reason=f"stream error: {type(exc).__name__}")
            await _reset(stream)
            return

        log.debug("tunnel request", peer=peer, service=service)  # accepted/rejected follow
        target = self.services.get(service)
        if target is None:
            await _refuse(stream, peer, service, f"unknown service {service!r}")
            return
        if request.transport != self.transports[service]:
            offered, asked = self.transports[service].upper(), request.transport.upper()
            await _refuse(stream, peer, service, f"service {service!r} is {offered} here, not {asked}")
            return
        if request.transport == "udp":
            await self._serve_udp(stream, peer, service, target, early_bytes)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                local = await trio.open_tcp_stream(target.host, target.port)
        except (OSError, trio.TooSlowError) as exc:
            await _refuse(stream, peer, service, f"service {service!r} at {target} unreachable: {exc or 'timeout'}")
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
        try:
            with self.stats[service].track(result, peer=peer):
                await pipe(local, stream, result, pending_to_local=early_bytes)
        finally:
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

    async def _serve_udp(self, stream: INetStream, peer: str, service: str, target: HostPort, early: bytes) -> None:
        try:
            sock = await open_service_socket(target)
        except OSError as exc:
            await _refuse(stream, peer, service, f"service {service!r} at {target}/udp unreachable: {exc}")
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
        try:
            with self.stats[service].track(result, peer=peer):
                await serve_datagrams(sock, stream, result, self.udp_idle, early)
        finally:
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


async def _refuse(stream: INetStream, peer: str, service: str | None, reason: str) -> None:
    log.warning("tunnel rejected", peer=peer, service=service, reason=reason)
    try:
        with trio.move_on_after(2):
            await stream.write(encode_response(TunnelResponse(False, reason)))
            await stream.close()
            return
    except Exception:
        pass
    await _reset(stream)


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
