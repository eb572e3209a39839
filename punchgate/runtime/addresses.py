"""Which of our addresses we tell other peers about (identify, DHT provider records, mDNS).

py-libp2p advertises its listen addresses as they are, so a node listening on
``/ip4/0.0.0.0/tcp/4001`` tells the world to dial 0.0.0.0, and DCUtR then wastes
seconds dialing it. :class:`AddressBook` is installed as the host's ``addrs_factory``:

* a wildcard listen address becomes one address per interface IP of that family;
* loopback and link-local addresses are dropped, unless every listen address is
  loopback (a node told to listen on 127.0.0.1 is meant for this machine only);
* relay circuit addresses (``<relay>/p2p-circuit``) are added while we hold a
  reservation, so a node behind NAT can be reached through its relay;
* the address our router forwards to us (``Advertise.mapped``: NAT-PMP or UPnP, once a
  dial-back got through it) is added as it is;
* our own addresses are left out altogether while the state machine says they are not
  worth telling (``Advertise(direct=False)``: a node that joined through bootstrap peers
  and is not known to be reachable), except on a node that listens only on loopback
  (it is for this machine, where they always work). Peers on the same LAN still find
  them by mDNS, which announces the listen addresses themselves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

import ifaddr
import multiaddr

InterfaceIps = Callable[[], list[str]]


def interface_ips() -> list[str]:
    """Every IP address of every interface of this machine (IPv6 without scope)."""
    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            ips.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return ips


def _ip_of(addr: multiaddr.Multiaddr) -> tuple[str, str] | None:
    for family in ("ip4", "ip6"):
        try:
            return family, addr.value_for_protocol(family)
        except Exception:  # multiaddr raises its own lookup error for a missing protocol
            continue
    return None


def _is_unhelpful(ip: str) -> bool:
    parsed = ipaddress.ip_address(ip)
    return parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified


def is_unhelpful_addr(addr: multiaddr.Multiaddr) -> bool:
    """A loopback, link-local or wildcard address: no use to another machine."""
    found = _ip_of(addr)
    return found is not None and _is_unhelpful(found[1])


def is_unspecified_addr(addr: multiaddr.Multiaddr) -> bool:
    found = _ip_of(addr)
    return found is not None and ipaddress.ip_address(found[1]).is_unspecified


def advertised(
    candidates: Iterable[multiaddr.Multiaddr],
    ips: list[str],
    relay_addrs: Iterable[multiaddr.Multiaddr] = (),
) -> list[multiaddr.Multiaddr]:
    """The addresses to advertise, given the host's candidates and this machine's IPs."""
    candidates = list(candidates)
    located = [(addr, _ip_of(addr)) for addr in candidates]
    loopback_only = all(
        found is not None and ipaddress.ip_address(found[1]).is_loopback for _, found in located
    ) and bool(located)
    result: list[multiaddr.Multiaddr] = []

    def add(addr: multiaddr.Multiaddr) -> None:
        if addr not in result:
            result.append(addr)

    for addr, found in located:
        if found is None:
            add(addr)
            continue
        family, ip = found
        if ipaddress.ip_address(ip).is_unspecified:
            for local_ip in ips:
                version = ipaddress.ip_address(local_ip).version
                if (version == 4) != (family == "ip4") or _is_unhelpful(local_ip):
                    continue
                rest = str(addr).split("/", 3)[3]  # what follows /ipX/<ip>/
                add(multiaddr.Multiaddr(f"/{family}/{local_ip}/{rest}"))
        elif loopback_only or not _is_unhelpful(ip):
            add(addr)
    for addr in relay_addrs:
        add(addr)
    return result


class AddressBook:
    """The host's ``addrs_factory``; :attr:`relay_addrs` is kept up to date by the relay code."""

    def __init__(self, ips: InterfaceIps = interface_ips) -> None:
        self._ips = ips
        self.direct = True
        self.relay_addrs: list[multiaddr.Multiaddr] = []
        self.mapped_addrs: list[multiaddr.Multiaddr] = []

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        # A node that listens only on loopback is for this machine, where its addresses always work.
        show = self.direct or _loopback_only(candidates)
        return advertised(candidates if show else [], self._ips(), [*self.mapped_addrs, *self.relay_addrs])


def _loopback_only(candidates: list[multiaddr.Multiaddr]) -> bool:
    located = [_ip_of(addr) for addr in candidates]
    return bool(located) and all(found is not None and ipaddress.ip_address(found[1]).is_loopback for found in located)
