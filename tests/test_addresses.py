"""What we advertise: wildcards expanded, loopback/link-local dropped, relay addresses added."""

from multiaddr import Multiaddr as M

from punchgate.runtime.addresses import advertised

IPS = ["127.0.0.1", "::1", "192.168.1.20", "fe80::1", "2001:db8::5", "10.0.0.7"]
RELAY = M("/ip4/203.0.113.9/tcp/4001/p2p/12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T/p2p-circuit")


def strs(addrs):
    return [str(a) for a in addrs]


def test_wildcards_expand_per_family_without_loopback_or_link_local():
    got = advertised([M("/ip4/0.0.0.0/tcp/4001"), M("/ip6/::/udp/4001/quic-v1")], IPS)
    assert strs(got) == [
        "/ip4/192.168.1.20/tcp/4001",
        "/ip4/10.0.0.7/tcp/4001",
        "/ip6/2001:db8::5/udp/4001/quic-v1",
    ]


def test_loopback_dropped_when_other_addresses_exist():
    got = advertised([M("/ip4/127.0.0.1/tcp/1"), M("/ip4/192.168.1.20/tcp/2")], IPS)
    assert strs(got) == ["/ip4/192.168.1.20/tcp/2"]


def test_loopback_only_node_keeps_its_loopback_addresses():
    got = advertised([M("/ip4/127.0.0.1/tcp/1"), M("/ip4/127.0.0.1/udp/1/quic-v1")], IPS)
    assert strs(got) == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/udp/1/quic-v1"]


def test_relay_addresses_are_added_once():
    got = advertised([M("/ip4/0.0.0.0/tcp/4001")], ["10.0.0.7"], [RELAY, RELAY])
    assert strs(got) == ["/ip4/10.0.0.7/tcp/4001", str(RELAY)]


def test_observed_public_address_is_kept():
    got = advertised([M("/ip4/10.0.0.7/tcp/4001"), M("/ip4/198.51.100.4/tcp/4001")], IPS)
    assert strs(got) == ["/ip4/10.0.0.7/tcp/4001", "/ip4/198.51.100.4/tcp/4001"]
