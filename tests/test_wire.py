"""Framing of /punchgate/tunnel/1.0.0: length-prefixed JSON, bounded, bytes after kept."""

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchgate.wire import (
    MAX_MESSAGE_SIZE,
    FrameDecoder,
    TunnelResponse,
    WireError,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)


def decode_all(data: bytes):
    decoder = FrameDecoder()
    decoder.feed(data)
    return decoder.message()


def test_request_bytes_match_the_rust_format():
    frame = encode_request("echo")
    body = b'{"service_name":"echo"}'
    assert frame == struct.pack(">I", len(body)) + body


def test_responses():
    assert json.loads(encode_response(TunnelResponse(True))[4:]) == {"accepted": True}
    rejected = json.loads(encode_response(TunnelResponse(False, "unknown service"))[4:])
    assert rejected == {"accepted": False, "reason": "unknown service"}
    assert parse_response({"accepted": False, "reason": "x"}) == TunnelResponse(False, "x")


@given(st.text(min_size=1, max_size=200), st.binary(max_size=300), st.integers(1, 50))
def test_decoder_handles_any_split_and_keeps_trailing_bytes(name, trailer, step):
    data = encode_request(name) + trailer
    decoder = FrameDecoder()
    result = None
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        result = decoder.message()
        if result is not None:
            # Whatever arrived after the frame so far must be handed back untouched.
            message, rest = result
            assert parse_request(message).service_name == name
            assert data.startswith(encode_request(name) + rest)
            break
    assert result is not None


def test_incomplete_frame_needs_more():
    assert decode_all(encode_request("echo")[:-1]) is None
    assert decode_all(b"\x00\x00") is None


def test_oversize_length_refused_before_the_body():
    with pytest.raises(WireError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_MESSAGE_SIZE + 1))
    with pytest.raises(WireError):
        encode_request("x" * (MAX_MESSAGE_SIZE + 1))


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"not json", b"[1,2]", b'"text"', b"{}", b'{"service_name": 5}'],
)
def test_bad_bodies(body):
    frame = struct.pack(">I", len(body)) + body
    with pytest.raises(WireError):
        message, _ = decode_all(frame)
        parse_request(message)


def test_bad_responses():
    for message in ({}, {"accepted": "yes"}, {"accepted": False, "reason": 3}):
        with pytest.raises(WireError):
            parse_response(message)
