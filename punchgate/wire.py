"""The tunnel protocol ``/punchgate/tunnel/1.0.0``, framing only (no I/O).

Wire format, compatible with the Rust original:

    client -> server   u32 big-endian length, then JSON {"service_name": "<name>"}
                       (+ "transport": "udp" for a UDP service; absent means TCP, so
                       peers that predate UDP see exactly the requests they know)
    server -> client   u32 big-endian length, then JSON {"accepted": true}
                       (+ "transport": "udp" when accepting a UDP request: a provider
                       that predates UDP accepts without it, and the client refuses that)
                       or {"accepted": false, "reason": "<text>"}
    then raw bytes both ways until each side half-closes (TCP), or datagrams (UDP):
    each one a u16 big-endian length and that many bytes (:func:`frame_datagram`,
    :class:`DatagramDecoder`), so that every datagram boundary survives the stream.

A message longer than :data:`MAX_MESSAGE_SIZE` is refused before its body is read.
:class:`FrameDecoder` takes bytes as they arrive and hands out one message plus any
bytes that followed it (they belong to the raw phase and must not be lost).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_ID = "/punchgate/tunnel/1.0.0"
MAX_MESSAGE_SIZE = 64 * 1024
_LENGTH = struct.Struct(">I")
TRANSPORTS = ("tcp", "udp")
MAX_DATAGRAM = 0xFFFF  # what a u16 length can say; covers every IPv4 and IPv6 UDP payload (65,507 / 65,527 B)
_DATAGRAM_LENGTH = struct.Struct(">H")


class WireError(ValueError):
    """A peer sent something that is not a valid tunnel protocol message."""


@dataclass(frozen=True)
class TunnelRequest:
    service_name: str
    transport: str = "tcp"


@dataclass(frozen=True)
class TunnelResponse:
    accepted: bool
    reason: str | None = None
    transport: str | None = None  # "udp" when a UDP request is accepted (an older provider would not say it)


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_SIZE:
        raise WireError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return _LENGTH.pack(len(body)) + body


def encode_request(service_name: str, transport: str = "tcp") -> bytes:
    if transport == "tcp":
        return encode({"service_name": service_name})  # byte for byte what the Rust original sends
    return encode({"service_name": service_name, "transport": transport})


def encode_response(response: TunnelResponse) -> bytes:
    if response.accepted:
        if response.transport not in (None, "tcp"):
            return encode({"accepted": True, "transport": response.transport})
        return encode({"accepted": True})
    return encode({"accepted": False, "reason": response.reason or "rejected"})


class FrameDecoder:
    """Accumulates bytes until one length-prefixed JSON message is complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_MESSAGE_SIZE:
                raise WireError(f"message length {length} exceeds {MAX_MESSAGE_SIZE}")

    def message(self) -> tuple[dict[str, Any], bytes] | None:
        """The decoded message and the bytes after it, or None if more bytes are needed."""
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_LENGTH.size : end])
        rest = bytes(self._buffer[end:])
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireError(f"message is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise WireError("message is not a JSON object")
        return value, rest


def parse_request(message: dict[str, Any]) -> TunnelRequest:
    name = message.get("service_name")
    if not isinstance(name, str) or not name:
        raise WireError("request has no service_name string")
    transport = message.get("transport", "tcp")
    if transport not in TRANSPORTS:
        raise WireError(f"request transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    return TunnelRequest(name, transport)


def parse_response(message: dict[str, Any]) -> TunnelResponse:
    accepted = message.get("accepted")
    if not isinstance(accepted, bool):
        raise WireError("response has no boolean 'accepted'")
    reason = message.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise WireError("response 'reason' is not a string")
    transport = message.get("transport")
    if transport is not None and not isinstance(transport, str):
        raise WireError("response 'transport' is not a string")
    return TunnelResponse(accepted, reason, transport)


# --- datagrams on a stream (UDP services) ---------------------------------------------


def frame_datagram(datagram: bytes) -> bytes:
    """One datagram as it goes on the stream: u16 big-endian length, then its bytes."""
    if len(datagram) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return _DATAGRAM_LENGTH.pack(len(datagram)) + datagram


class DatagramDecoder:
    """Cuts a byte stream back into the datagrams :func:`frame_datagram` framed.

    Every length a u16 can say is valid (0 included: UDP allows empty datagrams), so no
    input is an error; at most one incomplete frame (64 KiB + 2 B) is ever held.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the datagrams it completed, in order."""
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        start = 0
        size = len(buffer)
        while size - start >= 2:
            (length,) = _DATAGRAM_LENGTH.unpack_from(buffer, start)
            end = start + 2 + length
            if end > size:
                break
            out.append(bytes(buffer[start + 2 : end]))
            start = end
        if start:
            del buffer[:start]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)
