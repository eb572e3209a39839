"""The tunnel protocol ``/punchgate/tunnel/1.0.0``, framing only (no I/O).

Wire format, compatible with the Rust original:

    client -> server   u32 big-endian length, then JSON {"service_name": "<name>"}
    server -> client   u32 big-endian length, then JSON {"accepted": true}
                       or {"accepted": false, "reason": "<text>"}
    then raw bytes both ways until each side half-closes.

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


class WireError(ValueError):
    """A peer sent something that is not a valid tunnel protocol message."""


@dataclass(frozen=True)
class TunnelRequest:
    service_name: str


@dataclass(frozen=True)
class TunnelResponse:
    accepted: bool
    reason: str | None = None


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_SIZE:
        raise WireError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return _LENGTH.pack(len(body)) + body


def encode_request(service_name: str) -> bytes:
    return encode({"service_name": service_name})


def encode_response(response: TunnelResponse) -> bytes:
    if response.accepted:
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
    return TunnelRequest(name)


def parse_response(message: dict[str, Any]) -> TunnelResponse:
    accepted = message.get("accepted")
    if not isinstance(accepted, bool):
        raise WireError("response has no boolean 'accepted'")
    reason = message.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise WireError("response 'reason' is not a string")
    return TunnelResponse(accepted, reason)
