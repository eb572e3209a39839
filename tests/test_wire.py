"""Framing of /punchgate/tunnel/1.0.0: length-prefixed JSON, bounded, bytes after kept."""

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchgate.wire import (
    MAX_DATAGRAM,
    MAX_MESSAGE_SIZE,
    DatagramDecoder,
    FrameDecoder,
    TunnelRequest,
    TunnelResponse,
    WireError,
    encode_request,
    encode_response,
    frame_datagram,
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


# --- the transport field and datagram framing (UDP services) ---------------------------


def test_udp_request_carries_the_transport_and_tcp_stays_the_old_request():
    assert json.loads(encode_request("dns", "udp")[4:]) == {"service_name": "dns", "transport": "udp"}
    assert encode_request("ssh", "tcp") == encode_request("ssh")  # old peers see what they know
    assert parse_request({"service_name": "dns", "transport": "udp"}) == TunnelRequest("dns", "udp")
    assert parse_request({"service_name": "ssh"}) == TunnelRequest("ssh", "tcp")  # absent: TCP
    for bad in ("sctp", 17, None, ""):
        with pytest.raises(WireError, match="transport"):
            parse_request({"service_name": "dns", "transport": bad})


@given(
    st.lists(st.binary(max_size=300) | st.sampled_from([b"", b"\0" * MAX_DATAGRAM]), max_size=20),
    st.lists(st.integers(1, 70000), min_size=1, max_size=10),
)
def test_datagrams_survive_any_cut_of_the_stream(datagrams, cuts):
    stream = b"".join(frame_datagram(d) for d in datagrams)
    decoder = DatagramDecoder()
    out: list[bytes] = []
    at, i = 0, 0
    while at < len(stream):
        step = cuts[i % len(cuts)]
        out += decoder.feed(stream[at : at + step])
        at, i = at + step, i + 1
    assert out == datagrams
    assert decoder.pending == 0


def test_an_accepted_udp_request_says_so_and_tcp_answers_stay_the_old_ones():
    assert json.loads(encode_response(TunnelResponse(True, transport="udp"))[4:]) == {"accepted": True, "transport": "udp"}
    assert encode_response(TunnelResponse(True, transport="tcp")) == encode_response(TunnelResponse(True))
    assert parse_response({"accepted": True}).transport is None  # an older provider
    assert parse_response({"accepted": True, "transport": "udp"}).transport == "udp"
    with pytest.raises(WireError):
        parse_response({"accepted": True, "transport": 17})


def test_datagram_limits():
    assert frame_datagram(b"\0" * MAX_DATAGRAM)[:2] == b"\xff\xff"
    with pytest.raises(WireError, match="exceeds"):
        frame_datagram(b"\0" * (MAX_DATAGRAM + 1))
    decoder = DatagramDecoder()
    assert decoder.feed(b"\xff\xff" + b"x" * 100) == [] and decoder.pending == 102  # waits for the rest
