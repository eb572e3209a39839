"""Running real ``punchgate`` processes, reading their JSON log lines as they come."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


class PunchgateProcess:
    """A punchgate process with ``--log-format json``; every stderr line is kept."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, wrapper: list[str] | None = None
    ) -> None:
        """``wrapper`` is a prefix command that must exec the rest, keeping the process id:
        ``["ip", "netns", "exec", "lab-hosta"]`` runs the node inside that network namespace,
        and ``self.proc.pid`` is still the punchgate process itself."""
        full_env = {k: v for k, v in os.environ.items() if k != "PUNCHGATE_LOG"}  # only what we ask for
        full_env.update(env or {})
        self.command = [*(wrapper or []), sys.executable, "-m", "punchgate", "--log-format", "json", *args]
        self.started_at = time.time()  # wall clock, comparable with the events' "timestamp"
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False  # the end of stderr (None) has been taken from the queue
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._queue), daemon=True).start()
        threading.Thread(target=self._collect_stdout, daemon=True).start()

    @staticmethod
    def _pump(pipe, q) -> None:
        for line in pipe:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _collect_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def _parse(line: str) -> dict:
        """One log line as an event; a line that is not a JSON object (e.g. an error from a
        wrapper command before it could exec) becomes ``{"event": None, "raw": line}``."""
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": None, "raw": line}
        return event if isinstance(event, dict) else {"event": None, "raw": line}

    def events(self) -> list[dict]:
        return [self._parse(line) for line in self.lines]

    def log_text(self, last: int | None = None) -> str:
        """The stderr lines received so far (taking what is already queued), for messages."""
        while not self._ended and (line := self._next_line(0)) is not None:
            self.lines.append(line)
        lines = self.lines if last is None else self.lines[-last:]
        return "\n".join(lines)

    def _next_line(self, timeout: float) -> str | None:
        """The next stderr line, or None once stderr has ended or nothing came within ``timeout``."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            self._ended = True
        return line

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """The first logged event (seen before or arriving within ``timeout``) matching ``predicate``."""
        for seen in self.lines:
            event = self._parse(seen)
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self._next_line(left)
            if line is None:
                if self._ended:
                    raise AssertionError(
                        f"process exited ({self.proc.poll()}) first; log:\n" + "\n".join(self.lines)
                    )
                break
            self.lines.append(line)
            event = self._parse(line)
            if predicate(event):
                return event
        raise AssertionError("no matching log event in time; log:\n" + "\n".join(self.lines))

    @staticmethod
    def _is(event: dict, name: str, fields: dict) -> bool:
        return event.get("event") == name and all(event.get(k) == v for k, v in fields.items())

    def wait_event(self, name: str, timeout: float = 30.0, nth: int = 1, **fields) -> dict:
        """The ``nth`` (1-based, counted from the start of the log) event called ``name``
        whose ``fields`` have these values, waiting up to ``timeout`` for it."""
        seen = 0

        def match(event: dict) -> bool:
            nonlocal seen
            if self._is(event, name, fields):
                seen += 1
                return seen == nth
            return False

        return self.wait_for(match, timeout)

    def count_events(self, name: str, **fields) -> int:
        """How many events called ``name`` (with ``fields``) have been logged so far."""
        self.log_text()  # take what has already arrived
        return sum(1 for event in self.events() if self._is(event, name, fields))

    def drain(self) -> None:
        """Collect the remaining lines after the process has exited."""
        deadline = time.monotonic() + 10
        while not self._ended:
            left = deadline - time.monotonic()
            if left <= 0:
                raise queue.Empty  # as before: stderr did not end within 10 s
            line = self._next_line(left)
            if line is not None:
                self.lines.append(line)

    def tcp_address(self) -> str:
        return self.address("tcp")

    def address(self, transport: str) -> str:
        """Its first listen address (with /p2p/<id>) of ``transport``: "tcp" or "quic"."""
        part = "/tcp/" if transport == "tcp" else "/quic-v1/"
        event = self.wait_for(lambda e: e.get("event") == "listening on" and part in e["address"] + "/")
        return event["address"]

    def terminate_and_wait(self, timeout: float) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def identity_path(tmp_path: Path, name: str) -> str:
    return str(tmp_path / f"{name}.key")
