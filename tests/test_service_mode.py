"""Service mode: `punchgate up/down/status/logs`.

Linux against the real thing: a Podman container running systemd as PID 1, a user with
lingering on, `systemctl --user` and journald. macOS cannot run here: the plist is
rendered and read back with plistlib, and the launchctl calls are checked against a
recording stand-in.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from punchgate.devtools.podman import Container, build_images, skip_or_fail_without_podman, wait_for
from punchgate.service import Launchd, SystemdUser, manager_for, parse_env_file, up

USER = "u1"

# Inside the container: send SIZE random bytes to 127.0.0.1:PORT, half-close, read to EOF.
ECHO_CHECK = r"""
import hashlib, json, os, socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
s = socket.create_connection(("127.0.0.1", port), timeout=20)
s.settimeout(20)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = bytearray()
while data := s.recv(65536):
    got += data
print(json.dumps({"ok": hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), "got": len(got)}))
"""
ECHO_SERVER = (
    "import time\nfrom punchgate.devtools.echo import EchoServer\n"
    "with EchoServer('127.0.0.1', 7777):\n    time.sleep(3600)\n"
)
PAYLOAD = 256 * 1024


def punchgate_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "punchgate", *args], capture_output=True, text=True, timeout=60, env=env
    )


# ---------------------------------------------------------------- Linux, real systemd


class UserSession:
    """Commands run as USER in the container, with the environment a login would give."""

    def __init__(self, box: Container, uid: int) -> None:
        self.box = box
        # (the image sets PUNCHGATE_CONTROL_SOCKET for its own node; a login has no such variable)
        self.env = {"XDG_RUNTIME_DIR": f"/run/user/{uid}", "HOME": f"/home/{USER}", "PUNCHGATE_CONTROL_SOCKET": ""}

    def run(self, *command: str, check: bool = False, timeout: float = 60, env: dict | None = None):
        return self.box.exec(*command, user=USER, env={**self.env, **(env or {})}, check=check, timeout=timeout)

    def status(self) -> dict:
        done = self.run("punchgate", "status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path).returncode == 0


def echo_through(box: Container, port: int) -> dict:
    done = box.exec("python3", "-c", ECHO_CHECK, str(port), str(PAYLOAD), check=False, timeout=60)
    result = json.loads(done.stdout) if done.returncode == 0 else {"ok": False, "error": done.stderr[-300:]}
    return result


@pytest.mark.slow
def test_up_update_logs_reboot_down_with_systemd_user_manager():
    skip_or_fail_without_podman()
    image = build_images().systemd
    # --network=none: the container has only its own loopback; every byte stays inside it.
    args = ["--systemd=always", "--network=none", "--user=root", "--entrypoint=/sbin/init"]
    with Container(image, "systemd", args=args) as box:
        wait_for("systemd to boot", lambda: box.exec("systemctl", "is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), timeout=90)
        box.exec("useradd", "--create-home", "--shell", "/bin/bash", USER)
        box.exec("loginctl", "enable-linger", USER)
        uid = int(box.exec("id", "-u", USER).stdout)
        user = UserSession(box, uid)
        wait_for("the user manager", lambda: user.run("systemctl", "--user", "is-system-running").stdout.strip()
                 in ("running", "degraded"), timeout=60)
        env_file = f"/home/{USER}/.config/punchgate/punchgate.env"
        unit_file = f"/home/{USER}/.config/systemd/user/punchgate.service"

        # Bad usage and an unreachable user manager: one line, nothing written.
        done = user.run("punchgate", "up", "--expose", "ssh")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "--expose 'ssh'" in done.stderr
        done = user.run("punchgate", "up", "--no-mdns", env={"XDG_RUNTIME_DIR": "/nonexistent"})
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "cannot reach your user manager" in done.stderr
        assert not user.exists(env_file) and not user.exists(unit_file)
        assert user.run("punchgate", "status").returncode == 1

        # A provider (root, foreground) exposing an echo server, both on the container's loopback.
        box.exec("/opt/punchgate/bin/python", "-c", ECHO_SERVER, detach=True)
        box.exec("punchgate", "--identity", "/root/p.key", "--listen", "/ip4/127.0.0.1/tcp/4001", "--no-mdns",
                 "--expose", "echo=127.0.0.1:7777", "--control-socket", "/root/p/control.sock", detach=True)
        provider = wait_for("the provider", lambda: json.loads(box.exec(
            "punchgate", "status", "--json", "--control-socket", "/root/p/control.sock").stdout), timeout=30)
        boot = f"/ip4/127.0.0.1/tcp/4001/p2p/{provider['peer_id']}"

        # up: installed, enabled, running; a tunnel through the service's node echoes.
        done = user.run("punchgate", "up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--bootstrap", boot,
                        "--tunnel", f"{provider['peer_id']}:echo@127.0.0.1:2222")
        assert done.returncode == 0, done.stderr
        assert "installed and started (systemd --user)" in done.stdout
        config = parse_env_file(user.run("cat", env_file).stdout)
        assert config == {
            "PUNCHGATE_LISTEN": "/ip4/127.0.0.1/tcp/0",
            "PUNCHGATE_BOOTSTRAP": boot,
            "PUNCHGATE_TUNNEL": f"{provider['peer_id']}:echo@127.0.0.1:2222",
            "PUNCHGATE_IDENTITY": f"/home/{USER}/.local/share/punchgate/identity.key",
            "PUNCHGATE_NO_MDNS": "true",
        }
        assert "ExecStart=/opt/punchgate/bin/python" in user.run("cat", unit_file).stdout
        assert user.run("systemctl", "--user", "is-enabled", "punchgate.service").stdout.strip() == "enabled"
        first = wait_for("the service's node", lambda: user.status() if user.exists(
            f"/run/user/{uid}/punchgate/control.sock") else None, timeout=30)
        assert first["service"]["running"] and first["service"]["enabled"] == "enabled"
        assert first["service"]["pid"] == first["pid"]
        result = wait_for("an echo through the tunnel", lambda: echo_through(box, 2222)["ok"], timeout=30)
        assert result
        tunnel = user.status()["tunnels"][0]
        assert tunnel["bind"] == "127.0.0.1:2222" and tunnel["bytes_from_remote"] >= PAYLOAD
        table = user.run("punchgate", "status").stdout
        assert "active (running), enabled (systemd --user)" in table and "127.0.0.1:2222" in table

        # up again with other flags: configuration replaced, service restarted.
        done = user.run("punchgate", "up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--bootstrap", boot,
                        "--tunnel-by-name", "echo@127.0.0.1:2223")
        assert done.returncode == 0 and "updated and restarted" in done.stdout, done.stderr
        config = parse_env_file(user.run("cat", env_file).stdout)
        assert config["PUNCHGATE_TUNNEL_BY_NAME"] == "echo@127.0.0.1:2223" and "PUNCHGATE_TUNNEL" not in config
        second = wait_for("the restarted node", lambda: (lambda s: s if s["pid"] != first["pid"] else None)(
            user.status()), timeout=30)
        assert [t["bind"] for t in second["tunnels"]] == ["127.0.0.1:2223"]
        assert wait_for("an echo by name", lambda: echo_through(box, 2223)["ok"], timeout=45)
        assert not echo_through(box, 2222)["ok"]  # the old tunnel is gone

        # logs: the node's events from journald.
        done = user.run("punchgate", "logs", "-n", "1000")
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("punchgate starting") >= 2
        assert "client tunnel opened" in done.stdout and "service resolved" in done.stdout

        # Reboot: with linger on, the user manager and the service come back by themselves.
        box_pid_before = second["pid"]
        from punchgate.devtools.podman import podman

        podman("restart", "--time", "20", box.name, timeout=120)
        wait_for("systemd to boot again", lambda: box.exec("systemctl", "is-system-running", check=False)
                 .stdout.strip() in ("running", "degraded"), timeout=90)
        after = wait_for("the service after reboot", lambda: user.status(), timeout=60)
        assert after["service"]["running"] and after["uptime_s"] < 120
        assert after["tunnels"][0]["bind"] == "127.0.0.1:2223"
        assert after["pid"] != box_pid_before or after["uptime_s"] < second["uptime_s"]

        # down: stopped, disabled, both files removed, nothing answers.
        done = user.run("punchgate", "down")
        assert done.returncode == 0 and "stopped and removed" in done.stdout, done.stderr
        assert not user.exists(env_file) and not user.exists(unit_file)
        assert user.run("systemctl", "--user", "is-active", "punchgate.service").stdout.strip() in ("inactive", "unknown")
        assert not user.exists(f"/run/user/{uid}/punchgate/control.sock")
        done = user.run("punchgate", "status")
        assert done.returncode == 1 and "no punchgate node is running" in done.stderr
        done = user.run("punchgate", "down")
        assert done.returncode == 0 and "nothing to do" in done.stdout


# ---------------------------------------------------------------- fast: rendering, errors, macOS


def test_linux_unit_rendered_from_the_template(tmp_path):
    manager = SystemdUser(tmp_path / ".config", tmp_path / ".local" / "share")
    unit = manager.render()
    assert f"EnvironmentFile={tmp_path}/.config/punchgate/punchgate.env" in unit
    assert f"ExecStart={sys.executable} -m punchgate" in unit
    assert "WantedBy=default.target" in unit and "${env_file}" not in unit and "${exec_start}" not in unit


def test_bad_flag_or_no_user_manager_writes_nothing(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    done = punchgate_cli("up", "--tunnel", "nobody@x", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("punchgate: error: --tunnel 'nobody@x'")
    # This machine runs no systemd user manager (or none at all): exit 1, one line.
    done = punchgate_cli("up", "--no-mdns", env=env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert list(tmp_path.rglob("*")) == []
    done = punchgate_cli("logs", "-n", "x", env=env)
    assert done.returncode == 2


def test_unsupported_system_is_one_clear_line(tmp_path):
    from punchgate.service import ServiceError

    with pytest.raises(ServiceError, match="supports Linux .systemd. and macOS .launchd., not win32"):
        manager_for("win32")


@pytest.fixture
def recording_launchctl(tmp_path, monkeypatch):
    """A `launchctl` stand-in first on PATH: records each call, answers `print` like launchd."""
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "bin" / "launchctl"
    stub.parent.mkdir()
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "import os\n"
        "if sys.argv[1:2] == [os.environ.get('LAUNCHCTL_FAIL')]:\n"
        "    sys.exit('Bootstrap failed: 5: Input/output error')\n"
        "if sys.argv[1:2] == ['print']:\n"
        "    print('gui/501/com.punchgate.daemon = {\\n\\tstate = running\\n\\tpid = 4242\\n}')\n"
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_macos_plist_and_launchctl_calls(tmp_path, recording_launchctl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = manager_for("darwin")
    assert isinstance(manager, Launchd)
    home = tmp_path / "home"
    boot = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"
    message = up(["--bootstrap", boot, "--expose", "ssh=127.0.0.1:22", "--identity", "my key.key"], manager)
    assert "installed and started (launchd)" in message
    uid = os.getuid()
    assert recording_launchctl() == [
        ["bootout", f"gui/{uid}/com.punchgate.daemon"],
        ["enable", f"gui/{uid}/com.punchgate.daemon"],
        ["bootstrap", f"gui/{uid}", str(home / "Library/LaunchAgents/com.punchgate.daemon.plist")],
        ["kickstart", "-k", f"gui/{uid}/com.punchgate.daemon"],
    ]
    plist = plistlib.loads((home / "Library/LaunchAgents/com.punchgate.daemon.plist").read_bytes())
    log_file = str(home / "Library/Logs/punchgate/punchgate.log")
    assert plist["Label"] == "com.punchgate.daemon"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "punchgate"]
    assert plist["EnvironmentVariables"] == {
        "PUNCHGATE_IDENTITY": str(tmp_path / "my key.key"),  # made absolute; the space survives
        "PUNCHGATE_BOOTSTRAP": boot,
        "PUNCHGATE_EXPOSE": "ssh=127.0.0.1:22",
    }
    assert plist["StandardErrorPath"] == plist["StandardOutPath"] == log_file
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    env_file = home / "Library/Application Support/punchgate/punchgate.env"
    assert parse_env_file(env_file.read_text()) == plist["EnvironmentVariables"]
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    view = manager.view()
    assert (view["state"], view["running"], view["pid"]) == ("running", True, 4242)

    assert "updated and restarted" in up(["--expose", "web=127.0.0.1:8080"], manager)
    plist = plistlib.loads((home / "Library/LaunchAgents/com.punchgate.daemon.plist").read_bytes())
    assert plist["EnvironmentVariables"]["PUNCHGATE_EXPOSE"] == "web=127.0.0.1:8080"
    assert "PUNCHGATE_BOOTSTRAP" not in plist["EnvironmentVariables"]

    from punchgate.service import down

    calls_before = len(recording_launchctl())
    assert "stopped and removed (launchd)" in down(manager)
    assert recording_launchctl()[calls_before:] == [
        ["bootout", f"gui/{uid}/com.punchgate.daemon"],
        ["disable", f"gui/{uid}/com.punchgate.daemon"],
    ]
    assert not env_file.exists() and not (home / "Library/LaunchAgents/com.punchgate.daemon.plist").exists()


def test_macos_logs_tail_the_log_file(tmp_path):
    from punchgate.service import ServiceError, tail_file

    log = tmp_path / "punchgate.log"
    with pytest.raises(ServiceError, match="no log file"):
        tail_file(log, 10, follow=False)
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    shown: list[str] = []
    tail_file(log, 3, follow=False, out=shown.append)
    assert "".join(shown) == "line 97\nline 98\nline 99\n"


def test_env_file_round_trip_with_awkward_values(tmp_path):
    from punchgate.service import env_lines

    lines = env_lines(["--identity", 'we"ird\\ path/id.key', "--listen", "/ip4/0.0.0.0/tcp/4001",
                       "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1"], tmp_path, tmp_path / "default.key")
    values = parse_env_file("\n".join(lines))
    assert values["PUNCHGATE_IDENTITY"] == str(tmp_path / 'we"ird\\ path/id.key')
    assert values["PUNCHGATE_LISTEN"] == "/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1"
    # What the node reads back from it is what `up` was given.
    from punchgate.config import parse_config

    config = parse_config([], values)
    assert str(config.identity) == values["PUNCHGATE_IDENTITY"] and len(config.listen) == 2


def test_macos_failed_load_leaves_the_previous_installation(tmp_path, recording_launchctl, monkeypatch):
    from punchgate.service import ServiceError

    manager = manager_for("darwin")
    up(["--expose", "ssh=127.0.0.1:22"], manager)
    plist_before = manager.service_file.read_bytes()
    env_before = manager.env_file.read_text()
    monkeypatch.setenv("LAUNCHCTL_FAIL", "bootstrap")
    with pytest.raises(ServiceError, match="launchctl bootstrap .* failed: Bootstrap failed: 5"):
        up(["--expose", "web=127.0.0.1:8080"], manager)
    assert manager.service_file.read_bytes() == plist_before and manager.env_file.read_text() == env_before
    # A first installation that fails leaves nothing behind.
    manager.service_file.unlink()
    manager.env_file.unlink()
    with pytest.raises(ServiceError):
        up(["--expose", "web=127.0.0.1:8080"], manager)
    assert not manager.service_file.exists() and not manager.env_file.exists()
