"""Running the js-libp2p node of ``tests/js/node.mjs`` as a foreign peer, from tests and scripts.

``JsNode(*flags)`` starts ``node tests/js/node.mjs FLAGS`` (the flags are documented at the
top of that file and in ``tests/js/README.md``) and reads the JSON object it prints per
line on stdout as it comes::

    relay = JsNode("--dht", "--relay", "--autonat")
    relay.peer_id, relay.tcp_addr               # from its "started" event
    relay.wait_event("reservation", 10, peer=str(our_id))
    relay.stop()                                 # SIGTERM; its exit code

A node with ``--ping`` or ``--tunnel`` runs its actions and exits: ``wait_event("tunnel")``
then ``wait()``. ``wrapper`` is a prefix command that execs the rest, such as
``["ip", "netns", "exec", NAME]``: ``pid`` is then still the node process itself, the one
``stop`` and ``kill`` signal. Nothing is ever killed by name.

:func:`ensure_installed` runs ``npm ci`` in ``tests/js`` when ``node_modules`` is missing
or older than ``package-lock.json``; ``JsNode`` calls it first.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

JS_DIR = Path(__file__).resolve().parents[2] / "tests" / "js"
NODE_SCRIPT = JS_DIR / "node.mjs"
LOCKFILE = JS_DIR / "package-lock.json"
INSTALLED_MARK = JS_DIR / "node_modules" / ".package-lock.json"  # written by npm at the end of an install
MIN_NODE_MAJOR = 20
NPM_CI_TIMEOUT = 600


class JsNodeUnavailable(RuntimeError):
    """Node.js or npm is missing or too old, or ``npm ci`` failed."""


def _node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise JsNodeUnavailable(
            f"node not found on PATH: the js-libp2p peer (tests/js) needs Node.js {MIN_NODE_MAJOR} or later; install it"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < MIN_NODE_MAJOR:
        raise JsNodeUnavailable(
            f"node {version or '(unknown version)'} is too old: the js-libp2p peer (tests/js) needs Node.js"
            f" {MIN_NODE_MAJOR} or later"
        )
    return node


def _is_installed() -> bool:
    try:
        return INSTALLED_MARK.stat().st_mtime >= LOCKFILE.stat().st_mtime
    except FileNotFoundError:
        return False


def ensure_installed() -> str:
    """Install ``tests/js``'s packages (``npm ci``) unless they are in place; return the node binary.

    Concurrent callers (several test processes) wait for one another: the install holds a
    lock on ``package-lock.json``.
    """
    node = _node_binary()
    if _is_installed():
        return node
    npm = shutil.which("npm")
    if npm is None:
        raise JsNodeUnavailable(f"npm not found on PATH: it installs the js-libp2p peer's packages (npm ci in {JS_DIR})")
    with LOCKFILE.open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_installed():  # another process installed them while we waited
            return node
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR, capture_output=True, text=True, timeout=NPM_CI_TIMEOUT, stdin=subprocess.DEVNULL,
        )
    if result.returncode != 0:
        raise JsNodeUnavailable(f"npm ci in {JS_DIR} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return node


class JsNode:
    """One ``node tests/js/node.mjs`` process and the events it printed."""

    def __init__(self, *args: str, wrapper: list[str] | None = None, start_timeout: float = 30.0) -> None:
        node = ensure_installed()
        self.command = [*(wrapper or []), node, str(NODE_SCRIPT), *args]
        self.start_timeout = start_timeout
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=JS_DIR,
        )
        self.events: list[dict] = []  # every stdout line taken so far, parsed
        self.stderr: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False  # the end of stdout has been taken from the queue
        self._started: dict | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    @staticmethod
    def _parse(line: str) -> dict:
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": None, "raw": line}
        return event if isinstance(event, dict) else {"event": None, "raw": line}

    def _take(self, timeout: float) -> bool:
        """Take one line into ``events`` (waiting up to ``timeout``); False if none came or output ended."""
        if self._ended:
            return False
        try:
            line = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return False
        if line is None:
            self._ended = True
            return False
        self.events.append(self._parse(line))
        return True

    def output(self) -> str:
        """Everything printed so far (stdout events, then stderr), for failure messages."""
        while self._take(0):
            pass
        lines = [json.dumps(e) for e in self.events] + [f"stderr: {line}" for line in self.stderr]
        return "\n".join(lines)

    def wait_event(self, name: str, timeout: float = 30.0, nth: int = 1, **fields) -> dict:
        """The ``nth`` (1-based, from the start) event called ``name`` whose ``fields`` have
        these values, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        seen, index = 0, 0
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    seen += 1
                    if seen == nth:
                        return event
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):  # time is up, or the output ended
                break
        how = f"exited ({self._exit_code()})" if self._ended else f"nothing within {timeout} s"
        wanted = f"{name!r} #{nth}" + (f" with {fields}" if fields else "")
        raise AssertionError(f"js node: no {wanted} ({how}); output:\n{self.output()}")

    def _exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    @property
    def started(self) -> dict:
        """The "started" event (waited for once)."""
        if self._started is None:
            self._started = self.wait_event("started", self.start_timeout)
        return self._started

    @property
    def peer_id(self) -> str:
        return self.started["peer_id"]

    @property
    def addrs(self) -> list[str]:
        return self.started["addrs"]

    def addr(self, transport: str = "tcp") -> str:
        """Its first listen address (with /p2p/<id>) for ``transport``: "tcp" or "quic-v1"."""
        for addr in self.addrs:
            parts = addr.split("/")
            if transport in parts and "p2p-circuit" not in parts:
                return addr
        raise AssertionError(f"js node has no {transport} address: {self.addrs}")

    @property
    def tcp_addr(self) -> str:
        return self.addr("tcp")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit code, once it exits by itself (after its actions)."""
        code = self.proc.wait(timeout=timeout)
        while self._take(5):  # the events printed before exiting
            pass
        return code

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, and its exit code (0; -15 if Node.js had not yet run the script, which
        handles signals from its first line); killed if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> JsNode:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
