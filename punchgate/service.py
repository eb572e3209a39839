"""Service mode: ``punchgate up``, ``down``, ``logs`` and the service part of ``status``.

``up [node flags]`` checks the flags with the node's own parser, then writes the
configuration as ``PUNCHGATE_*`` lines to the env file, renders the per-user service from
the templates in ``deploy/`` and (re)starts it:

* Linux: ``~/.config/systemd/user/punchgate.service`` (``systemctl --user``; logs in journald);
* macOS: ``~/Library/LaunchAgents/com.punchgate.daemon.plist`` (``launchctl``; logs in
  ``~/Library/Logs/punchgate/punchgate.log``).

Every check (system, service manager, flags) runs before anything is written; files are
written to a temporary name and renamed, so a failure leaves the previous files whole.
``down`` stops and disables the service and removes both files.

The service runs ``<this Python> -m punchgate``: the interpreter of the installation that
ran ``up`` (a virtualenv keeps working). The node's identity defaults to the user's data
directory, its control socket to the default place, where ``punchgate status`` looks.
"""

from __future__ import annotations

import datetime
import os
import plistlib
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from punchgate.config import FLAGS, UsageError, _dest, build_arg_parser, parse_config

LABEL = "com.punchgate.daemon"
UNIT = "punchgate.service"
COMMAND_TIMEOUT = 30.0  # seconds for one systemctl/launchctl call


class ServiceError(Exception):
    """Service mode cannot run here or failed; ``str()`` is the one line for the user (exit 1)."""


# ---------------------------------------------------------------- configuration


def env_lines(argv: Sequence[str], cwd: Path, default_identity: Path) -> list[str]:
    """``PUNCHGATE_*=value`` lines for the node flags in ``argv`` (UsageError if any is bad).

    Only the flags are read, never the caller's environment: the service runs exactly
    what ``up`` was given. Relative paths are made absolute (the service's working
    directory is not the caller's); the identity defaults to ``default_identity``.
    """
    parse_config(argv, {})  # validates every value, with the node's own messages
    args = build_arg_parser().parse_args(list(argv))
    values: dict[str, str] = {}
    for flag in FLAGS:
        given = getattr(args, _dest(flag))
        if given is None:
            continue
        items = list(given) if flag.repeatable else [given]
        for item in items:
            if "," in item:
                raise UsageError(flag.name, item, "a comma cannot be kept in the service configuration", flag.example)
        if flag.name in ("--identity", "--control-socket"):
            items = [str(cwd / Path(items[0]).expanduser())]
        values[flag.env] = ",".join(items)
    values.setdefault("PUNCHGATE_IDENTITY", str(default_identity))
    if args.no_mdns:
        values["PUNCHGATE_NO_MDNS"] = "true"
    if args.no_port_mapping:
        values["PUNCHGATE_NO_PORT_MAPPING"] = "true"
    return [f"{key}={_quote_env(value)}" for key, value in values.items()]


def _quote_env(value: str) -> str:
    """A value as systemd's EnvironmentFile reads it back (quoted only when needed)."""
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./\[\]-]*", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_env_file(text: str) -> dict[str, str]:
    """The ``KEY=value`` pairs of an env file written by :func:`write_env_file`."""
    pairs = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[key] = value
    return pairs


def env_file_text(lines: list[str]) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        f"# punchgate service configuration, written by `punchgate up` ({stamp}).",
        "# `punchgate up [flags]` rewrites it and restarts the service; `punchgate down` removes it.",
    ]
    return "\n".join(header + lines) + "\n"


