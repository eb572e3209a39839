"""The private-network key file: format, permissions, ``punchgate network-key new``, never logged."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys

import pytest

from punchgate.devtools.processes import PunchgateProcess, identity_path
from punchgate.netkey import HEADER, NetworkKeyError, create, decode, encode, fingerprint, load

KEY = bytes(range(32))
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def write_key(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_go_and_js_file_format_round_trips():
    assert encode(KEY) == f"{HEADER}\n/base16/\n{KEY.hex()}\n".encode()
    assert decode(encode(KEY)) == KEY
    # What tests/test_js_interop.py writes for js-libp2p (no final newline), and CRLF, upper case, base64.
    assert decode(f"{HEADER}\n/base16/\n{KEY.hex()}".encode()) == KEY
    assert decode(f"{HEADER}\r\n/base16/\r\n{KEY.hex().upper()}\r\n".encode()) == KEY
    assert decode(f"{HEADER}\n/base64/\n{base64.b64encode(KEY).decode()}\n".encode()) == KEY


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "does not start with"),
        ("/key/swarm/psk/2.0.0/\n/base16/\n" + "ab" * 32, "does not start with"),
        (f"{HEADER}\n/base16/\n", "must have 3 lines"),
        (f"{HEADER}\n/base16/\n{'ab' * 31}", "the third line must be 32 bytes as 64 hex digits"),
        (f"{HEADER}\n/base16/\n{'zz' * 32}", "the third line must be 32 bytes as 64 hex digits"),
        (f"{HEADER}\n/base16/\n0x{'ab' * 31}", "the third line must be 32 bytes"),
        (f"{HEADER}\n/bin/\n{'ab' * 32}", "encoding line must be /base16/"),
        (f"{HEADER}\n/base64/\n{'A' * 40}", "44 base64 characters"),
        (f"{HEADER}\n/base16/\n{'ab' * 32}\nmore", "must have 3 lines"),
    ],
)
def test_bad_files_say_what_is_wrong_without_quoting_the_key(text, needle):
    with pytest.raises(NetworkKeyError, match=needle) as info:
        decode(text.encode(), "network key file k")
    assert "ab" * 8 not in str(info.value) and "zz" * 8 not in str(info.value)


def test_binary_and_huge_files_are_refused():
    with pytest.raises(NetworkKeyError, match="not a text file"):
        decode(b"\xff\xfe" * 10)
    with pytest.raises(NetworkKeyError, match="larger than"):
        decode(b"a" * 5000)


def test_fingerprint_is_stable_short_and_reveals_no_key_bytes():
    assert fingerprint(KEY) == fingerprint(bytes(KEY)) != fingerprint(bytes(32))
    assert len(fingerprint(KEY)) == 16 and fingerprint(KEY) not in KEY.hex()


def test_create_is_0600_never_overwrites_and_loads_back(tmp_path):
    path = tmp_path / "sub" / "network.key"
    key = create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load(path) == key
    with pytest.raises(NetworkKeyError, match="already exists"):
        create(path)
    assert load(path) == key  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["network.key"]  # no temporary left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_others_can_read_is_refused_with_the_chmod_line(tmp_path, mode):
    path = write_key(tmp_path / "network.key", encode(KEY).decode(), mode)
    with pytest.raises(NetworkKeyError) as info:
        load(path)
    assert str(info.value).endswith(f"chmod 600 {path}")


def test_a_missing_key_says_how_to_make_one(tmp_path):
    with pytest.raises(NetworkKeyError, match="punchgate network-key new"):
        load(tmp_path / "absent.key")


def punchgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "punchgate", *args], capture_output=True, text=True, timeout=60)


def test_network_key_new_command(tmp_path):
    path = tmp_path / "network.key"
    made = punchgate("network-key", "new", str(path))
    assert made.returncode == 0, made.stderr
    key = load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.hex() not in made.stdout + made.stderr and fingerprint(key) in made.stdout  # nothing secret
    again = punchgate("network-key", "new", str(path))
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.splitlines()) == 1
    assert load(path) == key
    for bad in (["network-key"], ["network-key", "old", "x"], ["network-key", "new"], ["network-key", "new", "a", "b"]):
        result = punchgate(*bad)
        assert result.returncode == 2 and result.stderr.startswith("punchgate: error: usage:"), bad
    assert punchgate("network-key", "--help").returncode == 0


def test_node_refuses_to_start_with_an_exposed_key_in_one_line(tmp_path):
    path = tmp_path / "network.key"
    create(path)
    path.chmod(0o644)
    proc = PunchgateProcess("--identity", identity_path(tmp_path, "n"), "--listen", LOOPBACK, "--network-key", str(path))
    try:
        assert proc.proc.wait(timeout=60) == 1
        proc.drain()
        errors = [e for e in proc.events() if e.get("level") == "error"]
        assert [e["event"] for e in errors] == ["cannot start"]
        assert errors[0]["reason"].endswith(f"chmod 600 {path}")
    finally:
        proc.kill()


def test_a_running_node_never_logs_its_key(tmp_path):
    path = tmp_path / "network.key"
    key = create(path)
    proc = PunchgateProcess(
        "--identity", identity_path(tmp_path, "n"), "--network-key", str(path),
        "--listen", LOOPBACK, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--no-mdns",
        env={"PUNCHGATE_LOG": "debug"},
    )
    try:
        private = proc.wait_event("private network", timeout=60)
        proc.wait_event("phase transition", to_phase="ready")
        assert private["fingerprint"] == fingerprint(key)
        assert private["dropped_listen"] == ["/ip4/127.0.0.1/udp/0/quic-v1"] and "QUIC" in private["quic"]
        addresses = [e["address"] for e in proc.events() if e["event"] == "listening on"]
        assert addresses and all("/tcp/" in a for a in addresses)  # no QUIC listener
        code, _ = proc.terminate_and_wait(10)
        proc.drain()
    finally:
        proc.kill()
    assert code == 0
    text = "\n".join(proc.lines) + "".join(proc.stdout)
    for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1]):
        assert form not in text
    assert os.path.exists(path)


def test_a_private_node_needs_a_tcp_listen_address(tmp_path):
    from libp2p.crypto.ed25519 import create_new_key_pair

    from punchgate.config import parse_config
    from punchgate.runtime.node import Node

    create(tmp_path / "network.key")
    config = parse_config(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--network-key", str(tmp_path / "network.key")], {})
    with pytest.raises(NetworkKeyError, match="TCP only"):
        Node(config, create_new_key_pair())
