"""Flag and environment parsing: good values become a Config, bad ones one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from punchgate.config import DEFAULT_LISTEN, UsageError, parse_config
from punchgate.limits import Limits
from punchgate.specs import HostPort, SpecError, parse_host_port, parse_tunnel

PEER = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"


def test_defaults():
    config = parse_config([], {})
    assert config.identity == Path("identity.key")
    assert [str(a) for a in config.listen] == list(DEFAULT_LISTEN)
    assert config.bootstrap == () and config.expose == () and config.tunnels == ()
    assert (config.log_format, config.log_level) == ("console", "info")


def test_every_flag_parses():
    config = parse_config(
        [
            "--identity", "/tmp/k.key",
            "--listen", "/ip4/127.0.0.1/tcp/4001",
            "--listen", "/ip6/::1/udp/4001/quic-v1",
            "--bootstrap", f"/ip4/192.0.2.1/tcp/4001/p2p/{PEER}",
            "--expose", "ssh=127.0.0.1:22",
            "--expose", "web=[::1]:8080",
            "--tunnel", f"{PEER}:ssh@127.0.0.1:2222",
            "--tunnel-by-name", "web@localhost:8080",
            "--log-format", "json",
        ],
        {"PUNCHGATE_LOG": "DEBUG"},
    )
    assert config.identity == Path("/tmp/k.key")
    assert len(config.listen) == 2 and len(config.bootstrap) == 1
    assert [(e.name, e.target) for e in config.expose] == [
        ("ssh", HostPort("127.0.0.1", 22)),
        ("web", HostPort("::1", 8080)),
    ]
    assert config.tunnels[0].peer_id == PEER and config.tunnels[0].bind == HostPort("127.0.0.1", 2222)
    assert config.tunnels_by_name[0].service == "web"
    assert (config.log_format, config.log_level) == ("json", "debug")


def test_mdns_on_by_default_and_off_by_flag_or_variable():
    assert parse_config([], {}).mdns is True
    assert parse_config(["--no-mdns"], {}).mdns is False
    assert parse_config([], {"PUNCHGATE_NO_MDNS": "true"}).mdns is False
    assert parse_config([], {"PUNCHGATE_NO_MDNS": "0"}).mdns is True
    assert parse_config(["--republish-interval", "60"], {}).republish_interval == 60.0


def test_port_mapping_on_by_default_and_off_by_flag_or_variable():
    assert parse_config([], {}).port_mapping is True
    assert parse_config(["--no-port-mapping"], {}).port_mapping is False
    assert parse_config([], {"PUNCHGATE_NO_PORT_MAPPING": "yes"}).port_mapping is False
    assert parse_config([], {"PUNCHGATE_NO_PORT_MAPPING": "false"}).port_mapping is True


def test_environment_lists_are_comma_separated_and_flags_win():
    env = {
        "PUNCHGATE_EXPOSE": "a=127.0.0.1:1, b=127.0.0.1:2",
        "PUNCHGATE_LISTEN": "/ip4/127.0.0.1/tcp/5000",
        "PUNCHGATE_LOG_FORMAT": "json",
    }
    config = parse_config([], env)
    assert [e.name for e in config.expose] == ["a", "b"]
    assert config.log_format == "json"
    config = parse_config(["--listen", "/ip4/127.0.0.1/tcp/6000"], env)
    assert [str(a) for a in config.listen] == ["/ip4/127.0.0.1/tcp/6000"]


@pytest.mark.parametrize(
    ("argv", "env", "flag"),
    [
        (["--listen", "/ip4/1.2.3/tcp/1"], {}, "--listen"),
        (["--listen", "/ip4/127.0.0.1/udp/1"], {}, "--listen"),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/1"], {}, "--bootstrap"),
        (["--expose", "ssh"], {}, "--expose"),
        (["--expose", "ssh=127.0.0.1:70000"], {}, "--expose"),
        (["--expose", "ssh=127.0.0.1:0"], {}, "--expose"),
        (["--expose", "bad name=127.0.0.1:22"], {}, "--expose"),
        (["--tunnel", "notapeer:ssh@127.0.0.1:2222"], {}, "--tunnel"),
        (["--tunnel", f"{PEER}ssh@127.0.0.1:2222"], {}, "--tunnel"),
        (["--tunnel-by-name", "ssh:2222"], {}, "--tunnel-by-name"),
        (["--expose", "a=127.0.0.1:1", "--expose", "a=127.0.0.1:2"], {}, "--expose"),
        (["--tunnel-by-name", "a@127.0.0.1:9", "--tunnel", f"{PEER}:b@127.0.0.1:9"], {}, "--tunnel"),
        (["--log-format", "xml"], {}, "--log-format"),
        ([], {"PUNCHGATE_LOG": "loud"}, "PUNCHGATE_LOG"),
        ([], {"PUNCHGATE_EXPOSE": "nope"}, "PUNCHGATE_EXPOSE"),
        (["--republish-interval", "0"], {}, "--republish-interval"),
        (["--republish-interval", "soon"], {}, "--republish-interval"),
        ([], {"PUNCHGATE_NO_MDNS": "maybe"}, "PUNCHGATE_NO_MDNS"),
        (["--expose", "dns=127.0.0.1:53/sctp"], {}, "--expose"),
        (["--tunnel-by-name", "dns@127.0.0.1:5353/"], {}, "--tunnel-by-name"),
        (["--tunnel-by-name", "a@127.0.0.1:9/udp", "--tunnel-by-name", "b@127.0.0.1:9/udp"], {}, "--tunnel"),
        (["--proxy", "127.0.0.1:9", "--tunnel-by-name", "b@127.0.0.1:9"], {}, "--tunnel"),
        (["--proxy", "localhost"], {}, "--proxy"),
        (["--udp-idle", "0.5"], {}, "--udp-idle"),
        ([], {"PUNCHGATE_NO_PORT_MAPPING": "maybe"}, "PUNCHGATE_NO_PORT_MAPPING"),
        (["--allow", "ssh"], {}, "--allow"),
        (["--allow", "ssh=somebody"], {}, "--allow"),
        (["--allow", f"ssh={PEER},"], {}, "--allow"),
        ([], {"PUNCHGATE_ALLOW": f"ssh={PEER};web"}, "PUNCHGATE_ALLOW"),
        (["--limit", "tunnel_sessions"], {}, "--limit"),
        (["--limit", "sessions=4"], {}, "--limit"),
        ([], {"PUNCHGATE_LIMIT": "handshake_timeout=0"}, "PUNCHGATE_LIMIT"),
    ],
)
def test_bad_values_name_the_flag_and_give_an_example(argv, env, flag):
    with pytest.raises(UsageError) as info:
        parse_config(argv, env)
    message = str(info.value)
    assert message.startswith(flag)
    assert "example:" in message
    assert "\n" not in message


def test_udp_suffix_proxy_and_udp_idle():
    config = parse_config(
        [
            "--expose", "dns=127.0.0.1:53/udp",
            "--expose", "web=127.0.0.1:80/tcp",
            "--tunnel", f"{PEER}:dns@127.0.0.1:5353/udp",
            "--tunnel-by-name", "dns@[::1]:5353/UDP",
            "--tunnel-by-name", "ssh@127.0.0.1:5353",  # the same port over TCP is another socket
            "--proxy", "127.0.0.1:1080",
            "--udp-idle", "5",
        ],
        {},
    )
    assert [(e.name, e.target, e.transport) for e in config.expose] == [
        ("dns", HostPort("127.0.0.1", 53), "udp"),
        ("web", HostPort("127.0.0.1", 80), "tcp"),
    ]
    assert (config.tunnels[0].bind, config.tunnels[0].transport) == (HostPort("127.0.0.1", 5353), "udp")
    assert [(t.bind, t.transport) for t in config.tunnels_by_name] == [
        (HostPort("::1", 5353), "udp"), (HostPort("127.0.0.1", 5353), "tcp"),
    ]
    assert config.proxy == HostPort("127.0.0.1", 1080) and config.udp_idle == 5.0
    defaults = parse_config([], {})
    assert defaults.proxy is None and defaults.udp_idle == 60.0
    assert parse_config([], {"PUNCHGATE_PROXY": "127.0.0.1:1081"}).proxy == HostPort("127.0.0.1", 1081)


def test_specs_reject_ambiguous_ipv6_and_accept_brackets():
    assert parse_host_port("[::1]:22") == HostPort("::1", 22)
    with pytest.raises(SpecError):
        parse_host_port("::1:22")
    assert parse_tunnel(f"{PEER}:ssh@[::1]:22").bind == HostPort("::1", 22)


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "punchgate", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_cli_bad_value_exits_2_with_one_line():
    result = run_cli("--expose", "ssh")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--expose" in lines[0] and "'ssh'" in lines[0] and "ssh=127.0.0.1:22" in lines[0]


def test_cli_unknown_flag_exits_2_with_one_line():
    result = run_cli("--bogus")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("punchgate ")


OTHER = "12D3KooWQGsb7e97Ueevd9QugKewJoAsstrwdw5c1hkxnuZbpPdV"


def test_access_control_flags_and_variables():
    config = parse_config(
        [
            "--allow", f"ssh={PEER},{OTHER}",
            "--allow", "web=*",
            "--allow-file", "/etc/punchgate/allow",
            "--network-key", "/etc/punchgate/network.key",
            "--limit", "tunnel_sessions=100",
            "--limit", "handshake_timeout=2.5",
        ],
        {},
    )
    assert config.allow == (("ssh", frozenset({PEER, OTHER})), ("web", frozenset({"*"})))
    assert config.allow_file == Path("/etc/punchgate/allow")
    assert config.network_key == Path("/etc/punchgate/network.key")
    assert (config.limits.tunnel_sessions, config.limits.handshake_timeout) == (100, 2.5)
    assert config.limits.inbound_conns == Limits().inbound_conns  # the others keep their defaults


def test_access_control_variables_allow_entries_are_separated_by_semicolons():
    env = {
        "PUNCHGATE_ALLOW": f"ssh={PEER},{OTHER}; web=* ;",
        "PUNCHGATE_ALLOW_FILE": "allow.txt",
        "PUNCHGATE_NETWORK_KEY": "net.key",
        "PUNCHGATE_LIMIT": "inbound_conns=10,inbound_conns_per_ip=2",
    }
    config = parse_config([], env)
    assert dict(config.allow) == {"ssh": frozenset({PEER, OTHER}), "web": frozenset({"*"})}
    assert (config.allow_file, config.network_key) == (Path("allow.txt"), Path("net.key"))
    assert (config.limits.inbound_conns, config.limits.inbound_conns_per_ip) == (10, 2)
    assert parse_config(["--allow", f"db={PEER}"], env).allow == (("db", frozenset({PEER})),)  # the flag wins


def test_no_access_control_by_default():
    config = parse_config([], {})
    assert (config.allow, config.allow_file, config.network_key, config.limits) == ((), None, None, Limits())


def test_help_lists_the_access_control_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--allow SERVICE=PEER_ID", "--allow-file PATH", "--network-key PATH", "--limit NAME=VALUE"):
        assert flag in result.stdout
