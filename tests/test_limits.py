"""The resource caps as pure counters: admission, token buckets, log throttling (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchgate.limits import (
    NODE_BUSY,
    TOO_FAST,
    TOO_MANY_STREAMS,
    ConnectionAdmission,
    LimitError,
    Limits,
    LogThrottle,
    StreamAdmission,
    TokenBucket,
    parse_limit,
    with_settings,
)

FAST = settings(max_examples=200, deadline=None)


def test_parse_limit():
    assert parse_limit("tunnel_sessions=10") == ("tunnel_sessions", 10)
    assert parse_limit("handshake-timeout=2.5") == ("handshake_timeout", 2.5)
    assert with_settings(Limits(), [("inbound_conns", 3)]).inbound_conns == 3
    for bad, needle in [
        ("nope=1", "is not a limit"),
        ("tunnel_sessions", "no '='"),
        ("tunnel_sessions=1.5", "an integer"),
        ("tunnel_sessions=0", "positive"),
        ("handshake_timeout=nan", "positive"),
        ("handshake_timeout=inf", "positive"),
        ("handshake_timeout=-1", "positive"),
    ]:
        with pytest.raises(LimitError, match=needle):
            parse_limit(bad)


@FAST
@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.lists(st.tuples(st.booleans(), st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"])), max_size=60),
)
def test_connection_admission_never_exceeds_its_caps(total, per_ip, steps):
    admission = ConnectionAdmission(total, per_ip)
    live: list[str] = []
    for opening, ip in steps:
        if opening:
            reason = admission.admit(ip)
            full = len(live) >= total or live.count(ip) >= per_ip
            assert (reason is not None) == full
            if reason is None:
                live.append(ip)
        elif ip in live:
            admission.release(ip)
            live.remove(ip)
        assert admission.total == len(live) <= total
        assert all(admission.by_ip[i] == live.count(i) <= per_ip for i in admission.by_ip)
        assert set(admission.by_ip) == set(live)  # nothing kept for IPs with no connection


def test_releasing_what_was_never_admitted_is_a_bug():
    with pytest.raises(ValueError):
        ConnectionAdmission(1, 1).release("10.0.0.1")


def test_token_bucket_rate_and_burst():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)  # one token per 0.1 s
    assert bucket.full(10.0) and bucket.tokens == 3  # never more than the burst


@FAST
@given(st.lists(st.floats(0, 0.5), max_size=80), st.floats(1, 50), st.integers(1, 10))
def test_token_bucket_never_admits_more_than_burst_plus_rate_times_time(gaps, rate, burst):
    bucket, now, taken = TokenBucket(rate, burst, 0.0), 0.0, 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
        assert taken <= burst + rate * now + 1e-9


def test_stream_admission_reasons():
    admission = StreamAdmission(per_peer=2, rate=100, burst=100, total=3)
    assert admission.admit("a", 0) is None and admission.admit("a", 0) is None
    assert admission.admit("a", 0) == TOO_MANY_STREAMS
    assert admission.admit("b", 0) is None
    assert admission.admit("c", 0) == NODE_BUSY
    admission.release("a")
    assert admission.admit("c", 0) is None
    slow = StreamAdmission(per_peer=100, rate=1, burst=2, total=100)
    assert [slow.admit("a", 0) for _ in range(3)] == [None, None, TOO_FAST]
    assert slow.admit("a", 1.0) is None


@FAST
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcde"), st.floats(0, 0.2)), max_size=120))
def test_stream_admission_counts_stay_true_and_bounded(steps):
    admission = StreamAdmission(per_peer=3, rate=20, burst=4, total=7)
    live: list[str] = []
    now = 0.0
    for opening, peer, gap in steps:
        now += gap
        if opening:
            if admission.admit(peer, now) is None:
                live.append(peer)
        elif peer in live:
            admission.release(peer)
            live.remove(peer)
        assert admission.total == len(live) <= 7
        assert all(admission.open[p] == live.count(p) <= 3 for p in admission.open)


def test_stream_admission_forgets_idle_peers():
    """A flood of identities that each open one stream and leave does not grow the state."""
    admission = StreamAdmission(per_peer=4, rate=10, burst=2, total=100)
    for i in range(10_000):
        peer = f"peer{i}"
        assert admission.admit(peer, i * 1.0) is None
        admission.release(peer)
    assert len(admission.buckets) <= 2 * len(admission.open) + 65 and not admission.open


def test_log_throttle_one_line_per_interval_with_a_count():
    throttle = LogThrottle(interval=10)
    assert throttle.allow("k", 0.0) == 0
    assert [throttle.allow("k", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert throttle.allow("other", 5.0) == 0
    assert throttle.allow("k", 10.0) == 3  # three lines held back since the last one


def test_log_throttle_keeps_bounded_state_under_many_keys():
    throttle = LogThrottle(interval=10)
    for i in range(5 * LogThrottle.MAX_KEYS):
        throttle.allow(f"peer{i}", 0.0)
    assert len(throttle._last) <= LogThrottle.MAX_KEYS
