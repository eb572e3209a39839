"""Podman for the container tests: images built once per run, containers with unique
names that are always removed.

* :func:`podman_problem` says why Podman cannot run here (None if it can). Tests skip
  with that reason, except under CI (``CI`` set), where Podman must work: they fail.
* :func:`build_images` runs ``scripts/build_images.sh`` once per process (offline,
  idempotent) and returns the punchgate images it built under tags of this process
  (``localhost/punchgate:test-<hex>``), removed when the process exits. The base images
  (``localhost/punchgate-base:bookworm``, ``-systemd:bookworm``) are the script's cache
  and stay, so that the next run skips debootstrap.
* :class:`Container` starts one container under a unique name and removes it (``rm -f``)
  when the ``with`` block ends, whatever happened. Nothing is ever removed by pattern.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build_images.sh"
BUILD_TIMEOUT = 1200  # from scratch: ~2 min of debootstrap, wheels, two image builds

T = TypeVar("T")


def unique_name(role: str) -> str:
    return f"pgtest-{role}-{secrets.token_hex(4)}"


def podman(*args: str, timeout: float = 60, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


@functools.lru_cache(maxsize=1)
def podman_problem() -> str | None:
    if os.geteuid() != 0:
        return "the container tests run as root (debootstrap, podman networks)"
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/test.sh installs it as root)"
    try:
        podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"podman does not work here: {exc}"
    return None


def skip_or_fail_without_podman() -> None:
    import pytest

    problem = podman_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the container tests, but {problem}")
    pytest.skip(problem)


class Images(NamedTuple):
    punchgate: str  # the root Containerfile on the base image
    systemd: str  # the same on the systemd base image
    seconds: float  # how long the build took


@functools.lru_cache(maxsize=1)
def build_images() -> Images:
    """Build the images once per process, under tags removed when the process exits."""
    suffix = secrets.token_hex(4)
    images = (f"localhost/punchgate:test-{suffix}", f"localhost/punchgate-systemd:test-{suffix}")
    atexit.register(_remove_images, images)
    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD_SCRIPT), "--tag", images[0], "--systemd-tag", images[1]],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build_images.sh failed: {result.stderr.strip()[-3000:]}")
    return Images(*images, time.monotonic() - started)


def _remove_images(tags: tuple[str, ...]) -> None:
    for tag in tags:
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, timeout=120, check=False)


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something true; bounded by ``timeout`` (AssertionError)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:  # the thing polled is not there yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Container:
    """``podman run -d`` under a unique name; removed on exit whatever happened."""

    def __init__(self, image: str, role: str, args: Sequence[str] = (), command: Sequence[str] = ()) -> None:
        self.name = unique_name(role)
        self.image = image
        self.args = list(args)
        self.command = list(command)

    def __enter__(self) -> Container:
        try:
            podman("run", "--detach", "--name", self.name, *self.args, self.image, *self.command, timeout=120)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        podman("rm", "--force", "--volumes", "--time", "5", self.name, timeout=120, check=False)

    def exec(self, *command: str, user: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 60, check: bool = True, input: str | None = None,
             detach: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["exec"]
        if detach:
            args.append("--detach")
        if input is not None:
            args.append("--interactive")
        if user is not None:
            args += ["--user", user]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        return podman(*args, self.name, *command, timeout=timeout, check=check, input=input)

    def logs(self) -> str:
        result = podman("logs", self.name, timeout=60, check=False)
        return result.stdout + result.stderr
