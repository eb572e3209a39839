"""The node's configuration, built from command-line flags and ``PUNCHGATE_*`` variables.

A flag given on the command line wins over its environment variable; list flags read
their variable as a comma-separated list. Every bad value becomes a :class:`UsageError`
naming the flag, the value and a correct example, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr

from punchgate import __version__
from punchgate.access import parse_allow_spec
from punchgate.limits import Limits, parse_limit, with_settings
from punchgate.specs import (
    ExposeSpec,
    HostPort,
    SpecError,
    TunnelByNameSpec,
    TunnelSpec,
    parse_bootstrap_addr,
    parse_expose,
    parse_host_port,
    parse_interval,
    parse_listen_addr,
    parse_tunnel,
    parse_tunnel_by_name,
)

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
EXAMPLE_PEER = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"


class UsageError(Exception):
    """A flag's value is unusable; ``str()`` is the one line shown to the user."""

    def __init__(self, flag: str, value: str, reason: str, example: str) -> None:
        self.flag = flag
        separator = "=" if flag.startswith("PUNCHGATE_") else " "
        super().__init__(f"{flag} {value!r}: {reason} (example: {flag}{separator}{example})")


@dataclass(frozen=True)
class Config:
    identity: Path = Path("identity.key")
    listen: tuple[multiaddr.Multiaddr, ...] = ()
    bootstrap: tuple[multiaddr.Multiaddr, ...] = ()
    expose: tuple[ExposeSpec, ...] = ()
    tunnels: tuple[TunnelSpec, ...] = ()
    tunnels_by_name: tuple[TunnelByNameSpec, ...] = ()
    log_format: str = "console"
    log_level: str = "info"
    mdns: bool = True
    republish_interval: float = 300.0
    connect_timeout: float = 30.0
    control_socket: Path | None = None  # None: no control socket (the CLI fills in the default)
    udp_idle: float = 60.0  # a UDP tunnel session without datagrams this long is closed
    proxy: HostPort | None = None  # the SOCKS5 + HTTP CONNECT entry to every name
    port_mapping: bool = True  # ask the router (NAT-PMP, UPnP) to forward a public port to us
    # access control (see punchgate/access.py and punchgate/limits.py)
    allow: tuple[tuple[str, frozenset[str]], ...] = ()
    allow_file: Path | None = None
    network_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = field(default=3.0, compare=False)

    def tunnel_binds(self) -> list[HostPort]:
        return [t.bind for t in self.tunnels] + [t.bind for t in self.tunnels_by_name]

    def local_binds(self) -> list[tuple[HostPort, str]]:
        """Every local socket the node binds for tunnels and the proxy, with its transport."""
        binds = [(t.bind, t.transport) for t in self.tunnels] + [(t.bind, t.transport) for t in self.tunnels_by_name]
        return binds + ([(self.proxy, "tcp")] if self.proxy is not None else [])


@dataclass(frozen=True)
class _Flag:
    name: str  # e.g. "--expose"
    env: str  # e.g. "PUNCHGATE_EXPOSE"
    example: str
    parse: Callable[[str], Any]
    repeatable: bool
    separator: str = ","  # between the entries of a repeatable flag's variable


FLAGS = (
    _Flag("--identity", "PUNCHGATE_IDENTITY", "/var/lib/punchgate/identity.key", Path, False),
    _Flag("--listen", "PUNCHGATE_LISTEN", "/ip4/0.0.0.0/tcp/4001", parse_listen_addr, True),
    _Flag(
        "--bootstrap",
        "PUNCHGATE_BOOTSTRAP",
        f"/ip4/203.0.113.7/tcp/4001/p2p/{EXAMPLE_PEER}",
        parse_bootstrap_addr,
        True,
    ),
    _Flag("--expose", "PUNCHGATE_EXPOSE", "ssh=127.0.0.1:22", parse_expose, True),
    _Flag("--tunnel", "PUNCHGATE_TUNNEL", f"{EXAMPLE_PEER}:ssh@127.0.0.1:2222", parse_tunnel, True),
    _Flag(
        "--tunnel-by-name", "PUNCHGATE_TUNNEL_BY_NAME", "ssh@127.0.0.1:2222", parse_tunnel_by_name, True
    ),
    _Flag("--log-format", "PUNCHGATE_LOG_FORMAT", "json", str, False),
    _Flag("--republish-interval", "PUNCHGATE_REPUBLISH_INTERVAL", "300", parse_interval, False),
    _Flag("--connect-timeout", "PUNCHGATE_CONNECT_TIMEOUT", "30", parse_interval, False),
    _Flag("--control-socket", "PUNCHGATE_CONTROL_SOCKET", "/run/user/1000/punchgate/control.sock", Path, False),
    _Flag("--allow", "PUNCHGATE_ALLOW", f"ssh={EXAMPLE_PEER}", parse_allow_spec, True, ";"),
    _Flag("--allow-file", "PUNCHGATE_ALLOW_FILE", "/etc/punchgate/allow", Path, False),
    _Flag("--network-key", "PUNCHGATE_NETWORK_KEY", "/etc/punchgate/network.key", Path, False),
    _Flag("--limit", "PUNCHGATE_LIMIT", "tunnel_streams_per_peer=16", parse_limit, True),
    _Flag("--udp-idle", "PUNCHGATE_UDP_IDLE", "60", parse_interval, False),
    _Flag("--proxy", "PUNCHGATE_PROXY", "127.0.0.1:1080", parse_host_port, False),
)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def _dest(flag: _Flag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other bad value)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


