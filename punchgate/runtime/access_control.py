"""The allowlist in force: ``--allow`` entries plus the ``--allow-file``, kept current.

The decisions are pure (``punchgate/access.py``); this module reads the file, builds the
:class:`~punchgate.access.AccessPolicy`, logs what it means at start, and re-reads the
file on SIGHUP and when it changes (a check of its inode, size and modification time
every second, the read itself in a worker thread so a slow disk never stalls the node).
A file that fails to parse or read keeps the previous list in force (logged as a
warning); each change is logged per service with the peers added and removed, and
the listeners in :attr:`AccessControl.subscribers` are told, so the tunnel service
can close the tunnels of peers no longer allowed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection
from pathlib import Path

import trio

from punchgate.access import AccessPolicy, AllowError, changes, merge, parse_allow_file
from punchgate.logs import get_logger

log = get_logger("punchgate.access")
POLL_INTERVAL = 1.0


class AllowFileError(Exception):
    """The allow file cannot be used at start; ``str()`` is one line."""


Stamp = tuple[int, int, int, int]  # device, inode, size, mtime in ns


def _stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_allow_file(path: Path) -> tuple[dict[str, frozenset[str]], Stamp | None]:
    """The file's rules and the stamp they were read at; :class:`AllowFileError` if unusable."""
    stamp = _stamp(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllowFileError(f"allow file {path} does not exist") from None
    except UnicodeDecodeError:
        raise AllowFileError(f"allow file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise AllowFileError(f"cannot read allow file {path}: {exc.strerror}") from None
    try:
        return parse_allow_file(text), stamp
    except AllowError as exc:
        raise AllowFileError(f"allow file {path}: {exc}") from None


class AccessControl:
    def __init__(
        self,
        allow: Collection[tuple[str, frozenset[str]]],
        allow_file: Path | None,
        exposed: Collection[str],
    ) -> None:
        """Reads the allow file now: raises :class:`AllowFileError` if it is unusable."""
        self.flag_rules = merge(*({service: peers} for service, peers in allow))
        self.path = allow_file
        self.exposed = tuple(exposed)
        self.enforcing = bool(allow) or allow_file is not None
        self.file_rules: dict[str, frozenset[str]] = {}
        self._stamp: Stamp | None = None
        if allow_file is not None:
            self.file_rules, self._stamp = read_allow_file(allow_file)
        self.policy = self._build()
        self.subscribers: list[Callable[[AccessPolicy], None]] = []
        self.reloads = 0  # successful reloads that changed the policy (tests wait on it)
        self.reload_failures = 0

    def _build(self) -> AccessPolicy:
        if not self.enforcing:
            return AccessPolicy.open()
        return AccessPolicy.enforce(self.flag_rules, self.file_rules)

    def log_summary(self) -> None:
        """At start: the policy, and a warning for every service open to every peer."""
        policy = self.policy
        for service in policy.open_to_all(self.exposed):
            log.warning(
                "service open to every peer",
                service=service,
                fix=f"--allow {service}=PEER_ID (or a line '{service} PEER_ID' in an --allow-file)"
                if not policy.enforcing
                else "remove '*' from its list",
            )
        for service in policy.closed_to_all(self.exposed):
            log.warning("service closed to every peer", service=service, reason="no peer is allowed to open it")
        if policy.enforcing:
            log.info(
                "access control",
                allowed={s: sorted(policy.rules.get(s, ())) for s in self.exposed},
                allow_file=str(self.path) if self.path else None,
            )
            for service in policy.unexposed(self.exposed):
                log.info("allow entry for a service not exposed here", service=service)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the allow file (SIGHUP, or a change seen by polling) until cancelled."""
        if self.path is None:
            task_status.started()
            return
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        await self.reload("SIGHUP")

                nursery.start_soon(on_signal)
                while True:
                    await trio.sleep(POLL_INTERVAL)
                    stamp = await trio.to_thread.run_sync(_stamp, self.path)
                    if stamp != self._stamp:
                        await self.reload("file changed")

    async def reload(self, why: str) -> bool:
        """Re-read the allow file; True if a new list is in force."""
        assert self.path is not None
        try:
            rules, stamp = await trio.to_thread.run_sync(read_allow_file, self.path)
        except AllowFileError as exc:
            self._stamp = _stamp(self.path)  # do not retry the same broken file every second
            self.reload_failures += 1
            log.warning("allow file not reloaded", trigger=why, reason=str(exc), kept="the previous list")
            return False
        self._stamp = stamp
        old, self.file_rules = self.policy, rules
        self.policy = self._build()
        diff = changes(old, self.policy)
        if not diff:
            log.info("allow file reloaded", trigger=why, changes=0)
            return False
        self.reloads += 1
        log.info("allow file reloaded", trigger=why, changes=len(diff))
        for change in diff:
            log.info("allow list changed", service=change.service, added=list(change.added), removed=list(change.removed))
        for service in self.policy.open_to_all(self.exposed):
            if service not in old.open_to_all(self.exposed):
                log.warning("service open to every peer", service=service, fix="remove '*' from its list")
        for subscriber in self.subscribers:
            subscriber(self.policy)
        return True
