"""A router that offers port mapping, for the namespace lab: miniupnpd on ``rtra``.

Debian's ``miniupnpd`` (2.3, nftables backend), configured and started by a test inside
router A's namespace of a :class:`~punchgate.devtools.natlab.NatLab`, stopped by PID:

* **its tables.** miniupnpd adds its DNAT rules to chains it does not create: a table
  ``inet miniupnpd`` here, with base chains hooked at nat prerouting and postrouting that
  jump to its chains, and its filter chain (``miniupnpd``) left unhooked. Whether a
  forwarded connection passes is the lab's iptables FORWARD chain's decision (policy
  DROP): ``forward=True`` adds the rule a home router has, accepting connections that
  conntrack says were DNATed; without it the router grants mappings and forwards
  nothing (a router that lies). iptables here is the nf_tables variant: both live in the
  kernel's nftables, and a packet must pass every base chain of its hook.
* **its external address.** miniupnpd refuses to map when its WAN address is a reserved
  one, and the lab's "internet" is 100.64.0.0/24 (RFC 6598 shared space). With
  ``ext_perform_stun`` it asks a STUN server instead, and maps when the answer shows no
  NAT in front of it. :func:`serve_stun` (RFC 5389 Binding answers with the sender's
  address) runs for it on ``pub``: router A's WAN address is, in the lab, public.
* **the rest of its configuration**: its own file in the test's directory, listening
  on the LAN, NAT-PMP and UPnP IGD each on or off, ``secure_mode`` (a host maps only to
  itself), LAN hosts allowed ports 1024-65535, nobody else anything.

``python -m punchgate.devtools.upnplab stun HOST PORT SECONDS`` runs the STUN responder.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from punchgate.devtools.natlab import NatLab

STUN_PORT = 3478
MAGIC_COOKIE = 0x2112A442
TABLE = "miniupnpd"  # our nftables table for miniupnpd's chains (family inet)
NFT_SETUP = f"""
table inet {TABLE} {{
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }}
    chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
    chain miniupnpd {{ }}
}}
"""


def stun_answer(request: bytes, sender: tuple[str, int]) -> bytes | None:
    """The Binding success response to ``request`` from ``sender`` (None: not a Binding request).

    It carries XOR-MAPPED-ADDRESS (RFC 5389) and MAPPED-ADDRESS (RFC 3489); a
    CHANGE-REQUEST is answered from the same address (this server has only one)."""
    if len(request) < 20 or request[0:2] != b"\x00\x01":
        return None
    cookie, transaction = request[4:8], request[8:20]
    ip = socket.inet_aton(sender[0])
    port = sender[1]
    xor_ip = struct.pack("!I", struct.unpack("!I", ip)[0] ^ MAGIC_COOKIE)
    xor = struct.pack("!HHBBH", 0x0020, 8, 0, 1, port ^ (MAGIC_COOKIE >> 16)) + xor_ip
    plain = struct.pack("!HHBBH", 0x0001, 8, 0, 1, port) + ip
    body = xor + plain
    return struct.pack("!HH", 0x0101, len(body)) + cookie + transaction + body


def serve_stun(host: str, port: int, seconds: float) -> None:
    """Answer Binding requests on HOST:PORT/udp for at most SECONDS (then exit)."""
    end = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        print(f"stun listening on {host}:{port}", flush=True)
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                request, sender = sock.recvfrom(2048)
            except TimeoutError:
                break
            answer = stun_answer(request, sender)
            if answer is not None:
                sock.sendto(answer, sender)
                print(f"stun answered {sender[0]}:{sender[1]}", flush=True)


class PortMappingRouter:
    """miniupnpd on the lab's router A (and the STUN responder on pub), until :meth:`stop`."""

    def __init__(self, lab: NatLab, workdir: Path, *, natpmp: bool = True, upnp: bool = True,
                 forward: bool = True) -> None:
        self.lab = lab
        self.workdir = workdir
        self.natpmp = natpmp
        self.upnp = upnp
        self.forward = forward
        self.proc: subprocess.Popen | None = None
        self.stun: subprocess.Popen | None = None
        env = lab.env
        self.lan_net = env["LANA_NET"]
        self.forward_rule = ["FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"]

    def run(self, *command: str, role: str = "rtra", check: bool = True, stdin: str | None = None) -> str:
        result = subprocess.run([*self.lab.wrap(role), *command], input=stdin, capture_output=True, text=True,
                                timeout=30, check=False)
        if check and result.returncode != 0:
            raise self.lab.failure(f"{' '.join(command)} in {role}: {result.stderr.strip()}")
        return result.stdout

    def config(self) -> str:
        env = self.lab.env
        return "\n".join([
            "ext_ifname=wan",
            "listening_ip=lan",
            "port=0",
            f"enable_natpmp={'yes' if self.natpmp else 'no'}",
            f"enable_upnp={'yes' if self.upnp else 'no'}",
            "secure_mode=yes",
            "system_uptime=no",
            f"uuid={uuid.uuid4()}",
            "ext_perform_stun=yes",
            f"ext_stun_host={env['PUB_IP']}",
            f"ext_stun_port={STUN_PORT}",
            f"upnp_table_name={TABLE}",
            f"upnp_nat_table_name={TABLE}",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            f"lease_file={self.workdir / 'miniupnpd.leases'}",
            f"allow 1024-65535 {self.lan_net} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ])

    def start(self, timeout: float = 20) -> None:
        """STUN responder on pub, miniupnpd's tables and config, miniupnpd in rtra (until it listens)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stun, stun_out = self.lab.helper(
            "stun responder", "pub", sys.executable, "-m", "punchgate.devtools.upnplab", "stun",
            self.lab.env["PUB_IP"], str(STUN_PORT), "600",
        )
        stun_out.wait(lambda line: "stun listening" in line, timeout, "STUN responder start")
        self.run("nft", "-f", "-", stdin=NFT_SETUP)
        if self.forward:
            self.run("iptables", "-w", "-I", *self.forward_rule)
        conf = self.workdir / "miniupnpd.conf"
        conf.write_text(self.config())
        self.proc, out = self.lab.helper(
            "miniupnpd", "rtra", "miniupnpd", "-d", "-f", str(conf), "-P", str(self.workdir / "miniupnpd.pid")
        )
        out.wait(lambda line: "Port forwarding is now enabled" in line, timeout, "miniupnpd: STUN says mapping works")
        ready = "Listening for NAT-PMP" if self.natpmp else "HTTP listening on port"
        out.wait(lambda line: ready in line, timeout, "miniupnpd listening")

    def redirects(self) -> list[tuple[int, str, int]]:
        """The router's port forwardings now: (external port, internal IP, internal port)."""
        listing = self.run("nft", "list", "chain", "inet", TABLE, "prerouting_miniupnpd")
        # nft 1.0.6 prints miniupnpd's match on the IP protocol byte: "@nh,72,8 0x6 th dport N"
        found = re.findall(r"(?:tcp|0x6 th) dport (\d+) dnat ip to ([\d.]+):(\d+)", listing)
        return [(int(e), ip, int(i)) for e, ip, i in found]

    def remove(self) -> None:
        """Take away miniupnpd's table and our forwarding rule (after :meth:`stop`), so that
        another router can be set up in the same lab."""
        self.run("nft", "delete", "table", "inet", TABLE, check=False)
        if self.forward:
            self.run("iptables", "-w", "-D", *self.forward_rule, check=False)

    def stop(self) -> None:
        """miniupnpd and the STUN responder by PID (SIGTERM, then SIGKILL)."""
        for proc in (self.proc, self.stun):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "stun":
        sys.exit("usage: python -m punchgate.devtools.upnplab stun HOST PORT SECONDS")
    serve_stun(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