METAVARS = {
    "--identity": "PATH",
    "--listen": "MULTIADDR",
    "--bootstrap": "MULTIADDR",
    "--expose": "NAME=HOST:PORT[/udp]",
    "--tunnel": "PEER_ID:SERVICE@HOST:PORT[/udp]",
    "--tunnel-by-name": "SERVICE@HOST:PORT[/udp]",
    "--log-format": "console|json",
    "--republish-interval": "SECONDS",
    "--connect-timeout": "SECONDS",
    "--control-socket": "PATH",
    "--allow": "SERVICE=PEER_ID[,PEER_ID...]",
    "--allow-file": "PATH",
    "--network-key": "PATH",
    "--limit": "NAME=VALUE",
    "--udp-idle": "SECONDS",
    "--proxy": "HOST:PORT",
}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="punchgate",
        description="Peer-to-peer, NAT-traversing TCP tunnels over libp2p. Every flag also reads "
        "PUNCHGATE_<FLAG> (comma-separated for repeatable flags); PUNCHGATE_LOG sets the log level.",
        epilog="Service mode: punchgate up [these flags] | punchgate down | punchgate status [--json] | "
        "punchgate logs [-f] [-n N]; punchgate connect [PEER_ID:]SERVICE (each with --help).",
    )
    helps = {
        "--identity": "Ed25519 key file, created on first run (default identity.key)",
        "--listen": "multiaddr to listen on (repeatable; default TCP and QUIC on all interfaces)",
        "--bootstrap": "peer to dial at start, /ip4/…/tcp/…/p2p/ID (repeatable)",
        "--expose": "serve local service NAME=HOST:PORT to the mesh; /udp for a UDP service (repeatable)",
        "--tunnel": "forward local HOST:PORT to PEER_ID's SERVICE; /udp for UDP (repeatable)",
        "--tunnel-by-name": "forward local HOST:PORT to whoever provides SERVICE; /udp for UDP (repeatable)",
        "--log-format": "console (default) or json (one object per line)",
        "--republish-interval": "seconds between re-announcements of exposed services (default 300)",
        "--connect-timeout": "seconds a local connection waits for a peer and a path before it is"
        " closed (default 30)",
        "--control-socket": "Unix socket answering `punchgate status` (default: in the user's runtime directory)",
        "--allow": "only these peers may open SERVICE; * for every peer (repeatable; PUNCHGATE_ALLOW"
        " separates entries with ';'). With --allow or --allow-file, services without a list are closed",
        "--allow-file": "allowlist file, one 'SERVICE PEER_ID' per line, # comments; re-read on SIGHUP"
        " and when it changes",
        "--network-key": "private network key file (/key/swarm/psk/1.0.0/, mode 0600; make one with"
        " 'punchgate network-key new PATH'): only peers holding it can connect; turns QUIC off",
        "--limit": "change a resource cap, e.g. tunnel_sessions=1024 (repeatable; see README,"
        " Access control)",
        "--udp-idle": "seconds without a datagram after which a UDP tunnel session is closed (default 60)",
        "--proxy": "serve SOCKS5 and HTTP CONNECT on HOST:PORT: SERVICE.punchgate or SERVICE.PEER_ID.punchgate"
        " reach that service",
    }
    for flag in FLAGS:
        parser.add_argument(
            flag.name,
            dest=_dest(flag),
            action="append" if flag.repeatable else "store",
            metavar=METAVARS[flag.name],
            help=helps[flag.name],
        )
    parser.add_argument(
        "--no-mdns", action="store_true", default=None, help="do not look for peers on the LAN with mDNS"
    )
    parser.add_argument(
        "--no-port-mapping", action="store_true", default=None,
        help="do not ask the router (NAT-PMP, UPnP IGD) to forward a public port to this node",
    )
    parser.add_argument("--version", action="version", version=f"punchgate {__version__}")
    return parser


