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

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("PUNCHGATE_LOG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "punchgate", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._queue), daemon=True).start()
        threading.Thread(target=self._collect_stdout, daemon=True).start()

    @staticmethod
    def _pump(pipe, q) -> None:
        for line in pipe:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _collect_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """The first logged event (seen before or arriving within ``timeout``) matching ``predicate``."""
        for line in self.lines:
            event = json.loads(line)
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"process exited ({self.proc.poll()}) first; log:\n" + "\n".join(self.lines))
            self.lines.append(line)
            event = json.loads(line)
            if predicate(event):
                return event
        raise AssertionError("no matching log event in time; log:\n" + "\n".join(self.lines))

    def wait_event(self, name: str, timeout: float = 30.0, **fields) -> dict:
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()), timeout
        )

    def drain(self) -> None:
        """Collect the remaining lines after the process has exited."""
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)

    def tcp_address(self) -> str:
        event = self.wait_for(lambda e: e.get("event") == "listening on" and "/tcp/" in e["address"])
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
