"""Asking our router to forward a public TCP port to each of our listen ports.

Two protocols, tried in this order (the state machine decides when; this module only asks):

* **NAT-PMP** (RFC 6886), spoken here over trio UDP: requests go to port 5351 of the
  default route's gateway (``/proc/net/route``), are sent again after 0.25, 0.5 and 1 s
  when nothing answers, and end at once when the gateway refuses the datagram (ICMP port
  unreachable: no NAT-PMP there). Opcode 0 asks the external address; opcode 2 maps a
  TCP port for a lifetime, and lifetime 0 deletes the mapping of an internal port.
  Decision: our own client rather than the PyPI packages (``NAT-PMP``, ``py-natpmp``,
  both forks of one 2013 library): they use blocking sockets, so every call would need a
  worker thread, and their retry schedule (the RFC's, up to 64 s) cannot be bounded by
  a cancel scope; the protocol is two fixed-size messages.
* **UPnP IGD** through ``miniupnpc`` (a py-libp2p dependency; its wrapper
  ``libp2p/discovery/upnp`` maps external port = internal port with no lease and gives
  no lease to renew, so we call the module ourselves): SSDP discovery (1.5 s), the
  gateway's external address, ``AddPortMapping`` with a lease. Its calls block, so each
  runs in a worker thread under the caller's cancel scope (abandoned if cancelled; one
  call at a time, behind a lock). A port another host holds (718 ConflictInMappingEntry)
  is asked for again as a random high port; a router that takes only permanent mappings
  (725) gets one, removed at shutdown like the others.

The external port asked for is not the listen port but one derived from our peer ID and
the listen port (20000-59999, the same after a restart). Decision: two hosts of one LAN
listening on the same port then ask for different ports, and a check of our own listen
port (is ``<our public IP>:<listen port>`` reachable?) stays a different question from
the check of the mapping: with equal ports the mapping would answer both.

A mapping whose external address is private (another NAT in front of the router) is
refused here: nobody outside could use it. Whether the router really forwards is not
this module's business: the machine has a peer dial the mapped address before it is
advertised.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import random
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import multiaddr
import trio

from punchgate.specs import transport_of

NATPMP_PORT = 5351
NATPMP_WAITS = (0.25, 0.5, 1.0)  # a request is sent again after each wait without an answer
UPNP_DISCOVER_MS = 1500  # SSDP: how long miniupnpc collects answers
UPNP_CALL_TIMEOUT = 6.0  # one miniupnpc call (its HTTP requests have their own, longer, timeouts)
LEASE = 3600  # seconds asked for; renewed half-way (the machine decides when)
DESCRIPTION = "punchgate"
RANDOM_PORTS = (20000, 60000)  # where to look when the wanted external port is taken
TCP = 2  # NAT-PMP opcode: map TCP (1 is UDP); the answer's opcode is 128 + this

NATPMP_RESULTS = {
    1: "unsupported version",
    2: "not authorized (port mapping is turned off on the router)",
    3: "network failure (the router has no external address)",
    4: "out of resources (no port left)",
    5: "unsupported opcode",
}

T = TypeVar("T")


class PortMappingError(Exception):
    """No mapping: ``silent`` when nothing answered at all (no port-mapping gateway here)."""

    def __init__(self, reason: str, silent: bool = False) -> None:
        super().__init__(reason)
        self.silent = silent


@dataclass
class Mapping:
    method: str  # "natpmp" or "upnp"
    gateway: str  # the router's address (LAN side)
    external_ip: str
    ports: dict[int, int]  # internal (listen) port -> external port
    lease: int  # seconds; 0: until removed


def default_gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 gateway of the default route (Linux), or None."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:  # not Linux, or no /proc
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def mappable_ports(addrs: Iterable[multiaddr.Multiaddr]) -> list[int]:
    """The TCP ports among ``addrs`` worth mapping: not bound to a loopback address."""
    ports: list[int] = []
    for addr in addrs:
        if transport_of(addr) != "tcp":
            continue
        try:
            ip = addr.value_for_protocol("ip4")
        except Exception:  # not IPv4: NAT-PMP and IGD v1 map IPv4 only
            continue
        port = int(addr.value_for_protocol("tcp"))
        if not ipaddress.ip_address(ip).is_loopback and port not in ports:
            ports.append(port)
    return ports


def wanted_port(seed: str, internal: int) -> int:
    """The external port to ask for ``internal``: stable for one node, never ``internal``."""
    span = RANDOM_PORTS[1] - RANDOM_PORTS[0]
    digest = hashlib.sha256(f"{seed}/{internal}".encode()).digest()
    port = RANDOM_PORTS[0] + int.from_bytes(digest[:4], "big") % span
    return port + 1 if port == internal else port


def _check_external(ip: str) -> str:
    parsed = ipaddress.ip_address(ip)
    if parsed.is_unspecified:
        raise PortMappingError("the router has no external address")
    if parsed.is_private:
        raise PortMappingError(f"the router's external address {ip} is private: another NAT is in front of it")
    return ip


# --- NAT-PMP -----------------------------------------------------------------------------


class NatPmp:
    """A NAT-PMP client for one gateway."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway

    async def _ask(self, request: bytes, size: int, valid: Callable[[bytes], bool]) -> bytes:
        """Send ``request`` until an answer of ``size`` bytes that ``valid`` accepts comes back."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.connect((self.gateway, NATPMP_PORT))  # answers from elsewhere are dropped
            for wait in NATPMP_WAITS:
                await sock.send(request)
                with trio.move_on_after(wait):
                    while True:
                        try:
                            answer = await sock.recv(64)
                        except ConnectionRefusedError:
                            raise PortMappingError(f"NAT-PMP: {self.gateway} refused (none there)", silent=True) from None
                        except OSError as exc:
                            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                                raise PortMappingError(f"NAT-PMP: {self.gateway} unreachable", silent=True) from None
                            raise
                        if len(answer) >= size and answer[0] == 0 and answer[1] == request[1] + 128 and valid(answer):
                            result = struct.unpack_from("!H", answer, 2)[0]
                            if result:
                                text = NATPMP_RESULTS.get(result, f"result {result}")
                                raise PortMappingError(f"NAT-PMP: {self.gateway} answered {text}")
                            return answer
        raise PortMappingError(f"NAT-PMP: no answer from {self.gateway}", silent=True)

    async def external_ip(self) -> str:
        answer = await self._ask(b"\x00\x00", 12, lambda a: True)
        return socket.inet_ntoa(answer[8:12])

    async def map_tcp(self, internal: int, suggested: int, lifetime: int) -> tuple[int, int]:
        """Map ``internal`` (``lifetime`` 0: delete its mapping); the external port and lifetime granted."""
        request = struct.pack("!BBHHHI", 0, TCP, 0, internal, suggested, lifetime)
        answer = await self._ask(request, 16, lambda a: struct.unpack_from("!H", a, 8)[0] == internal)
        _, external, granted = struct.unpack_from("!HHI", answer, 8)
        return external, granted

    async def map(self, ports: list[int], wanted: dict[int, int], lease: int) -> Mapping:
        ip = _check_external(await self.external_ip())
        granted: dict[int, int] = {}
        lifetime = lease
        for internal in ports:
            external, given = await self.map_tcp(internal, wanted[internal], lease)
            if external == 0 or given == 0:
                raise PortMappingError(f"NAT-PMP: {self.gateway} granted no port for {internal}")
            granted[internal] = external
            lifetime = min(lifetime, given)
        return Mapping("natpmp", self.gateway, ip, granted, lifetime)

    async def unmap(self, ports: Iterable[int]) -> None:
        for internal in ports:
            await self.map_tcp(internal, 0, 0)


# --- UPnP IGD ------------------------------------------------------------------------------


@dataclass
class Upnp:
    """UPnP IGD through miniupnpc; every call blocks, so each runs in a worker thread."""

    _gateway: object | None = None  # a miniupnpc.UPnP whose IGD was selected
    _host: str = ""  # that IGD's address (from its control URL)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def _in_thread(self, call: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return call()

        with trio.fail_after(UPNP_CALL_TIMEOUT * 3):
            return await trio.to_thread.run_sync(locked, abandon_on_cancel=True)

    def _discover(self) -> object:
        import miniupnpc

        gateway = miniupnpc.UPnP(discoverdelay=UPNP_DISCOVER_MS)
        try:
            found = gateway.discover()
        except Exception as exc:  # miniupnpc raises plain Exceptions with the C library's text
            raise PortMappingError(f"UPnP: no device answered ({exc})", silent=True) from None
        if not found:
            raise PortMappingError("UPnP: no device answered", silent=True)
        try:
            control_url = gateway.selectigd()
        except Exception as exc:
            raise PortMappingError(f"UPnP: none of {found} devices is an internet gateway ({exc})") from None
        self._host = urllib.parse.urlsplit(str(control_url)).hostname or ""
        return gateway

    def _map(self, ports: list[int], wanted: dict[int, int], lease: int) -> Mapping:
        fresh = self._gateway is None
        gateway = self._gateway or self._discover()
        try:
            ip = gateway.externalipaddress()  # type: ignore[attr-defined]
        except Exception as exc:
            self._gateway = None
            if not fresh:  # the router may have restarted elsewhere: look for it again
                return self._map(ports, wanted, lease)
            raise PortMappingError(f"UPnP: no external address ({exc})") from None
        _check_external(str(ip or "0.0.0.0"))
        granted: dict[int, int] = {}
        for internal in ports:
            choices = [wanted[internal], *(random.randint(*RANDOM_PORTS) for _ in range(2))]
            for external in dict.fromkeys(choices):
                try:
                    gateway.addportmapping(  # type: ignore[attr-defined]
                        external, "TCP", gateway.lanaddr, internal, DESCRIPTION, "", lease  # type: ignore[attr-defined]
                    )
                except Exception as exc:
                    text = str(exc)
                    if "OnlyPermanentLeasesSupported" in text and lease:
                        lease = 0  # this router keeps mappings until removed: we remove ours at shutdown
                        gateway.addportmapping(  # type: ignore[attr-defined]
                            external, "TCP", gateway.lanaddr, internal, DESCRIPTION, "", 0  # type: ignore[attr-defined]
                        )
                    elif "Conflict" in text:  # another host holds this external port
                        continue
                    else:
                        raise PortMappingError(f"UPnP: the gateway refused the mapping of {internal} ({text})") from None
                granted[internal] = external
                break
            else:
                raise PortMappingError(f"UPnP: every external port asked for {internal} is taken")
        self._gateway = gateway
        return Mapping("upnp", self._host, str(ip), granted, lease)

    async def map(self, ports: list[int], wanted: dict[int, int], lease: int) -> Mapping:
        return await self._in_thread(lambda: self._map(ports, wanted, lease))

    async def unmap(self, external_ports: Iterable[int]) -> None:
        gateway = self._gateway
        if gateway is None:
            return
        ports = list(external_ports)

        def remove() -> None:
            for port in ports:
                try:
                    gateway.deleteportmapping(port, "TCP")  # type: ignore[attr-defined]
                except Exception:  # not there (any more): nothing to remove
                    continue

        await self._in_thread(remove)


# --- both -------------------------------------------------------------------------------


@dataclass
class PortMapper:
    """Maps our listen ports with whichever protocol the gateway speaks; remembers what
    it asked for, so that :meth:`unmap` removes it (also after a cancelled attempt)."""

    seed: str = ""  # our peer ID: which external ports we ask for
    route_table: Path = Path("/proc/net/route")
    mapping: Mapping | None = None
    upnp: Upnp = field(default_factory=Upnp)
    _asked: dict[str, list[int]] = field(default_factory=dict)  # method -> internal ports asked for

    async def map(self, ports: list[int], lease: int = LEASE) -> Mapping:
        if not ports:
            raise PortMappingError("no TCP listen port to map (listening on loopback only?)")
        gateway = default_gateway(self.route_table)
        previous = self.mapping.ports if self.mapping else {}  # a renewal asks for the same ports
        wanted = {port: previous.get(port) or wanted_port(self.seed, port) for port in ports}
        methods = ["natpmp", "upnp"]
        if self.mapping is not None and self.mapping.method == "upnp":
            methods.reverse()  # a renewal asks the gateway that granted the mapping first
        errors: list[PortMappingError] = []
        for method in methods:
            self._asked[method] = list(ports)
            try:
                if method == "natpmp":
                    if gateway is None:
                        raise PortMappingError("NAT-PMP: no default gateway", silent=True)
                    mapping = await NatPmp(gateway).map(ports, wanted, lease)
                else:
                    mapping = await self.upnp.map(ports, wanted, lease)
            except PortMappingError as exc:
                errors.append(exc)
                continue
            except (OSError, trio.TooSlowError) as exc:
                errors.append(PortMappingError(f"{method}: {type(exc).__name__}: {exc}"))
                continue
            self.mapping = mapping
            return mapping
        self.mapping = None
        detail = "; ".join(str(e) for e in errors)
        if all(e.silent for e in errors):
            raise PortMappingError(f"no port-mapping gateway answered ({detail})", silent=True)
        raise PortMappingError(detail)

    async def unmap(self) -> Mapping | None:
        """Remove what we mapped (or may have: an attempt cut short); the mapping removed, if known."""
        mapping, self.mapping = self.mapping, None
        asked, self._asked = self._asked, {}
        gateway = mapping.gateway if mapping and mapping.method == "natpmp" else default_gateway(self.route_table)
        if (mapping is None or mapping.method == "natpmp") and "natpmp" in asked and gateway is not None:
            try:
                await NatPmp(gateway).unmap(mapping.ports if mapping else asked["natpmp"])
            except PortMappingError:
                pass  # nothing there to delete
        if (mapping is None or mapping.method == "upnp") and "upnp" in asked:
            await self.upnp.unmap(mapping.ports.values() if mapping else asked["upnp"])
        return mapping