def _write_atomically(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _Files:
    """Writes the env file and the service file together; :meth:`restore` puts back what was
    there before (or removes them), so a failed ``up`` leaves the previous installation whole."""

    def __init__(self, files: list[tuple[Path, str | bytes, int]]) -> None:
        self.files = files
        self.before = {path: path.read_bytes() if path.exists() else None for path, _, _ in files}

    def write(self) -> None:
        try:
            for path, content, mode in self.files:
                _write_atomically(path, content, mode)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for path, _, mode in self.files:
            old = self.before[path]
            if old is None:
                path.unlink(missing_ok=True)
            else:
                _write_atomically(path, old, mode)


def template(*parts: str) -> str:
    return resources.files("punchgate").joinpath("deploy", *parts).read_text()


def python_command() -> list[str]:
    return [sys.executable, "-m", "punchgate"]


# ---------------------------------------------------------------- service managers


@dataclass
class Runner:
    """Runs the service manager's commands (bounded in time); swapped only by tests."""

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except FileNotFoundError:
            raise ServiceError(f"{argv[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise ServiceError(f"`{shlex.join(argv)}` did not answer within {COMMAND_TIMEOUT:.0f} s") from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(f"`{shlex.join(argv)}` failed: {detail[-1] if detail else f'exit {result.returncode}'}")
        return result


class ServiceManager:
    name = ""
    service_file: Path
    env_file: Path
    identity: Path  # the node's identity unless `up` is given --identity

    def check(self) -> None:
        """Raise ServiceError if this manager cannot be used here."""
        raise NotImplementedError

    def installed(self) -> bool:
        return self.service_file.exists()

    def install(self, lines: list[str]) -> None:
        raise NotImplementedError

    def remove(self) -> bool:
        raise NotImplementedError

    def view(self) -> dict[str, Any]:
        raise NotImplementedError

    def logs(self, follow: bool, lines: int) -> int:
        raise NotImplementedError


class SystemdUser(ServiceManager):
    name = "systemd --user"

    def __init__(self, config_home: Path, data_home: Path, runner: Runner | None = None) -> None:
        self.service_file = config_home / "systemd" / "user" / UNIT
        self.env_file = config_home / "punchgate" / "punchgate.env"
        self.identity = data_home / "punchgate" / "identity.key"
        self.runner = runner or Runner()

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.runner.run(["systemctl", "--user", *args], check=check)

    def check(self) -> None:
        if shutil.which("systemctl") is None:
            raise ServiceError("systemctl not found: service mode on Linux needs systemd (run `punchgate [flags]` in the foreground instead)")
        result = self.systemctl("show-environment", check=False)
        if result.returncode != 0:
            raise ServiceError(
                "`systemctl --user` cannot reach your user manager "
                f"({(result.stderr.strip().splitlines() or ['no answer'])[-1]}); log in with a user session "
                "or run `loginctl enable-linger $USER` (and set XDG_RUNTIME_DIR=/run/user/$(id -u))"
            )

    def render(self) -> str:
        exec_start = " ".join(_systemd_quote(part) for part in python_command())
        # safe_substitute: the template's comments mention $USER and ${...} literally.
        return string.Template(template("systemd", "punchgate-user.service")).safe_substitute(
            env_file=_systemd_quote(str(self.env_file)), exec_start=exec_start
        )

    def install(self, lines: list[str]) -> None:
        files = _Files([(self.env_file, env_file_text(lines), 0o600), (self.service_file, self.render(), 0o644)])
        files.write()
        try:
            self.systemctl("daemon-reload")
            self.systemctl("enable", UNIT)
        except ServiceError:
            files.restore()
            self.systemctl("daemon-reload", check=False)
            raise
        self.systemctl("restart", UNIT)

    def remove(self) -> bool:
        existed = self.service_file.exists() or self.env_file.exists()
        if self.service_file.exists():
            self.systemctl("disable", "--now", UNIT, check=False)
        self.service_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)
        self.systemctl("daemon-reload", check=False)
        self.systemctl("reset-failed", UNIT, check=False)
        return existed

    def view(self) -> dict[str, Any]:
        props = "ActiveState,SubState,UnitFileState,MainPID,ExecMainStartTimestamp,NRestarts,Result"
        result = self.systemctl("show", UNIT, f"--property={props}", check=False)
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        pid = int(values.get("MainPID") or 0)
        return {
            "manager": self.name,
            "file": str(self.service_file),
            "config": str(self.env_file),
            "state": f"{values.get('ActiveState', '?')} ({values.get('SubState', '?')})",
            "running": values.get("ActiveState") == "active",
            "enabled": values.get("UnitFileState", "?"),
            "pid": pid or None,
            "since": values.get("ExecMainStartTimestamp") or None,
            "restarts": int(values["NRestarts"]) if values.get("NRestarts", "").isdigit() else None,
        }

    def logs(self, follow: bool, lines: int) -> int:
        if shutil.which("journalctl") is None:
            raise ServiceError("journalctl not found: the service's log is in journald")
        argv = ["journalctl", "--user", "--unit", UNIT, "--output", "cat", "--lines", str(lines), "--no-pager"]
        if follow:
            argv.append("--follow")
        try:
            return subprocess.run(argv).returncode
        except KeyboardInterrupt:
            return 0


def _systemd_quote(word: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Launchd(ServiceManager):
    name = "launchd"

    def __init__(self, home: Path, config_dir: Path, data_dir: Path, log_dir: Path, uid: int, runner: Runner | None = None) -> None:
        self.service_file = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.env_file = config_dir / "punchgate.env"
        self.identity = data_dir / "identity.key"
        self.log_file = log_dir / "punchgate.log"
        self.domain = f"gui/{uid}"
        self.runner = runner or Runner()

    def launchctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.runner.run(["launchctl", *args], check=check)

    def check(self) -> None:
        if shutil.which("launchctl") is None:
            raise ServiceError("launchctl not found: service mode on macOS needs launchd")

    def render(self, lines: list[str]) -> bytes:
        plist = plistlib.loads(template("launchd", f"{LABEL}.plist").encode())
        fill = {"python": python_command()[0], "log_file": str(self.log_file)}

        def substitute(value: Any) -> Any:
            if isinstance(value, str):
                return string.Template(value).substitute(fill)
            if isinstance(value, list):
                return [substitute(v) for v in value]
            if isinstance(value, dict):
                return {k: substitute(v) for k, v in value.items()}
            return value

        plist = substitute(plist)
        plist["EnvironmentVariables"] = parse_env_file("\n".join(lines))
        return plistlib.dumps(plist)

    def install(self, lines: list[str]) -> None:
        files = _Files([(self.env_file, env_file_text(lines), 0o600), (self.service_file, self.render(lines), 0o644)])
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        files.write()
        target = f"{self.domain}/{LABEL}"
        self.launchctl("bootout", target, check=False)  # not loaded yet is fine
        try:
            self.launchctl("enable", target)
            self.launchctl("bootstrap", self.domain, str(self.service_file))
        except ServiceError:
            files.restore()
            if files.before[self.service_file] is not None:  # the previous agent runs again
                self.launchctl("bootstrap", self.domain, str(self.service_file), check=False)
            raise
        self.launchctl("kickstart", "-k", target)

    def remove(self) -> bool:
        existed = self.service_file.exists() or self.env_file.exists()
        target = f"{self.domain}/{LABEL}"
        self.launchctl("bootout", target, check=False)
        self.launchctl("disable", target, check=False)
        self.service_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)
        return existed

    def view(self) -> dict[str, Any]:
        result = self.launchctl("print", f"{self.domain}/{LABEL}", check=False)
        state = re.search(r"^\s*state = (.+)$", result.stdout, re.M)
        pid = re.search(r"^\s*pid = (\d+)$", result.stdout, re.M)
        return {
            "manager": self.name,
            "file": str(self.service_file),
            "config": str(self.env_file),
            "state": state.group(1).strip() if state else ("not loaded" if result.returncode else "?"),
            "running": bool(state and state.group(1).strip() == "running"),
            "enabled": "loaded" if result.returncode == 0 else "not loaded",
            "pid": int(pid.group(1)) if pid else None,
            "since": None,
            "log": str(self.log_file),
        }

    def logs(self, follow: bool, lines: int) -> int:
        return tail_file(self.log_file, lines, follow)


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def tail_file(path: Path, lines: int, follow: bool, out: Callable[[str], None] | None = None, poll: float = 0.5) -> int:
    """Print the last ``lines`` lines of ``path``; with ``follow``, keep printing new ones (Ctrl-C ends)."""
    if out is None:
        out = _print
    if not path.exists():
        raise ServiceError(f"no log file at {path} (has the service run? `punchgate up` starts it)")
    with path.open("rb") as file:
        tail = file.read().splitlines(keepends=True)[-lines:] if lines > 0 else []
        out(b"".join(tail).decode(errors="replace"))
        try:
            while follow:
                data = file.read()
                if data:
                    out(data.decode(errors="replace"))
                else:
                    time.sleep(poll)
        except KeyboardInterrupt:
            pass
    return 0


def manager_for(platform: str | None = None, runner: Runner | None = None) -> ServiceManager:
    """The per-user service manager of this system (ServiceError on any other system).
    Paths come from platformdirs (which reads HOME and the XDG_* variables)."""
    from platformdirs.macos import MacOS
    from platformdirs.unix import Unix

    platform = sys.platform if platform is None else platform
    if platform.startswith("linux"):
        return SystemdUser(Path(Unix().user_config_dir), Path(Unix().user_data_dir), runner)
    if platform == "darwin":
        mac = MacOS("punchgate")
        home = Path(os.path.expanduser("~"))
        return Launchd(home, Path(mac.user_config_dir), Path(mac.user_data_dir), Path(mac.user_log_dir), os.getuid(), runner)
    raise ServiceError(
        f"service mode supports Linux (systemd) and macOS (launchd), not {platform};"
        " run `punchgate [flags]` in the foreground"
    )


# ---------------------------------------------------------------- commands


def up(argv: Sequence[str], manager: ServiceManager, cwd: Path | None = None) -> str:
    """Install or update the service and (re)start it; returns what to tell the user."""
    lines = env_lines(argv, cwd or Path.cwd(), manager.identity)  # UsageError before any check
    manager.check()
    updated = manager.installed()
    manager.install(lines)
    verb = "updated and restarted" if updated else "installed and started"
    return f"punchgate service {verb} ({manager.name}); configuration in {manager.env_file}"


def down(manager: ServiceManager) -> str:
    manager.check()
    if manager.remove():
        return f"punchgate service stopped and removed ({manager.name})"
    return "no punchgate service was installed; nothing to do"