def _raw_values(flag: _Flag, given: Any, env: Mapping[str, str]) -> list[str]:
    if given is not None:
        return list(given) if flag.repeatable else [given]
    text = env.get(flag.env)
    if text is None or text.strip() == "":
        return []
    if flag.repeatable:
        return [part.strip() for part in text.split(flag.separator) if part.strip()]
    return [text.strip()]


def _parse_values(flag: _Flag, raw: list[str], source: str) -> list[Any]:
    values = []
    for text in raw:
        try:
            values.append(flag.parse(text))
        except SpecError as exc:
            raise UsageError(source, text, str(exc), flag.example) from None
    return values


def parse_config(argv: Sequence[str], env: Mapping[str, str]) -> Config:
    """Build a :class:`Config`; raise :class:`UsageError` for any bad value."""
    parser = build_arg_parser()
    args = parser.parse_args(list(argv))
    parsed: dict[str, list[Any]] = {}
    for flag in FLAGS:
        given = getattr(args, _dest(flag))
        source = flag.name if given is not None else flag.env
        parsed[_dest(flag)] = _parse_values(flag, _raw_values(flag, given, env), source)

    log_format = parsed["log_format"][0] if parsed["log_format"] else "console"
    if log_format not in LOG_FORMATS:
        raise UsageError("--log-format", log_format, "must be console or json", "json")
    log_level = env.get("PUNCHGATE_LOG", "info").strip().lower() or "info"
    if log_level not in LOG_LEVELS:
        raise UsageError("PUNCHGATE_LOG", log_level, f"must be one of {', '.join(LOG_LEVELS)}", "debug")

    no_mdns_env = env.get("PUNCHGATE_NO_MDNS", "").strip().lower()
    if no_mdns_env not in TRUE_WORDS + FALSE_WORDS:
        raise UsageError("PUNCHGATE_NO_MDNS", no_mdns_env, "must be true or false", "true")
    mdns = not (args.no_mdns or no_mdns_env in TRUE_WORDS)
    no_mapping_env = env.get("PUNCHGATE_NO_PORT_MAPPING", "").strip().lower()
    if no_mapping_env not in TRUE_WORDS + FALSE_WORDS:
        raise UsageError("PUNCHGATE_NO_PORT_MAPPING", no_mapping_env, "must be true or false", "true")
    port_mapping = not (args.no_port_mapping or no_mapping_env in TRUE_WORDS)

    listen = parsed["listen"] or [parse_listen_addr(a) for a in DEFAULT_LISTEN]
    config = Config(
        identity=parsed["identity"][0] if parsed["identity"] else Path("identity.key"),
        listen=tuple(listen),
        bootstrap=tuple(parsed["bootstrap"]),
        expose=tuple(parsed["expose"]),
        tunnels=tuple(parsed["tunnel"]),
        tunnels_by_name=tuple(parsed["tunnel_by_name"]),
        log_format=log_format,
        log_level=log_level,
        mdns=mdns,
        republish_interval=parsed["republish_interval"][0] if parsed["republish_interval"] else 300.0,
        connect_timeout=parsed["connect_timeout"][0] if parsed["connect_timeout"] else 30.0,
        control_socket=parsed["control_socket"][0] if parsed["control_socket"] else None,
        udp_idle=parsed["udp_idle"][0] if parsed["udp_idle"] else 60.0,
        proxy=parsed["proxy"][0] if parsed["proxy"] else None,
        port_mapping=port_mapping,
        allow=tuple(parsed["allow"]),
        allow_file=parsed["allow_file"][0] if parsed["allow_file"] else None,
        network_key=parsed["network_key"][0] if parsed["network_key"] else None,
        limits=with_settings(Limits(), parsed["limit"]),
    )
    _check_unique(config)
    return config


def _check_unique(config: Config) -> None:
    seen_names: set[str] = set()
    for spec in config.expose:
        if spec.name in seen_names:
            raise UsageError(
                "--expose",
                f"{spec.name}={spec.target}",
                f"service name {spec.name!r} is exposed twice",
                "ssh=127.0.0.1:22 --expose web=127.0.0.1:8080",
            )
        seen_names.add(spec.name)
    seen_binds: set[tuple[HostPort, str]] = set()
    for bind, transport in config.local_binds():
        if (bind, transport) in seen_binds:
            shown = str(bind) + ("/udp" if transport == "udp" else "")
            raise UsageError(
                "--tunnel",
                shown,
                f"two tunnels (or a tunnel and --proxy) bind {shown}",
                "ssh@127.0.0.1:2222 --tunnel-by-name web@127.0.0.1:8080",
            )
        seen_binds.add((bind, transport))
